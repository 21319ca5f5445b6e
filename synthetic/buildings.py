"""The places of the synthetic data set: which facade stands where along every route (no pixels).

Each route gets a row of buildings (width, height, wall colour, and two seeds: one for the layout
that makes a place recognisable, one for small details) covering the route plus a margin at both
ends. Look-alikes, the hard negatives, are then made: a few runs of ``LOOKALIKE_RUN`` buildings are
copied, with small changes of colour, height and details, over buildings at least
``LOOKALIKE_MIN_DIST_M`` away on the map, without moving anything else on the route. ``scene``
draws the buildings; the look-alike runs go into the manifest.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .geometry import route_position
from .plan import split_rng

LOOKALIKE_MIN_DIST_M = 150.0
LOOKALIKE_RUN = 3  # buildings copied per look-alike


@dataclasses.dataclass
class Building:
    """One facade. ``structure_seed`` fixes its layout (windows, roof, texture, shop front);
    ``detail_seed`` fixes small things (which windows are lit, sign colour and lettering)."""

    width_m: float
    height_frac: float  # of the image height
    wall: tuple
    structure_seed: int
    detail_seed: int
    gap_after_m: float
    group: int = -1  # look-alike group id, -1 when unique
    x0_m: float = 0.0  # strip position (metres), set by _place_buildings


def _random_wall(rng: np.random.Generator) -> tuple:
    palettes = [
        (180, 80, 60),
        (200, 170, 130),
        (150, 150, 155),
        (90, 110, 140),
        (210, 200, 180),
        (120, 70, 50),
        (230, 220, 200),
        (170, 120, 80),
        (100, 130, 100),
        (60, 60, 70),
        (190, 150, 110),
        (140, 40, 40),
        (220, 180, 90),
        (80, 90, 110),
    ]
    base = np.array(palettes[int(rng.integers(len(palettes)))], dtype=float)
    return tuple(int(v) for v in np.clip(base + rng.uniform(-25, 25, size=3), 0, 255))


def _new_building(rng: np.random.Generator) -> Building:
    return Building(
        width_m=float(rng.uniform(7.0, 20.0)),
        height_frac=float(rng.uniform(0.28, 0.70)),
        wall=_random_wall(rng),
        structure_seed=int(rng.integers(2**62)),
        detail_seed=int(rng.integers(2**62)),
        gap_after_m=float(rng.uniform(1.0, 4.0)) if rng.random() < 0.25 else 0.0,
    )


def _place_buildings(buildings: list, start_m: float) -> None:
    x = start_m
    for b in buildings:
        b.x0_m = x
        x += b.width_m + b.gap_after_m


def _perturbed_copy(b: Building, rng: np.random.Generator, group: int) -> Building:
    wall = tuple(int(v) for v in np.clip(np.array(b.wall) + rng.uniform(-12, 12, size=3), 0, 255))
    return Building(
        width_m=b.width_m,
        height_frac=float(np.clip(b.height_frac * rng.uniform(0.95, 1.05), 0.2, 0.75)),
        wall=wall,
        structure_seed=b.structure_seed,
        detail_seed=int(rng.integers(2**62)),
        gap_after_m=b.gap_after_m,
        group=group,
    )


def plan_buildings(
    *, seed: int, split: str, routes: list, margin_m: float, lookalikes_per_km: float
) -> tuple[list, list]:
    """Buildings of every route of a split and the look-alike runs.

    Returns ``(buildings_per_route, lookalikes)``; ``lookalikes`` lists dicts with the group id and
    the (route, arc centre) of the source and the copy, which lie >= 150 m apart on the map.
    """
    per_route = []
    for r, route in enumerate(routes):
        rng = split_rng(seed, split, 1, r)
        buildings, length = [], 0.0
        while length < route.length + 2 * margin_m:
            b = _new_building(rng)
            buildings.append(b)
            length += b.width_m + b.gap_after_m
        per_route.append(buildings)
    rng = split_rng(seed, split, 2)
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
            source = per_route[r1][i : i + LOOKALIKE_RUN]
            replaced = per_route[r2][j : j + LOOKALIKE_RUN]
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
        lookalikes.append(
            dict(
                group=group,
                source_route=r1,
                source_s=round(c1, 2),
                copy_route=r2,
                copy_s=round(c2, 2),
                distance_m=round(float(np.linalg.norm(p1 - p2)), 2),
            )
        )
    return per_route, lookalikes


def _run_centre(buildings: list, i: int) -> float:
    first, last = buildings[i], buildings[i + LOOKALIKE_RUN - 1]
    return 0.5 * (first.x0_m + last.x0_m + last.width_m)
