"""Benchmark scale, run for real: eval.py on a Pitts30k-size synthetic split, killed and continued.

    nice python3 benchmarks/scale.py                     # 10,000 database images, 6,816 queries (hours on 2 cores)
    python3 benchmarks/scale.py --database_num 200 --queries_num 40 --rerank_num 20    # a few minutes

1. The built-in synthetic data set with a test split of --database_num / --queries_num images (Pitts30k's
   10,000 / 6,816 by default; generated once under --work and reused, generation time reported).
2. Run A: eval.py with the small model (--backbone vit_tiny, 112x112 inputs, random weights),
   --efficient_ram_testing and --rerank_num 100: wall time of each stage (eval.py's "Time per stage"
   line), the peak resident memory (the largest process, getrusage; and the whole process tree, sampled
   every second), the peak disk use of its run folder (sampled) and the dense store's size.
3. Run B: the same command, SIGKILLed at a random moment of its re-ranking (uniform over the first 90 %
   of run A's re-ranking time, after the first-stage candidates were saved), then continued with
   --continue_run: its predictions.jsonl must be byte-identical to run A's and its recalls equal
   (exit status 1 otherwise). The time the continuation took is reported beside run A's.
4. The cost of one query-candidate pair at the paper's feature size (61x61x128, ViT-L at 224x224),
   measured with random unit features read from an on-disk store (--vitl_candidates candidates of
   --vitl_queries queries), and the projection to Pitts250k-test and the benchmark's Nordland: store
   size (float32 and float16) and re-ranking time = pairs x that cost, on this machine's CPU.

Printed as a report (and --json FILE). Random features do not have trained features' structure: the
re-rank engine's bfloat16 screen decides a different share of rows on them, so the ViT-L cost is an
estimate to within a factor (stated in the report).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import retrieval
import synthetic_dataset
from dense_store import DenseStore

PITTS30K = (10_000, 6_816)
# (database, queries) of the paper's large sets: Pitts250k-test, and Nordland as the benchmark's
# downloader makes it (the paper's own Nordland-test has 3,450 of each).
PROJECTED = {"Pitts30k-test": PITTS30K, "Pitts250k-test": (83_952, 8_280), "Nordland (benchmark)": (27_592, 27_592)}
VITL_DENSE = (61, 61, 128)  # ViT-L/14 at 224x224
GIB = 2**30


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants now (Linux /proc; 0 when unreadable)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def disk_usage_bytes(folder: str) -> int:
    """Bytes allocated on disk below `folder` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def run_eval(argv: Sequence[str], *, cwd: str, log_path: str, kill_when=None) -> Dict[str, float]:
    """Run eval.py with `argv` in `cwd` (output appended to log_path), sampling the process tree's memory
    and the run folders' disk use every second. kill_when() -> True sends SIGKILL. Returns exit status,
    wall_s, peak_rss_bytes (largest process, getrusage), peak_tree_rss_bytes, peak_disk_bytes."""
    start = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "eval.py"), *argv], cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
    peak_tree = peak_disk = 0
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_tree = max(peak_tree, tree_rss_bytes(proc.pid))
        peak_disk = max(peak_disk, disk_usage_bytes(os.path.join(cwd, "test")))
        if kill_when is not None and not killed and kill_when():
            proc.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(1.0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "exit": proc.returncode,
        "killed": killed,
        "wall_s": time.perf_counter() - start,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "peak_tree_rss_bytes": peak_tree,
        "peak_disk_bytes": peak_disk,
    }


STAGES = re.compile(
    r"Time per stage \(this process\): database extraction ([0-9.]+) s, query extraction ([0-9.]+) s, "
    r"search ([0-9.]+) s, re-ranking ([0-9.]+) s"
)


def stage_times(folder: str) -> Dict[str, float]:
    """The last "Time per stage" line of the run's info.log."""
    found = STAGES.findall(open(os.path.join(folder, "info.log")).read())
    if not found:
        raise RuntimeError(f"{folder}/info.log has no 'Time per stage' line: the run did not finish")
    keys = ("database_extraction_s", "query_extraction_s", "search_s", "rerank_s")
    return dict(zip(keys, (float(v) for v in found[-1])))


def outputs(folder: str):
    with open(os.path.join(folder, "predictions.jsonl"), "rb") as f:
        predictions = f.read()
    log = open(os.path.join(folder, "info.log")).read()
    return predictions, re.findall(r"Recalls on .*", log)[-1], re.findall(r"First ranking recalls: .*", log)[-1]


def vitl_pair_seconds(folder: str, *, candidates: int, queries: int, seed: int = 0) -> float:
    """Seconds of one query-candidate pair at ViT-L's feature size: retrieval.rerank_predictions of
    `queries` queries against `candidates` random unit maps read from an on-disk store."""
    gen = torch.Generator().manual_seed(seed)

    def unit(n):
        return F.normalize(torch.randn(n, *VITL_DENSE, generator=gen), dim=-1).numpy()

    os.makedirs(folder, exist_ok=True)
    database, query_store = DenseStore(folder), DenseStore(None)
    try:
        for start in range(0, candidates, 16):
            database.append(unit(min(16, candidates - start)))
        query_store.append(unit(queries))
        database.finish()
        query_store.finish()
        predictions = np.tile(np.arange(candidates, dtype=np.int64), (queries, 1))
        retrieval.rerank_predictions(predictions[:1, :2], query_store, database, device="cpu")  # warm-up
        start = time.perf_counter()
        retrieval.rerank_predictions(predictions, query_store, database, device="cpu")
        return (time.perf_counter() - start) / (queries * candidates)
    finally:
        database.close()
        query_store.close()


def projection(pair_s: float, rerank_num: int) -> List[Dict[str, float]]:
    """Store size and re-ranking time of each PROJECTED data set at ViT-L's feature size."""
    per_image = int(np.prod(VITL_DENSE)) * 4
    return [
        {
            "dataset": name,
            "database": db,
            "queries": q,
            "store_float32_bytes": (db + q) * per_image,
            "store_float16_bytes": (db + q) * per_image // 2,
            "rerank_pairs": q * rerank_num,
            "rerank_hours": q * rerank_num * pair_s / 3600,
        }
        for name, (db, q) in PROJECTED.items()
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=os.path.join("/tmp", "selavpr_scale"), help="data set and runs go here")
    p.add_argument("--database_num", type=int, default=PITTS30K[0])
    p.add_argument("--queries_num", type=int, default=PITTS30K[1])
    p.add_argument("--rerank_num", type=int, default=100)
    p.add_argument("--backbone", default="vit_tiny")
    p.add_argument("--backbone_depth", type=int, default=None)
    p.add_argument("--resize", type=int, nargs=2, default=[112, 112])
    p.add_argument("--infer_batch_size", type=int, default=16)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="of the data set and of the kill moment")
    p.add_argument("--vitl_candidates", type=int, default=100)
    p.add_argument("--vitl_queries", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    report: Dict[str, object] = {"cpu": cpu_name(), "torch": torch.__version__, "args": vars(args)}

    # 1. The data set.
    name = f"synthetic_{args.database_num}x{args.queries_num}"
    start = time.perf_counter()
    reused = os.path.isdir(os.path.join(work, "datasets", name))
    synthetic_dataset.ensure_dataset(
        os.path.join(work, "datasets"),
        name,
        seed=args.seed,
        train_database_num=20,
        train_queries_num=2,
        val_database_num=10,
        val_queries_num=2,
        test_database_num=args.database_num,
        test_queries_num=args.queries_num,
    )
    report["dataset"] = {"name": name, "reused": reused, "seconds": time.perf_counter() - start}
    print(f"data set {name}: {'reused' if reused else 'generated'} in {report['dataset']['seconds']:.0f} s", flush=True)

    flags = [
        "--datasets_folder",
        os.path.join(work, "datasets"),
        "--dataset_name",
        name,
        "--backbone",
        args.backbone,
        *(["--backbone_depth", str(args.backbone_depth)] if args.backbone_depth else []),
        "--resize",
        *map(str, args.resize),
        "--allow_random_weights",
        "--device",
        "cpu",
        "--num_workers",
        str(args.num_workers),
        "--infer_batch_size",
        str(args.infer_batch_size),
        "--efficient_ram_testing",
        "--rerank_num",
        str(args.rerank_num),
    ]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = os.path.join(work, f"scale_{stamp}.log")

    # 2. Run A, uninterrupted.
    a = run_eval([*flags, "--save_dir", f"a_{stamp}"], cwd=work, log_path=log_path)
    if a["exit"] != 0:
        print(f"run A failed (exit {a['exit']}): see {log_path}")
        return 1
    (folder_a,) = glob.glob(os.path.join(work, "test", f"a_{stamp}", "*"))
    a.update(stage_times(folder_a))
    image_bytes = int(np.prod([4 * (s // 14) - 3 for s in args.resize])) * 128 * 4
    a["store_bytes"] = (args.database_num + args.queries_num) * image_bytes
    report["run_a"] = a
    print(f"run A: {json.dumps(a)}", flush=True)

    # 3. Run B: killed at a random moment of its re-ranking, then continued.
    delay = random.Random(args.seed).uniform(0.0, 0.9) * a["rerank_s"]
    started: Dict[str, float] = {}

    def kill_when() -> bool:
        found = glob.glob(os.path.join(work, "test", f"b_{stamp}", "*", "progress", "search.npz"))
        if found and "at" not in started:
            started["at"] = time.perf_counter()
        return "at" in started and time.perf_counter() - started["at"] >= delay

    b = run_eval([*flags, "--save_dir", f"b_{stamp}"], cwd=work, log_path=log_path, kill_when=kill_when)
    (folder_b,) = glob.glob(os.path.join(work, "test", f"b_{stamp}", "*"))
    record = os.path.join(folder_b, "progress", "reranked.json")
    done = json.load(open(record))["done"] if os.path.exists(record) else 0
    b.update(kill_delay_s=delay, queries_recorded_at_kill=done)
    continued = run_eval([*flags, "--continue_run", folder_b], cwd=work, log_path=log_path)
    if continued["exit"] != 0:
        print(f"the continuation of run B failed (exit {continued['exit']}): see {log_path}")
        return 1
    continued.update(stage_times(folder_b))
    same = outputs(folder_a) == outputs(folder_b)
    report.update(run_b_killed=b, run_b_continued=continued, identical=same)
    print(f"run B killed: {json.dumps(b)}\nrun B continued: {json.dumps(continued)}\nidentical: {same}", flush=True)

    # 4. Per-pair costs and the projection.
    tiny_pair_s = a["rerank_s"] / (args.queries_num * min(args.rerank_num, args.database_num))
    vitl_s = vitl_pair_seconds(
        os.path.join(work, f"vitl_{stamp}"), candidates=args.vitl_candidates, queries=args.vitl_queries
    )
    shutil.rmtree(os.path.join(work, f"vitl_{stamp}"), ignore_errors=True)
    report.update(tiny_pair_s=tiny_pair_s, vitl_pair_s=vitl_s, projection=projection(vitl_s, args.rerank_num))

    print(f"\n## Scale run on {report['cpu']} (torch {torch.__version__})\n")
    print(
        f"data set: {args.database_num} database images, {args.queries_num} queries; generation "
        f"{report['dataset']['seconds']:.0f} s{' (reused)' if reused else ''}"
    )
    print(
        f"run A: wall {a['wall_s']:.0f} s; database extraction {a['database_extraction_s']:.0f} s, query "
        f"extraction {a['query_extraction_s']:.0f} s, search {a['search_s']:.1f} s, re-ranking {a['rerank_s']:.0f} s "
        f"({a['rerank_s'] / args.queries_num * 1000:.0f} ms/query)"
    )
    print(
        f"peak RSS: {a['peak_rss_bytes'] / GIB:.2f} GiB (largest process), {a['peak_tree_rss_bytes'] / GIB:.2f} GiB "
        f"(process tree, sampled); peak disk {a['peak_disk_bytes'] / GIB:.2f} GiB, dense store "
        f"{a['store_bytes'] / GIB:.2f} GiB"
    )
    print(
        f"run B: killed {b['kill_delay_s']:.0f} s into its re-ranking ({done} of {args.queries_num} queries "
        f"recorded); the continuation took {continued['wall_s']:.0f} s (re-ranking {continued['rerank_s']:.0f} s) "
        f"against run A's {a['wall_s']:.0f} s; predictions and recalls identical: {same}"
    )
    print(
        f"per-pair cost: {tiny_pair_s * 1000:.2f} ms measured ({args.backbone} maps), "
        f"{vitl_s * 1000:.2f} ms at ViT-L size"
    )
    print("\n| data set | database | queries | store float32 | store float16 | re-rank on this CPU |")
    print("|---|---|---|---|---|---|")
    for row in report["projection"]:
        print(
            f"| {row['dataset']} | {row['database']:,} | {row['queries']:,} "
            f"| {row['store_float32_bytes'] / 1e9:.0f} GB "
            f"| {row['store_float16_bytes'] / 1e9:.0f} GB | {row['rerank_hours']:.1f} h |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
