"""The built-in synthetic visual-place-recognition data set (module and command).

Writes a deterministic data set in the Visual Geo-localization Benchmark layout::

    <datasets_folder>/<dataset_name>/images/{train,val,test}/{database,queries}/*.jpg
    <datasets_folder>/<dataset_name>/synthetic_dataset.json      (parameters, counts, look-alikes)

with file names ``@utm_east@utm_north@17@T@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg``.

How the world is built (everything from numpy + Pillow, keyed by the seed):

* every split lies in its own area (its own UTM offset and its own place seeds) and holds a few
  routes: polylines whose direction stays within 45 degrees of a main direction, so points far apart
  along a route are far apart on the map too, and routes of one split lie side by side with 200 m gaps;
* a route is a street seen sideways: a strip of procedural facades (the "places": buildings with
  window grids, shop fronts, awnings, signs, textures, roofs), a hazy skyline behind them and poles,
  lamps, signs and trees in front of them. The three layers move with parallax as the camera moves;
* database images are taken every ``db_spacing_m`` metres along the routes (day, centred, mild
  noise, occasionally a car or a pedestrian); queries are other visits at random positions: other
  light (brightness, contrast, colour cast, gamma, night images with lit windows and lamp glow),
  other viewpoint (lateral offset = zoom, pan, tilt, roll, oblique "forward" views), occluders
  (cars, pedestrians, blobs), noise and blur. The note field says ``day``/``night`` and
  ``sideways`` (frontal like the database) or ``forward`` (oblique), as MSLS mining expects;
* look-alikes (hard negatives): a few runs of three buildings are copied, with small changes of
  colour, height, signs and lit windows, to places at least 150 m away;
* labels carry a little GPS noise. Every query lies within 10 m of a database image (so within
  the 25 m evaluation radius too); the generator checks this and fails loudly otherwise.

The same seed and options give byte-identical files (Pillow's JPEG encoder at a fixed quality is
deterministic). Generation is atomic: the set is written into a hidden temporary folder next to
the target and renamed into place, so an interrupted run never leaves a half data set behind.

Command::

    python3 synthetic_dataset.py --datasets_folder DIR [--dataset_name synthetic] [--seed 0]
        [--preset default|tiny] [--train_database_num N] [--train_queries_num N] ...
        [--image_size H W] [--db_spacing_m M] [--overwrite | --if_missing]
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

GENERATOR_VERSION = 1
MANIFEST_NAME = "synthetic_dataset.json"
SPLITS = ("train", "val", "test")
UTM_ZONE_NUMBER = 17
UTM_ZONE_LETTER = "T"
# Split areas: far apart (tens of km) so no positive can cross splits. Zone 17T ~ southern Ontario.
SPLIT_ORIGINS = {"train": (610_000.0, 4_825_000.0), "val": (640_000.0, 4_845_000.0),
                 "test": (670_000.0, 4_865_000.0)}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

PRESETS = {
    # (database, queries) per split and routes per split.
    "default": {"train": (600, 300), "val": (200, 100), "test": (300, 150),
                "routes": {"train": 4, "val": 2, "test": 3}},
    "tiny": {"train": (40, 15), "val": (40, 15), "test": (40, 15),
             "routes": {"train": 2, "val": 2, "test": 2}},
}

VIEW_WIDTH_M = 24.0          # metres of facade seen across a database image
CAMERA_DISTANCE_M = 12.0     # camera to facade; a lateral offset d zooms by D / (D - d)
MAX_LATERAL_M = 3.0          # query lateral offset bound (metres)
GPS_NOISE_M = 0.7            # std of label noise, clipped at 2 sigma
ROUTE_GAP_M = 200.0          # gap between the bounding boxes of two routes of a split
LOOKALIKE_MIN_DIST_M = 150.0
LOOKALIKE_RUN = 3            # buildings copied per look-alike
POSITIVE_RADIUS_M = 25.0
HARD_POSITIVE_RADIUS_M = 10.0
# Query viewpoint ranges: zoom (clipped), pan and tilt (fractions of W and H), roll, and the oblique
# factor of "forward" views (per degree of yaw towards the travel direction, up to the maximum yaw).
QUERY_ZOOM_RANGE = (0.85, 1.4)
QUERY_PAN = 0.12
QUERY_TILT = 0.06
QUERY_ROLL_DEG = 4.0
QUERY_MAX_YAW_DEG = 35.0
OBLIQUE_PER_DEGREE = 1.0 / 125.0


# ----------------------------------------------------------------------------------------------
# Pure geometry and naming helpers
# ----------------------------------------------------------------------------------------------

def utm_to_latlon(east: float, north: float, zone_number: int = UTM_ZONE_NUMBER,
                  northern: bool = True) -> tuple[float, float]:
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
    mu = m / (a * (1 - e2 / 4 - 3 * e2 ** 2 / 64 - 5 * e2 ** 3 / 256))
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    phi1 = (mu + (3 * e1 / 2 - 27 * e1 ** 3 / 32) * math.sin(2 * mu)
            + (21 * e1 ** 2 / 16 - 55 * e1 ** 4 / 32) * math.sin(4 * mu)
            + (151 * e1 ** 3 / 96) * math.sin(6 * mu)
            + (1097 * e1 ** 4 / 512) * math.sin(8 * mu))
    sin1, cos1, tan1 = math.sin(phi1), math.cos(phi1), math.tan(phi1)
    c1 = ep2 * cos1 ** 2
    t1 = tan1 ** 2
    n1 = a / math.sqrt(1 - e2 * sin1 ** 2)
    r1 = a * (1 - e2) / (1 - e2 * sin1 ** 2) ** 1.5
    d = x / (n1 * k0)
    lat = phi1 - (n1 * tan1 / r1) * (d ** 2 / 2
                                     - (5 + 3 * t1 + 10 * c1 - 4 * c1 ** 2 - 9 * ep2) * d ** 4 / 24
                                     + (61 + 90 * t1 + 298 * c1 + 45 * t1 ** 2 - 252 * ep2 - 3 * c1 ** 2)
                                     * d ** 6 / 720)
    lon = (d - (1 + 2 * t1 + c1) * d ** 3 / 6
           + (5 - 2 * c1 + 28 * t1 - 3 * c1 ** 2 + 8 * ep2 + 24 * t1 ** 2) * d ** 5 / 120) / cos1
    lon0 = zone_number * 6 - 183
    return math.degrees(lat), lon0 + math.degrees(lon)


def pano_id(seed: int, split: str, kind: str, index: int) -> str:
    """A 22-character Mapillary-key-like id ([A-Za-z0-9_-]), a pure function of its arguments."""
    digest = hashlib.blake2b(f"synthetic/{seed}/{split}/{kind}/{index}".encode(), digest_size=18).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")[:22]


def format_image_name(*, east: float, north: float, lat: float, lon: float, key: str, tile: str,
                      heading: float, pitch: float, roll: float, height: float, timestamp: int,
                      note: str) -> str:
    """``@utm_east@utm_north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg``.

    UTM in metres with 2 decimals; ``name.split('@')`` gives '' + 14 fields + '.jpg'.
    """
    fields = [f"{east:.2f}", f"{north:.2f}", str(UTM_ZONE_NUMBER), UTM_ZONE_LETTER, f"{lat:.6f}",
              f"{lon:.6f}", key, tile, f"{round(heading % 360.0, 2) % 360.0:.2f}", f"{pitch:.2f}", f"{roll:.2f}",
              f"{height:.2f}", str(int(timestamp)), note]
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
    for start in range(0, len(query_utms), 512):   # chunks bound the (chunk, D) matrix
        chunk = query_utms[start:start + 512]
        d2 = ((chunk[:, None, :] - database_utms[None, :, :]) ** 2).sum(-1)
        out[start:start + 512] = np.sqrt(d2.min(1))
    return out


# ----------------------------------------------------------------------------------------------
# Planning: routes, camera positions, labels (no pixels)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shot:
    """One image to render: where the camera really is (route, s, lateral) and its label."""
    kind: str            # "database" or "queries"
    index: int
    route: int
    s: float             # arc length along the route (metres)
    lateral: float       # offset towards the facade (metres, + = closer)
    east: float          # labelled UTM (with GPS noise)
    north: float
    heading: float
    yaw: float           # camera turned this many degrees from the facade normal towards the travel direction
    night: bool
    sideways: bool
    timestamp: int
    key: str
    name: str


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    split: str
    routes: list
    database: list       # [Shot]
    queries: list        # [Shot]


def _split_rng(seed: int, split: str, *stream: int) -> np.random.Generator:
    # One independent stream per (seed, split, purpose, ...): changing one count never reshuffles
    # the content of unrelated parts.
    return np.random.default_rng([seed, SPLIT_CODES[split], *stream])


def plan_split(*, seed: int, split: str, database_num: int, queries_num: int, routes_num: int,
               db_spacing_m: float, night_fraction: float, sideways_fraction: float) -> SplitPlan:
    """Routes, database shots and query shots of one split (pure: no images are drawn).

    Database images: ``database_num`` shared between ``routes_num`` routes, one every
    ``db_spacing_m`` metres (jitter +-15 %). Queries: spread over the routes in proportion to their
    length, at uniform random arc positions within the database span, lateral offset within
    +-3 m. At least one query is night and at least one is sideways when ``queries_num`` >= 2.
    """
    rng = _split_rng(seed, split, 0)
    per_route = [database_num // routes_num + (1 if r < database_num % routes_num else 0)
                 for r in range(routes_num)]
    origin_e, origin_n = SPLIT_ORIGINS[split]
    routes, db_s = [], []
    cursor = origin_e
    for r, n in enumerate(per_route):
        steps = db_spacing_m * (1.0 + rng.uniform(-0.15, 0.15, size=n - 1))
        s = np.concatenate([[0.0], np.cumsum(steps)])
        shape = make_route_shape(rng, float(s[-1]))
        lo, hi = shape.min(0), shape.max(0)
        offset = np.array([cursor - lo[0], origin_n + rng.uniform(0.0, 300.0) - lo[1]])
        routes.append(make_route(shape + offset))
        cursor += (hi[0] - lo[0]) + ROUTE_GAP_M
        db_s.append(s)

    lengths = np.array([route.length for route in routes])
    q_route = np.sort(rng.choice(routes_num, size=queries_num, p=lengths / lengths.sum()))
    q_s = np.array([rng.uniform(0.0, lengths[r]) for r in q_route])
    q_lateral = rng.uniform(-MAX_LATERAL_M, MAX_LATERAL_M, size=queries_num)
    q_night = rng.random(queries_num) < night_fraction
    q_side = rng.random(queries_num) < sideways_fraction
    if queries_num >= 2:
        # MSLS-weighted mining needs both groups non-empty; two different queries carry them.
        if not q_night.any():
            q_night[0] = True
        if not q_side.any():
            q_side[-1] = True

    def noise(n: int) -> np.ndarray:
        return np.clip(rng.normal(0.0, GPS_NOISE_M, size=(n, 2)), -2 * GPS_NOISE_M, 2 * GPS_NOISE_M)

    database = []
    for r, s in enumerate(db_s):
        east, north, bearing = route_position(routes[r], s)
        gps = noise(len(s))
        for i in range(len(s)):
            index = len(database)
            # Database: daytime in the summer of 2019 (local time = UTC-5).
            ts = 1559347200 + int(rng.integers(0, 90)) * 86400 + int(rng.integers(9 + 5, 17 + 5)) * 3600 \
                + int(rng.integers(0, 3600))
            database.append(dict(kind="database", index=index, route=r, s=float(s[i]), lateral=0.0,
                                 east=float(east[i] + gps[i, 0]), north=float(north[i] + gps[i, 1]),
                                 heading=float(bearing[i] + 90.0), yaw=0.0, night=False, sideways=True,
                                 timestamp=ts))
    queries = []
    gps = noise(queries_num)
    for i in range(queries_num):
        r = int(q_route[i])
        east, north, bearing = route_position(routes[r], np.array([q_s[i]]))
        # The facade is on the right of the direction of travel: "closer" is along bearing + 90.
        normal = math.radians(bearing[0] + 90.0)
        true_e = east[0] + q_lateral[i] * math.sin(normal)
        true_n = north[0] + q_lateral[i] * math.cos(normal)
        yaw = 0.0 if q_side[i] else float(rng.uniform(20.0, QUERY_MAX_YAW_DEG))
        hour = int(rng.choice([21, 22, 23, 24, 25, 26])) if q_night[i] else int(rng.integers(8, 18))
        ts = 1577836800 + int(rng.integers(0, 730)) * 86400 + (hour + 5) * 3600 + int(rng.integers(0, 3600))
        queries.append(dict(kind="queries", index=i, route=r, s=float(q_s[i]), lateral=float(q_lateral[i]),
                            east=float(true_e + gps[i, 0]), north=float(true_n + gps[i, 1]),
                            heading=float(bearing[0] + 90.0 - yaw), yaw=yaw, night=bool(q_night[i]),
                            sideways=bool(q_side[i]), timestamp=ts))

    def finish(rec: dict) -> Shot:
        key = pano_id(seed, split, rec["kind"], rec["index"])
        lat, lon = utm_to_latlon(rec["east"], rec["north"])
        note = ("night" if rec["night"] else "day") + "_" + ("sideways" if rec["sideways"] else "forward")
        name = format_image_name(east=rec["east"], north=rec["north"], lat=lat, lon=lon, key=key,
                                 tile=f"r{rec['route']}", heading=rec["heading"], pitch=0.0, roll=0.0,
                                 height=2.5, timestamp=rec["timestamp"], note=note)
        return Shot(key=key, name=name, **rec)

    plan = SplitPlan(split=split, routes=routes, database=[finish(r) for r in database],
                     queries=[finish(r) for r in queries])
    names = [shot.name for shot in plan.database + plan.queries]
    if len(set(names)) != len(names) or len({shot.key for shot in plan.database + plan.queries}) != len(names):
        raise RuntimeError(f"internal error: duplicate image names in split {split!r}")
    return plan


# ----------------------------------------------------------------------------------------------
# Scene content: buildings (the places), skyline, street furniture
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Building:
    """One facade. ``structure_seed`` fixes its layout (windows, roof, texture, shop front);
    ``detail_seed`` fixes small things (which windows are lit, sign colour and lettering)."""
    width_m: float
    height_frac: float       # of the image height
    wall: tuple
    structure_seed: int
    detail_seed: int
    gap_after_m: float
    group: int = -1          # look-alike group id, -1 when unique
    x0_m: float = 0.0        # strip position (metres), set by _place_buildings


def _random_wall(rng: np.random.Generator) -> tuple:
    palettes = [(180, 80, 60), (200, 170, 130), (150, 150, 155), (90, 110, 140), (210, 200, 180),
                (120, 70, 50), (230, 220, 200), (170, 120, 80), (100, 130, 100), (60, 60, 70),
                (190, 150, 110), (140, 40, 40), (220, 180, 90), (80, 90, 110)]
    base = np.array(palettes[int(rng.integers(len(palettes)))], dtype=float)
    return tuple(int(v) for v in np.clip(base + rng.uniform(-25, 25, size=3), 0, 255))


def _new_building(rng: np.random.Generator) -> Building:
    return Building(width_m=float(rng.uniform(7.0, 20.0)), height_frac=float(rng.uniform(0.28, 0.70)),
                    wall=_random_wall(rng), structure_seed=int(rng.integers(2 ** 62)),
                    detail_seed=int(rng.integers(2 ** 62)),
                    gap_after_m=float(rng.uniform(1.0, 4.0)) if rng.random() < 0.25 else 0.0)


def _place_buildings(buildings: list, start_m: float) -> None:
    x = start_m
    for b in buildings:
        b.x0_m = x
        x += b.width_m + b.gap_after_m


def _perturbed_copy(b: Building, rng: np.random.Generator, group: int) -> Building:
    wall = tuple(int(v) for v in np.clip(np.array(b.wall) + rng.uniform(-12, 12, size=3), 0, 255))
    return Building(width_m=b.width_m, height_frac=float(np.clip(b.height_frac * rng.uniform(0.95, 1.05), 0.2, 0.75)),
                    wall=wall, structure_seed=b.structure_seed, detail_seed=int(rng.integers(2 ** 62)),
                    gap_after_m=b.gap_after_m, group=group)


def plan_buildings(*, seed: int, split: str, routes: list, margin_m: float,
                   lookalikes_per_km: float) -> tuple[list, list]:
    """Buildings of every route of a split and the look-alike runs.

    Returns ``(buildings_per_route, lookalikes)``; ``lookalikes`` lists dicts with the group id and
    the (route, arc centre) of the source and the copy, which lie >= 150 m apart on the map.
    """
    per_route = []
    for r, route in enumerate(routes):
        rng = _split_rng(seed, split, 1, r)
        buildings, length = [], 0.0
        while length < route.length + 2 * margin_m:
            b = _new_building(rng)
            buildings.append(b)
            length += b.width_m + b.gap_after_m
        per_route.append(buildings)
    rng = _split_rng(seed, split, 2)
    total_km = sum(route.length for route in routes) / 1000.0
    wanted = max(1, int(round(total_km * lookalikes_per_km))) if lookalikes_per_km > 0 else 0
    used = [set() for _ in routes]
    runs = []
    for buildings in per_route:
        _place_buildings(buildings, -margin_m)
    for group in range(wanted):
        for _attempt in range(200):
            r1, r2 = int(rng.integers(len(routes))), int(rng.integers(len(routes)))
            n1, n2 = len(per_route[r1]), len(per_route[r2])
            i, j = int(rng.integers(n1 - LOOKALIKE_RUN + 1)), int(rng.integers(n2 - LOOKALIKE_RUN + 1))
            span_i, span_j = set(range(i, i + LOOKALIKE_RUN)), set(range(j, j + LOOKALIKE_RUN))
            if span_i & used[r1] or span_j & used[r2] or (r1 == r2 and span_i & span_j):
                continue
            source = per_route[r1][i:i + LOOKALIKE_RUN]
            replaced = per_route[r2][j:j + LOOKALIKE_RUN]
            content = source[-1].x0_m + source[-1].width_m - source[0].x0_m
            room = replaced[-1].x0_m + replaced[-1].width_m + replaced[-1].gap_after_m - replaced[0].x0_m
            # The copy must fit in the place of the buildings it replaces, leaving at most an 8 m
            # alley: then nothing else on the route moves and the distances below stay exact.
            if not 0.0 <= room - content <= 8.0:
                continue
            c1, c2 = _run_centre(per_route[r1], i), replaced[0].x0_m + content / 2
            # Both runs must be seen by the cameras (inside the route) and lie far apart on the map.
            if not (10.0 <= c1 <= routes[r1].length - 10.0 and 10.0 <= c2 <= routes[r2].length - 10.0):
                continue
            p1 = np.array(route_position(routes[r1], np.array([c1]))[:2]).ravel()
            p2 = np.array(route_position(routes[r2], np.array([c2]))[:2]).ravel()
            if np.linalg.norm(p1 - p2) < LOOKALIKE_MIN_DIST_M:
                continue
            x = replaced[0].x0_m
            for k, src in enumerate(source):
                src.group = group
                copy = _perturbed_copy(src, rng, group)
                copy.x0_m = x
                if k == LOOKALIKE_RUN - 1:
                    copy.gap_after_m = room - content
                x += copy.width_m + copy.gap_after_m
                per_route[r2][j + k] = copy
            used[r1] |= span_i
            used[r2] |= span_j
            runs.append((group, r1, i, r2, j))
            break
    lookalikes = []
    for group, r1, i, r2, j in runs:
        c1, c2 = _run_centre(per_route[r1], i), _run_centre(per_route[r2], j)
        p1 = np.array(route_position(routes[r1], np.array([c1]))[:2]).ravel()
        p2 = np.array(route_position(routes[r2], np.array([c2]))[:2]).ravel()
        lookalikes.append(dict(group=group, source_route=r1, source_s=round(c1, 2), copy_route=r2,
                               copy_s=round(c2, 2), distance_m=round(float(np.linalg.norm(p1 - p2)), 2)))
    return per_route, lookalikes


def _run_centre(buildings: list, i: int) -> float:
    first, last = buildings[i], buildings[i + LOOKALIKE_RUN - 1]
    return 0.5 * (first.x0_m + last.x0_m + last.width_m)


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
    def y_base(self) -> int:   # canvas row of the facades' foot
        return int(self.my + 0.74 * self.height)


def make_geometry(image_size: tuple[int, int]) -> Geometry:
    h, w = image_size
    # Margins hold everything the most extreme query view samples (zoomed out, oblique, panned,
    # tilted and rolled; see view_quad), so no view reaches past the rendered canvas.
    stretch = (1.0 + QUERY_MAX_YAW_DEG * OBLIQUE_PER_DEGREE) / QUERY_ZOOM_RANGE[0]
    half_w, half_h = w / 2 * stretch, h / 2 * stretch
    roll = math.radians(QUERY_ROLL_DEG)
    mx = int(math.ceil(half_w * math.cos(roll) + half_h * math.sin(roll) + QUERY_PAN * w - w / 2)) + 2
    my = int(math.ceil(half_w * math.sin(roll) + half_h * math.cos(roll) + QUERY_TILT * h - h / 2)) + 2
    ppm = w / VIEW_WIDTH_M
    # Strips extend beyond both route ends by half a canvas plus some slack (foreground parallax).
    margin_m = (w + 2 * mx) / ppm
    return Geometry(height=h, width=w, mx=mx, my=my, ppm=ppm, margin_m=margin_m)


def _rect(method, xy: Sequence[float], **kwargs) -> None:
    """Call an ImageDraw box method (rectangle, ellipse, ...) with the corners put in order, so that
    small random sizes that collapse a box never make Pillow reject it."""
    x0, y0, x1, y1 = xy
    x0, x1 = sorted((float(x0), float(x1)))
    y0, y1 = sorted((float(y0), float(y1)))
    if "radius" in kwargs:
        # Pillow rejects a corner radius near half the box size; tiny boxes get square corners.
        kwargs["radius"] = int(max(0.0, min(kwargs["radius"], (x1 - x0) / 2 - 2, (y1 - y0) / 2 - 2)))
    method([x0, y0, x1, y1], **kwargs)


def _shade(rgb: Sequence[int], factor: float) -> tuple:
    return tuple(int(np.clip(v * factor, 0, 255)) for v in rgb)


def _draw_building(draw: ImageDraw.ImageDraw, lit: ImageDraw.ImageDraw, b: Building, g: Geometry,
                   x_offset_px: float) -> None:
    rs = np.random.default_rng(b.structure_seed)
    rd = np.random.default_rng(b.detail_seed)
    H = g.height
    left = (b.x0_m * g.ppm) - x_offset_px
    right = left + b.width_m * g.ppm
    base = g.y_base
    top = base - b.height_frac * H
    wall = b.wall
    _rect(draw.rectangle, [left, top, right, base], fill=wall + (255,))

    texture = int(rs.integers(4))
    if texture == 1:      # brick courses
        step = max(2.0, H * rs.uniform(0.012, 0.02))
        col = _shade(wall, 0.85) + (255,)
        y = top + step
        while y < base:
            draw.line([left, y, right, y], fill=col, width=1)
            y += step
    elif texture == 2:    # vertical siding
        step = max(3.0, g.ppm * rs.uniform(0.4, 0.9))
        col = _shade(wall, 0.88) + (255,)
        x = left + step
        while x < right:
            draw.line([x, top, x, base], fill=col, width=1)
            x += step
    elif texture == 3:    # concrete panels
        col = _shade(wall, 0.8) + (255,)
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
    roof_col = _shade(wall, rs.uniform(0.45, 0.75)) + (255,)
    if roof == 0:         # cornice band
        _rect(draw.rectangle, [left - 1, top, right + 1, top + H * 0.025], fill=roof_col)
    elif roof == 1:       # gable
        peak = top - H * rs.uniform(0.06, 0.14)
        draw.polygon([(left, top), ((left + right) / 2, peak), (right, top)], fill=roof_col)
    elif roof == 2:       # stepped penthouse
        inset = (right - left) * rs.uniform(0.15, 0.35)
        _rect(draw.rectangle, [left + inset, top - H * rs.uniform(0.05, 0.12), right - inset, top], fill=roof_col)
    else:                 # parapet with a water tank
        _rect(draw.rectangle, [left, top - H * 0.015, right, top], fill=roof_col)
        tx = left + (right - left) * rs.uniform(0.2, 0.7)
        _rect(draw.rectangle, [tx, top - H * 0.08, tx + g.ppm * 1.5, top], fill=_shade(roof_col[:3], 0.7) + (255,))

    # Window grid.
    floor_px = H * rs.uniform(0.075, 0.11)
    ground_px = floor_px * rs.uniform(1.25, 1.6)
    style = int(rs.integers(4))
    glass_palette = [(40, 55, 75), (70, 90, 110), (30, 40, 40), (120, 150, 170), (60, 50, 45)]
    glass = glass_palette[int(rs.integers(len(glass_palette)))]
    frame = _shade(wall, rs.uniform(0.5, 1.4))
    lit_p = rd.uniform(0.15, 0.6)
    pitch_px = g.ppm * rs.uniform(1.6, 3.2)
    n_cols = max(1, int((right - left) / pitch_px))
    pitch_px = (right - left) / n_cols
    win_w = pitch_px * rs.uniform(0.4, 0.7)
    win_h = floor_px * rs.uniform(0.45, 0.7)
    y_floor = base - ground_px
    if style == 3:        # glass curtain wall over the upper floors
        _rect(draw.rectangle, [left + 2, top + H * 0.03, right - 2, y_floor - 2], fill=glass + (255,))
    while y_floor - floor_px > top + H * 0.02:
        y0 = y_floor - floor_px + (floor_px - win_h) / 2
        y1 = y0 + win_h
        if style == 1:    # ribbon windows
            _rect(draw.rectangle, [left + pitch_px * 0.2, y0, right - pitch_px * 0.2, y1], fill=glass + (255,))
            for c in range(1, n_cols):
                x = left + c * pitch_px
                draw.line([x, y0, x, y1], fill=frame + (255,), width=1)
        for c in range(n_cols):
            x0 = left + c * pitch_px + (pitch_px - win_w) / 2
            x1 = x0 + win_w
            if style == 0:
                _rect(draw.rectangle, [x0 - 1, y0 - 1, x1 + 1, y1 + 1], fill=frame + (255,))
                _rect(draw.rectangle, [x0, y0, x1, y1], fill=glass + (255,))
            elif style == 2:  # tall rounded windows
                _rect(draw.rounded_rectangle, [x0, y0 - win_h * 0.15, x1, y1], radius=win_w / 2.5, fill=glass + (255,),
                                       outline=frame + (255,))
            elif style == 3:
                draw.line([x0, y0 - 2, x0, y1 + 2], fill=frame + (255,), width=1)
            if rd.random() < lit_p:
                _rect(lit.rectangle, [x0, y0, x1, y1], fill=int(rd.uniform(140, 255)))
        y_floor -= floor_px

    # Ground floor: shop front with awning and sign, or door with windows.
    if rs.random() < 0.6:
        shop_l, shop_r = left + (right - left) * 0.08, right - (right - left) * 0.08
        shop_t = base - ground_px * 0.75
        _rect(draw.rectangle, [shop_l, shop_t, shop_r, base], fill=_shade(glass, 1.3) + (255,))
        if rd.random() < 0.8:
            _rect(lit.rectangle, [shop_l, shop_t, shop_r, base], fill=230)
        awn = tuple(int(v) for v in rs.integers(30, 230, size=3))
        awn2 = _shade(awn, 0.6) if rs.random() < 0.5 else (235, 235, 230)
        stripe = max(2.0, g.ppm * 0.5)
        x = shop_l
        k = 0
        awn_b = shop_t + ground_px * 0.12
        while x < shop_r:
            _rect(draw.rectangle, [x, shop_t - 2, min(x + stripe, shop_r), awn_b],
                  fill=(awn if k % 2 == 0 else awn2) + (255,))
            x += stripe
            k += 1
        sign = tuple(int(v) for v in rd.integers(20, 240, size=3))
        sign_h = max(7.0, ground_px * 0.3)
        sign_t = shop_t - 3 - sign_h
        sx0 = shop_l + (shop_r - shop_l) * rd.uniform(0.0, 0.3)
        sx1 = shop_r - (shop_r - shop_l) * rd.uniform(0.0, 0.3)
        _rect(draw.rectangle, [sx0, sign_t, sx1, shop_t - 3], fill=sign + (255,))
        letter = (255, 255, 255) if sum(sign) < 380 else (20, 20, 20)
        x = sx0 + 3
        while x < sx1 - 4:   # lettering: bars of random widths
            w = rd.uniform(2, 6)
            _rect(draw.rectangle, [x, sign_t + sign_h * 0.25, min(x + w, sx1 - 3), sign_t + sign_h * 0.75],
                  fill=letter + (255,))
            x += w + rd.uniform(2, 4)
    else:
        door_x = left + (right - left) * rs.uniform(0.2, 0.7)
        _rect(draw.rectangle, [door_x, base - ground_px * 0.8, door_x + g.ppm * 1.4, base],
              fill=_shade(wall, 0.35) + (255,))
        for c in range(n_cols):
            x0 = left + c * pitch_px + (pitch_px - win_w) / 2
            if abs(x0 - door_x) < pitch_px * 0.8:
                continue
            y0 = base - ground_px * 0.8
            _rect(draw.rectangle, [x0, y0, x0 + win_w, y0 + ground_px * 0.5], fill=glass + (255,),
                  outline=frame + (255,))


def _draw_skyline(draw, lit, rng: np.random.Generator, g: Geometry, length_px: int) -> None:
    x = -10.0
    haze = np.array([175, 188, 205], dtype=float)
    while x < length_px:
        w = g.ppm * rng.uniform(6, 28)
        h = g.height * rng.uniform(0.35, 0.85)
        col = np.clip(0.72 * haze + 0.28 * rng.integers(40, 200, size=3), 0, 255).astype(int)
        top = g.y_base - h
        _rect(draw.rectangle, [x, top, x + w, g.y_base], fill=tuple(int(v) for v in col) + (255,))
        if rng.random() < 0.3:   # antenna
            ax = x + w * rng.uniform(0.3, 0.7)
            draw.line([ax, top, ax, top - g.height * 0.08], fill=tuple(int(v) for v in col * 0.9) + (255,), width=1)
        # Sparse lit windows, visible only at night.
        for _ in range(int(w * h / 600)):
            wx, wy = x + rng.uniform(2, max(3, w - 3)), top + rng.uniform(3, max(4, h - 3))
            if rng.random() < 0.35:
                _rect(lit.rectangle, [wx, wy, wx + 1, wy + 2], fill=int(rng.uniform(90, 200)))
        x += w + (g.ppm * rng.uniform(0, 6) if rng.random() < 0.4 else 0)


def _draw_street_furniture(draw, lamps, rng: np.random.Generator, g: Geometry, length_px: int) -> None:
    H = g.height
    foot = g.y_base + 0.1 * H
    x = rng.uniform(0, 8) * g.ppm
    while x < length_px:
        kind = int(rng.choice(5, p=[0.3, 0.2, 0.3, 0.1, 0.1]))
        if kind == 0:     # street lamp
            top = foot - H * rng.uniform(0.6, 0.8)
            col = tuple(int(v) for v in rng.integers(30, 80, size=3)) + (255,)
            _rect(draw.rectangle, [x, top, x + 3, foot], fill=col)
            arm = g.ppm * rng.uniform(1.0, 2.0) * (1 if rng.random() < 0.5 else -1)
            draw.line([x + 1, top, x + 1 + arm, top], fill=col, width=2)
            hx = x + 1 + arm
            head = [hx - 5, top, hx + 5, top + 5]
            _rect(draw.rectangle, head, fill=(200, 200, 180, 255))
            _rect(lamps.ellipse, [hx - 4, top + 1, hx + 4, top + 6], fill=255)
        elif kind == 1:   # traffic sign on a pole
            top = foot - H * rng.uniform(0.35, 0.5)
            _rect(draw.rectangle, [x, top, x + 2, foot], fill=(120, 120, 125, 255))
            r = H * rng.uniform(0.04, 0.07)
            colour = [(200, 30, 30), (30, 70, 180), (240, 200, 20), (30, 140, 60)][int(rng.integers(4))]
            shape = int(rng.integers(3))
            box = [x + 1 - r, top - r, x + 1 + r, top + r]
            if shape == 0:
                _rect(draw.ellipse, box, fill=colour + (255,), outline=(240, 240, 240, 255), width=2)
            elif shape == 1:
                draw.polygon([(x + 1, top - r), (x + 1 + r, top + r), (x + 1 - r, top + r)], fill=colour + (255,),
                             outline=(240, 240, 240, 255))
            else:
                _rect(draw.rectangle, box, fill=colour + (255,), outline=(240, 240, 240, 255), width=2)
        elif kind == 2:   # tree
            trunk_h = H * rng.uniform(0.15, 0.3)
            _rect(draw.rectangle, [x, foot - trunk_h, x + g.ppm * 0.35, foot], fill=(90, 60, 35, 255))
            cr = H * rng.uniform(0.12, 0.22)
            cx, cy = x + g.ppm * 0.17, foot - trunk_h - cr * 0.6
            green = np.array([50, 110, 45]) + rng.integers(-25, 40, size=3)
            for _ in range(int(rng.integers(3, 6))):
                ox, oy = rng.uniform(-0.5, 0.5) * cr, rng.uniform(-0.5, 0.3) * cr
                rr = cr * rng.uniform(0.55, 0.9)
                shade = np.clip(green * rng.uniform(0.8, 1.2), 0, 255).astype(int)
                _rect(draw.ellipse, [cx + ox - rr, cy + oy - rr, cx + ox + rr, cy + oy + rr],
                             fill=tuple(int(v) for v in shade) + (255,))
        elif kind == 3:   # bus shelter
            w = g.ppm * rng.uniform(3, 5)
            top = foot - H * 0.28
            _rect(draw.rectangle, [x, top, x + w, foot], fill=(150, 180, 190, 150), outline=(60, 60, 60, 255), width=2)
            _rect(draw.rectangle, [x, top, x + w, top + H * 0.03], fill=(60, 60, 60, 255))
        else:             # bin / hydrant / bollard
            w = g.ppm * rng.uniform(0.5, 0.9)
            h = H * rng.uniform(0.06, 0.1)
            colour = tuple(int(v) for v in rng.integers(20, 220, size=3))
            _rect(draw.rectangle, [x, foot - h, x + w, foot], fill=colour + (255,))
        x += g.ppm * rng.uniform(5.0, 16.0)


@dataclasses.dataclass
class SceneLayer:
    """One pre-rendered strip: day RGBA (Lpx x Hc), lit-window mask, parallax, night darkening."""
    day: Image.Image
    lit: Image.Image
    parallax: float
    darkness: float
    night: Optional[Image.Image] = None   # made on first use: only routes with night queries pay for it

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


def render_route_scene(*, seed: int, split: str, route_index: int, route: Route, buildings: list,
                       g: Geometry) -> RouteScene:
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
            offset_px = -g.margin_m * g.ppm   # strip x = (s + margin) * ppm
            for b in buildings:
                if b.x0_m + b.width_m < -g.margin_m or b.x0_m > route.length + g.margin_m:
                    continue
                _draw_building(draw, lit_draw, b, g, offset_px)
            darkness = 0.16
        elif name == "skyline":
            _draw_skyline(draw, lit_draw, _split_rng(seed, split, 4, route_index), g, length_px)
            darkness = 0.09
        else:
            _draw_street_furniture(draw, lit_draw, _split_rng(seed, split, 5, route_index), g, length_px)
            darkness = 0.12
            blurred = np.asarray(lit.filter(ImageFilter.GaussianBlur(radius=max(2.0, g.height * 0.05))),
                                 dtype=np.float32) / 255.0
            glow_rgb = np.clip(blurred[..., None] * np.array([360, 300, 180], dtype=np.float32), 0, 255)
            glow = Image.fromarray(np.rint(glow_rgb).astype(np.uint8), "RGB")
        layers.append(SceneLayer(day=rgba, lit=lit, parallax=par, darkness=darkness))
    return RouteScene(layers=layers, glow=glow)


# ----------------------------------------------------------------------------------------------
# Views: composition, viewpoint, occluders, light
# ----------------------------------------------------------------------------------------------

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


def view_quad(g: Geometry, *, zoom: float, pan_px: float, tilt_px: float, roll_deg: float,
              oblique: float) -> np.ndarray:
    """Source quad (4, 2) in canvas pixels of a view: zoom > 1 magnifies; ``oblique`` in [-0.4, 0.4]
    makes one side of the facade nearer (a camera turned towards the direction of travel)."""
    hc, wc = g.canvas
    w, h = g.width, g.height
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]], dtype=np.float64)
    corners /= zoom
    if oblique:
        side = np.sign(corners[:, 0])   # -1 left, +1 right
        corners[:, 1] *= 1.0 + oblique * side
        corners[:, 0] *= 1.0 + abs(oblique)
    t = math.radians(roll_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    corners = corners @ rot.T
    return corners + np.array([wc / 2 + pan_px, hc / 2 + tilt_px])


def _background(g: Geometry, s: float, rng: np.random.Generator, night: bool,
                box: tuple[int, int, int, int]) -> np.ndarray:
    """Sky gradient, sidewalk, kerb, asphalt and lane dashes of the canvas region ``box`` = (x0, y0,
    x1, y1): (y1 - y0, x1 - x0, 3) uint8."""
    hc, wc = g.canvas
    bx0, by0, bx1, by1 = box
    if night:
        top, bottom = np.array([5, 7, 20]), np.array([30, 32, 55]) + rng.integers(0, 15, size=3)
    else:
        kind = int(rng.integers(3))
        if kind == 0:     # clear
            top, bottom = np.array([70, 125, 205]), np.array([175, 205, 235])
        elif kind == 1:   # overcast
            top, bottom = np.array([150, 155, 165]), np.array([205, 205, 210])
        else:             # warm evening
            top, bottom = np.array([100, 120, 180]), np.array([235, 190, 150])
        top = top + rng.integers(-15, 15, size=3)
        bottom = bottom + rng.integers(-15, 15, size=3)
    t = np.linspace(0.0, 1.0, hc)[:, None]
    rows = top[None, :] * (1 - t) + bottom[None, :] * t          # (Hc, 3)
    k = 0.25 if night else 1.0
    y0 = g.y_base
    kerb = int(y0 + 0.06 * g.height)
    rows[y0:kerb] = np.array([160, 158, 150]) * k
    rows[kerb:kerb + 2] = 110 * k
    rows[kerb + 2:] = rng.uniform(70, 95) * k
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


def compose_view(scene: RouteScene, g: Geometry, s: float, *, night: bool, rng: np.random.Generator,
                 box: Optional[tuple[int, int, int, int]] = None) -> Image.Image:
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
        body = _shade(body, 0.2)
    _rect(draw.rounded_rectangle, [x0, y0 + ch * 0.35, x0 + cw, y1 - ch * 0.12], radius=ch * 0.15, fill=body)
    _rect(draw.rounded_rectangle, [x0 + cw * 0.2, y0, x0 + cw * 0.78, y0 + ch * 0.45], radius=ch * 0.12, fill=body)
    glass = (25, 30, 40) if night else (90, 120, 150)
    _rect(draw.rectangle, [x0 + cw * 0.25, y0 + ch * 0.06, x0 + cw * 0.48, y0 + ch * 0.38], fill=glass)
    _rect(draw.rectangle, [x0 + cw * 0.51, y0 + ch * 0.06, x0 + cw * 0.73, y0 + ch * 0.38], fill=glass)
    r = ch * 0.2
    for wx in (x0 + cw * 0.2, x0 + cw * 0.8):
        _rect(draw.ellipse, [wx - r, y1 - 2 * r, wx + r, y1], fill=(15, 15, 15))
    if night:
        _rect(draw.ellipse, [x0 + cw - 6, y0 + ch * 0.45, x0 + cw, y0 + ch * 0.6], fill=(255, 245, 200))
        _rect(draw.ellipse, [x0, y0 + ch * 0.45, x0 + 5, y0 + ch * 0.6], fill=(220, 30, 30))


def _draw_pedestrian(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, night: bool) -> None:
    ph = h * rng.uniform(0.25, 0.45)
    x = rng.uniform(0, w)
    foot = h * rng.uniform(0.8, 1.0)
    k = 0.2 if night else 1.0
    clothes = _shade(tuple(int(v) for v in rng.integers(10, 230, size=3)), k)
    skin = _shade((int(rng.integers(90, 230)), int(rng.integers(70, 190)), int(rng.integers(50, 160))), k)
    head = ph * 0.13
    _rect(draw.ellipse, [x - head / 2, foot - ph, x + head / 2, foot - ph + head], fill=skin)
    _rect(draw.rounded_rectangle, [x - ph * 0.13, foot - ph + head, x + ph * 0.13, foot - ph * 0.45], radius=3,
          fill=clothes)
    legs = _shade(clothes, 0.6)
    draw.line([x - ph * 0.06, foot - ph * 0.45, x - ph * 0.08, foot], fill=legs, width=max(2, int(ph * 0.07)))
    draw.line([x + ph * 0.06, foot - ph * 0.45, x + ph * 0.09, foot], fill=legs, width=max(2, int(ph * 0.07)))


def _draw_blob(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, night: bool) -> None:
    r = min(w, h) * rng.uniform(0.08, 0.2)
    cx, cy = rng.uniform(0, w), rng.uniform(0.3 * h, h)
    col = _shade(tuple(int(v) for v in rng.integers(0, 255, size=3)), 0.2 if night else 1.0)
    _rect(draw.ellipse, [cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r], fill=col)


def make_noise_bank(rng: np.random.Generator, image_size: tuple[int, int]) -> np.ndarray:
    """Unit Gaussian noise (2H, 2W, 3) float32 from which every image of a split takes a window."""
    h, w = image_size
    return rng.standard_normal(size=(2 * h, 2 * w, 3), dtype=np.float32)


def _finish(image: Image.Image, rng: np.random.Generator, *, brightness: float, contrast: float,
            gains: np.ndarray, gamma: float, noise: float, blur: float, noise_bank: np.ndarray) -> Image.Image:
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
        x += noise * noise_bank[oy:oy + h, ox:ox + w]
        np.rint(x, out=x)
        np.clip(x, 0, 255, out=x)
        image = Image.fromarray(x.astype(np.uint8), "RGB")
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(radius=blur))
    return image


def render_shot(scene: RouteScene, g: Geometry, shot: Shot, rng: np.random.Generator,
                noise_bank: np.ndarray) -> Image.Image:
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
        return _finish(image, rng, brightness=rng.uniform(0.92, 1.08), contrast=rng.uniform(0.95, 1.05),
                       gains=rng.uniform(0.97, 1.03, size=3), gamma=1.0, noise=1.5, blur=0.0,
                       noise_bank=noise_bank)
    zoom = CAMERA_DISTANCE_M / (CAMERA_DISTANCE_M - shot.lateral) * rng.uniform(0.92, 1.1)
    zoom = float(np.clip(zoom, *QUERY_ZOOM_RANGE))
    # Turned towards the travel direction, the camera sees the facade ahead (image left) farther away.
    oblique = -shot.yaw * OBLIQUE_PER_DEGREE
    quad = view_quad(g, zoom=zoom, pan_px=rng.uniform(-QUERY_PAN, QUERY_PAN) * w,
                     tilt_px=rng.uniform(-QUERY_TILT, QUERY_TILT) * h,
                     roll_deg=rng.uniform(-QUERY_ROLL_DEG, QUERY_ROLL_DEG), oblique=oblique)
    source = compose_view(scene, g, shot.s, night=night, rng=rng)
    image = source.transform((w, h), Image.Transform.PERSPECTIVE, perspective_coefficients((w, h), quad),
                             resample=Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.poisson(0.9))):
        _draw_car(draw, rng, w, h, night)
    for _ in range(int(rng.poisson(1.0))):
        _draw_pedestrian(draw, rng, w, h, night)
    if rng.random() < 0.15:
        _draw_blob(draw, rng, w, h, night)
    if night:
        cast = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.15, 0.15, size=3)
        return _finish(image, rng, brightness=rng.uniform(0.8, 1.3), contrast=rng.uniform(0.8, 1.2), gains=cast,
                       gamma=rng.uniform(0.85, 1.15), noise=rng.uniform(5.0, 12.0),
                       blur=rng.uniform(0.5, 1.5) if rng.random() < 0.5 else 0.0, noise_bank=noise_bank)
    return _finish(image, rng, brightness=rng.uniform(0.6, 1.45), contrast=rng.uniform(0.7, 1.3),
                   gains=rng.uniform(0.85, 1.15, size=3), gamma=rng.uniform(0.8, 1.25), noise=rng.uniform(2.0, 7.0),
                   blur=rng.uniform(0.5, 1.5) if rng.random() < 0.3 else 0.0, noise_bank=noise_bank)


# ----------------------------------------------------------------------------------------------
# Options, generation, atomic publishing
# ----------------------------------------------------------------------------------------------

class OptionError(ValueError):
    """A bad option or a data set folder that does not match the options; the message names the flag."""


def resolve_options(*, seed: int = 0, preset: str = "default",
                    train_database_num: Optional[int] = None, train_queries_num: Optional[int] = None,
                    val_database_num: Optional[int] = None, val_queries_num: Optional[int] = None,
                    test_database_num: Optional[int] = None, test_queries_num: Optional[int] = None,
                    routes_per_split: Optional[int] = None, image_size: Sequence[int] = (192, 256),
                    db_spacing_m: float = 6.0, night_fraction: float = 0.25, sideways_fraction: float = 0.4,
                    lookalikes_per_km: float = 2.0, jpeg_quality: int = 90) -> dict:
    """Validate the options and fill the preset's sizes: a JSON-able dict (the manifest's ``params``).

    Raises ValueError naming the flag (``--name`` = keyword ``name``) and the accepted range.
    """
    def bad(flag: str, msg: str) -> OptionError:
        return OptionError(f"--{flag} {msg}")

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise bad("seed", f"must be a non-negative integer, got {seed!r}")
    if preset not in PRESETS:
        raise bad("preset", f"must be one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    given = dict(train_database_num=train_database_num, train_queries_num=train_queries_num,
                 val_database_num=val_database_num, val_queries_num=val_queries_num,
                 test_database_num=test_database_num, test_queries_num=test_queries_num)
    sizes, routes = {}, {}
    for split in SPLITS:
        r = p["routes"][split] if routes_per_split is None else routes_per_split
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= 50:
            raise bad("routes_per_split", f"must be an integer in [1, 50], got {r!r}")
        routes[split] = int(r)
        for what, default in (("database", p[split][0]), ("queries", p[split][1])):
            flag = f"{split}_{what}_num"
            n = given[flag] if given[flag] is not None else default
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
                raise bad(flag, f"must be an integer, got {n!r}")
            low = 5 * routes[split] if what == "database" else 2
            if not low <= n <= 200_000:
                hint = (f" (5 per route, {routes[split]} route(s); lower --routes_per_split)"
                        if what == "database" else "")
                raise bad(flag, f"must be in [{low}, 200000]{hint}, got {n}")
            sizes[flag] = int(n)
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
            or not all(32 <= v <= 4096 for v in image_size)):
        raise bad("image_size", f"must be two integers H W, each in [32, 4096], got {image_size!r}")
    # Spacing bound: with +-15 % jitter, +-3 m lateral offset and <= 1.4 m GPS noise, a query lies
    # within 0.575 * spacing + 3 + 2.8 m of a database image; 12 m keeps that under 10 m (hard positives).
    if not isinstance(db_spacing_m, (int, float)) or not 1.0 <= db_spacing_m <= 12.0:
        raise bad("db_spacing_m", f"must be in [1, 12] metres (every query needs a database image within 10 m), "
                                  f"got {db_spacing_m!r}")
    for flag, v in (("night_fraction", night_fraction), ("sideways_fraction", sideways_fraction)):
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise bad(flag, f"must be in [0, 1], got {v!r}")
    if not isinstance(lookalikes_per_km, (int, float)) or not 0.0 <= lookalikes_per_km <= 20.0:
        raise bad("lookalikes_per_km", f"must be in [0, 20], got {lookalikes_per_km!r}")
    if (isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, (int, np.integer))
            or not 10 <= jpeg_quality <= 100):
        raise bad("jpeg_quality", f"must be an integer in [10, 100], got {jpeg_quality!r}")
    return dict(generator_version=GENERATOR_VERSION, seed=int(seed), preset=preset, **sizes,
                routes_per_split=routes, image_size=[int(image_size[0]), int(image_size[1])],
                db_spacing_m=float(db_spacing_m), night_fraction=float(night_fraction),
                sideways_fraction=float(sideways_fraction), lookalikes_per_km=float(lookalikes_per_km),
                jpeg_quality=int(jpeg_quality))


def _check_name(datasets_folder: str, dataset_name: str) -> Path:
    if not isinstance(dataset_name, str) or not dataset_name or dataset_name.startswith(".") \
            or "/" in dataset_name or os.sep in dataset_name or dataset_name in ("..",):
        raise OptionError(f"--dataset_name must be a plain folder name (no '/', not starting with '.'), "
                         f"got {dataset_name!r}")
    if not datasets_folder:
        raise OptionError("--datasets_folder is empty: give the folder that holds the data sets")
    folder = Path(datasets_folder)
    if folder.exists() and not folder.is_dir():
        raise OptionError(f"--datasets_folder {datasets_folder!r} exists and is not a folder")
    return folder / dataset_name


def _write_split(root: Path, params: dict, split: str) -> dict:
    """Render one split into ``root``; returns its manifest entry."""
    seed = params["seed"]
    g = make_geometry(tuple(params["image_size"]))
    plan = plan_split(seed=seed, split=split, database_num=params[f"{split}_database_num"],
                      queries_num=params[f"{split}_queries_num"], routes_num=params["routes_per_split"][split],
                      db_spacing_m=params["db_spacing_m"], night_fraction=params["night_fraction"],
                      sideways_fraction=params["sideways_fraction"])
    # The generator guarantees what the training code relies on; fail loudly if it ever does not.
    q = np.array([[s.east, s.north] for s in plan.queries])
    d = np.array([[s.east, s.north] for s in plan.database])
    nearest = min_distances(q, d)
    if nearest.max() > HARD_POSITIVE_RADIUS_M:
        raise RuntimeError(f"internal error: a {split} query is {nearest.max():.1f} m from the database")
    buildings, lookalikes = plan_buildings(seed=seed, split=split, routes=plan.routes, margin_m=g.margin_m,
                                           lookalikes_per_km=params["lookalikes_per_km"])
    for kind in ("database", "queries"):
        (root / "images" / split / kind).mkdir(parents=True, exist_ok=True)
    noise_bank = make_noise_bank(_split_rng(seed, split, 7), (g.height, g.width))
    for r, route in enumerate(plan.routes):
        scene = render_route_scene(seed=seed, split=split, route_index=r, route=route, buildings=buildings[r], g=g)
        for shot in [s for s in plan.database + plan.queries if s.route == r]:
            rng = _split_rng(seed, split, 6, 0 if shot.kind == "database" else 1, shot.index)
            image = render_shot(scene, g, shot, rng, noise_bank)
            image.save(root / "images" / split / shot.kind / shot.name, format="JPEG", quality=params["jpeg_quality"])
    return dict(database_num=len(plan.database), queries_num=len(plan.queries),
                night_queries=sum(s.night for s in plan.queries),
                sideways_queries=sum(s.sideways for s in plan.queries),
                max_query_to_database_m=round(float(nearest.max()), 2),
                routes=[dict(length_m=round(r.length, 2), start_utm=[round(float(v), 2) for v in r.vertices[0]])
                        for r in plan.routes],
                lookalikes=lookalikes)


def _build_into(temp_root: Path, params: dict) -> None:
    manifest = dict(params=params, splits={})
    for split in SPLITS:
        manifest["splits"][split] = _write_split(temp_root, params, split)
    with open(temp_root / MANIFEST_NAME, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


def _publish(temp_root: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``temp_root`` to ``target`` (atomic on one file system)."""
    if target.exists() and overwrite:
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, trash / "old")
        os.rename(temp_root, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(temp_root, target)   # fails if another process published first


def generate(datasets_folder: str, dataset_name: str = "synthetic", *, seed: int = 0, preset: str = "default",
             train_database_num: Optional[int] = None, train_queries_num: Optional[int] = None,
             val_database_num: Optional[int] = None, val_queries_num: Optional[int] = None,
             test_database_num: Optional[int] = None, test_queries_num: Optional[int] = None,
             routes_per_split: Optional[int] = None, image_size: Sequence[int] = (192, 256),
             db_spacing_m: float = 6.0, night_fraction: float = 0.25, sideways_fraction: float = 0.4,
             lookalikes_per_km: float = 2.0, jpeg_quality: int = 90, overwrite: bool = False) -> Path:
    """Generate the data set and return its root ``<datasets_folder>/<dataset_name>``.

    Sizes default to the preset ("default": train 600/300, val 200/100, test 300/150 database/queries;
    "tiny": 40/15 per split); ``image_size`` is (H, W) of every image. Written into a hidden temporary
    folder beside the target and renamed into place when complete. An existing target is an error
    unless ``overwrite`` (then it is replaced only once the new set is complete).
    """
    params = resolve_options(seed=seed, preset=preset, train_database_num=train_database_num,
                             train_queries_num=train_queries_num, val_database_num=val_database_num,
                             val_queries_num=val_queries_num, test_database_num=test_database_num,
                             test_queries_num=test_queries_num, routes_per_split=routes_per_split,
                             image_size=image_size, db_spacing_m=db_spacing_m, night_fraction=night_fraction,
                             sideways_fraction=sideways_fraction, lookalikes_per_km=lookalikes_per_km,
                             jpeg_quality=jpeg_quality)
    target = _check_name(datasets_folder, dataset_name)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists: pass --overwrite (overwrite=True) to replace it, "
                              f"choose another --dataset_name, or use --if_missing (ensure_dataset) to reuse it")
    return _generate_params(target, params, overwrite=overwrite)


def _generate_params(target: Path, params: dict, *, overwrite: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp_root = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(temp_root, 0o755)   # mkdtemp makes it private; the published data set should not be
    try:
        _build_into(temp_root, params)
        _publish(temp_root, target, overwrite)
    except BaseException:
        shutil.rmtree(temp_root, ignore_errors=True)
        raise
    return target


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest (``params``, ``splits``) of a generated data set root."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} was not made by synthetic_dataset.py "
                                f"(or is incomplete); delete it or choose another --dataset_name")
    with open(path) as f:
        return json.load(f)


def ensure_dataset(datasets_folder: str, dataset_name: str = "synthetic", *, seed: int = 0,
                   preset: str = "default", train_database_num: Optional[int] = None,
                   train_queries_num: Optional[int] = None, val_database_num: Optional[int] = None,
                   val_queries_num: Optional[int] = None, test_database_num: Optional[int] = None,
                   test_queries_num: Optional[int] = None, routes_per_split: Optional[int] = None,
                   image_size: Sequence[int] = (192, 256), db_spacing_m: float = 6.0,
                   night_fraction: float = 0.25, sideways_fraction: float = 0.4,
                   lookalikes_per_km: float = 2.0, jpeg_quality: int = 90) -> Path:
    """Return the data set root, generating it first (as :func:`generate`) when it does not exist yet.

    An existing folder is reused only when its manifest records the same options; otherwise an
    OptionError (a ValueError) says what differs. Safe when several processes call it at once: each
    builds privately and the first rename wins. A folder is only ever published complete, so an
    interrupted run leaves nothing that this function would trust (at most a hidden ``.NAME.tmp-*``
    folder when the process was killed outright, which can be deleted).
    """
    options = dict(seed=seed, preset=preset, train_database_num=train_database_num,
                   train_queries_num=train_queries_num, val_database_num=val_database_num,
                   val_queries_num=val_queries_num, test_database_num=test_database_num,
                   test_queries_num=test_queries_num, routes_per_split=routes_per_split, image_size=image_size,
                   db_spacing_m=db_spacing_m, night_fraction=night_fraction, sideways_fraction=sideways_fraction,
                   lookalikes_per_km=lookalikes_per_km, jpeg_quality=jpeg_quality)
    params = resolve_options(**options)
    target = _check_name(datasets_folder, dataset_name)
    if not target.exists():
        try:
            return _generate_params(target, params, overwrite=False)
        except OSError:
            if not target.exists():   # not a lost race: a real error
                raise
    existing = read_manifest(target)["params"]
    if existing != params:
        diff = sorted(k for k in set(existing) | set(params) if existing.get(k) != params.get(k))
        raise OptionError(f"{target} was generated with other options ({', '.join(diff)} differ: "
                          f"{ {k: existing.get(k) for k in diff} } vs requested { {k: params.get(k) for k in diff} }); "
                          "delete it, pass the same options, or choose another --dataset_name")
    return target


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate the built-in synthetic VPR data set "
                                            "(Visual Geo-localization Benchmark layout).")
    p.add_argument("--datasets_folder", type=os.path.expanduser, default=None,
                   help="folder that receives <dataset_name>/ (default: $DATASETS_FOLDER)")
    p.add_argument("--dataset_name", type=str, default="synthetic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", type=str, default="default", choices=sorted(PRESETS))
    for split in SPLITS:
        for what in ("database", "queries"):
            p.add_argument(f"--{split}_{what}_num", type=int, default=None,
                           help=f"number of {split} {what} images (default: from --preset)")
    p.add_argument("--routes_per_split", type=int, default=None, help="routes per split (default: from --preset)")
    p.add_argument("--image_size", type=int, nargs=2, default=[192, 256], metavar=("H", "W"))
    p.add_argument("--db_spacing_m", type=float, default=6.0, help="metres between database images (1-12)")
    p.add_argument("--night_fraction", type=float, default=0.25)
    p.add_argument("--sideways_fraction", type=float, default=0.4)
    p.add_argument("--lookalikes_per_km", type=float, default=2.0)
    p.add_argument("--jpeg_quality", type=int, default=90)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing data set")
    mode.add_argument("--if_missing", action="store_true",
                      help="reuse an existing data set made with the same options; generate it otherwise")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    folder = args.datasets_folder or os.environ.get("DATASETS_FOLDER")
    if not folder:
        parser.error("--datasets_folder is required (or set the DATASETS_FOLDER environment variable)")
    options = dict(seed=args.seed, preset=args.preset, routes_per_split=args.routes_per_split,
                   image_size=tuple(args.image_size), db_spacing_m=args.db_spacing_m,
                   night_fraction=args.night_fraction, sideways_fraction=args.sideways_fraction,
                   lookalikes_per_km=args.lookalikes_per_km, jpeg_quality=args.jpeg_quality)
    for split in SPLITS:
        for what in ("database", "queries"):
            options[f"{split}_{what}_num"] = getattr(args, f"{split}_{what}_num")
    start = time.perf_counter()
    try:
        if args.if_missing:
            root = ensure_dataset(folder, args.dataset_name, **options)
        else:
            root = generate(folder, args.dataset_name, overwrite=args.overwrite, **options)
    except (OptionError, FileExistsError, FileNotFoundError) as err:
        parser.error(str(err))
    manifest = read_manifest(root)
    counts = ", ".join(f"{s} {m['database_num']}/{m['queries_num']}" for s, m in manifest["splits"].items())
    print(f"{root}: {counts} database/queries images ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
