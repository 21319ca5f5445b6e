"""The plan of a split: its routes, where every camera stands and what its image is labelled.

No pixels are drawn here. A split holds ``routes_num`` routes side by side in its own area of the
map (its own UTM offset, tens of km from the others, so no positive can cross splits). Database
shots stand every ``db_spacing_m`` metres along the routes, facing the facades; query shots stand
at random positions along the same routes, with a lateral offset, a yaw, day or night and a later
timestamp. Labels carry a little clipped GPS noise. Every random choice comes from ``split_rng``,
one independent stream per (seed, split, purpose), which the scene and the views use too.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .camera import MAX_LATERAL_M, QUERY_MAX_YAW_DEG
from .geometry import (
    ImageLabel,
    format_image_name,
    make_route,
    make_route_shape,
    pano_id,
    route_position,
    utm_to_latlon,
)

SPLITS = ("train", "val", "test")
# Split areas: far apart (tens of km) so no positive can cross splits. Zone 17T ~ southern Ontario.
SPLIT_ORIGINS = {"train": (610_000.0, 4_825_000.0), "val": (640_000.0, 4_845_000.0), "test": (670_000.0, 4_865_000.0)}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
GPS_NOISE_M = 0.7  # std of label noise, clipped at 2 sigma
ROUTE_GAP_M = 200.0  # gap between the bounding boxes of two routes of a split
# Every query is planned within this distance of a database image (spacing, lateral offset and GPS
# noise are bounded so that it holds), so each has a positive within training's default 10 m.
HARD_POSITIVE_RADIUS_M = 10.0


@dataclasses.dataclass(frozen=True)
class Shot:
    """One image to render: where the camera really is (route, s, lateral) and its label."""

    kind: str  # "database" or "queries"
    index: int
    route: int
    s: float  # arc length along the route (metres)
    lateral: float  # offset towards the facade (metres, + = closer)
    east: float  # labelled UTM (with GPS noise)
    north: float
    heading: float
    yaw: float  # camera turned this many degrees from the facade normal towards the travel direction
    night: bool
    sideways: bool
    timestamp: int
    key: str
    name: str


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    split: str
    routes: list
    database: list  # [Shot]
    queries: list  # [Shot]


def split_rng(seed: int, split: str, *stream: int) -> np.random.Generator:
    """The random stream of one purpose of a split.

    One independent stream per (seed, split, purpose, ...): changing one count never reshuffles
    the content of unrelated parts. The streams in use: ``0`` the shots (here), ``1, route`` the
    buildings of a route and ``2`` the look-alikes (buildings), ``4, route`` the skyline and
    ``5, route`` the street furniture (scene), ``6, 0|1, index`` each database or query image and
    ``7`` the split's noise bank (writer).
    """
    return np.random.default_rng([seed, SPLIT_CODES[split], *stream])


def plan_split(
    *,
    seed: int,
    split: str,
    database_num: int,
    queries_num: int,
    routes_num: int,
    db_spacing_m: float,
    night_fraction: float,
    sideways_fraction: float,
) -> SplitPlan:
    """Routes, database shots and query shots of one split (pure: no images are drawn).

    Database images: ``database_num`` shared between ``routes_num`` routes, one every
    ``db_spacing_m`` metres (jitter +-15 %). Queries: spread over the routes in proportion to their
    length, at uniform random arc positions within the database span, lateral offset within
    +-3 m. At least one query is night and at least one is sideways when ``queries_num`` >= 2.
    """
    rng = split_rng(seed, split, 0)
    per_route = [database_num // routes_num + (1 if r < database_num % routes_num else 0) for r in range(routes_num)]
    origin_e, origin_n = SPLIT_ORIGINS[split]
    routes, db_s = [], []
    cursor = origin_e
    for n in per_route:
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
            ts = (
                1559347200
                + int(rng.integers(0, 90)) * 86400
                + int(rng.integers(9 + 5, 17 + 5)) * 3600
                + int(rng.integers(0, 3600))
            )
            database.append(
                dict(
                    kind="database",
                    index=index,
                    route=r,
                    s=float(s[i]),
                    lateral=0.0,
                    east=float(east[i] + gps[i, 0]),
                    north=float(north[i] + gps[i, 1]),
                    heading=float(bearing[i] + 90.0),
                    yaw=0.0,
                    night=False,
                    sideways=True,
                    timestamp=ts,
                )
            )
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
        queries.append(
            dict(
                kind="queries",
                index=i,
                route=r,
                s=float(q_s[i]),
                lateral=float(q_lateral[i]),
                east=float(true_e + gps[i, 0]),
                north=float(true_n + gps[i, 1]),
                heading=float(bearing[0] + 90.0 - yaw),
                yaw=yaw,
                night=bool(q_night[i]),
                sideways=bool(q_side[i]),
                timestamp=ts,
            )
        )

    def finish(rec: dict) -> Shot:
        key = pano_id(seed, split, rec["kind"], rec["index"])
        lat, lon = utm_to_latlon(rec["east"], rec["north"])
        note = ("night" if rec["night"] else "day") + "_" + ("sideways" if rec["sideways"] else "forward")
        label = ImageLabel(
            east=rec["east"],
            north=rec["north"],
            lat=lat,
            lon=lon,
            key=key,
            tile=f"r{rec['route']}",
            heading=rec["heading"],
            timestamp=rec["timestamp"],
            note=note,
        )
        name = format_image_name(label)
        return Shot(key=key, name=name, **rec)

    plan = SplitPlan(
        split=split, routes=routes, database=[finish(r) for r in database], queries=[finish(r) for r in queries]
    )
    names = [shot.name for shot in plan.database + plan.queries]
    if len(set(names)) != len(names) or len({shot.key for shot in plan.database + plan.queries}) != len(names):
        raise RuntimeError(f"internal error: duplicate image names in split {split!r}")
    return plan
