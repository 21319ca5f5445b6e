"""Command: generate the built-in synthetic visual-place-recognition data set.

Writes ``<datasets_folder>/<dataset_name>/`` in the Visual Geo-localization Benchmark layout
(``images/{train,val,test}/{database,queries}/*.jpg`` and the ``synthetic_dataset.json``
manifest), deterministic for a seed and options; see the ``synthetic`` package for how the world
is built. Command::

    python3 synthetic_dataset.py --datasets_folder DIR [--dataset_name synthetic] [--seed 0]
        [--preset default|tiny] [--train_database_num N] [--train_queries_num N] ...
        [--image_size H W] [--db_spacing_m M] [--overwrite | --if_missing]

The library's API is re-exported here, so ``import synthetic_dataset`` callers keep
``synthetic_dataset.generate(...)``, ``ensure_dataset``, ``read_manifest``, ``PRESETS`` and the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from synthetic import (
    GENERATOR_VERSION,
    MANIFEST_NAME,
    PRESETS,
    SPLITS,
    OptionError,
    SyntheticOptions,
    ensure_dataset,
    generate,
    read_manifest,
    resolve_options,
)

__all__ = [
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "PRESETS",
    "SPLITS",
    "OptionError",
    "SyntheticOptions",
    "build_parser",
    "ensure_dataset",
    "generate",
    "main",
    "read_manifest",
    "resolve_options",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate the built-in synthetic VPR data set (Visual Geo-localization Benchmark layout)."
    )
    p.add_argument(
        "--datasets_folder",
        type=os.path.expanduser,
        default=None,
        help="folder that receives <dataset_name>/ (default: $DATASETS_FOLDER)",
    )
    p.add_argument("--dataset_name", type=str, default="synthetic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", type=str, default="default", choices=sorted(PRESETS))
    for split in SPLITS:
        for what in ("database", "queries"):
            p.add_argument(
                f"--{split}_{what}_num",
                type=int,
                default=None,
                help=f"number of {split} {what} images (default: from --preset)",
            )
    p.add_argument("--routes_per_split", type=int, default=None, help="routes per split (default: from --preset)")
    p.add_argument("--image_size", type=int, nargs=2, default=[192, 256], metavar=("H", "W"))
    p.add_argument("--db_spacing_m", type=float, default=6.0, help="metres between database images (1-12)")
    p.add_argument("--night_fraction", type=float, default=0.25)
    p.add_argument("--sideways_fraction", type=float, default=0.4)
    p.add_argument("--lookalikes_per_km", type=float, default=2.0)
    p.add_argument("--jpeg_quality", type=int, default=90)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing data set")
    mode.add_argument(
        "--if_missing",
        action="store_true",
        help="reuse an existing data set made with the same options; generate it otherwise",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    folder = args.datasets_folder or os.environ.get("DATASETS_FOLDER")
    if not folder:
        parser.error("--datasets_folder is required (or set the DATASETS_FOLDER environment variable)")
    sizes = {f"{s}_{w}_num": getattr(args, f"{s}_{w}_num") for s in SPLITS for w in ("database", "queries")}
    options = SyntheticOptions(
        seed=args.seed,
        preset=args.preset,
        **sizes,
        routes_per_split=args.routes_per_split,
        image_size=tuple(args.image_size),
        db_spacing_m=args.db_spacing_m,
        night_fraction=args.night_fraction,
        sideways_fraction=args.sideways_fraction,
        lookalikes_per_km=args.lookalikes_per_km,
        jpeg_quality=args.jpeg_quality,
    )
    start = time.perf_counter()
    try:
        if args.if_missing:
            root = ensure_dataset(folder, args.dataset_name, options)
        else:
            root = generate(folder, args.dataset_name, options, overwrite=args.overwrite)
    except (OptionError, FileExistsError, FileNotFoundError) as err:
        parser.error(str(err))
    manifest = read_manifest(root)
    counts = ", ".join(f"{s} {m['database_num']}/{m['queries_num']}" for s, m in manifest["splits"].items())
    print(f"{root}: {counts} database/queries images ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
