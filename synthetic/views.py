"""The images: what one camera sees of a route's scene, with its viewpoint, occluders and light.

``render_shot`` makes the (H, W) image of one planned shot:

* composition (``compose_view``): sky, road and lane dashes (``_background``), then the scene's
  strips cut at the camera's arc position, each by its own parallax; at night the night strips
  and the lamps' glow;
* viewpoint: a database image is the centred crop; a query samples a perspective quad of the
  canvas (``view_quad``: zoom from its lateral offset, pan, tilt, roll, and an oblique factor for
  a camera turned towards the direction of travel), warped by ``perspective_coefficients``;
* occluders drawn over the view: cars, pedestrians and blobs (queries get more of them);
* light and sensor (``_finish``): contrast, brightness, colour cast, gamma, Gaussian noise taken
  from a per-split noise bank, and blur.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from .camera import (
    CAMERA_DISTANCE_M,
    OBLIQUE_PER_DEGREE,
    QUERY_PAN,
    QUERY_ROLL_DEG,
    QUERY_TILT,
    QUERY_ZOOM_RANGE,
    Geometry,
)
from .plan import Shot
from .scene import RouteScene, rect, shade


def perspective_coefficients(size: tuple[int, int], quad: np.ndarray) -> tuple:
    """PIL PERSPECTIVE data mapping the output rectangle ``size`` = (W, H) onto ``quad`` (4, 2).

    ``quad`` lists the source points of the output corners (0,0), (W,0), (W,H), (0,H).
    """
    w, h = size
    dst = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    a, rhs = [], []
    for (x, y), (u, v) in zip(dst, np.asarray(quad, dtype=np.float64)):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return tuple(float(c) for c in np.linalg.solve(np.array(a), np.array(rhs)))


def view_quad(
    g: Geometry, *, zoom: float, pan_px: float, tilt_px: float, roll_deg: float, oblique: float
) -> np.ndarray:
    """Source quad (4, 2) in canvas pixels of a view: zoom > 1 magnifies; ``oblique`` in [-0.4, 0.4]
    makes one side of the facade nearer (a camera turned towards the direction of travel)."""
    hc, wc = g.canvas
    w, h = g.width, g.height
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]], dtype=np.float64)
    corners /= zoom
    if oblique:
        side = np.sign(corners[:, 0])  # -1 left, +1 right
        corners[:, 1] *= 1.0 + oblique * side
        corners[:, 0] *= 1.0 + abs(oblique)
    t = math.radians(roll_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    corners = corners @ rot.T
    return corners + np.array([wc / 2 + pan_px, hc / 2 + tilt_px])


def _background(
    g: Geometry, s: float, rng: np.random.Generator, night: bool, box: tuple[int, int, int, int]
) -> np.ndarray:
    """Sky gradient, sidewalk, kerb, asphalt and lane dashes of the canvas region ``box`` = (x0, y0,
    x1, y1): (y1 - y0, x1 - x0, 3) uint8."""
    hc, wc = g.canvas
    bx0, by0, bx1, by1 = box
    if night:
        top, bottom = np.array([5, 7, 20]), np.array([30, 32, 55]) + rng.integers(0, 15, size=3)
    else:
        kind = int(rng.integers(3))
        if kind == 0:  # clear
            top, bottom = np.array([70, 125, 205]), np.array([175, 205, 235])
        elif kind == 1:  # overcast
            top, bottom = np.array([150, 155, 165]), np.array([205, 205, 210])
        else:  # warm evening
            top, bottom = np.array([100, 120, 180]), np.array([235, 190, 150])
        top = top + rng.integers(-15, 15, size=3)
        bottom = bottom + rng.integers(-15, 15, size=3)
    t = np.linspace(0.0, 1.0, hc)[:, None]
    rows = top[None, :] * (1 - t) + bottom[None, :] * t  # (Hc, 3)
    k = 0.25 if night else 1.0
    y0 = g.y_base
    kerb = int(y0 + 0.06 * g.height)
    rows[y0:kerb] = np.array([160, 158, 150]) * k
    rows[kerb : kerb + 2] = 110 * k
    rows[kerb + 2 :] = rng.uniform(70, 95) * k
    lane_y = int(y0 + 0.2 * g.height)
    rows = np.clip(np.rint(rows), 0, 255).astype(np.uint8)
    out = np.repeat(rows[by0:by1, None, :], bx1 - bx0, axis=1)
    if lane_y + 3 <= hc:
        # Dashes 3 m long every 6 m; the road is nearer than the facade, so it moves faster.
        x_m = (np.arange(bx0, bx1) - wc / 2) / g.ppm + s * 1.6
        dash = np.mod(x_m, 6.0) < 3.0
        lo, hi = max(lane_y, by0) - by0, min(lane_y + 3, by1) - by0
        if hi > lo:
            out[lo:hi, dash] = np.array([220, 220, 200]) * (0.4 if night else 1.0)
    return out


def compose_view(
    scene: RouteScene,
    g: Geometry,
    s: float,
    *,
    night: bool,
    rng: np.random.Generator,
    box: Optional[tuple[int, int, int, int]] = None,
) -> Image.Image:
    """RGB image of the canvas region ``box`` = (x0, y0, x1, y1) (default: the whole (Hc, Wc) canvas)
    seen from arc length ``s``, before any viewpoint change."""
    hc, wc = g.canvas
    x0, y0, x1, y1 = box if box is not None else (0, 0, wc, hc)
    image = Image.fromarray(_background(g, s, rng, night, (x0, y0, x1, y1)), "RGB").convert("RGBA")
    for layer in scene.layers:
        left = int(round((s * layer.parallax + g.margin_m) * g.ppm - wc / 2))
        strip = layer.night_strip() if night else layer.day
        image.alpha_composite(strip.crop((left + x0, y0, left + x1, y1)))
    image = image.convert("RGB")
    if night:
        left = int(round((s * scene.layers[-1].parallax + g.margin_m) * g.ppm - wc / 2))
        image = ImageChops.add(image, scene.glow.crop((left + x0, y0, left + x1, y1)))
    return image


def _draw_car(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, night: bool) -> None:
    cw = w * rng.uniform(0.25, 0.55)
    ch = cw * rng.uniform(0.3, 0.42)
    x0 = rng.uniform(-0.3 * cw, w - 0.7 * cw)
    y1 = h * rng.uniform(0.9, 1.08)
    y0 = y1 - ch
    body = tuple(int(v) for v in rng.integers(10, 240, size=3))
    if night:
        body = shade(body, 0.2)
    rect(draw.rounded_rectangle, [x0, y0 + ch * 0.35, x0 + cw, y1 - ch * 0.12], radius=ch * 0.15, fill=body)
    rect(draw.rounded_rectangle, [x0 + cw * 0.2, y0, x0 + cw * 0.78, y0 + ch * 0.45], radius=ch * 0.12, fill=body)
    glass = (25, 30, 40) if night else (90, 120, 150)
    rect(draw.rectangle, [x0 + cw * 0.25, y0 + ch * 0.06, x0 + cw * 0.48, y0 + ch * 0.38], fill=glass)
    rect(draw.rectangle, [x0 + cw * 0.51, y0 + ch * 0.06, x0 + cw * 0.73, y0 + ch * 0.38], fill=glass)
    r = ch * 0.2
    for wx in (x0 + cw * 0.2, x0 + cw * 0.8):
        rect(draw.ellipse, [wx - r, y1 - 2 * r, wx + r, y1], fill=(15, 15, 15))
    if night:
        rect(draw.ellipse, [x0 + cw - 6, y0 + ch * 0.45, x0 + cw, y0 + ch * 0.6], fill=(255, 245, 200))
        rect(draw.ellipse, [x0, y0 + ch * 0.45, x0 + 5, y0 + ch * 0.6], fill=(220, 30, 30))


def _draw_pedestrian(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, night: bool) -> None:
    ph = h * rng.uniform(0.25, 0.45)
    x = rng.uniform(0, w)
    foot = h * rng.uniform(0.8, 1.0)
    k = 0.2 if night else 1.0
    clothes = shade(tuple(int(v) for v in rng.integers(10, 230, size=3)), k)
    skin = shade((int(rng.integers(90, 230)), int(rng.integers(70, 190)), int(rng.integers(50, 160))), k)
    head = ph * 0.13
    rect(draw.ellipse, [x - head / 2, foot - ph, x + head / 2, foot - ph + head], fill=skin)
    rect(
        draw.rounded_rectangle,
        [x - ph * 0.13, foot - ph + head, x + ph * 0.13, foot - ph * 0.45],
        radius=3,
        fill=clothes,
    )
    legs = shade(clothes, 0.6)
    draw.line([x - ph * 0.06, foot - ph * 0.45, x - ph * 0.08, foot], fill=legs, width=max(2, int(ph * 0.07)))
    draw.line([x + ph * 0.06, foot - ph * 0.45, x + ph * 0.09, foot], fill=legs, width=max(2, int(ph * 0.07)))


def _draw_blob(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, night: bool) -> None:
    r = min(w, h) * rng.uniform(0.08, 0.2)
    cx, cy = rng.uniform(0, w), rng.uniform(0.3 * h, h)
    col = shade(tuple(int(v) for v in rng.integers(0, 255, size=3)), 0.2 if night else 1.0)
    rect(draw.ellipse, [cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r], fill=col)


def make_noise_bank(rng: np.random.Generator, image_size: tuple[int, int]) -> np.ndarray:
    """Unit Gaussian noise (2H, 2W, 3) float32 from which every image of a split takes a window."""
    h, w = image_size
    return rng.standard_normal(size=(2 * h, 2 * w, 3), dtype=np.float32)


def _finish(
    image: Image.Image,
    rng: np.random.Generator,
    *,
    brightness: float,
    contrast: float,
    gains: np.ndarray,
    gamma: float,
    noise: float,
    blur: float,
    noise_bank: np.ndarray,
) -> Image.Image:
    """Light and sensor: contrast about the image mean, brightness, per-channel gains and gamma (as
    one lookup table per channel), then Gaussian noise of std ``noise`` and an optional blur."""
    mean = float(np.asarray(image.convert("L"), dtype=np.float32).mean())
    v = np.arange(256, dtype=np.float64)
    lut = []
    for gain in gains:
        y = np.clip(((v - mean) * contrast + mean) * brightness * gain, 0, 255)
        lut.append(np.rint(255.0 * (y / 255.0) ** gamma))
    image = image.point(np.concatenate(lut).astype(np.int64).tolist())
    if noise > 0:
        # A random window of a shared bank of unit Gaussian noise: drawing fresh normals for every
        # pixel of every image was the single largest cost of the generator.
        x = np.asarray(image, dtype=np.float32)
        h, w = x.shape[:2]
        if noise_bank.shape[0] < h or noise_bank.shape[1] < w:
            raise ValueError(f"internal error: noise bank {noise_bank.shape} smaller than the image {x.shape}")
        oy = int(rng.integers(noise_bank.shape[0] - h + 1))
        ox = int(rng.integers(noise_bank.shape[1] - w + 1))
        x += noise * noise_bank[oy : oy + h, ox : ox + w]
        np.rint(x, out=x)
        np.clip(x, 0, 255, out=x)
        image = Image.fromarray(x.astype(np.uint8), "RGB")
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius=blur))
    return image


def render_shot(
    scene: RouteScene, g: Geometry, shot: Shot, rng: np.random.Generator, noise_bank: np.ndarray
) -> Image.Image:
    """The (H, W) RGB image of one database or query shot."""
    w, h = g.width, g.height
    night = shot.night
    if shot.kind == "database":
        image = compose_view(scene, g, shot.s, night=night, rng=rng, box=(g.mx, g.my, g.mx + w, g.my + h))
        draw = ImageDraw.Draw(image)
        if rng.random() < 0.25:
            _draw_car(draw, rng, w, h, False)
        if rng.random() < 0.2:
            _draw_pedestrian(draw, rng, w, h, False)
        return _finish(
            image,
            rng,
            brightness=rng.uniform(0.92, 1.08),
            contrast=rng.uniform(0.95, 1.05),
            gains=rng.uniform(0.97, 1.03, size=3),
            gamma=1.0,
            noise=1.5,
            blur=0.0,
            noise_bank=noise_bank,
        )
    zoom = CAMERA_DISTANCE_M / (CAMERA_DISTANCE_M - shot.lateral) * rng.uniform(0.92, 1.1)
    zoom = float(np.clip(zoom, *QUERY_ZOOM_RANGE))
    # Turned towards the travel direction, the camera sees the facade ahead (image left) farther away.
    oblique = -shot.yaw * OBLIQUE_PER_DEGREE
    quad = view_quad(
        g,
        zoom=zoom,
        pan_px=rng.uniform(-QUERY_PAN, QUERY_PAN) * w,
        tilt_px=rng.uniform(-QUERY_TILT, QUERY_TILT) * h,
        roll_deg=rng.uniform(-QUERY_ROLL_DEG, QUERY_ROLL_DEG),
        oblique=oblique,
    )
    source = compose_view(scene, g, shot.s, night=night, rng=rng)
    image = source.transform(
        (w, h), Image.Transform.PERSPECTIVE, perspective_coefficients((w, h), quad), resample=Image.Resampling.BILINEAR
    )
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.poisson(0.9))):
        _draw_car(draw, rng, w, h, night)
    for _ in range(int(rng.poisson(1.0))):
        _draw_pedestrian(draw, rng, w, h, night)
    if rng.random() < 0.15:
        _draw_blob(draw, rng, w, h, night)
    if night:
        cast = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.15, 0.15, size=3)
        return _finish(
            image,
            rng,
            brightness=rng.uniform(0.8, 1.3),
            contrast=rng.uniform(0.8, 1.2),
            gains=cast,
            gamma=rng.uniform(0.85, 1.15),
            noise=rng.uniform(5.0, 12.0),
            blur=rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 0.0,
            noise_bank=noise_bank,
        )
    return _finish(
        image,
        rng,
        brightness=rng.uniform(0.6, 1.45),
        contrast=rng.uniform(0.7, 1.3),
        gains=rng.uniform(0.85, 1.15, size=3),
        gamma=rng.uniform(0.8, 1.25),
        noise=rng.uniform(2.0, 7.0),
        blur=rng.uniform(0.5, 1.5) if rng.random() < 0.3 else 0.0,
        noise_bank=noise_bank,
    )
