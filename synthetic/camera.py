"""The camera of the synthetic data set and the pixel canvas it needs.

A database camera stands ``CAMERA_DISTANCE_M`` from the facades and looks straight at them,
seeing ``VIEW_WIDTH_M`` of street across the image. A query camera may stand nearer or farther
(up to ``MAX_LATERAL_M``, seen as zoom), pan, tilt, roll, and turn towards the direction of travel
(an oblique "forward" view). The ranges below are shared by the planner (which draws the lateral
offset and the yaw), the views (which turn them into a source quad) and ``make_geometry``, which
sizes the canvas margins so that even the most extreme view stays inside what was drawn.
"""

from __future__ import annotations

import dataclasses
import math

VIEW_WIDTH_M = 24.0  # metres of facade seen across a database image
CAMERA_DISTANCE_M = 12.0  # camera to facade; a lateral offset d zooms by D / (D - d)
MAX_LATERAL_M = 3.0  # query lateral offset bound (metres)
# Query viewpoint ranges: zoom (clipped), pan and tilt (fractions of W and H), roll, and the oblique
# factor of "forward" views (per degree of yaw towards the travel direction, up to the maximum yaw).
QUERY_ZOOM_RANGE = (0.85, 1.4)
QUERY_PAN = 0.12
QUERY_TILT = 0.06
QUERY_ROLL_DEG = 4.0
QUERY_MAX_YAW_DEG = 35.0
OBLIQUE_PER_DEGREE = 1.0 / 125.0


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Pixel geometry shared by all layers: output (H, W), canvas margins, pixels per metre."""

    height: int
    width: int
    mx: int
    my: int
    ppm: float
    margin_m: float

    @property
    def canvas(self) -> tuple[int, int]:
        return self.height + 2 * self.my, self.width + 2 * self.mx

    @property
    def y_base(self) -> int:  # canvas row of the facades' foot
        return int(self.my + 0.74 * self.height)


def make_geometry(image_size: tuple[int, int]) -> Geometry:
    """Pixel geometry of images of ``image_size`` = (H, W)."""
    h, w = image_size
    # Margins hold everything the most extreme query view samples (zoomed out, oblique, panned,
    # tilted and rolled; see views.view_quad), so no view reaches past the rendered canvas.
    stretch = (1.0 + QUERY_MAX_YAW_DEG * OBLIQUE_PER_DEGREE) / QUERY_ZOOM_RANGE[0]
    half_w, half_h = w / 2 * stretch, h / 2 * stretch
    roll = math.radians(QUERY_ROLL_DEG)
    mx = int(math.ceil(half_w * math.cos(roll) + half_h * math.sin(roll) + QUERY_PAN * w - w / 2)) + 2
    my = int(math.ceil(half_w * math.sin(roll) + half_h * math.cos(roll) + QUERY_TILT * h - h / 2)) + 2
    ppm = w / VIEW_WIDTH_M
    # Strips extend beyond both route ends by half a canvas plus some slack (foreground parallax).
    margin_m = (w + 2 * mx) / ppm
    return Geometry(height=h, width=w, mx=mx, my=my, ppm=ppm, margin_m=margin_m)
