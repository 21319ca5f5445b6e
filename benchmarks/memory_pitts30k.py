"""Peak RAM and disk of a Pitts30k-sized evaluation with --efficient_ram_testing, simulated.

Pitts30k test: 10,000 database images and 6,816 queries. No model runs; random unit-norm features
of the real sizes stand in for it (global D = 1024, dense 61x61x128 float32 = 1.9 MB per image):

1. the dense features of every database image, and of the queries to re-rank, are written through
   ``retrieval.DenseStore`` on disk in batches, as extraction would; the global descriptors stay in RAM,
   as ``test.evaluate`` keeps them;
2. ``retrieval.l2_search`` runs for all queries (k = --rerank_num, 100);
3. ``local_matching.mutual_nn_scores`` re-ranks a few queries (--rerank_queries) against the
   on-disk store, and ``local_matching.rerank`` orders them;
4. the peak RSS of the process (getrusage) is checked against --rss_limit_gb (4), the disk use of
   the store is reported, and the store is deleted (also on errors and Ctrl-C).

The full size writes 10,000 x 3721 x 128 x 4 B = 19 GB: free space is checked first.

    python3 benchmarks/memory_pitts30k.py                       # Pitts30k size, store under /tmp
    python3 benchmarks/memory_pitts30k.py --folder /big/disk --touch_database
    python3 benchmarks/memory_pitts30k.py --database_num 50 --queries_num 20 --rerank_queries 2   # smoke

--touch_database then reads every database entry once through the store (what re-ranking all 6,816
queries ends up doing) and includes that pass in the peak: the store reads with os.pread, so the
pages read do not stay resident as they would through a memory map.
Exit status: 0 PASS, 1 FAIL, 2 bad options / no space.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import local_matching
import retrieval

PITTS30K_DATABASE = 10_000
PITTS30K_QUERIES = 6_816
# Head room left on the disk beside the store (logs, other users' files).
DISK_RESERVE_BYTES = 1 << 30


def dense_bytes_per_image(dense_size: Sequence[int]) -> int:
    """Bytes of one image's dense features (h, w, C) in float32."""
    h, w, c = dense_size
    return int(h) * int(w) * int(c) * 4


def store_bytes(*, database_num: int, rerank_queries: int, dense_size: Sequence[int]) -> int:
    """Bytes the benchmark's stores take: every database image plus the re-ranked queries."""
    return (database_num + rerank_queries) * dense_bytes_per_image(dense_size)


def check_free_space(folder: str, needed_bytes: int, *, reserve_bytes: int = DISK_RESERVE_BYTES) -> int:
    """Raise ValueError naming --folder unless it has needed + reserve bytes free; returns the free bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes + reserve_bytes:
        raise ValueError(
            f"--folder {folder}: {free / 1e9:.1f} GB free, but the dense store needs "
            f"{needed_bytes / 1e9:.1f} GB (+{reserve_bytes / 1e9:.1f} GB head room). Pass --folder on a "
            f"disk with more space, or lower --database_num / --dense_size."
        )
    return free


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_breakdown() -> Dict[str, int]:
    """Current RssAnon / RssFile / RssShmem in bytes from /proc/self/status (Linux; {} elsewhere).

    File pages of a memory map that were read count in the RSS until the kernel reclaims them, so
    they show up in getrusage's peak too; anonymous memory is what the process holds itself.
    """
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def random_unit(gen: torch.Generator, *shape: int) -> np.ndarray:
    """Random float32 array of `shape`, L2-normalised along the last axis (as the model's outputs)."""
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1).numpy()


def disk_bytes(path: str) -> int:
    """Bytes the file really occupies on disk (allocated blocks)."""
    return os.stat(path).st_blocks * 512


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What is simulated: database and query images, how many queries are re-ranked against how many
    candidates, the dense feature map (H, W, C) and the global descriptor's dimension."""

    database_num: int = PITTS30K_DATABASE
    queries_num: int = PITTS30K_QUERIES
    rerank_queries: int = 5
    rerank_num: int = 100
    dense_size: Sequence[int] = (61, 61, 128)
    global_dim: int = 1024


PITTS30K_SIZES = Sizes()


def run_benchmark(
    sizes: Sizes = PITTS30K_SIZES,
    *,
    folder: Optional[str] = None,
    batch_size: int = 16,
    chunk_size: int = 16,
    touch_database: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, float]:
    """Simulate the evaluation (see the module doc) and return its measurements.

    Keys: peak_rss_bytes (including the --touch_database pass), store_bytes (apparent size), disk_bytes
    (allocated), expected_store_bytes, write_s, search_s, rerank_s, wall_s, write_mb_s, rss_anon_bytes,
    rss_file_bytes (after re-ranking), and with touch_database: touch_s, touched_peak_rss_bytes,
    touched_rss_anon_bytes,
    touched_rss_file_bytes (through the map).
    """
    database_num, queries_num, rerank_queries = sizes.database_num, sizes.queries_num, sizes.rerank_queries
    rerank_num, dense_size, global_dim = sizes.rerank_num, sizes.dense_size, sizes.global_dim
    for flag, value in (
        ("database_num", database_num),
        ("queries_num", queries_num),
        ("rerank_num", rerank_num),
        ("batch_size", batch_size),
        ("chunk_size", chunk_size),
        ("global_dim", global_dim),
    ):
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1 (got {value})")
    if len(dense_size) != 3 or min(dense_size) < 1:
        raise ValueError(f"--dense_size needs three positive numbers H W C (got {list(dense_size)})")
    if not 0 <= rerank_queries <= queries_num:
        raise ValueError(f"--rerank_queries {rerank_queries} must lie between 0 and --queries_num {queries_num}")
    k = min(rerank_num, database_num)
    expected = store_bytes(database_num=database_num, rerank_queries=rerank_queries, dense_size=dense_size)

    own_folder = folder is None
    if own_folder:
        folder = tempfile.mkdtemp(prefix="selavpr_memory_bench_", dir=tempfile.gettempdir())
    else:
        os.makedirs(folder, exist_ok=True)
    result: Dict[str, float] = {"expected_store_bytes": expected, "start_rss_bytes": peak_rss_bytes()}
    db_store = q_store = None
    wall = time.perf_counter()
    try:
        result["free_bytes_before"] = check_free_space(folder, expected)
        gen = torch.Generator().manual_seed(seed)
        # Global descriptors in RAM, as evaluate keeps them: (N, D) float32 (69 MB at Pitts30k size).
        db_global = random_unit(gen, database_num, global_dim)
        q_global = random_unit(gen, queries_num, global_dim)

        # 1. Dense features through the on-disk store, one extraction batch at a time.
        db_store, q_store = retrieval.DenseStore(folder), retrieval.DenseStore(folder)
        start = time.perf_counter()
        report_every = max(1, database_num // batch_size // 10)
        for b, first in enumerate(range(0, database_num, batch_size)):
            db_store.append(random_unit(gen, min(batch_size, database_num - first), *dense_size))
            if progress and (b + 1) % report_every == 0:
                done = min(first + batch_size, database_num)
                print(
                    f"  wrote {done}/{database_num} database images ({db_store.nbytes() / 1e9:.1f} GB, "
                    f"{time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        rerank_ids = (
            np.linspace(0, queries_num - 1, rerank_queries).round().astype(np.int64)
            if rerank_queries
            else np.zeros(0, dtype=np.int64)
        )
        for first in range(0, len(rerank_ids), batch_size):
            q_store.append(random_unit(gen, min(batch_size, len(rerank_ids) - first), *dense_size))
        db_store.finish()
        q_store.finish()
        result["write_s"] = time.perf_counter() - start
        result["store_bytes"] = db_store.nbytes() + q_store.nbytes()
        result["disk_bytes"] = sum(disk_bytes(s.path) for s in (db_store, q_store))
        result["write_mb_s"] = result["store_bytes"] / 1e6 / result["write_s"]

        # 2. First stage for every query.
        start = time.perf_counter()
        _, predictions = retrieval.l2_search(db_global, q_global, k)
        result["search_s"] = time.perf_counter() - start

        # 3. Re-rank the subset against the on-disk store (positional reads).
        start = time.perf_counter()
        for row, q in enumerate(rerank_ids):
            query_local = torch.from_numpy(np.array(q_store[row]))
            scores = local_matching.mutual_nn_scores(query_local, db_store, predictions[q], chunk_size=chunk_size)
            order = local_matching.rerank(scores.cpu().numpy().astype(np.float32))
            if sorted(np.asarray(order).tolist()) != list(range(k)):
                raise RuntimeError(f"local_matching.rerank returned no permutation of the {k} candidates")
        result["rerank_s"] = time.perf_counter() - start
        result["rerank_s_per_query"] = result["rerank_s"] / max(len(rerank_ids), 1)
        result["peak_rss_bytes"] = peak_rss_bytes()
        now = resident_breakdown()
        result["rss_anon_bytes"] = now.get("RssAnon", -1)
        result["rss_file_bytes"] = now.get("RssFile", -1)
        result["wall_s"] = time.perf_counter() - wall

        if touch_database:
            # Every database entry read once through the store, what re-ranking all 6,816 queries ends
            # up doing: the store reads with os.pread into fresh buffers, so nothing stays resident.
            start = time.perf_counter()
            checksum = 0.0
            for i in range(len(db_store)):
                checksum += float(db_store[i].sum())
            result["touch_s"] = time.perf_counter() - start
            result["touch_checksum"] = checksum
            result["touched_peak_rss_bytes"] = peak_rss_bytes()
            now = resident_breakdown()
            result["touched_rss_anon_bytes"] = now.get("RssAnon", -1)
            result["touched_rss_file_bytes"] = now.get("RssFile", -1)
            result["peak_rss_bytes"] = result["touched_peak_rss_bytes"]
        return result
    finally:
        for store in (db_store, q_store):
            if store is not None:
                store.close()
        if own_folder:
            shutil.rmtree(folder, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--database_num", type=int, default=PITTS30K_DATABASE)
    parser.add_argument("--queries_num", type=int, default=PITTS30K_QUERIES)
    parser.add_argument("--rerank_queries", type=int, default=5, help="queries re-ranked (all are searched)")
    parser.add_argument("--rerank_num", type=int, default=100, help="candidates per query (k of the search)")
    parser.add_argument(
        "--folder",
        default=None,
        help="where the store goes (default: a new temp folder under $TMPDIR or /tmp, removed)",
    )
    parser.add_argument("--dense_size", type=int, nargs=3, default=[61, 61, 128], metavar=("H", "W", "C"))
    parser.add_argument("--global_dim", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=16, help="images per store write, as extraction")
    parser.add_argument("--chunk_size", type=int, default=16, help="candidates per mutual_nn_scores chunk")
    parser.add_argument("--rss_limit_gb", type=float, default=4.0, help="PASS when peak RSS <= this (1 GB = 1e9 B)")
    parser.add_argument(
        "--touch_database",
        action="store_true",
        help="afterwards read every database entry through the map and report the RSS split",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    print(
        f"memory_pitts30k: {args.database_num} database, {args.queries_num} queries, dense "
        f"{'x'.join(map(str, args.dense_size))} fp32, global {args.global_dim}, k {args.rerank_num}, "
        f"re-ranking {args.rerank_queries} queries",
        flush=True,
    )
    try:
        sizes = Sizes(
            database_num=args.database_num,
            queries_num=args.queries_num,
            rerank_queries=args.rerank_queries,
            rerank_num=args.rerank_num,
            dense_size=args.dense_size,
            global_dim=args.global_dim,
        )
        r = run_benchmark(
            sizes,
            folder=args.folder,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            touch_database=args.touch_database,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gb = 1e9
    full_eval = (args.database_num + args.queries_num) * dense_bytes_per_image(args.dense_size)
    print(
        f"store: {r['store_bytes']:,} bytes ({r['store_bytes'] / gb:.2f} GB; "
        f"expected {r['expected_store_bytes']:,}), "
        f"on disk {r['disk_bytes']:,} bytes; written in {r['write_s']:.0f} s ({r['write_mb_s']:.0f} MB/s); "
        f"removed afterwards",
        flush=True,
    )
    print(
        f"(a full evaluate also stores every query's dense features: {full_eval / gb:.1f} GB for "
        f"{args.database_num} + {args.queries_num} images)"
    )
    print(
        f"search: {args.queries_num} queries x {args.database_num} in {r['search_s']:.1f} s; re-rank: "
        f"{args.rerank_queries} queries in {r['rerank_s']:.1f} s ({r['rerank_s_per_query']:.2f} s/query)"
    )
    print(
        f"resident after re-ranking: anonymous {r['rss_anon_bytes'] / gb:.2f} GB, mapped file pages "
        f"{r['rss_file_bytes'] / gb:.2f} GB; RSS at start {r['start_rss_bytes'] / gb:.2f} GB"
    )
    if args.touch_database:
        print(
            f"after reading every database entry through the store ({r['touch_s']:.0f} s): peak RSS "
            f"{r['touched_peak_rss_bytes'] / gb:.2f} GB = anonymous {r['touched_rss_anon_bytes'] / gb:.2f} GB + "
            f"mapped file pages {r['touched_rss_file_bytes'] / gb:.2f} GB"
        )
    passed = r["peak_rss_bytes"] <= args.rss_limit_gb * gb
    print(
        f"memory_pitts30k: peak RSS {r['peak_rss_bytes'] / gb:.2f} GB (limit {args.rss_limit_gb:.2f} GB) "
        f"{'PASS' if passed else 'FAIL'}; disk {r['disk_bytes'] / gb:.2f} GB; wall {r['wall_s']:.0f} s",
        flush=True,
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
