"""The street of one route, drawn once: three long strips that every view is cut from.

A route is a street seen sideways. ``render_route_scene`` draws it as three RGBA strips along the
route, each with a mask of what lights up at night:

* skyline: hazy towers far behind, with sparse lit windows;
* facades: the buildings planned by ``buildings`` (walls, textures, roofs, window grids, shop
  fronts with awnings and signs, doors), the places to recognise;
* street furniture in front: lamps, traffic signs, trees, bus shelters, bins.

The layers move with parallax (``PARALLAX``: metres of strip per metre of travel), so a view
from a nearby position is not a mere shift of another. Night strips (darker, bluish walls, lit
windows glowing warm) and the lamps' glow are derived from the day strips. ``rect`` and ``shade``
are the drawing helpers shared with ``views``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .buildings import Building
from .camera import Geometry
from .geometry import Route
from .plan import split_rng


def rect(method, xy: Sequence[float], **kwargs) -> None:
    """Call an ImageDraw box method (rectangle, ellipse, ...) with the corners put in order, so that
    small random sizes that collapse a box never make Pillow reject it."""
    x0, y0, x1, y1 = xy
    x0, x1 = sorted((float(x0), float(x1)))
    y0, y1 = sorted((float(y0), float(y1)))
    if "radius" in kwargs:
        # Pillow rejects a corner radius near half the box size; tiny boxes get square corners.
        kwargs["radius"] = int(max(0.0, min(kwargs["radius"], (x1 - x0) / 2 - 2, (y1 - y0) / 2 - 2)))
    method([x0, y0, x1, y1], **kwargs)


def shade(rgb: Sequence[int], factor: float) -> tuple:
    """``rgb`` scaled by ``factor`` and clipped to [0, 255], as an int tuple."""
    return tuple(int(np.clip(v * factor, 0, 255)) for v in rgb)


def _draw_building(
    draw: ImageDraw.ImageDraw, lit: ImageDraw.ImageDraw, b: Building, g: Geometry, x_offset_px: float
) -> None:
    rs = np.random.default_rng(b.structure_seed)
    rd = np.random.default_rng(b.detail_seed)
    H = g.height
    left = (b.x0_m * g.ppm) - x_offset_px
    right = left + b.width_m * g.ppm
    base = g.y_base
    top = base - b.height_frac * H
    wall = b.wall
    rect(draw.rectangle, [left, top, right, base], fill=wall + (255,))

    texture = int(rs.integers(4))
    if texture == 1:  # brick courses
        step = max(2.0, H * rs.uniform(0.012, 0.02))
        col = shade(wall, 0.85) + (255,)
        y = top + step
        while y < base:
            draw.line([left, y, right, y], fill=col, width=1)
            y += step
    elif texture == 2:  # vertical siding
        step = max(3.0, g.ppm * rs.uniform(0.4, 0.9))
        col = shade(wall, 0.88) + (255,)
        x = left + step
        while x < right:
            draw.line([x, top, x, base], fill=col, width=1)
            x += step
    elif texture == 3:  # concrete panels
        col = shade(wall, 0.8) + (255,)
        ph, pw = H * rs.uniform(0.08, 0.14), g.ppm * rs.uniform(2.0, 4.0)
        y = top + ph
        while y < base:
            draw.line([left, y, right, y], fill=col, width=1)
            y += ph
        x = left + pw
        while x < right:
            draw.line([x, top, x, base], fill=col, width=1)
            x += pw

    # Roof.
    roof = int(rs.integers(4))
    roof_col = shade(wall, rs.uniform(0.45, 0.75)) + (255,)
    if roof == 0:  # cornice band
        rect(draw.rectangle, [left - 1, top, right + 1, top + H * 0.025], fill=roof_col)
    elif roof == 1:  # gable
        peak = top - H * rs.uniform(0.06, 0.14)
        draw.polygon([(left, top), ((left + right) / 2, peak), (right, top)], fill=roof_col)
    elif roof == 2:  # stepped penthouse
        inset = (right - left) * rs.uniform(0.15, 0.35)
        rect(draw.rectangle, [left + inset, top - H * rs.uniform(0.05, 0.12), right - inset, top], fill=roof_col)
    else:  # parapet with a water tank
        rect(draw.rectangle, [left, top - H * 0.015, right, top], fill=roof_col)
        tx = left + (right - left) * rs.uniform(0.2, 0.7)
        rect(draw.rectangle, [tx, top - H * 0.08, tx + g.ppm * 1.5, top], fill=shade(roof_col[:3], 0.7) + (255,))

    # Window grid.
    floor_px = H * rs.uniform(0.075, 0.11)
    ground_px = floor_px * rs.uniform(1.25, 1.6)
    style = int(rs.integers(4))
    glass_palette = [(40, 55, 75), (70, 90, 110), (30, 40, 40), (120, 150, 170), (60, 50, 45)]
    glass = glass_palette[int(rs.integers(len(glass_palette)))]
    frame = shade(wall, rs.uniform(0.5, 1.4))
    lit_p = rd.uniform(0.15, 0.6)
    pitch_px = g.ppm * rs.uniform(1.6, 3.2)
    n_cols = max(1, int((right - left) / pitch_px))
    pitch_px = (right - left) / n_cols
    win_w = pitch_px * rs.uniform(0.4, 0.7)
    win_h = floor_px * rs.uniform(0.45, 0.7)
    y_floor = base - ground_px
    if style == 3:  # glass curtain wall over the upper floors
        rect(draw.rectangle, [left + 2, top + H * 0.03, right - 2, y_floor - 2], fill=glass + (255,))
    while y_floor - floor_px > top + H * 0.02:
        y0 = y_floor - floor_px + (floor_px - win_h) / 2
        y1 = y0 + win_h
        if style == 1:  # ribbon windows
            rect(draw.rectangle, [left + pitch_px * 0.2, y0, right - pitch_px * 0.2, y1], fill=glass + (255,))
            for c in range(1, n_cols):
                x = left + c * pitch_px
                draw.line([x, y0, x, y1], fill=frame + (255,), width=1)
        for c in range(n_cols):
            x0 = left + c * pitch_px + (pitch_px - win_w) / 2
            x1 = x0 + win_w
            if style == 0:
                rect(draw.rectangle, [x0 - 1, y0 - 1, x1 + 1, y1 + 1], fill=frame + (255,))
                rect(draw.rectangle, [x0, y0, x1, y1], fill=glass + (255,))
            elif style == 2:  # tall rounded windows
                rect(
                    draw.rounded_rectangle,
                    [x0, y0 - win_h * 0.15, x1, y1],
                    radius=win_w / 2.5,
                    fill=glass + (255,),
                    outline=frame + (255,),
                )
            elif style == 3:
                draw.line([x0, y0 - 2, x0, y1 + 2], fill=frame + (255,), width=1)
            if rd.random() < lit_p:
                rect(lit.rectangle, [x0, y0, x1, y1], fill=int(rd.uniform(140, 255)))
        y_floor -= floor_px

    # Ground floor: shop front with awning and sign, or door with windows.
    if rs.random() < 0.6:
        shop_l, shop_r = left + (right - left) * 0.08, right - (right - left) * 0.08
        shop_t = base - ground_px * 0.75
        rect(draw.rectangle, [shop_l, shop_t, shop_r, base], fill=shade(glass, 1.3) + (255,))
        if rd.random() < 0.8:
            rect(lit.rectangle, [shop_l, shop_t, shop_r, base], fill=230)
        awn = tuple(int(v) for v in rs.integers(30, 230, size=3))
        awn2 = shade(awn, 0.6) if rs.random() < 0.5 else (235, 235, 230)
        stripe = max(2.0, g.ppm * 0.5)
        x = shop_l
        k = 0
        awn_b = shop_t + ground_px * 0.12
        while x < shop_r:
            rect(
                draw.rectangle,
                [x, shop_t - 2, min(x + stripe, shop_r), awn_b],
                fill=(awn if k % 2 == 0 else awn2) + (255,),
            )
            x += stripe
            k += 1
        sign = tuple(int(v) for v in rd.integers(20, 240, size=3))
        sign_h = max(7.0, ground_px * 0.3)
        sign_t = shop_t - 3 - sign_h
        sx0 = shop_l + (shop_r - shop_l) * rd.uniform(0.0, 0.3)
        sx1 = shop_r - (shop_r - shop_l) * rd.uniform(0.0, 0.3)
        rect(draw.rectangle, [sx0, sign_t, sx1, shop_t - 3], fill=sign + (255,))
        letter = (255, 255, 255) if sum(sign) < 380 else (20, 20, 20)
        x = sx0 + 3
        while x < sx1 - 4:  # lettering: bars of random widths
            w = rd.uniform(2, 6)
            rect(
                draw.rectangle,
                [x, sign_t + sign_h * 0.25, min(x + w, sx1 - 3), sign_t + sign_h * 0.75],
                fill=letter + (255,),
            )
            x += w + rd.uniform(2, 4)
    else:
        door_x = left + (right - left) * rs.uniform(0.2, 0.7)
        rect(
            draw.rectangle,
            [door_x, base - ground_px * 0.8, door_x + g.ppm * 1.4, base],
            fill=shade(wall, 0.35) + (255,),
        )
        for c in range(n_cols):
            x0 = left + c * pitch_px + (pitch_px - win_w) / 2
            if abs(x0 - door_x) < pitch_px * 0.8:
                continue
            y0 = base - ground_px * 0.8
            rect(
                draw.rectangle, [x0, y0, x0 + win_w, y0 + ground_px * 0.5], fill=glass + (255,), outline=frame + (255,)
            )


def _draw_skyline(draw, lit, rng: np.random.Generator, g: Geometry, length_px: int) -> None:
    x = -10.0
    haze = np.array([175, 188, 205], dtype=float)
    while x < length_px:
        w = g.ppm * rng.uniform(6, 28)
        h = g.height * rng.uniform(0.35, 0.85)
        col = np.clip(0.72 * haze + 0.28 * rng.integers(40, 200, size=3), 0, 255).astype(int)
        top = g.y_base - h
        rect(draw.rectangle, [x, top, x + w, g.y_base], fill=tuple(int(v) for v in col) + (255,))
        if rng.random() < 0.3:  # antenna
            ax = x + w * rng.uniform(0.3, 0.7)
            draw.line([ax, top, ax, top - g.height * 0.08], fill=tuple(int(v) for v in col * 0.9) + (255,), width=1)
        # Sparse lit windows, visible only at night.
        for _ in range(int(w * h / 600)):
            wx, wy = x + rng.uniform(2, max(3, w - 3)), top + rng.uniform(3, max(4, h - 3))
            if rng.random() < 0.35:
                rect(lit.rectangle, [wx, wy, wx + 1, wy + 2], fill=int(rng.uniform(90, 200)))
        x += w + (g.ppm * rng.uniform(0, 6) if rng.random() < 0.4 else 0)


def _draw_street_furniture(draw, lamps, rng: np.random.Generator, g: Geometry, length_px: int) -> None:
    H = g.height
    foot = g.y_base + 0.1 * H
    x = rng.uniform(0, 8) * g.ppm
    while x < length_px:
        kind = int(rng.choice(5, p=[0.3, 0.2, 0.3, 0.1, 0.1]))
        if kind == 0:  # street lamp
            top = foot - H * rng.uniform(0.6, 0.8)
            col = tuple(int(v) for v in rng.integers(30, 80, size=3)) + (255,)
            rect(draw.rectangle, [x, top, x + 3, foot], fill=col)
            arm = g.ppm * rng.uniform(1.0, 2.0) * (1 if rng.random() < 0.5 else -1)
            draw.line([x + 1, top, x + 1 + arm, top], fill=col, width=2)
            hx = x + 1 + arm
            head = [hx - 5, top, hx + 5, top + 5]
            rect(draw.rectangle, head, fill=(200, 200, 180, 255))
            rect(lamps.ellipse, [hx - 4, top + 1, hx + 4, top + 6], fill=255)
        elif kind == 1:  # traffic sign on a pole
            top = foot - H * rng.uniform(0.35, 0.5)
            rect(draw.rectangle, [x, top, x + 2, foot], fill=(120, 120, 125, 255))
            r = H * rng.uniform(0.04, 0.07)
            colour = [(200, 30, 30), (30, 70, 180), (240, 200, 20), (30, 140, 60)][int(rng.integers(4))]
            shape = int(rng.integers(3))
            box = [x + 1 - r, top - r, x + 1 + r, top + r]
            if shape == 0:
                rect(draw.ellipse, box, fill=colour + (255,), outline=(240, 240, 240, 255), width=2)
            elif shape == 1:
                draw.polygon(
                    [(x + 1, top - r), (x + 1 + r, top + r), (x + 1 - r, top + r)],
                    fill=colour + (255,),
                    outline=(240, 240, 240, 255),
                )
            else:
                rect(draw.rectangle, box, fill=colour + (255,), outline=(240, 240, 240, 255), width=2)
        elif kind == 2:  # tree
            trunk_h = H * rng.uniform(0.15, 0.3)
            rect(draw.rectangle, [x, foot - trunk_h, x + g.ppm * 0.35, foot], fill=(90, 60, 35, 255))
            cr = H * rng.uniform(0.12, 0.22)
            cx, cy = x + g.ppm * 0.17, foot - trunk_h - cr * 0.6
            green = np.array([50, 110, 45]) + rng.integers(-25, 40, size=3)
            for _ in range(int(rng.integers(3, 6))):
                ox, oy = rng.uniform(-0.5, 0.5) * cr, rng.uniform(-0.5, 0.3) * cr
                rr = cr * rng.uniform(0.55, 0.9)
                leaves = np.clip(green * rng.uniform(0.8, 1.2), 0, 255).astype(int)
                rect(
                    draw.ellipse,
                    [cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr],
                    fill=tuple(int(v) for v in leaves) + (255,),
                )
        elif kind == 3:  # bus shelter
            w = g.ppm * rng.uniform(3, 5)
            top = foot - H * 0.28
            rect(draw.rectangle, [x, top, x + w, foot], fill=(150, 180, 190, 150), outline=(60, 60, 60, 255), width=2)
            rect(draw.rectangle, [x, top, x + w, top + H * 0.03], fill=(60, 60, 60, 255))
        else:  # bin / hydrant / bollard
            w = g.ppm * rng.uniform(0.5, 0.9)
            h = H * rng.uniform(0.06, 0.1)
            colour = tuple(int(v) for v in rng.integers(20, 220, size=3))
            rect(draw.rectangle, [x, foot - h, x + w, foot], fill=colour + (255,))
        x += g.ppm * rng.uniform(5.0, 16.0)


@dataclasses.dataclass
class SceneLayer:
    """One pre-rendered strip: day RGBA (Lpx x Hc), lit-window mask, parallax, night darkening."""

    day: Image.Image
    lit: Image.Image
    parallax: float
    darkness: float
    night: Optional[Image.Image] = None  # made on first use: only routes with night queries pay for it

    def night_strip(self) -> Image.Image:
        if self.night is None:
            # Night: walls lose most light and turn bluish (a per-channel lookup table); lit windows
            # glow warm (a blend towards warm white weighted by the lit mask). Pillow's C loops keep
            # this cheap for strips thousands of pixels long.
            tint = self.darkness * np.array([0.8, 0.85, 1.1])
            v = np.arange(256)
            lut = np.concatenate([np.clip(np.rint(v * t), 0, 255) for t in tint]).astype(np.int64).tolist()
            dark = self.day.convert("RGB").point(lut)
            night = Image.composite(Image.new("RGB", dark.size, (255, 205, 120)), dark, self.lit)
            night.putalpha(self.day.getchannel("A"))
            self.night = night
        return self.night


@dataclasses.dataclass
class RouteScene:
    """The three strips of one route (skyline, facades, street furniture) and the lamp glow (RGB)."""

    layers: list
    glow: Image.Image


PARALLAX = {"skyline": 0.4, "facade": 1.0, "furniture": 1.45}


def render_route_scene(
    *, seed: int, split: str, route_index: int, route: Route, buildings: list, g: Geometry
) -> RouteScene:
    """Draw the three layers of a route once; views are crops of them."""
    hc, _wc = g.canvas
    layers = []
    glow = None
    for name in ("skyline", "facade", "furniture"):
        par = PARALLAX[name]
        length_px = int(math.ceil((route.length * par + 2 * g.margin_m) * g.ppm)) + 2
        rgba = Image.new("RGBA", (length_px, hc), (0, 0, 0, 0))
        lit = Image.new("L", (length_px, hc), 0)
        draw, lit_draw = ImageDraw.Draw(rgba), ImageDraw.Draw(lit)
        if name == "facade":
            offset_px = -g.margin_m * g.ppm  # strip x = (s + margin) * ppm
            for b in buildings:
                if b.x0_m + b.width_m < -g.margin_m or b.x0_m > route.length + g.margin_m:
                    continue
                _draw_building(draw, lit_draw, b, g, offset_px)
            darkness = 0.16
        elif name == "skyline":
            _draw_skyline(draw, lit_draw, split_rng(seed, split, 4, route_index), g, length_px)
            darkness = 0.09
        else:
            _draw_street_furniture(draw, lit_draw, split_rng(seed, split, 5, route_index), g, length_px)
            darkness = 0.12
            blurred = (
                np.asarray(lit.filter(ImageFilter.GaussianBlur(radius=max(2.0, g.height * 0.05))), dtype=np.float32)
                / 255.0
            )
            glow_rgb = np.clip(blurred[..., None] * np.array([360, 300, 180], dtype=np.float32), 0, 255)
            glow = Image.fromarray(np.rint(glow_rgb).astype(np.uint8), "RGB")
        layers.append(SceneLayer(day=rgba, lit=lit, parallax=par, darkness=darkness))
    return RouteScene(layers=layers, glow=glow)
