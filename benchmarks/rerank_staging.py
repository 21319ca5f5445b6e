"""Host work of bringing re-rank candidates to the engine's device: the staging (local_matching/staging.py:
one host copy per candidate at most, into reusable buffers, page-locked on CUDA) against the path it
replaced (np.array copy of every candidate, then on CUDA a second copy into fresh page-locked memory),
side by side in one run, alternating, on 61x61x128 features.

    python3 benchmarks/rerank_staging.py                      # CPU: memmap, DenseStore in RAM and on disk
    python3 benchmarks/rerank_staging.py --device cuda        # GPU: the same plus the transfers

Prints, per store, the time per candidate of both and their ratio, e.g.
    DenseStore on disk: before 3.75 ms/candidate, staged 0.85 ms/candidate, staged/before 0.23
The engine itself does not run (its time per candidate is the same either way).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dense_store import DenseStore  # noqa: E402
from local_matching import staging  # noqa: E402


def before(store, indices: Sequence[int], device: torch.device) -> None:
    """The replaced path: a numpy copy of each candidate, then (CUDA) a copy into fresh page-locked
    memory and an asynchronous transfer."""
    for i in indices:
        t = torch.from_numpy(np.array(store[int(i)], dtype=np.float32, copy=True)).reshape(-1, 128)
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def staged(store, indices: Sequence[int], device: torch.device, chunk: int) -> None:
    """The stager as mutual_nn_scores runs it (each candidate released at once: no engine here)."""
    readers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    with staging.CandidateStager(store, list(indices), device, buffers=2 * chunk, readers=readers) as stager:
        for k, _ in enumerate(stager):
            stager.release(k)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--images", type=int, default=40, help="database images (default 40, 76 MB)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--chunk", type=int, default=16, help="candidates per chunk (evaluation: 16)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    rng = np.random.default_rng(0)
    features = rng.standard_normal((args.images, 61, 61, 128), dtype=np.float32)
    indices = list(range(args.images)) * 3  # k = 3 x images candidates, each image three times
    with tempfile.TemporaryDirectory(prefix="staging_bench_") as folder:
        np.save(os.path.join(folder, "db.npy"), features)
        memmap = np.load(os.path.join(folder, "db.npy"), mmap_mode="r")
        in_ram = DenseStore(None)
        on_disk = DenseStore(os.path.join(folder, "store"))
        for store in (in_ram, on_disk):
            store.append(features)
            store.finish()
        for name, store in (
            ("memmap (read-only)", memmap),
            ("DenseStore in RAM", in_ram),
            ("DenseStore on disk", on_disk),
        ):
            times = {"before": [], "staged": []}
            for r in range(args.rounds):
                runs = (("before", before), ("staged", staged))
                for side, fn in runs if r % 2 == 0 else runs[::-1]:
                    extra = (args.chunk,) if side == "staged" else ()
                    t0 = time.perf_counter()
                    fn(store, indices, device, *extra)
                    times[side].append((time.perf_counter() - t0) / len(indices))
            b, s = (1000 * float(np.median(times[k])) for k in ("before", "staged"))
            print(
                f"{name} -> {device}: before {b:.2f} ms/candidate, staged {s:.2f} ms/candidate, staged/before "
                f"{s / b:.2f} (median of {args.rounds} alternating rounds of {len(indices)} candidates)",
                flush=True,
            )
        on_disk.close()
        in_ram.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
