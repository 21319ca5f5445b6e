"""How hard is the built-in synthetic data set? A non-learned baseline, measured in one run.

Generates the set (or reuses one made with the same options), then retrieves every query of a split
by L2 nearest neighbour on small grayscale thumbnails (default 16x12, each normalised to zero mean and
unit std) and prints Recall@1/5/10 with 25 m positives next to chance level, broken down by the
queries' note (day/night, sideways/forward). Also prints generation time, image count and size on
disk. The data set is meant to sit between the two: clearly above chance, clearly below perfect
(target R@1 15-70 %).

    python3 benchmarks/synthetic_baseline.py                       # default set, in a temp folder
    python3 benchmarks/synthetic_baseline.py --preset tiny --split val
    python3 benchmarks/synthetic_baseline.py --datasets_folder DIR --dataset_name NAME   # reuse/keep
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from sklearn.neighbors import NearestNeighbors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import synthetic_dataset


def list_images(folder: str) -> list[str]:
    """All ``*.jpg`` under ``folder`` (recursive, hidden entries skipped), sorted like BaseDataset."""
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths.extend(os.path.join(root, f) for f in files if f.endswith(".jpg") and not f.startswith("."))
    return sorted(paths)


def utms_of(paths: Sequence[str]) -> np.ndarray:
    """(N, 2) UTM east/north from the file names (fields 1 and 2)."""
    return np.array([[float(v) for v in os.path.basename(p).split("@")[1:3]] for p in paths], dtype=np.float64)


def thumbnails(paths: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """(N, w*h) float32 grayscale thumbnails of ``size`` = (w, h), each with zero mean and unit std."""
    out = np.empty((len(paths), size[0] * size[1]), dtype=np.float32)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            out[i] = np.asarray(image.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.float32).ravel()
    out -= out.mean(1, keepdims=True)
    out /= np.maximum(out.std(1, keepdims=True), 1e-6)
    return out


def recalls_at(predictions: np.ndarray, positives: Sequence[np.ndarray], values: Sequence[int]) -> np.ndarray:
    """Recall@N in % for each N in ``values``: ``predictions`` (Q, >= max N) database indexes."""
    hits = np.zeros(len(values))
    for q, pos in enumerate(positives):
        for k, n in enumerate(values):
            if np.isin(predictions[q, :n], pos).any():
                hits[k:] += 1
                break
    return 100.0 * hits / max(1, len(positives))


def chance_recalls(positives: Sequence[np.ndarray], database_num: int, values: Sequence[int]) -> np.ndarray:
    """Expected Recall@N in % of a uniformly random ranking: 1 - C(D-p, N) / C(D, N) per query."""
    out = np.zeros(len(values))
    for pos in positives:
        p = len(pos)
        for k, n in enumerate(values):
            miss = math.comb(database_num - p, n) / math.comb(database_num, n) if database_num - p >= n else 0.0
            out[k] += 1.0 - miss
    return 100.0 * out / max(1, len(positives))


def folder_size(root: str) -> tuple[int, int]:
    """(number of .jpg files, total bytes of all files) under ``root``."""
    count, total = 0, 0
    for folder, _dirs, files in os.walk(root):
        for f in files:
            total += os.path.getsize(os.path.join(folder, f))
            count += f.endswith(".jpg")
    return count, total


def run(
    *,
    datasets_folder: Optional[str],
    dataset_name: str,
    seed: int,
    preset: str,
    split: str,
    thumb_size: tuple[int, int],
    radius_m: float,
    recall_values: Sequence[int],
) -> dict:
    """Generate (timed) or reuse the set, then measure the baseline; returns the numbers printed."""
    with tempfile.TemporaryDirectory(prefix="synthetic_baseline-") as temp:
        folder = datasets_folder or temp
        existed = os.path.isdir(os.path.join(folder, dataset_name))
        start = time.perf_counter()
        root = synthetic_dataset.ensure_dataset(
            folder, dataset_name, synthetic_dataset.SyntheticOptions(seed=seed, preset=preset)
        )
        gen_s = None if existed else time.perf_counter() - start
        count, size = folder_size(str(root))
        database = list_images(str(root / "images" / split / "database"))
        queries = list_images(str(root / "images" / split / "queries"))
        db_utm, q_utm = utms_of(database), utms_of(queries)
        knn = NearestNeighbors().fit(db_utm)
        positives = knn.radius_neighbors(q_utm, radius=radius_m, return_distance=False)
        start = time.perf_counter()
        db_x, q_x = thumbnails(database, thumb_size), thumbnails(queries, thumb_size)
        k = min(max(recall_values), len(database))
        predictions = NearestNeighbors(n_neighbors=k).fit(db_x).kneighbors(q_x, return_distance=False)
        baseline_s = time.perf_counter() - start
        notes = np.array([os.path.basename(p).split("@")[-2] for p in queries])
        groups = {"all": np.ones(len(queries), dtype=bool)}
        for note in sorted(set(notes)):
            groups[note] = notes == note
        by_group = {
            name: (
                int(mask.sum()),
                recalls_at(predictions[mask], [positives[i] for i in np.flatnonzero(mask)], recall_values),
            )
            for name, mask in groups.items()
        }
        return dict(
            root=str(root),
            generation_s=gen_s,
            images=count,
            bytes=size,
            database_num=len(database),
            queries_num=len(queries),
            mean_positives=float(np.mean([len(p) for p in positives])),
            queries_without_positive=int(sum(len(p) == 0 for p in positives)),
            chance=chance_recalls(positives, len(database), recall_values),
            by_group=by_group,
            baseline_s=baseline_s,
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets_folder",
        default=None,
        help="keep/reuse the set here (default: a temporary folder, deleted afterwards)",
    )
    parser.add_argument("--dataset_name", default="synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default", choices=sorted(synthetic_dataset.PRESETS))
    parser.add_argument("--split", default="test", choices=list(synthetic_dataset.SPLITS))
    parser.add_argument("--thumb_size", type=int, nargs=2, default=[16, 12], metavar=("W", "H"))
    parser.add_argument("--val_positive_dist_threshold", type=float, default=25.0)
    parser.add_argument("--recall_values", type=int, nargs="+", default=[1, 5, 10])
    args = parser.parse_args(argv)
    if min(args.thumb_size) < 1:
        parser.error(f"--thumb_size must be positive, got {args.thumb_size}")
    if args.val_positive_dist_threshold <= 0:
        parser.error(f"--val_positive_dist_threshold must be positive, got {args.val_positive_dist_threshold}")
    if min(args.recall_values) < 1:
        parser.error(f"--recall_values must be positive, got {args.recall_values}")
    try:
        out = run(
            datasets_folder=args.datasets_folder,
            dataset_name=args.dataset_name,
            seed=args.seed,
            preset=args.preset,
            split=args.split,
            thumb_size=tuple(args.thumb_size),
            radius_m=args.val_positive_dist_threshold,
            recall_values=args.recall_values,
        )
    except (synthetic_dataset.OptionError, FileNotFoundError) as err:
        parser.error(str(err))
    gen = "reused (not timed)" if out["generation_s"] is None else f"{out['generation_s']:.1f} s"
    print(f"data set      : {out['root']} (preset {args.preset}, seed {args.seed})")
    print(f"generation    : {gen}; {out['images']} images, {out['bytes'] / 2**20:.1f} MiB on disk")
    print(
        f"{args.split} split    : {out['database_num']} database, {out['queries_num']} queries, "
        f"{out['mean_positives']:.1f} positives per query within {args.val_positive_dist_threshold:g} m "
        f"({out['queries_without_positive']} queries without any)"
    )
    w, h = args.thumb_size
    header = "".join(f"{'R@' + str(n):>8s}" for n in args.recall_values)
    print(f"\n{'method':<34s}{'queries':>8s}{header}")
    print(f"{'chance (random ranking)':<34s}{out['queries_num']:>8d}" + "".join(f"  {v:6.1f}" for v in out["chance"]))
    for name, (n, rec) in out["by_group"].items():
        label = f"thumbnail {w}x{h} L2" + ("" if name == "all" else f" [{name}]")
        print(f"{label:<34s}{n:>8d}" + "".join(f"  {v:6.1f}" for v in rec))
    r1 = out["by_group"]["all"][1][0]
    verdict = "inside" if 15.0 <= r1 <= 70.0 else "OUTSIDE"
    print(
        f"\nR@1 {r1:.1f} % is {verdict} the target band 15-70 %; "
        f"ratio to chance: {r1 / max(out['chance'][0], 1e-9):.1f}x (baseline took {out['baseline_s']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
