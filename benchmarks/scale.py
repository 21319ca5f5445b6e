"""Benchmark scale, run for real: eval.py on a Pitts30k-size synthetic split, killed and continued.

    nice python3 benchmarks/scale.py                     # 10,000 database images, 6,816 queries (35-40 min on 2 cores)
    python3 benchmarks/scale.py --database_num 200 --queries_num 40 --rerank_num 20    # a few minutes

1. The built-in synthetic data set with a test split of --database_num / --queries_num images (Pitts30k's
   10,000 / 6,816 by default; generated once under --work and reused, generation time reported).
2. Run A: eval.py with the small model (--backbone vit_tiny, 112x112 inputs, random weights),
   --efficient_ram_testing and --rerank_num 100, uninterrupted: wall time of each stage (eval.py's "Time
   per stage" line), peak resident memory (VmHWM of the eval.py process, and the whole process tree
   sampled every second), the peak disk use of its run folder (sampled) and the dense store's size.
3. Run B, the same run killed during its re-ranking and continued. So that the long extraction is not
   done twice, B starts as run A's twin: the moment A has saved its first-stage candidates, its run
   folder is copied into B's (the finished stage files hard-linked, nothing of the re-ranking), which is
   exactly the folder A would leave if it were killed right then. B is continued (--continue_run), then
   SIGKILLed at a random moment of its re-ranking (in the middle of a random chunk of queries) and
   continued again: its predictions.jsonl must be byte-identical to run A's and its recalls equal (exit
   status 1 otherwise). A and B re-rank at the same time, each with about half of the CPU.
4. The cost of one query-candidate pair at the paper's feature size (61x61x128, ViT-L at 224x224),
   measured with random unit features read from an on-disk store (--vitl_candidates candidates of
   --vitl_queries queries), and the projection to Pitts250k-test and the benchmark's Nordland: store
   size (float32 and float16) and re-ranking time = pairs x that cost, on this machine's CPU.

Printed as a report (and --json FILE). Random features do not have trained features' structure: the
re-rank engine's bfloat16 screen decides a different share of rows on them, so the ViT-L cost is an
estimate to within a factor.
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


def vm_hwm_bytes(pid: int) -> int:
    """The peak resident memory of process `pid` so far (VmHWM; 0 when unreadable). Read from the process
    itself: getrusage's ru_maxrss of a child also counts its parent's peak from before the exec."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return 0


class EvalProcess:
    """eval.py with `argv`, running in a child process (output appended to log_path); poll() samples its
    peak memory and the disk use of `disk_folder` and says whether it still runs."""

    def __init__(self, argv: Sequence[str], *, cwd: str, log_path: str, disk_folder: str) -> None:
        self.disk_folder = disk_folder
        self.start = time.perf_counter()
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "eval.py"), *argv], cwd=cwd, stdout=log, stderr=subprocess.STDOUT
            )
        self.stats = {"peak_rss_bytes": 0, "peak_tree_rss_bytes": 0, "peak_disk_bytes": 0, "killed": False}

    def poll(self) -> bool:
        if self.proc.poll() is not None:
            self.stats.setdefault("wall_s", time.perf_counter() - self.start)
            self.stats["exit"] = self.proc.returncode
            return False
        for key, value in (
            ("peak_rss_bytes", vm_hwm_bytes(self.proc.pid)),
            ("peak_tree_rss_bytes", tree_rss_bytes(self.proc.pid)),
            ("peak_disk_bytes", disk_usage_bytes(self.disk_folder)),
        ):
            self.stats[key] = max(self.stats[key], value)
        return True

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.stats["killed"] = True


def wait(*processes: EvalProcess, every: Optional[callable] = None) -> None:
    """Poll the processes every second until all have ended; every() is called at each round."""
    while any([p.poll() for p in processes]):
        if every is not None:
            every()
        time.sleep(1.0)


def make_twin(folder_a: str, folder_b: str) -> None:
    """Run B's folder as run A's would be if A were killed right after its search: logs, run.json and the
    saved first-stage candidates copied, the finished stage files hard-linked (A only reads them now)."""
    os.makedirs(os.path.join(folder_b, "progress"))
    for name in ("info.log", "debug.log", "run.json"):
        shutil.copy2(os.path.join(folder_a, name), os.path.join(folder_b, name))
    shutil.copy2(os.path.join(folder_a, "progress", "search.npz"), os.path.join(folder_b, "progress", "search.npz"))
    os.makedirs(os.path.join(folder_b, "dense_features"))
    for name in os.listdir(os.path.join(folder_a, "dense_features")):
        os.link(os.path.join(folder_a, "dense_features", name), os.path.join(folder_b, "dense_features", name))


def reranked_done(folder: str) -> int:
    try:
        with open(os.path.join(folder, "progress", "reranked.json")) as f:
            return int(json.load(f)["done"])
    except (OSError, ValueError, KeyError):
        return 0


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
        synthetic_dataset.SyntheticOptions(
            seed=args.seed,
            train_database_num=20,
            train_queries_num=2,
            val_database_num=10,
            val_queries_num=2,
            test_database_num=args.database_num,
            test_queries_num=args.queries_num,
        ),
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

    # 2. Run A, uninterrupted; 3. run B, its twin from the end of A's search, killed during its re-ranking.
    a_root, b_root = os.path.join(work, "test", f"a_{stamp}"), os.path.join(work, "test", f"b_{stamp}")
    run_a = EvalProcess([*flags, "--save_dir", f"a_{stamp}"], cwd=work, log_path=log_path, disk_folder=a_root)
    rng = random.Random(args.seed)
    state: Dict[str, object] = {}

    def watch() -> None:
        found = glob.glob(os.path.join(a_root, "*", "progress", "search.npz"))
        if found and "b" not in state:
            folder_a = os.path.dirname(os.path.dirname(found[0]))
            folder_b = os.path.join(b_root, os.path.basename(folder_a))
            make_twin(folder_a, folder_b)
            state.update(folder_a=folder_a, folder_b=folder_b, twin_at=time.perf_counter())
            chunk = json.load(open(os.path.join(folder_b, "run.json")))["chunks"]["queries"]
            chunks = -(-args.queries_num // chunk)
            # Killed inside chunk c (2 <= c < chunks - 1): fraction f of the way through it, its length
            # estimated from the chunk before. Fewer chunks: a few seconds into the re-ranking.
            target = rng.randrange(2, chunks - 1) * chunk if chunks >= 4 else None
            state.update(chunk=chunk, target=target, fraction=rng.uniform(0.1, 0.9), seen={})
            state["b"] = EvalProcess(
                [*flags, "--continue_run", folder_b], cwd=work, log_path=log_path, disk_folder=folder_b
            )
        run_b = state.get("b")
        if run_b is None or run_b.stats["killed"] or run_b.proc.poll() is not None:
            return
        done, now, seen = reranked_done(state["folder_b"]), time.perf_counter(), state["seen"]
        seen.setdefault(done, now)
        if state["target"] is None:
            kill_at = state["twin_at"] + 20 + 20 * state["fraction"]
        elif done >= state["target"]:
            # A chunk's length: the average since the first record B wrote (or since B started).
            first = min(d for d in seen if d > 0)
            if done > first:
                length = (seen[done] - seen[first]) / ((done - first) / state["chunk"])
            else:
                length = (seen[done] - state["twin_at"]) / (done / state["chunk"])
            kill_at = seen[done] + state["fraction"] * length
        else:
            return
        if now >= kill_at:
            run_b.kill()
            state.update(killed_with_queries_recorded=done)

    while True:
        watch()
        if not any([p.poll() for p in [run_a, state.get("b")] if p is not None]):
            break
        time.sleep(1.0)
    a = run_a.stats
    if a["exit"] != 0 or "b" not in state:
        print(f"run A failed (exit {a['exit']}): see {log_path}")
        return 1
    a.update(stage_times(state["folder_a"]))
    image_bytes = int(np.prod([4 * (s // 14) - 3 for s in args.resize])) * 128 * 4
    a["store_bytes"] = (args.database_num + args.queries_num) * image_bytes
    b = dict(state["b"].stats, queries_recorded_at_kill=state.get("killed_with_queries_recorded"))
    print(f"run A: {json.dumps(a)}\nrun B killed: {json.dumps(b)}", flush=True)
    if not b["killed"]:
        print(f"run B was not killed during its re-ranking (exit {b.get('exit')}): see {log_path}")
        return 1
    run_c = EvalProcess(
        [*flags, "--continue_run", state["folder_b"]], cwd=work, log_path=log_path, disk_folder=state["folder_b"]
    )
    wait(run_c)
    continued = run_c.stats
    if continued["exit"] != 0:
        print(f"the continuation of run B failed (exit {continued['exit']}): see {log_path}")
        return 1
    continued.update(stage_times(state["folder_b"]))
    same = outputs(state["folder_a"]) == outputs(state["folder_b"])
    report.update(run_a=a, run_b_killed=b, run_b_continued=continued, identical=same)
    print(f"run B continued: {json.dumps(continued)}\nidentical: {same}", flush=True)
    done = b["queries_recorded_at_kill"]

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
        f"run B: killed during its re-ranking with {done} of {args.queries_num} queries recorded; the "
        f"continuation took {continued['wall_s']:.0f} s (re-ranking {continued['rerank_s']:.0f} s, the queries "
        f"not recorded); predictions and recalls identical to run A's: {same}"
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
