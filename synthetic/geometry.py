"""Map geometry and image names of the synthetic data set (pure functions, metres, no pixels).

* ``utm_to_latlon``: WGS84 latitude/longitude of a UTM position, for the lat/lon fields of names;
* ``pano_id``, ``ImageLabel`` and ``format_image_name``: the Mapillary-like key and the benchmark's
  ``@utm_east@utm_north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg``;
* ``Route``: a street as a polyline, its random shape (``make_route_shape``), and the position and
  direction of travel at given arc lengths (``route_position``);
* ``min_distances``: how far each query label lies from the nearest database label.

Randomness only comes in through a generator the caller passes, so the results are pure functions
of their arguments.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import os

import numpy as np

UTM_ZONE_NUMBER = 17
UTM_ZONE_LETTER = "T"


def utm_to_latlon(
    east: float, north: float, zone_number: int = UTM_ZONE_NUMBER, northern: bool = True
) -> tuple[float, float]:
    """WGS84 (lat, lon) in degrees of a UTM position (metres), by the USGS series (Snyder 1987).

    Accurate to well below a centimetre within a zone, far more than the 2-decimal file names need.
    """
    a = 6378137.0
    f = 1 / 298.257223563
    k0 = 0.9996
    e2 = f * (2 - f)
    ep2 = e2 / (1 - e2)
    x = east - 500000.0
    y = north if northern else north - 10_000_000.0
    m = y / k0
    mu = m / (a * (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256))
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    phi1 = (
        mu
        + (3 * e1 / 2 - 27 * e1**3 / 32) * math.sin(2 * mu)
        + (21 * e1**2 / 16 - 55 * e1**4 / 32) * math.sin(4 * mu)
        + (151 * e1**3 / 96) * math.sin(6 * mu)
        + (1097 * e1**4 / 512) * math.sin(8 * mu)
    )
    sin1, cos1, tan1 = math.sin(phi1), math.cos(phi1), math.tan(phi1)
    c1 = ep2 * cos1**2
    t1 = tan1**2
    n1 = a / math.sqrt(1 - e2 * sin1**2)
    r1 = a * (1 - e2) / (1 - e2 * sin1**2) ** 1.5
    d = x / (n1 * k0)
    lat = phi1 - (n1 * tan1 / r1) * (
        d**2 / 2
        - (5 + 3 * t1 + 10 * c1 - 4 * c1**2 - 9 * ep2) * d**4 / 24
        + (61 + 90 * t1 + 298 * c1 + 45 * t1**2 - 252 * ep2 - 3 * c1**2) * d**6 / 720
    )
    lon = (
        d - (1 + 2 * t1 + c1) * d**3 / 6 + (5 - 2 * c1 + 28 * t1 - 3 * c1**2 + 8 * ep2 + 24 * t1**2) * d**5 / 120
    ) / cos1
    lon0 = zone_number * 6 - 183
    return math.degrees(lat), lon0 + math.degrees(lon)


def pano_id(seed: int, split: str, kind: str, index: int) -> str:
    """A 22-character Mapillary-key-like id ([A-Za-z0-9_-]), a pure function of its arguments."""
    digest = hashlib.blake2b(f"synthetic/{seed}/{split}/{kind}/{index}".encode(), digest_size=18).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")[:22]


@dataclasses.dataclass(frozen=True)
class ImageLabel:
    """What an image's file name records: its labelled UTM position (metres) and lat/lon (degrees), the
    Mapillary-like key, the tile, the camera's heading/pitch/roll (degrees) and height (metres), the
    capture time (Unix seconds) and a free note."""

    east: float
    north: float
    lat: float
    lon: float
    key: str
    tile: str
    heading: float
    timestamp: int
    note: str
    pitch: float = 0.0
    roll: float = 0.0
    height: float = 2.5


def format_image_name(label: ImageLabel) -> str:
    """``@utm_east@utm_north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg``.

    UTM in metres with 2 decimals; ``name.split('@')`` gives '' + 14 fields + '.jpg'.
    """
    east, north, heading = label.east, label.north, label.heading
    fields = [
        f"{east:.2f}",
        f"{north:.2f}",
        str(UTM_ZONE_NUMBER),
        UTM_ZONE_LETTER,
        f"{label.lat:.6f}",
        f"{label.lon:.6f}",
        label.key,
        label.tile,
        f"{round(heading % 360.0, 2) % 360.0:.2f}",
        f"{label.pitch:.2f}",
        f"{label.roll:.2f}",
        f"{label.height:.2f}",
        str(int(label.timestamp)),
        label.note,
    ]
    for value in fields:
        if "@" in value or "/" in value or os.sep in value:
            raise ValueError(f"file-name field {value!r} contains '@' or a path separator")
    return "@" + "@".join(fields) + "@.jpg"


@dataclasses.dataclass(frozen=True)
class Route:
    """A polyline: ``vertices`` (V, 2) east/north metres, ``cum`` (V,) arc length at each vertex."""

    vertices: np.ndarray
    cum: np.ndarray

    @property
    def length(self) -> float:
        return float(self.cum[-1])


def make_route_shape(rng: np.random.Generator, length_m: float) -> np.ndarray:
    """Vertices (V, 2) of a route of the given length starting at (0, 0).

    Segments of 60-220 m; the direction wanders but stays within 45 degrees of a random main
    direction, so two points d metres apart along the route are >= d*cos(45) apart on the map
    (no route folds back onto itself).
    """
    main = rng.uniform(0.0, 2 * math.pi)
    deviation = 0.0
    points = [np.zeros(2)]
    total = 0.0
    while total < length_m - 1e-9:
        seg = min(rng.uniform(60.0, 220.0), length_m - total)
        deviation = float(np.clip(deviation + rng.uniform(-0.7, 0.7), -math.pi / 4, math.pi / 4))
        angle = main + deviation
        points.append(points[-1] + seg * np.array([math.cos(angle), math.sin(angle)]))
        total += seg
    return np.stack(points)


def make_route(vertices: np.ndarray) -> Route:
    """Route from its vertices (V, 2), V >= 2."""
    vertices = np.asarray(vertices, dtype=np.float64)
    seg = np.linalg.norm(np.diff(vertices, axis=0), axis=1)
    return Route(vertices=vertices, cum=np.concatenate([[0.0], np.cumsum(seg)]))


def route_position(route: Route, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(east (N,), north (N,), bearing_deg (N,)) at arc lengths ``s`` (N,), clipped to the route.

    Bearing is the compass direction of travel (0 = north, 90 = east).
    """
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, route.length)
    seg = np.clip(np.searchsorted(route.cum, s, side="right") - 1, 0, len(route.cum) - 2)
    start, end = route.vertices[seg], route.vertices[seg + 1]
    seg_len = np.maximum(route.cum[seg + 1] - route.cum[seg], 1e-12)
    t = (s - route.cum[seg]) / seg_len
    pos = start + (end - start) * t[:, None]
    d = end - start
    bearing = np.degrees(np.arctan2(d[:, 0], d[:, 1])) % 360.0
    return pos[:, 0], pos[:, 1], bearing


def min_distances(query_utms: np.ndarray, database_utms: np.ndarray) -> np.ndarray:
    """Distance (Q,) in metres from every query (Q, 2) to its nearest database image (D, 2)."""
    out = np.empty(len(query_utms))
    for start in range(0, len(query_utms), 512):  # chunks bound the (chunk, D) matrix
        chunk = query_utms[start : start + 512]
        d2 = ((chunk[:, None, :] - database_utms[None, :, :]) ** 2).sum(-1)
        out[start : start + 512] = np.sqrt(d2.min(1))
    return out
