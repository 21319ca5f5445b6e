"""The options of the synthetic data set: presets, checks, and the ``params`` the manifest records.

``SyntheticOptions`` holds them (the command-line flag ``--name`` is the field ``name``);
``resolve_options`` checks every option and fills the sizes a preset leaves open. Its result is what
``ensure_dataset`` compares with an existing set's manifest to decide whether that set may be reused.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from .plan import SPLITS

# Recorded in every manifest; bump it when the same options would give other images, so that
# ensure_dataset does not reuse a set made by an older generator.
GENERATOR_VERSION = 1

PRESETS = {
    # (database, queries) per split and routes per split.
    "default": {
        "train": (600, 300),
        "val": (200, 100),
        "test": (300, 150),
        "routes": {"train": 4, "val": 2, "test": 3},
    },
    "tiny": {"train": (40, 15), "val": (40, 15), "test": (40, 15), "routes": {"train": 2, "val": 2, "test": 2}},
}


class OptionError(ValueError):
    """A bad option or a data set folder that does not match the options; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
    """The generator's options, one field per flag of synthetic_dataset.py (``--name`` = field ``name``).

    Sizes left at None come from the preset ("default": train 600/300, val 200/100, test 300/150
    database/queries images and 4/2/3 routes; "tiny": 40/15 images and 2 routes per split);
    ``image_size`` is (H, W) of every image. Checked by :func:`resolve_options`, not here, so that a bad
    value is reported with its flag's name wherever the options come from.
    """

    seed: int = 0
    preset: str = "default"
    train_database_num: Optional[int] = None
    train_queries_num: Optional[int] = None
    val_database_num: Optional[int] = None
    val_queries_num: Optional[int] = None
    test_database_num: Optional[int] = None
    test_queries_num: Optional[int] = None
    routes_per_split: Optional[int] = None
    image_size: Sequence[int] = (192, 256)
    db_spacing_m: float = 6.0
    night_fraction: float = 0.25
    sideways_fraction: float = 0.4
    lookalikes_per_km: float = 2.0
    jpeg_quality: int = 90


DEFAULT_OPTIONS = SyntheticOptions()


def resolve_options(options: SyntheticOptions = DEFAULT_OPTIONS) -> dict:
    """Validate the options and fill the preset's sizes: a JSON-able dict (the manifest's ``params``).

    Raises ValueError naming the flag (``--name`` = keyword ``name``) and the accepted range.
    """
    o = options
    seed, preset, routes_per_split, image_size = o.seed, o.preset, o.routes_per_split, o.image_size
    db_spacing_m, night_fraction, sideways_fraction = o.db_spacing_m, o.night_fraction, o.sideways_fraction
    lookalikes_per_km, jpeg_quality = o.lookalikes_per_km, o.jpeg_quality

    def bad(flag: str, msg: str) -> OptionError:
        return OptionError(f"--{flag} {msg}")

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise bad("seed", f"must be a non-negative integer, got {seed!r}")
    if preset not in PRESETS:
        raise bad("preset", f"must be one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    given = {
        f"{split}_{what}_num": getattr(o, f"{split}_{what}_num") for split in SPLITS for what in ("database", "queries")
    }
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
                hint = (
                    f" (5 per route, {routes[split]} route(s); lower --routes_per_split)" if what == "database" else ""
                )
                raise bad(flag, f"must be in [{low}, 200000]{hint}, got {n}")
            sizes[flag] = int(n)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
        or not all(32 <= v <= 4096 for v in image_size)
    ):
        raise bad("image_size", f"must be two integers H W, each in [32, 4096], got {image_size!r}")
    # Spacing bound: with +-15 % jitter, +-3 m lateral offset and <= 1.4 m GPS noise, a query lies
    # within 0.575 * spacing + 3 + 2.8 m of a database image; 12 m keeps that under 10 m (hard positives).
    if not isinstance(db_spacing_m, (int, float)) or not 1.0 <= db_spacing_m <= 12.0:
        raise bad(
            "db_spacing_m",
            f"must be in [1, 12] metres (every query needs a database image within 10 m), got {db_spacing_m!r}",
        )
    for flag, v in (("night_fraction", night_fraction), ("sideways_fraction", sideways_fraction)):
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise bad(flag, f"must be in [0, 1], got {v!r}")
    if not isinstance(lookalikes_per_km, (int, float)) or not 0.0 <= lookalikes_per_km <= 20.0:
        raise bad("lookalikes_per_km", f"must be in [0, 20], got {lookalikes_per_km!r}")
    if (
        isinstance(jpeg_quality, bool)
        or not isinstance(jpeg_quality, (int, np.integer))
        or not 10 <= jpeg_quality <= 100
    ):
        raise bad("jpeg_quality", f"must be an integer in [10, 100], got {jpeg_quality!r}")
    return dict(
        generator_version=GENERATOR_VERSION,
        seed=int(seed),
        preset=preset,
        **sizes,
        routes_per_split=routes,
        image_size=[int(image_size[0]), int(image_size[1])],
        db_spacing_m=float(db_spacing_m),
        night_fraction=float(night_fraction),
        sideways_fraction=float(sideways_fraction),
        lookalikes_per_km=float(lookalikes_per_km),
        jpeg_quality=int(jpeg_quality),
    )
