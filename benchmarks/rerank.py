"""Re-rank speed: the project's engine (local_matching.mutual_nn_scores) against the plain public
algorithm, measured side by side in one run, with equality of every score checked.

The reference kept here is the public release's computation: the candidates' dense features as one
(k, L, C) tensor, the batched (k, L, L) similarity matrix, max both ways, mutual pairs counted.
Data: random 61x61x128 unit-norm features with structure - a smooth random field per scene plus
noise; each candidate mixes a shifted copy of the query's scene with an unrelated scene in a
random proportion, so scores spread over hundreds (not all ~1, not all equal) and neighbouring
positions are near-duplicates, as in real dense features (many near-ties). The database is a
float32 .npy file read through np.memmap (the efficient-RAM store); both sides load from it.

Each side runs in a fresh child process with the default torch threads, so each peak RSS
(resource.getrusage of that process: torch itself, the memory-mapped data it read, features and
similarity matrices) is its own. The reference times fewer queries at k > 20 (it needs ~5.5 GB
and tens of seconds per query at k = 100); scores are compared on the queries both ran.

    python3 benchmarks/rerank.py                       # k = 20 and 100, 2 queries, CPU (~2 min)
    python3 benchmarks/rerank.py --queries 4 --k 20 50 100 --device cpu
    python3 benchmarks/rerank.py --gpu_engine --k 20 --queries 1   # the GPU engine, forced on the CPU

Prints, per k:
    k=100: project 1.60 s/query, reference 8.30 s/query, 5.2x, scores identical
    k=100: peak RSS project 0.45 GB, reference 6.02 GB
and exits with status 1 (printing "scores DIFFER") if any score differs. With --gpu_engine the project
side runs the GPU engine (local_matching/device_engine.py; on the CPU its bf16 product is emulated in
float32, so only its exactness and the share of rows / columns its screen leaves to recompute mean
anything there) and prints that share:
    k=20: GPU engine recomputed 4.1% of rows, 0.4% of columns
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GRID, CHANNELS = 61, 128


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _scene(gen: torch.Generator, coarse: int = 8) -> torch.Tensor:
    """(C, 61, 61) smooth random field of unit standard deviation (bilinear upsampling of noise)."""
    z = torch.randn(1, CHANNELS, coarse, coarse, generator=gen)
    f = F.interpolate(z, size=(GRID, GRID), mode="bilinear", align_corners=False)[0]
    return f / f.std()


def _unit(f: torch.Tensor) -> np.ndarray:
    """(C, h, w) -> (h, w, C) float32 with unit-norm feature vectors (as the model's local head)."""
    return F.normalize(f.permute(1, 2, 0), dim=-1).numpy().astype(np.float32)


def make_data(folder: str, queries: int, k: int, seed: int) -> None:
    """queries.npy (Q, 61, 61, 128) and database.npy (Q * k, 61, 61, 128): candidates of query q
    are rows q*k .. q*k+k-1."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    q_out = np.lib.format.open_memmap(
        os.path.join(folder, "queries.npy"), mode="w+", dtype=np.float32, shape=(queries, GRID, GRID, CHANNELS)
    )
    db_out = np.lib.format.open_memmap(
        os.path.join(folder, "database.npy"), mode="w+", dtype=np.float32, shape=(queries * k, GRID, GRID, CHANNELS)
    )
    for q in range(queries):
        scene = _scene(gen)
        q_out[q] = _unit(scene + 0.3 * torch.randn(scene.shape, generator=gen))
        for c in range(k):
            share = float(rng.uniform(0.0, 1.0))  # how much of the query's scene it shows
            shift = tuple(int(s) for s in rng.integers(-3, 4, size=2))
            mixed = share * torch.roll(scene, shift, dims=(1, 2)) + (1.0 - share**2) ** 0.5 * _scene(gen)
            noise = float(rng.uniform(0.3, 0.8))
            db_out[q * k + c] = _unit(mixed + noise * torch.randn(scene.shape, generator=gen))
    q_out.flush()
    db_out.flush()
    del q_out, db_out


# ----------------------------------------------------------------------------------------------
# The two sides
# ----------------------------------------------------------------------------------------------
def reference_scores(
    query_local: np.ndarray, database: np.ndarray, candidates: np.ndarray, device: torch.device
) -> torch.Tensor:
    """The public algorithm: (k, L, L) similarity in one batched matmul, max both ways, count."""
    query = torch.from_numpy(np.array(query_local)).to(device).view(1, -1, CHANNELS)
    cands = torch.from_numpy(np.array(database[candidates])).to(device).view(len(candidates), -1, CHANNELS)
    sim = torch.matmul(cands, query.transpose(1, 2))  # (k, Lc, Lq)
    nn12 = torch.max(sim, dim=2).indices  # (k, Lc)
    nn21 = torch.max(sim, dim=1).indices  # (k, Lq)
    rows = torch.arange(sim.shape[1], device=device)
    return (torch.gather(nn21, 1, nn12) == rows).sum(dim=1).float()


def project_scores(
    query_local: np.ndarray, database: np.ndarray, candidates: np.ndarray, device: torch.device, gpu_engine=None
) -> torch.Tensor:
    import local_matching

    query = torch.from_numpy(np.array(query_local)).to(device)
    return local_matching.mutual_nn_scores(query, database, candidates, gpu_engine=gpu_engine)


def run_child(side: str, folder: str, k: int, queries: int, device: str, gpu_engine: bool) -> None:
    """Time `side` on the first `queries` queries; print one JSON line (times, scores, peak RSS, and
    the GPU engine's recomputed shares when it ran)."""
    from local_matching import device_engine

    dev = torch.device(device)
    q_store = np.load(os.path.join(folder, "queries.npy"), mmap_mode="r")
    database = np.load(os.path.join(folder, "database.npy"), mmap_mode="r")
    k_max = database.shape[0] // q_store.shape[0]
    fn = reference_scores
    if side == "project":
        fn = (lambda *a: project_scores(*a, gpu_engine=True)) if gpu_engine else project_scores
    times, scores = [], []
    for q in range(queries):
        candidates = np.arange(q * k_max, q * k_max + k)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        s = fn(q_store[q], database, candidates, dev)
        s = s.cpu()
        times.append(time.perf_counter() - start)
        scores.append(s.tolist())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = device_engine.STATS
    shares = (
        {"rows": stats["rows_recomputed"] / stats["rows"], "columns": stats["columns_recomputed"] / stats["columns"]}
        if stats["rows"]
        else None
    )
    print(json.dumps({"times": times, "scores": scores, "peak_rss_gb": peak_kb / 1024**2, "recomputed": shares}))


def _spawn(side: str, folder: str, k: int, queries: int, device: str, gpu_engine: bool = False) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        side,
        "--_data",
        folder,
        "--k",
        str(k),
        "--queries",
        str(queries),
        "--device",
        device,
    ] + (["--gpu_engine"] if gpu_engine else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks/rerank.py: the {side} run failed (k={k}):\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--queries", type=int, default=2, help="queries timed for the project (default 2)")
    p.add_argument(
        "--reference_queries",
        type=int,
        default=None,
        help="queries timed for the reference (default: all for k <= 20, else 1: it takes "
        "~10 s and 5.5 GB per query at k = 100); scores are compared on these",
    )
    p.add_argument("--k", type=int, nargs="+", default=[20, 100], help="candidates per query (default 20 100)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gpu_engine",
        action="store_true",
        help="project side: the GPU engine (forced on the CPU too), and print the share it recomputed",
    )
    p.add_argument("--_child", choices=["project", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--_data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.queries < 1 or any(k < 1 for k in args.k):
        p.error("--queries and every --k must be >= 1")
    if args.reference_queries is not None and not 1 <= args.reference_queries <= args.queries:
        p.error("--reference_queries must be between 1 and --queries")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args._child:
        run_child(args._child, args._data, args.k[0], args.queries, args.device, args.gpu_engine)
        return 0
    identical = True
    with tempfile.TemporaryDirectory(prefix="rerank_bench_") as folder:
        make_data(folder, args.queries, max(args.k), args.seed)
        for k in args.k:
            ref_q = args.reference_queries or (args.queries if k <= 20 else 1)
            proj = _spawn("project", folder, k, args.queries, args.device, args.gpu_engine)
            ref = _spawn("reference", folder, k, ref_q, args.device)
            same = proj["scores"][:ref_q] == ref["scores"]
            identical &= same
            t_proj = float(np.mean(proj["times"]))
            t_ref = float(np.mean(ref["times"]))
            print(
                f"k={k}: project {t_proj:.2f} s/query, reference {t_ref:.2f} s/query, "
                f"{t_ref / t_proj:.1f}x, scores {'identical' if same else 'DIFFER'}",
                flush=True,
            )
            print(
                f"k={k}: peak RSS project {proj['peak_rss_gb']:.2f} GB, reference {ref['peak_rss_gb']:.2f} GB",
                flush=True,
            )
            if proj["recomputed"]:
                shares = proj["recomputed"]
                print(
                    f"k={k}: GPU engine recomputed {100 * shares['rows']:.1f}% of rows, "
                    f"{100 * shares['columns']:.1f}% of columns",
                    flush=True,
                )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
