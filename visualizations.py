"""Pictures of what the model sees: dense matches, feature heat maps, prediction rows.

Pillow + numpy (no matplotlib, no torch import; files are read by ``image_files``); OpenCV only
for the RANSAC check of matches (``fundamental_ransac``), imported on first use, so that
importing this module and everything but that check work without it. Every function takes
numpy arrays (torch tensors are accepted too and converted through ``.detach().cpu()``)
or PIL images, and returns numpy arrays or PIL images. Nothing here touches the model;
the command-line scripts in ``tools/`` run the model and hand the arrays over.

Conventions
-----------
* Points are ``(x, y)`` pixel coordinates, ``x`` along the width, as float arrays ``(N, 2)``.
* A feature grid ``(h, w)`` is flattened row-major, so flat index ``k`` is cell
  ``(row, col) = divmod(k, w)``; the cell's centre in an image of ``W x H`` pixels is
  ``((col + 0.5) * W / w, (row + 0.5) * H / h)``. This matches a feature map computed on the
  image resized (without cropping) to the network's input size, since the resize scales each
  axis independently.
* A fundamental matrix ``F`` maps points of image A to epipolar lines in image B:
  ``x_b^T F x_a = 0`` for homogeneous ``x_a``, ``x_b`` (OpenCV's ``points1``/``points2`` order).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

import atomic_files
import image_files

__all__ = [
    "QUERY_FRAME_COLOUR",
    "CORRECT_FRAME_COLOUR",
    "WRONG_FRAME_COLOUR",
    "grid_indices_to_pixels",
    "opencv",
    "fundamental_ransac",
    "distinct_colours",
    "draw_matches",
    "feature_heatmap",
    "jet_colormap",
    "overlay_heatmap",
    "prediction_row",
    "image_format_for",
    "save_image_atomic",
]

# Frame colours of prediction_row (RGB).
QUERY_FRAME_COLOUR = (30, 110, 230)
CORRECT_FRAME_COLOUR = (0, 190, 0)
WRONG_FRAME_COLOUR = (220, 0, 0)

# Fewer matches than this cannot be verified (the 8-point algorithm's minimum): nothing is kept.
_MIN_MATCHES = 8
# How to install the optional OpenCV (the headless build: no GUI libraries needed).
OPENCV_INSTALL = "pip install opencv-python-headless"


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _to_numpy(value, *, name: str) -> np.ndarray:
    """Array from a numpy array, a sequence or a torch tensor (on any device)."""
    if hasattr(value, "detach"):  # torch tensor: avoid importing torch here
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as error:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: cannot be read as an array ({error})") from None


def _check_points(points, *, name: str) -> np.ndarray:
    array = _to_numpy(points, name=name).astype(np.float64, copy=False)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(
            f"{name}: expected an (N, 2) array of (x, y) pixel coordinates, got shape {tuple(array.shape)}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: contains NaN or infinite coordinates; pass finite pixel coordinates")
    return array


def _check_grid(grid, *, name: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a feature-grid size (h, w), got {grid!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: grid size must be positive, got ({h}, {w})")
    return h, w


def _rgb(image: Image.Image, *, name: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name}: expected a PIL.Image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------
def grid_indices_to_pixels(indices, grid: Sequence[int], image_size: Sequence[int]) -> np.ndarray:
    """Pixel centres of feature-grid cells: (N,) row-major flat indices into a ``grid = (h, w)`` grid ->
    (N, 2) float64 ``(x, y)`` centres on a picture of ``image_size = (W, H)`` (PIL's ``.size``):
    ``x = (col + 0.5) * W / w``, ``y = (row + 0.5) * H / h``."""
    h, w = _check_grid(grid, name="grid")
    width, height = (float(v) for v in image_size)
    flat = _to_numpy(indices, name="indices")
    if flat.ndim != 1:
        raise ValueError(f"indices: expected a 1-D array of flat grid indices, got shape {tuple(flat.shape)}")
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"indices: expected integer grid indices, got dtype {flat.dtype}")
    flat = flat.astype(np.int64, copy=False)
    if flat.size and (flat.min() < 0 or flat.max() >= h * w):
        raise ValueError(
            f"indices: values must lie in [0, {h * w}) for a {h}x{w} grid, "
            f"got range [{flat.min()}, {flat.max()}]; check the grid size"
        )
    rows, cols = np.divmod(flat, w)
    return np.stack([(cols + 0.5) * (width / w), (rows + 0.5) * (height / h)], axis=1)


def opencv():
    """The ``cv2`` module, imported on first use.

    OpenCV is an optional dependency of the RANSAC check of matches only (``fundamental_ransac``,
    ``tools/draw_matches.py``): everything else here, and the rest of the project, runs without it. When
    it is missing (or cannot be loaded), a ValueError names the package and the command that installs it.
    """
    try:
        import cv2
    except ImportError as error:
        raise ValueError(
            f"the RANSAC check of matches needs OpenCV, an optional dependency of the picture "
            f"tools ({error}): install it with `{OPENCV_INSTALL}`, or draw every match "
            "without the check (draw_matches.py --no_ransac)"
        ) from None
    return cv2


def fundamental_ransac(
    pts_a, pts_b, *, threshold: float = 5.0, iterations: int = 2000, confidence: float = 0.999
) -> tuple[np.ndarray | None, np.ndarray]:
    """Robust fundamental matrix: OpenCV's RANSAC (``cv2.findFundamentalMat`` with ``FM_RANSAC``),
    the fit the public release's match picture uses.

    A correspondence is an inlier when its symmetric epipolar distance (the larger of its
    distances, in pixels, to its epipolar lines in A and in B) is ``<= threshold``. OpenCV draws
    its samples with a fixed internal seed, so the same inputs give the same result; it stops
    after ``iterations`` hypotheses or once ``confidence`` is reached. With 8 to 14
    correspondences OpenCV fits by least median of squares instead, whose inlier rule does not
    use ``threshold``.

    pts_a, pts_b: (N, 2) matched ``(x, y)`` pixel coordinates in images A and B; threshold in pixels
    (> 0); iterations >= 1; confidence in (0, 1). Returns ``(F, inlier_mask)``: F (3, 3) float64 with
    unit Frobenius norm and ``x_b^T F x_a = 0``, and a (N,) bool mask. With fewer than 8
    correspondences, or when no fit is found (degenerate points: all equal, all on one line, ...), F is
    None and the mask is all False (nothing can be verified, so nothing is kept). Bad arguments, or
    OpenCV missing (see ``opencv``), raise ValueError.
    """
    pts_a = _check_points(pts_a, name="pts_a")
    pts_b = _check_points(pts_b, name="pts_b")
    if len(pts_a) != len(pts_b):
        raise ValueError(f"pts_a and pts_b must have the same number of points, got {len(pts_a)} and {len(pts_b)}")
    if not (threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold: must be a positive number of pixels, got {threshold}")
    if int(iterations) < 1:
        raise ValueError(f"iterations: must be >= 1, got {iterations}")
    # OpenCV silently replaces a confidence outside (0, 1) by 0.99: refuse it instead.
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must lie strictly between 0 and 1, got {confidence}")
    cv2 = opencv()  # before the early return, so a missing OpenCV is reported whatever the input
    n = len(pts_a)
    empty = np.zeros(n, dtype=bool)
    if n < _MIN_MATCHES:
        return None, empty
    fundamental, mask = cv2.findFundamentalMat(
        np.ascontiguousarray(pts_a),
        np.ascontiguousarray(pts_b),
        cv2.FM_RANSAC,
        float(threshold),
        float(confidence),
        int(iterations),
    )
    # A failed fit returns no matrix (and a mask that means nothing).
    if fundamental is None or fundamental.shape != (3, 3) or not np.all(np.isfinite(fundamental)):
        return None, empty
    # OpenCV scales F so that F[2, 2] = 1; unit Frobenius norm does not depend on that entry.
    fundamental = fundamental.astype(np.float64) / np.linalg.norm(fundamental)
    return fundamental, mask.reshape(n).astype(bool)


# --------------------------------------------------------------------------------------
# matches
# --------------------------------------------------------------------------------------
def distinct_colours(count: int, *, seed_hue: float = 0.0) -> np.ndarray:
    """(count, 3) uint8 saturated RGB colours with well-spread hues (golden-ratio steps)."""
    hue = (seed_hue + np.arange(count) * 0.6180339887498949) % 1.0
    # HSV -> RGB with S = 1, V = 1: each channel is a clipped triangle wave of the hue.
    channels = []
    for offset in (0.0, 2.0 / 3.0, 1.0 / 3.0):  # R, G, B
        phase = (hue + offset) % 1.0
        channels.append(np.clip(np.abs(phase * 6.0 - 3.0) - 1.0, 0.0, 1.0))
    return np.rint(np.stack(channels, axis=1) * 255.0).astype(np.uint8)


def _side_by_side(
    image_a: Image.Image, image_b: Image.Image, height: int | None, gap: int
) -> tuple[Image.Image, tuple[float, float], tuple[float, float], int]:
    """Canvas with A left and B right at one height; returns (canvas, scale_a, scale_b,
    offset_b) where scale = (sx, sy) maps an input image's pixels to the shown copy and
    offset_b is the x where B's copy starts on the canvas."""
    target = image_a.height if height is None else int(height)
    if target <= 0:
        raise ValueError(f"height: must be a positive number of pixels, got {height}")
    shown = []
    for image in (image_a, image_b):
        width = max(1, round(image.width * target / image.height))
        shown.append(
            image if image.size == (width, target) else image.resize((width, target), Image.Resampling.BILINEAR)
        )
    canvas = Image.new("RGB", (shown[0].width + gap + shown[1].width, target), (255, 255, 255))
    canvas.paste(shown[0], (0, 0))
    canvas.paste(shown[1], (shown[0].width + gap, 0))
    scales = [(s.width / i.width, s.height / i.height) for s, i in zip(shown, (image_a, image_b))]
    return canvas, scales[0], scales[1], shown[0].width + gap


def draw_matches(
    image_a: Image.Image,
    image_b: Image.Image,
    idx_a,
    idx_b,
    grid_a: Sequence[int],
    grid_b: Sequence[int],
    *,
    ransac: bool = True,
    threshold: float = 5.0,
    max_lines: int | None = None,
    height: int | None = None,
    gap: int = 0,
    line_width: int = 1,
) -> Image.Image:
    """Two images side by side with one coloured line per feature match -> an RGB PIL image of size
    (W_a' + gap + W_b', height'), the lines drawn over it.

    image_a, image_b: the pictures the features were computed on (any size: grid cells are mapped to
    each picture's own size, see the module docstring). idx_a, idx_b: (M,) int flat row-major grid
    indices of matched cells, e.g. from ``local_matching.mutual_nn_pairs``; ``idx_a[k]`` matches
    ``idx_b[k]``. grid_a, grid_b: (h, w) feature-grid sizes of A and B.

    ransac keeps only matches consistent with a RANSAC fundamental matrix, computed in the pixel
    coordinates of ``image_a`` / ``image_b`` as given (before the display resize below), by
    ``fundamental_ransac`` (needs OpenCV), with ``threshold`` as the inlier distance in those pixels.
    With fewer than 8 matches nothing can be verified and no line is drawn. max_lines draws at most
    this many lines (an evenly spaced subset of the kept matches, in their given order; None: all).
    height is the display height of both pictures (aspect ratios kept; None keeps image A's height and
    resizes B to it); gap the white pixels between them; line_width in pixels.
    """
    image_a = _rgb(image_a, name="image_a")
    image_b = _rgb(image_b, name="image_b")
    a = _to_numpy(idx_a, name="idx_a")
    b = _to_numpy(idx_b, name="idx_b")
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"idx_a and idx_b must be 1-D arrays of equal length, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if max_lines is not None and int(max_lines) < 0:
        raise ValueError(f"max_lines: must be >= 0 or None, got {max_lines}")
    if gap < 0 or line_width < 1:
        raise ValueError(f"gap must be >= 0 and line_width >= 1, got {gap} and {line_width}")
    pts_a = grid_indices_to_pixels(a, grid_a, image_a.size)
    pts_b = grid_indices_to_pixels(b, grid_b, image_b.size)
    if ransac:
        _, keep = fundamental_ransac(pts_a, pts_b, threshold=threshold)
        pts_a, pts_b = pts_a[keep], pts_b[keep]
    if max_lines is not None and len(pts_a) > int(max_lines):
        chosen = np.linspace(0, len(pts_a) - 1, int(max_lines)).round().astype(np.int64)
        chosen = np.unique(chosen)
        pts_a, pts_b = pts_a[chosen], pts_b[chosen]

    canvas, (sxa, sya), (sxb, syb), offset_b = _side_by_side(image_a, image_b, height, gap)
    draw = ImageDraw.Draw(canvas)
    for (xa, ya), (xb, yb), colour in zip(pts_a, pts_b, distinct_colours(len(pts_a))):
        draw.line(
            [(xa * sxa, ya * sya), (xb * sxb + offset_b, yb * syb)],
            fill=tuple(int(c) for c in colour),
            width=int(line_width),
        )
    return canvas


# --------------------------------------------------------------------------------------
# heat maps
# --------------------------------------------------------------------------------------
def feature_heatmap(feature_map) -> np.ndarray:
    """Heat map of a feature map: the NEGATED channel mean, min-max scaled to [0, 1].

    feature_map (C, h, w), numpy array or torch tensor (any device/dtype) -> (h, w) float64 in [0, 1];
    a constant map gives all zeros.
    """
    array = _to_numpy(feature_map, name="feature_map")
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(
            f"feature_map: expected a non-empty (C, h, w) array, got shape "
            f"{tuple(array.shape)} (channels first: permute (h, w, C) maps)"
        )
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError("feature_map: contains NaN or infinite values")
    heat = -array.mean(axis=0)
    low, high = heat.min(), heat.max()
    if high - low <= 0.0:
        return np.zeros_like(heat)
    return (heat - low) / (high - low)


def jet_colormap(values) -> np.ndarray:
    """Jet-like colour map: 0 -> dark blue, 0.375 -> cyan, 0.625 -> yellow, 1 -> dark red.

    Each channel is the classic piecewise-linear jet ramp ``clip(1.5 - |4 v - k|, 0, 1)``
    with k = 3 (red), 2 (green), 1 (blue). values (...) floats, clipped to [0, 1] -> (..., 3) uint8 RGB.
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * v - k), 0.0, 1.0) for k in (3.0, 2.0, 1.0)], axis=-1)
    return np.rint(rgb * 255.0).astype(np.uint8)


def overlay_heatmap(image: Image.Image, heat, *, alpha: float = 0.6) -> Image.Image:
    """Blend a coloured heat map over an image.

    ``heat`` is upsampled to the image size with PIL's bilinear filter, coloured by
    ``jet_colormap``, and blended per pixel as ``alpha * heat_colour + (1 - alpha) * image``
    (alpha weighs the heat colours; the default 0.6 is the public release's), rounded to uint8.
    image: a PIL image (converted to RGB); heat: (h, w) floats in [0, 1] (e.g. from
    ``feature_heatmap``); alpha in [0, 1]. Returns an RGB PIL image of the same size as ``image``.
    """
    image = _rgb(image, name="image")
    heat = _to_numpy(heat, name="heat").astype(np.float32, copy=False)
    if heat.ndim != 2 or 0 in heat.shape:
        raise ValueError(f"heat: expected a non-empty (h, w) array, got shape {tuple(heat.shape)}")
    if not np.all(np.isfinite(heat)):
        raise ValueError("heat: contains NaN or infinite values")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must lie in [0, 1], got {alpha}")
    upsampled = np.asarray(Image.fromarray(heat).resize(image.size, Image.Resampling.BILINEAR))
    colours = jet_colormap(upsampled).astype(np.float64)
    blended = alpha * colours + (1.0 - alpha) * np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------
# prediction rows
# --------------------------------------------------------------------------------------
def _open_rgb(source, *, name: str) -> Image.Image:
    """A PIL image as RGB, or a file read as a viewer shows it (image_files.read_rgb: EXIF orientation,
    high-bit-depth grayscale scaled to 8 bits, huge JPEGs draft-decoded), the same reading as the model's."""
    if isinstance(source, Image.Image):
        return _rgb(source, name=name)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: image file {str(path)!r} does not exist; check the path")
    try:
        return image_files.read_rgb(str(path))
    except (OSError, ValueError) as error:
        raise ValueError(f"{name}: {error}") from None


def _framed_tile(
    image: Image.Image, tile_height: int, border: int, colour: tuple[int, int, int], label: str
) -> Image.Image:
    """Image resized to tile_height (aspect kept) inside a `border`-px frame, with a label
    in a dark box at its top-left corner (inside the picture, so the frame stays plain)."""
    width = max(1, round(image.width * tile_height / image.height))
    picture = image.resize((width, tile_height), Image.Resampling.BILINEAR)
    tile = Image.new("RGB", (width + 2 * border, tile_height + 2 * border), colour)
    tile.paste(picture, (border, border))
    if label:
        draw = ImageDraw.Draw(tile)
        left, top, right, bottom = draw.textbbox((0, 0), label)
        pad = 2
        x0, y0 = border, border
        box = (
            x0,
            y0,
            min(x0 + right - left + 2 * pad, border + width - 1),
            min(y0 + bottom - top + 2 * pad, border + tile_height - 1),
        )
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x0 + pad - left, y0 + pad - top), label, fill=(255, 255, 255))
    return tile


def prediction_row(
    query_path,
    prediction_paths: Sequence,
    correct_flags: Sequence[bool],
    *,
    tile_height: int = 160,
    border: int = 6,
    scores: Sequence[float] | None = None,
    spacing: int | None = None,
) -> Image.Image:
    """One row: the query, then its ranked predictions framed green (correct) / red (wrong).

    Every picture is resized to ``tile_height`` pixels high (aspect kept) and framed by
    ``border`` pixels: blue (``QUERY_FRAME_COLOUR``) for the query, ``CORRECT_FRAME_COLOUR``
    or ``WRONG_FRAME_COLOUR`` for prediction k (label ``#k``, plus the score when given,
    drawn with ImageDraw's default font). Tiles are separated by ``spacing`` white pixels (None: the
    border width).

    query_path: the query image's path (or a PIL image); prediction_paths: the top-N predictions'
    paths (or PIL images), best first; correct_flags: (N,) bools, whether each prediction is a true
    positive; scores: optional (N,) numbers shown after the rank (e.g. re-ranking scores). Returns an
    RGB image of height ``tile_height + 2 * border`` and width ``sum(tile widths) + spacing * N``.
    """
    if tile_height < 1 or border < 0:
        raise ValueError(f"tile_height must be >= 1 and border >= 0, got {tile_height} and {border}")
    paths = list(prediction_paths)
    flags = [bool(f) for f in correct_flags]
    if len(paths) != len(flags):
        raise ValueError(f"prediction_paths ({len(paths)}) and correct_flags ({len(flags)}) must have the same length")
    score_list = None if scores is None else [float(s) for s in scores]
    if score_list is not None and len(score_list) != len(paths):
        raise ValueError(f"scores ({len(score_list)}) and prediction_paths ({len(paths)}) must have the same length")
    gap = border if spacing is None else int(spacing)
    if gap < 0:
        raise ValueError(f"spacing: must be >= 0, got {spacing}")

    tiles = [_framed_tile(_open_rgb(query_path, name="query_path"), tile_height, border, QUERY_FRAME_COLOUR, "query")]
    for rank, (path, correct) in enumerate(zip(paths, flags), start=1):
        label = f"#{rank}" if score_list is None else f"#{rank}: {score_list[rank - 1]:.4g}"
        colour = CORRECT_FRAME_COLOUR if correct else WRONG_FRAME_COLOUR
        tiles.append(
            _framed_tile(_open_rgb(path, name=f"prediction_paths[{rank - 1}]"), tile_height, border, colour, label)
        )
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    row = Image.new("RGB", (width, tile_height + 2 * border), (255, 255, 255))
    x = 0
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.width + gap
    return row


# --------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------
def image_format_for(path) -> str:
    """PIL format name for an output path from its extension (e.g. 'JPEG' for .jpg).

    Raises ValueError naming the path when the extension is unknown or the path is a folder,
    so that scripts can check ``--output`` before any slow work.
    """
    destination = Path(path)
    if destination.is_dir():
        raise ValueError(f"output {str(destination)!r} is a folder; give a file name such as out.jpg")
    extension = destination.suffix.lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None:
        raise ValueError(
            f"output {str(destination)!r}: unknown image extension {extension or '(none)'}; use .jpg or .png"
        )
    return image_format


def save_image_atomic(image: Image.Image, path, *, quality: int = 95) -> Path:
    """Write ``image`` to ``path`` atomically: a temp file in the same folder, then
    ``os.replace`` (readers never see a half-written picture; a failure leaves no temp
    file behind). The format follows the extension (.jpg, .png, ...); missing parent
    folders are created. JPEG output is written as RGB at ``quality``. Returns the destination path.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"image: expected a PIL.Image, got {type(image).__name__}")
    destination = Path(path)
    image_format = image_format_for(destination)
    folder = destination.parent
    folder.mkdir(parents=True, exist_ok=True)
    options: dict = {}
    if image_format == "JPEG":
        image = image if image.mode in ("RGB", "L") else image.convert("RGB")
        options["quality"] = int(quality)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as stream:
            image.save(stream, format=image_format, **options)

    atomic_files.atomic_write(str(destination), write)
    return destination
