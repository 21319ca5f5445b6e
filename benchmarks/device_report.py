"""One command that proves and measures everything device-specific (GPU) in one go.

    python3 benchmarks/device_report.py --json device_report.json            # GPU: <= 8 minutes
    python3 benchmarks/device_report.py --quick --json /tmp/quick.json       # CPU, small sizes (CI)

Rows (one table at the end, the same as JSON, rewritten after every row so that a kill keeps the
rows done so far):
  rerank_exactness  the re-rank engine's scores and orders vs the plain public algorithm (one
                    batched k x L x L float32 similarity per query, max both ways, same device) on
                    random 61x61x128 features at k = 20 and 100, plus exactly tied and one-ulp
                    near-tied candidates; differing scores must be 0. Also: the engine path that ran
                    and the tile self-check's verdict on this device.
  rerank_speed      ms/query at k = 20 and 100, engine vs plain algorithm, same device, features
                    resident on the device (transfers excluded on both sides).
  extraction        ViT-L/14 at 224x224: images/s at batch 32 / 64 / 128, fp32 vs bf16 autocast; the
                    largest descriptor deviation bf16 vs fp32; whether bf16 changes first-stage or
                    re-ranked orders on a few hundred random-weight images.
  training_step     the public recipe's batch (4 queries x (query + positive + 2 negatives) = 16
                    images), frozen ViT-L/14: s/step and peak device memory for fp32 and bf16 autocast;
                    the first losses on the device vs on the CPU from the same weights and images.
  end_to_end        eval.py on the built-in synthetic set on the device vs on the CPU: first-stage and
                    re-ranked recalls (and predictions) must be identical.
  torchrun          torchrun --nproc_per_node=1 train.py (a few steps + evaluation) on the synthetic
                    set, and the project's collectives, DDP step and sharded evaluation over a real
                    one-process group (NCCL on CUDA, gloo on the CPU) vs the single-process result.

--quick runs the same code at small sizes (tiny ViT) on the CPU; rows that need CUDA to mean what
they say run their CPU equivalent there (the device side is then the CPU too) and say so. Each row
has a time limit; the whole run has a budget (--budget_s, default 470 s): a row that no longer fits
is skipped and marked so. (--quick defaults to generous limits, 300 s a row: on a shared CPU its
slowness must not fail it.) Exit status 0 when every row is ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import atomic_files
import local_matching

# Sizes: the full run (a GPU) and --quick (CPU, CI).
FULL = dict(
    grid=61,
    channels=128,
    ks=(20, 100),
    queries=20,
    speed_queries=10,
    backbone="vit_large",
    depth=None,
    resize=224,
    batches=(32, 64, 128),
    timed_batches=3,
    order_db=200,
    order_queries=100,
    order_k=20,
    train_queries=4,
    train_steps=3,
    resize_e2e=224,
    loader_workers=4,
)
QUICK = dict(
    grid=12,
    channels=128,
    ks=(5, 10),
    queries=2,
    speed_queries=2,
    backbone="vit_tiny",
    depth=2,
    resize=56,
    batches=(2, 4),
    timed_batches=1,
    order_db=16,
    order_queries=8,
    order_k=5,
    train_queries=2,
    train_steps=1,
    resize_e2e=56,
    loader_workers=0,
)
# Per-row time limits (seconds; the full run), in the order the rows run.
LIMITS = dict(rerank_exactness=90, rerank_speed=60, training_step=100, extraction=110, end_to_end=100, torchrun=110)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Optional[str], report: Dict[str, Any]) -> None:
    """Atomic rewrite (temp file + rename): a kill leaves the previous complete file."""
    if not path:
        return
    atomic_files.atomic_write_text(path, json.dumps(report, indent=1, default=str))


def _engine_path(device: torch.device, lc: int, lq: int, c: int) -> str:
    dev = (
        str(device)
        if device.type == "cpu" or device.index is not None
        else f"{device.type}:{torch.cuda.current_device()}"
    )
    paths = local_matching.engine_paths()
    return paths.get(f"{dev} {lc}x{c} vs {lq}x{c}", paths.get(f"{device} {lc}x{c} vs {lq}x{c}", "not recorded"))


# ------------------------------------------------------------------------------------------------
# Re-rank: data and the plain public algorithm
# ------------------------------------------------------------------------------------------------
def rerank_query_data(seed: int, *, k: int, grid: int, channels: int, device: torch.device):
    """One query (L, C) and k candidates (k, L, C), unit vectors, on `device`. Candidates 0-4 are
    the hard cases: 1 is an exact copy of 0 (tied scores), 2 is 0 with a quarter of its vectors
    duplicated (exact ties in columns of S), 3 is the query with half its vectors moved by one
    float32 ulp (near-ties one ulp apart), 4 pairs each even vector with a one-ulp copy of it.
    The query repeats some of its own vectors (ties in rows of S). The others mix the query with
    noise in decreasing shares, so scores spread from ~L down to a few."""
    gen = torch.Generator(device=device).manual_seed(seed)
    L = grid * grid
    q = F.normalize(torch.randn(L, channels, generator=gen, device=device), dim=1)
    q[L // 2 : L // 2 + L // 16] = q[: L // 16]
    shares = torch.linspace(0.95, 0.0, k, device=device).view(k, 1, 1)
    noise = F.normalize(torch.randn(k, L, channels, generator=gen, device=device), dim=2)
    x = F.normalize(shares * q.unsqueeze(0) + (1 - shares) * noise, dim=2)
    up = torch.full_like(q, 2.0)
    if k >= 5:
        x[1] = x[0]
        x[2, L // 4 : L // 2] = x[2, : L // 2 - L // 4].clone()
        x[3] = q
        x[3, ::2] = torch.nextafter(q[::2], up[::2])
        x[4] = q
        x[4, 1::2] = torch.nextafter(q[0 : L - 1 : 2], up[0 : L - 1 : 2])[: x[4, 1::2].shape[0]]
    return q.contiguous(), x.contiguous()


@torch.no_grad()
def public_scores(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The public algorithm: S = x @ q.T (k, Lc, Lq) in one batched float32 matmul, max both ways
    (first index on ties), mutual pairs counted -> (k,) float32 on the inputs' device."""
    sim = torch.matmul(x, q.unsqueeze(0).transpose(1, 2))
    nn12 = torch.max(sim, dim=2).indices
    nn21 = torch.max(sim, dim=1).indices
    return (torch.gather(nn21, 1, nn12) == torch.arange(x.shape[1], device=x.device)).sum(1).float()


def engine_scores(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The project's engine as evaluation calls it (chunks of 16 candidates), store on the device."""
    return local_matching.mutual_nn_scores(q, x, np.arange(x.shape[0]), chunk_size=16)


def row_rerank_exactness(cfg: Dict[str, Any], device: torch.device, deadline: float) -> Dict[str, Any]:
    L, C = cfg["grid"] ** 2, cfg["channels"]
    out: Dict[str, Any] = {"queries": cfg["queries"], "positions": L, "channels": C}
    bad = 0
    parts = []
    for k in cfg["ks"]:
        differing = orders_differing = total = done = 0
        for i in range(cfg["queries"]):
            if time.monotonic() > deadline:
                break
            q, x = rerank_query_data(1000 * k + i, k=k, grid=cfg["grid"], channels=C, device=device)
            want = public_scores(q, x)
            got = engine_scores(q, x)
            differing += int((got.cpu() != want.cpu()).sum())
            total += k
            orders_differing += int(not np.array_equal(local_matching.rerank(got), local_matching.rerank(want)))
            done += 1
        out[f"k{k}"] = dict(
            queries_run=done, scores=total, differing_scores=differing, queries_with_differing_order=orders_differing
        )
        bad += differing + orders_differing + (done < cfg["queries"])
        parts.append(
            f"k={k}: {differing}/{total} scores differ, {orders_differing}/{done} orders differ"
            + ("" if done == cfg["queries"] else f" (only {done} queries: time limit)")
        )
    out["engine_path"] = _engine_path(device, L, L, C)
    ok, detail = local_matching.tile_self_check(
        candidate_positions=L, query_positions=L, channels=C, device=device, screen=device.type == "cpu"
    )
    out["tile_self_check"] = dict(passed=ok, detail=detail)
    out["status"] = "ok" if bad == 0 else "FAIL"
    out["summary"] = (
        "; ".join(parts)
        + f"; path: {out['engine_path']}; tile self-check on {device}: "
        + ("passed" if ok else "FAILED")
    )
    return out


def row_rerank_speed(cfg: Dict[str, Any], device: torch.device, deadline: float) -> Dict[str, Any]:
    L, C = cfg["grid"] ** 2, cfg["channels"]
    out: Dict[str, Any] = {"features": "resident on the device (no transfers timed)"}
    parts = []
    for k in cfg["ks"]:
        data = [
            rerank_query_data(7 * k + i, k=k, grid=cfg["grid"], channels=C, device=device)
            for i in range(cfg["speed_queries"] + 1)
        ]
        times: Dict[str, List[float]] = {"engine": [], "plain": []}
        for i, (q, x) in enumerate(data):
            for name, fn in (("engine", engine_scores), ("plain", public_scores)):
                _sync(device)
                t0 = time.perf_counter()
                fn(q, x).cpu()
                _sync(device)
                if i > 0:  # query 0 warms up
                    times[name].append(time.perf_counter() - t0)
            if time.monotonic() > deadline and i > 0:
                break
        del data
        eng, plain = (1000 * float(np.median(times[n])) for n in ("engine", "plain"))
        out[f"k{k}"] = dict(
            engine_ms_per_query=round(eng, 3),
            plain_ms_per_query=round(plain, 3),
            speedup=round(plain / eng, 3),
            queries_timed=len(times["engine"]),
        )
        parts.append(f"k={k}: engine {eng:.2f} ms, plain {plain:.2f} ms, {plain / eng:.2f}x")
    k_max = max(cfg["ks"])
    out["goal_2ms_at_k100"] = (
        ("met" if out[f"k{k_max}"]["engine_ms_per_query"] <= 2.0 else "not met")
        if k_max == 100
        else "n/a (quick sizes)"
    )
    out["engine_path"] = _engine_path(device, L, L, C)
    out["status"] = "ok"
    out["summary"] = "; ".join(parts) + f"; <= 2 ms/query at k=100: {out['goal_2ms_at_k100']}"
    return out


# ------------------------------------------------------------------------------------------------
# Model rows
# ------------------------------------------------------------------------------------------------
def _model(cfg: Dict[str, Any]):
    import network

    torch.manual_seed(0)
    model = network.GeoLocalizationNet(backbone=cfg["backbone"], backbone_depth=cfg["depth"])
    with torch.no_grad():  # the adapters' output layers start at zero: make them count
        for name, p in model.named_parameters():
            if "D_fc2" in name:
                p.normal_(std=0.02)
    return model


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """n smooth random images (3, size, size), normalised-like values (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, max(2, size // 16), max(2, size // 16), generator=gen)
    return F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False) + 0.3 * torch.randn(
        n, 3, size, size, generator=gen
    )


@torch.inference_mode()
def _extract(model, images: torch.Tensor, device: torch.device, precision: str, batch: int):
    """(local (N, h, w, C) float32 numpy, global (N, D) float32 numpy) as retrieval.extract_features."""
    locs, globs = [], []
    with _autocast(device, precision):
        for s in range(0, len(images), batch):
            local, glob = model(images[s : s + batch].to(device, non_blocking=True))
            locs.append(local.float().cpu().numpy())
            globs.append(glob.float().cpu().numpy())
    return np.concatenate(locs), np.concatenate(globs)


def _l2_topk(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    try:
        import retrieval

        return retrieval.l2_search(database, queries, k)[1]
    except ImportError:  # no faiss: the same exact L2 order in float64
        d = ((queries[:, None, :].astype(np.float64) - database[None].astype(np.float64)) ** 2).sum(-1)
        return np.argsort(d, axis=1, kind="stable")[:, :k]


def _rerank(preds: np.ndarray, q_local: np.ndarray, db_local: np.ndarray, device: torch.device) -> np.ndarray:
    out = np.empty_like(preds)
    for i in range(len(preds)):
        scores = local_matching.mutual_nn_scores(
            torch.from_numpy(q_local[i]).to(device), db_local, preds[i], chunk_size=16
        )
        out[i] = preds[i][local_matching.rerank(scores)]
    return out


def row_extraction(cfg: Dict[str, Any], device: torch.device, deadline: float) -> Dict[str, Any]:
    model = _model(cfg).eval().to(device)
    size = cfg["resize"]
    out: Dict[str, Any] = {"backbone": cfg["backbone"], "resize": size}
    parts = []
    for batch in cfg["batches"]:
        if time.monotonic() > deadline:
            out[f"batch{batch}"] = "skipped: time limit"
            continue
        images = _images(batch, size, seed=batch).to(device)
        rates = {}
        for precision in ("fp32", "bf16"):
            with torch.inference_mode(), _autocast(device, precision):
                model(images)  # warm-up
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(cfg["timed_batches"]):
                    model(images)
                _sync(device)
            rates[precision] = batch * cfg["timed_batches"] / (time.perf_counter() - t0)
        out[f"batch{batch}"] = {f"{p}_images_per_s": round(r, 1) for p, r in rates.items()}
        parts.append(f"b{batch}: fp32 {rates['fp32']:.0f}, bf16 {rates['bf16']:.0f} img/s")
        del images
    # Deviations and orders on a few hundred images (database + queries that are noisy copies).
    n_db, n_q = cfg["order_db"], cfg["order_queries"]
    db_images = _images(n_db, size, seed=1)
    q_images = db_images[:n_q] + 0.5 * _images(n_q, size, seed=2)
    images = torch.cat([db_images, q_images])
    feats = {p: _extract(model, images, device, p, batch=32) for p in ("fp32", "bf16")}
    out["max_abs_deviation_bf16"] = dict(
        local=float(np.abs(feats["bf16"][0] - feats["fp32"][0]).max()),
        global_=float(np.abs(feats["bf16"][1] - feats["fp32"][1]).max()),
    )
    k = min(cfg["order_k"], n_db)
    orders = {}
    for p, (local, glob) in feats.items():
        first = _l2_topk(glob[:n_db], glob[n_db:], k)
        orders[p] = (first, _rerank(first, local[n_db:], local[:n_db], device))
    changed_first = int((orders["bf16"][0] != orders["fp32"][0]).any(axis=1).sum())
    changed_rerank = int((orders["bf16"][1] != orders["fp32"][1]).any(axis=1).sum())
    top1 = int((orders["bf16"][1][:, 0] != orders["fp32"][1][:, 0]).sum())
    out["bf16_vs_fp32_orders"] = dict(
        images=n_db + n_q,
        queries=n_q,
        k=k,
        queries_first_stage_order_changed=changed_first,
        queries_reranked_order_changed=changed_rerank,
        queries_reranked_top1_changed=top1,
    )
    dev = out["max_abs_deviation_bf16"]
    parts.append(
        f"bf16 max |dev| local {dev['local']:.2g} global {dev['global_']:.2g}; bf16 changes first-stage "
        f"order of {changed_first}/{n_q}, re-ranked {changed_rerank}/{n_q} (top-1 {top1})"
    )
    out["status"] = "ok"
    out["summary"] = "; ".join(parts)
    return out


def _triplets(queries: int, negs: int) -> torch.Tensor:
    """The collate order of the training set: per query [query, positive, negatives...]."""
    group = 2 + negs
    return torch.tensor([[g * group, g * group + 1, g * group + 2 + n] for g in range(queries) for n in range(negs)])


def row_training_step(cfg: Dict[str, Any], device: torch.device, deadline: float) -> Dict[str, Any]:
    import loss

    base = _model(cfg)  # built once (a ViT-L takes seconds to initialise), copied per side
    base.freeze()
    queries, negs = cfg["train_queries"], 2  # the public recipe: --train_batch_size 4, 2 negatives
    triplets = _triplets(queries, negs)
    images = _images(queries * (2 + negs), cfg["resize"], seed=3)
    normaliser = queries * negs
    out: Dict[str, Any] = {"backbone": cfg["backbone"], "images_per_step": len(images), "resize": cfg["resize"]}
    parts = []
    first_losses = {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(base).to(device).train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for step in range(cfg["train_steps"] + 1):
            _sync(device)
            t0 = time.perf_counter()
            local, glob = loss.forward_features(model, images.to(device, non_blocking=True), precision=precision)
            g, l = loss.triplet_losses(local, glob, triplets, margin=0.1, normaliser=normaliser)
            optimizer.zero_grad(set_to_none=True)
            (g + l).backward()
            optimizer.step()
            values = (g.item(), l.item())
            _sync(device)
            if step == 0:
                first_losses[precision] = values
            else:
                times.append(time.perf_counter() - t0)
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"non-finite training loss {values} at {precision}, step {step}")
            if time.monotonic() > deadline and times:
                break
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        out[precision] = dict(
            s_per_step=round(float(np.mean(times)), 4),
            steps_timed=len(times),
            peak_device_memory_gib=None if math.isnan(peak) else round(peak, 3),
            first_losses=first_losses[precision],
        )
        parts.append(
            f"{precision} {np.mean(times):.3f} s/step" + ("" if math.isnan(peak) else f", peak {peak:.2f} GiB")
        )
        del model, optimizer
    # First losses of fp32 on the CPU from the same weights and images (forward only).
    cpu_model = base.train()
    with torch.no_grad():
        local, glob = loss.forward_features(cpu_model, images, precision="fp32")
        g, l = loss.triplet_losses(local, glob, triplets, margin=0.1, normaliser=normaliser)
    cpu = (g.item(), l.item())
    dev = first_losses["fp32"]
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(dev, cpu))
    out["first_losses_fp32"] = {str(device): dev, "cpu": cpu, "max_relative_difference": rel}
    parts.append(
        f"first losses fp32 {device} (global {dev[0]:.6f}, local {dev[1]:.6f}) vs cpu "
        f"({cpu[0]:.6f}, {cpu[1]:.6f}), rel. diff {rel:.1e}"
    )
    out["status"] = "ok" if rel < 1e-2 else "FAIL"
    out["summary"] = "; ".join(parts)
    return out


# ------------------------------------------------------------------------------------------------
# Whole-program rows (subprocesses)
# ------------------------------------------------------------------------------------------------
def _dataset(folder: str) -> str:
    import synthetic_dataset

    if not os.path.isdir(os.path.join(folder, "synthetic")):
        synthetic_dataset.generate(folder, "synthetic", seed=0, preset="tiny")
    return folder


def _model_flags(cfg: Dict[str, Any]) -> List[str]:
    flags = [
        "--backbone",
        cfg["backbone"],
        "--allow_random_weights",
        "--resize",
        str(cfg["resize_e2e"]),
        str(cfg["resize_e2e"]),
        "--num_workers",
        str(cfg["loader_workers"]),
        "--infer_batch_size",
        "16",
        "--seed",
        "0",
    ]
    if cfg["depth"]:
        flags += ["--backbone_depth", str(cfg["depth"])]
    return flags


def _recalls(text: str) -> Dict[str, str]:
    first = re.findall(r"First ranking recalls: (R@.*)", text)
    final = re.findall(r"Recalls on < .*?>: (R@.*)", text)
    return {"first_stage": first[-1].strip() if first else None, "reranked": final[-1].strip() if final else None}


def _run(
    command: List[str], *, cwd: str, timeout: float, env: Optional[Dict[str, str]] = None
) -> subprocess.CompletedProcess:
    """Run a command in its own process group; past `timeout` the whole group is killed (torchrun's
    workers too, which would otherwise keep the output pipes open) and TimeoutError is raised."""
    full_env = dict(os.environ, **(env or {}))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=max(5.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TimeoutError(
            f"{os.path.basename(command[1 if command[1] != '-m' else 2])} did not finish within "
            f"the row's time limit ({max(5.0, timeout):.0f} s)"
        ) from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _predictions(folder: str) -> Optional[str]:
    for dirpath, _, files in os.walk(folder):
        if "predictions.jsonl" in files:
            with open(os.path.join(dirpath, "predictions.jsonl")) as f:
                return f.read()
    return None


def row_end_to_end(cfg: Dict[str, Any], device: torch.device, deadline: float, work: str) -> Dict[str, Any]:
    data = _dataset(os.path.join(work, "datasets"))
    sides = [str(device.type), "cpu"]
    out: Dict[str, Any] = {}
    results = {}
    for i, dev in enumerate(sides):
        run_dir = os.path.join(work, f"e2e_{i}_{dev}")
        os.makedirs(run_dir, exist_ok=True)
        proc = _run(
            [
                sys.executable,
                os.path.join(ROOT, "eval.py"),
                "--datasets_folder",
                data,
                "--dataset_name",
                "synthetic",
                "--device",
                dev,
                "--save_dir",
                f"e2e_{dev}",
                *_model_flags(cfg),
            ],
            cwd=run_dir,
            timeout=deadline - time.monotonic(),
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"eval.py --device {dev} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}"
            )
        results[i] = (_recalls(proc.stdout + proc.stderr), _predictions(run_dir))
        out[f"{dev}_{i}"] = results[i][0]
    same_recalls = results[0][0] == results[1][0] and None not in results[0][0].values()
    same_preds = results[0][1] is not None and results[0][1] == results[1][1]
    out["identical_recalls"], out["identical_predictions"] = same_recalls, same_preds
    note = "" if device.type == "cuda" else " (no CUDA: CPU run twice)"
    out["status"] = "ok" if same_recalls else "FAIL"
    out["summary"] = (
        f"{sides[0]} vs cpu{note}: recalls {'identical' if same_recalls else 'DIFFER'} "
        f"({results[0][0]['reranked']}), predictions {'identical' if same_preds else 'differ'}"
    )
    return out


def row_torchrun(cfg: Dict[str, Any], device: torch.device, deadline: float, work: str) -> Dict[str, Any]:
    data = _dataset(os.path.join(work, "datasets"))
    dev = device.type
    run_dir = os.path.join(work, "torchrun_train")
    os.makedirs(run_dir, exist_ok=True)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
    ]
    train_flags = [
        "--datasets_folder",
        data,
        "--dataset_name",
        "synthetic",
        "--device",
        dev,
        "--save_dir",
        "tr",
        "--epochs_num",
        "1",
        "--cache_refresh_rate",
        "6",
        "--queries_per_epoch",
        "6",
        "--neg_samples_num",
        "12",
        "--train_batch_size",
        "2",
        "--rerank_num",
        "10",
        "--mining",
        "full",
        *_model_flags(cfg),
    ]
    out: Dict[str, Any] = {}
    proc = _run(
        [*launcher, os.path.join(ROOT, "train.py"), *train_flags],
        cwd=run_dir,
        timeout=(deadline - time.monotonic()) * 0.6,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun train.py failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    out["train"] = _recalls(proc.stdout + proc.stderr)
    # The project's collectives over a real one-process group (NCCL on CUDA): see _dist_probe.
    probe_json = os.path.join(work, "dist_probe.json")
    probe_cmd = [
        *launcher[:-1],
        f"--master_port={_free_port()}",
        os.path.abspath(__file__),
        "--_dist_probe",
        probe_json,
        "--device",
        dev,
        "--_data",
        data,
    ] + (["--quick"] if cfg["quick"] else [])
    proc = _run(probe_cmd, cwd=run_dir, timeout=deadline - time.monotonic())
    if proc.returncode != 0 or not os.path.exists(probe_json):
        raise RuntimeError(
            f"one-process {dev} group probe failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}"
        )
    with open(probe_json) as f:
        probe = json.load(f)
    out["group_probe"] = probe
    ok = out["train"]["reranked"] is not None and probe["all_ok"]
    out["status"] = "ok" if ok else "FAIL"
    out["summary"] = (
        f"torchrun train.py ({dev}): {out['train']['reranked']}; {probe['backend']} group: "
        f"{', '.join(f'{k} {v}' for k, v in probe['checks'].items())}"
    )
    return out


class _OneRankGroup:
    """A distributed.Context over a real process group of ONE process, with its collectives
    switched on (the project runs a single process without a group; this exercises the NCCL / gloo
    code paths on a machine with one GPU)."""

    @staticmethod
    def make(**kwargs):
        import distributed

        class Forced(distributed.Context):
            @property
            def enabled(self) -> bool:
                return True

        return Forced(**kwargs)


def _dist_probe(path: str, device_type: str, data: str, cfg: Dict[str, Any]) -> int:
    """Child of torchrun --nproc_per_node=1: the project's collectives, a DDP training step and the
    sharded evaluation over a real group; compares with the single-process results."""
    import torch.distributed as dist

    import commons
    import datasets_ws
    import loss
    import test

    backend = commons.backend_for(device_type, nccl_available=dist.is_available() and dist.is_nccl_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(backend=backend)
    wait_group = dist.new_group(backend="gloo")
    ctx = _OneRankGroup.make(
        rank=0, world_size=1, local_rank=local_rank, device=device, backend=backend, wait_group=wait_group
    )
    checks: Dict[str, Any] = {}
    checks["sum_over_ranks"] = ctx.sum_over_ranks([1.5, -2.25]) == [1.5, -2.25]
    checks["broadcast_object"] = ctx.broadcast_object({"a": [1, 2]}, long_wait=True) == {"a": [1, 2]}
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    checks["gather_rows"] = bool(np.array_equal(ctx.gather_rows(rows, [3]), rows))
    model = _model(cfg)
    model.freeze()
    model.to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx.broadcast_module(model)
    checks["broadcast_module"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ddp = ctx.wrap_model(model)
    images = _images(8, cfg["resize_e2e"], seed=5).to(device)
    local, glob = loss.forward_features(ddp, images, precision="fp32")
    g, l = loss.triplet_losses(local, glob, _triplets(2, 2), margin=0.1, normaliser=4)
    (g + l).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    checks["ddp_step_finite"] = bool(
        math.isfinite((g + l).item()) and all(x is not None and bool(torch.isfinite(x).all()) for x in grads)
    )
    ds = datasets_ws.BaseDataset(data, "synthetic", "test", resize=[cfg["resize_e2e"]] * 2)
    kwargs = dict(rerank_num=10, batch_size=8, num_workers=0, device=device)
    grouped = test.evaluate(model, ds, dist_ctx=ctx, **kwargs)
    single = test.evaluate(model, ds, dist_ctx=None, **kwargs)
    checks["sharded_eval_equals_single"] = bool(
        np.array_equal(grouped.recalls, single.recalls)
        and np.array_equal(grouped.predictions, single.predictions)
        and np.array_equal(grouped.recalls_first, single.recalls_first)
    )
    dist.destroy_process_group()
    result = dict(
        backend=backend,
        device=device,
        checks=checks,
        all_ok=all(checks.values()),
        recalls=[float(r) for r in single.recalls],
    )
    _write_json(path, result)
    return 0 if result["all_ok"] else 1


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def _table(rows: List[Dict[str, Any]]) -> str:
    width = max(len(r["row"]) for r in rows)
    lines = [f"{'row':<{width}}  {'status':<7} {'s':>6}  result", "-" * (width + 80)]
    for r in rows:
        lines.append(f"{r['row']:<{width}}  {r['status'][:7]:<7} {r['seconds']:>6.1f}  {r['summary']}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes on the CPU (CI)")
    p.add_argument(
        "--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available (cpu with --quick)"
    )
    p.add_argument("--json", default=None, help="write the table as JSON here (rewritten after every row)")
    p.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="time budget of the whole run in seconds (default 470; 1800 with --quick, whose sizes are "
        "small but whose CPU may be shared)",
    )
    p.add_argument(
        "--row_limit_s",
        type=float,
        default=None,
        help="time limit of every row (default: per row, 300 s each with --quick)",
    )
    p.add_argument("--rows", nargs="+", default=list(LIMITS), choices=list(LIMITS), help="rows to run")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed)")
    p.add_argument("--_dist_probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg["quick"] = args.quick
    if args._dist_probe:
        return _dist_probe(args._dist_probe, args.device or "cpu", args._data, cfg)
    device_name = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if device_name == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available here; use --device cpu or --quick", file=sys.stderr)
        return 2
    device = torch.device(device_name)
    limits = {name: args.row_limit_s or (300 if args.quick else LIMITS[name]) for name in args.rows}
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.quick else 470.0
    start = time.monotonic()
    report: Dict[str, Any] = dict(
        command=" ".join(
            [
                os.path.basename(sys.executable),
                "benchmarks/device_report.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        quick=args.quick,
        device=str(device),
        budget_s=args.budget_s,
        torch=torch.__version__,
        python=sys.version.split()[0],
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
        threads=torch.get_num_threads(),
        rows=[],
    )
    _write_json(args.json, report)
    print(
        f"device report: {report['device_name']} ({device}), torch {torch.__version__}, "
        f"{'quick' if args.quick else 'full'} sizes, budget {args.budget_s:.0f} s",
        flush=True,
    )
    own_work = args.workdir is None
    work = args.workdir or tempfile.mkdtemp(prefix="device_report_")
    rows_fns: Dict[str, Callable[[float], Dict[str, Any]]] = {
        "rerank_exactness": lambda d: row_rerank_exactness(cfg, device, d),
        "rerank_speed": lambda d: row_rerank_speed(cfg, device, d),
        "training_step": lambda d: row_training_step(cfg, device, d),
        "extraction": lambda d: row_extraction(cfg, device, d),
        "end_to_end": lambda d: row_end_to_end(cfg, device, d, work),
        "torchrun": lambda d: row_torchrun(cfg, device, d, work),
    }
    try:
        for name in args.rows:
            left = args.budget_s - (time.monotonic() - start)
            t0 = time.monotonic()
            if left < min(limits[name], 20):
                row = dict(row=name, status="skipped", summary=f"skipped: over budget ({left:.0f} s left)")
            else:
                try:
                    row = dict(row=name, **rows_fns[name](t0 + min(limits[name], left)))
                except Exception as err:  # the row fails, the report goes on
                    traceback.print_exc()
                    row = dict(row=name, status="ERROR", summary=f"{type(err).__name__}: {err}"[:600])
            row["seconds"] = round(time.monotonic() - t0, 2)
            report["rows"].append(row)
            report["elapsed_s"] = round(time.monotonic() - start, 1)
            _write_json(args.json, report)
            print(f"[{name}] {row['status']} in {row['seconds']:.1f} s: {row['summary']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if own_work:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    print()
    print(_table(report["rows"]))
    if args.json:
        print(f"\nJSON: {args.json}")
    return 0 if all(r["status"] == "ok" for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
