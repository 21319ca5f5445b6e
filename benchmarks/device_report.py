"""One command that proves and measures everything device-specific (GPU) in one go.

    python3 benchmarks/device_report.py --json device_report.json            # GPU: <= 8 minutes
    python3 benchmarks/device_report.py --quick --json /tmp/quick.json       # CPU, small sizes (CI)

Rows (one table at the end, the same as JSON, rewritten after every row so that a kill keeps the
rows done so far). float32 is IEEE float32 throughout (TF32 off, as every command sets it):
  rerank_exactness  the re-rank engine's scores and orders vs the plain public algorithm on the same
                    device IN THE SAME CHUNKS of 16 candidates the engine takes (a device's batched
                    product may depend on the batch size; one batched product of all k is reported
                    beside, for information), on random 61x61x128 features at k = 20 and 100, plus
                    exactly tied and one-ulp near-tied candidates; differing scores must be 0 (exact
                    equality: fp32 is promised). Also: the engine path that ran, the shares of rows and
                    columns the GPU engine recomputed, and the checks its fast path rests on - the tile
                    self-check (a prerequisite of the tiled / screened paths only: where it fails the
                    plain path runs, exact by construction) and, on a GPU, the bf16 screen's soundness
                    probe. On the CPU the GPU engine also runs, forced, against the same reference.
  rerank_speed      ms/query at k = 20 and 100: the engine (on a GPU: the bf16x3-screened engine)
                    with features resident on the device, the same staged from host RAM, and the
                    public algorithm (one batched product of the k candidates); the path taken; the
                    engine's scores must equal the plain algorithm's on every timed query.
  extraction        ViT-L/14 at 224x224: images/s at batch 32 / 64 / 128, fp32 vs bf16 autocast; the
                    largest descriptor deviation bf16 vs fp32; whether bf16 changes first-stage or
                    re-ranked orders on a few hundred random-weight images.
  training_step     the public recipe's batch (4 queries x (query + positive + 2 negatives) = 16
                    images), frozen ViT-L/14: s/step and peak device memory for fp32 and bf16 autocast;
                    the first losses on the device vs on the CPU from the same weights and images,
                    within the fp32 tolerance (1e-3 relative; 2e-2 if TF32 were in play).
  end_to_end        eval.py on the built-in synthetic set on the device vs on the CPU: recalls must be
                    identical; rankings (not the text of predictions.jsonl, which holds floats) must
                    agree up to near-ties - l2 distances within 1e-4, mutual-NN scores within 0.5% of
                    the largest (fp32 tolerances: the two devices sum in different orders).
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
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import atomic_files
import local_matching
import numerics

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
# fp32 (the project's default, IEEE), tf32 (the public release's convolutions on recent GPUs), bf16.
EXTRACTION_PRECISIONS = ("fp32", "tf32", "bf16")
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


def ieee_fp32(device: torch.device) -> str:
    """float32 is IEEE float32 here, as in every command: numerics.set_precision("fp32") at the start
    (no TF32 in matmuls or cuDNN convolutions, torch's cuDNN default on Ampere and newer). Returns the
    line a command would log."""
    return numerics.set_precision("fp32", device=str(device)).line


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


# Candidates per chunk, as evaluation re-ranks (retrieval.Retrieval's rerank_chunk_size).
CHUNK = 16


def engine_scores(q: torch.Tensor, x: Any, gpu_engine: Optional[bool] = None) -> torch.Tensor:
    """The project's engine as evaluation calls it (chunks of CHUNK candidates); x: the store (the
    device tensor itself, or a host array the engine stages)."""
    return local_matching.mutual_nn_scores(q, x, np.arange(x.shape[0]), chunk_size=CHUNK, gpu_engine=gpu_engine)


def plain_scores_chunked(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The plain algorithm on the engine's chunks (like with like: a device's batched product may
    depend on the batch size, and the engine's exactness is relative to its own chunking)."""
    return torch.cat([public_scores(q, x[s : s + CHUNK]) for s in range(0, x.shape[0], CHUNK)])


def _checks(device: torch.device, positions: int, channels: int) -> Dict[str, Any]:
    """The checks the engine's fast paths rest on here: the tile self-check
    (a prerequisite of the tiled / screened paths only: where it fails the plain path runs, exact by
    construction) and, for the GPU engine, the screen's soundness probe and kernel."""
    from local_matching import screening

    gpu = device.type != "cpu"
    ok, detail = local_matching.tile_self_check(
        candidate_positions=positions,
        query_positions=positions,
        channels=channels,
        device=device,
        screen=not gpu,
        gpu_engine=gpu,
        batch=CHUNK,
    )
    out: Dict[str, Any] = {
        "tile_self_check": dict(passed=ok, detail=detail, needed_by="the tiled / screened paths only"),
    }
    if gpu:
        lcp = -(-positions // 32) * 32
        width = screening.row_block_width(positions)
        out["bf16_fp32_matmul_native"] = screening.native_bf16_fp32_matmul(device)
        out["screen_sound"] = screening.fp32_screen_is_sound(
            CHUNK * lcp, 3 * screening.inner_size(channels), -(-positions // width) * width, device
        )
    return out


def _recomputed_shares(before: Dict[str, int]) -> Optional[Dict[str, float]]:
    """Shares of rows / columns the GPU engine recomputed exactly since `before` (None if it did not run)."""
    from local_matching import device_engine

    now = device_engine.STATS
    rows, cols = now["rows"] - before["rows"], now["columns"] - before["columns"]
    if not rows:
        return None
    return dict(
        rows=round((now["rows_recomputed"] - before["rows_recomputed"]) / rows, 4),
        columns=round((now["columns_recomputed"] - before["columns_recomputed"]) / cols, 4),
    )


def row_rerank_exactness(cfg: Dict[str, Any], device: torch.device, deadline: float) -> Dict[str, Any]:
    from local_matching import device_engine

    L, C = cfg["grid"] ** 2, cfg["channels"]
    out: Dict[str, Any] = {"queries": cfg["queries"], "positions": L, "channels": C, "chunk": CHUNK}
    # The GPU engine also runs on the CPU (forced), so that the CPU report exercises its code too.
    engines = {"engine": None} if device.type != "cpu" else {"engine": None, "gpu_engine_forced": True}
    bad = 0
    parts = []
    paths: Dict[str, str] = {}
    stats = dict(device_engine.STATS)
    for k in cfg["ks"]:
        counts = {name: dict(differing_scores=0, queries_with_differing_order=0) for name in engines}
        total = done = batch_effect = 0
        for i in range(cfg["queries"]):
            if time.monotonic() > deadline:
                break
            q, x = rerank_query_data(1000 * k + i, k=k, grid=cfg["grid"], channels=C, device=device)
            want = plain_scores_chunked(q, x).cpu()
            for name, forced in engines.items():
                got = engine_scores(q, x, gpu_engine=forced).cpu()
                paths[name] = _engine_path(device, L, L, C)
                counts[name]["differing_scores"] += int((got != want).sum())
                counts[name]["queries_with_differing_order"] += int(
                    not np.array_equal(local_matching.rerank(got), local_matching.rerank(want))
                )
            # Informational: the public release's one batched product of all k candidates.
            batch_effect += int((public_scores(q, x).cpu() != want).sum())
            total += k
            done += 1
        out[f"k{k}"] = dict(
            queries_run=done,
            scores=total,
            **counts["engine"],
            plain_one_batch_of_k_vs_chunks_differing_scores=batch_effect,
        )
        if "gpu_engine_forced" in counts:
            out[f"k{k}"]["gpu_engine_forced"] = counts["gpu_engine_forced"]
        bad += sum(c["differing_scores"] + c["queries_with_differing_order"] for c in counts.values())
        bad += done < cfg["queries"]
        forced = counts.get("gpu_engine_forced")
        parts.append(
            f"k={k}: {counts['engine']['differing_scores']}/{total} scores differ, "
            f"{counts['engine']['queries_with_differing_order']}/{done} orders differ"
            + (f" (GPU engine forced: {forced['differing_scores']} differ)" if forced else "")
            + ("" if done == cfg["queries"] else f" (only {done} queries: time limit)")
        )
    out["engine_path"] = paths.get("engine", "not run")
    if "gpu_engine_forced" in paths:
        out["gpu_engine_forced_path"] = paths["gpu_engine_forced"]
    out.update(_checks(device, L, C))
    out["recomputed"] = _recomputed_shares(stats)
    out["status"] = "ok" if bad == 0 else "FAIL"
    check = out["tile_self_check"]
    out["summary"] = (
        "; ".join(parts)
        + f" (vs the plain algorithm in the same chunks of {CHUNK}); path: {out['engine_path']}; "
        + f"tile self-check (needed by the tiled / screened paths only): {'passed' if check['passed'] else 'FAILED'}"
        + (f"; screen probe {'sound' if out['screen_sound'] else 'UNSOUND'}" if "screen_sound" in out else "")
    )
    return out


def row_rerank_speed(cfg: Dict[str, Any], device: torch.device, deadline: float) -> Dict[str, Any]:
    """ms/query, engine (features on the device; and staged from host RAM) vs the public algorithm
    (one batched product of the k candidates), with the engine's scores checked against the plain
    algorithm in the same chunks on every timed query."""
    from local_matching import device_engine

    L, C = cfg["grid"] ** 2, cfg["channels"]
    out: Dict[str, Any] = {"features": "resident on the device, and (engine_from_host) in host RAM"}
    parts = []
    unequal = 0
    stats = dict(device_engine.STATS)
    for k in cfg["ks"]:
        data = [
            rerank_query_data(7 * k + i, k=k, grid=cfg["grid"], channels=C, device=device)
            for i in range(cfg["speed_queries"] + 1)
        ]
        times: Dict[str, List[float]] = {"engine": [], "plain": [], "engine_from_host": []}
        for i, (q, x) in enumerate(data):
            host = x.cpu().numpy()  # a RAM store: the engine stages it (one host copy per candidate)
            for name, store in (("engine", x), ("plain", None), ("engine_from_host", host)):
                _sync(device)
                t0 = time.perf_counter()
                scores = (public_scores(q, x) if store is None else engine_scores(q, store)).cpu()
                _sync(device)
                if i > 0:  # query 0 warms up
                    times[name].append(time.perf_counter() - t0)
                if name == "engine":
                    unequal += int(not torch.equal(scores, plain_scores_chunked(q, x).cpu()))
            del host
            if time.monotonic() > deadline and i > 0:
                break
        del data
        ms = {n: 1000 * float(np.median(t)) for n, t in times.items()}
        out[f"k{k}"] = dict(
            engine_ms_per_query=round(ms["engine"], 3),
            plain_ms_per_query=round(ms["plain"], 3),
            speedup=round(ms["plain"] / ms["engine"], 3),
            engine_from_host_ms_per_query=round(ms["engine_from_host"], 3),
            queries_timed=len(times["engine"]),
        )
        parts.append(
            f"k={k}: engine {ms['engine']:.2f} ms, plain {ms['plain']:.2f} ms, {ms['plain'] / ms['engine']:.2f}x; "
            f"from host RAM {ms['engine_from_host']:.2f} ms"
        )
    k_max = max(cfg["ks"])
    out["goal_2ms_at_k100"] = (
        ("met" if out[f"k{k_max}"]["engine_ms_per_query"] <= 2.0 else "not met")
        if k_max == 100
        else "n/a (quick sizes)"
    )
    out["engine_path"] = _engine_path(device, L, L, C)
    out["recomputed"] = _recomputed_shares(stats)
    out["queries_with_scores_unequal_to_plain"] = unequal
    out["status"] = "ok" if unequal == 0 else "FAIL"
    shares = out["recomputed"]
    out["summary"] = (
        "; ".join(parts)
        + f"; path: {out['engine_path']}"
        + (f" (recomputed: {100 * shares['rows']:.1f}% rows, {100 * shares['columns']:.1f}% columns)" if shares else "")
        + f"; scores {'equal to' if not unequal else 'DIFFER from'} the plain algorithm"
        + f"; <= 2 ms/query at k=100: {out['goal_2ms_at_k100']}"
    )
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


@contextmanager
def _autocast(device: torch.device, precision: str):
    """The arithmetic of a command's forward at `precision`: bf16 autocast, or TF32 switched on for the
    duration (tf32: what torch's defaults gave the public release's convolutions on Ampere and newer),
    or IEEE fp32."""
    numerics.set_tf32(precision == "tf32" and device.type == "cuda")
    try:
        with numerics.autocast(device.type, precision):
            yield
    finally:
        numerics.set_tf32(False)


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
        for precision in EXTRACTION_PRECISIONS:
            with torch.inference_mode(), _autocast(device, precision):
                model(images)  # warm-up
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(cfg["timed_batches"]):
                    model(images)
                _sync(device)
            rates[precision] = batch * cfg["timed_batches"] / (time.perf_counter() - t0)
        out[f"batch{batch}"] = {f"{p}_images_per_s": round(r, 1) for p, r in rates.items()}
        parts.append(f"b{batch}: " + ", ".join(f"{p} {r:.0f}" for p, r in rates.items()) + " img/s")
        del images
    # Deviations and orders on a few hundred images (database + queries that are noisy copies).
    n_db, n_q = cfg["order_db"], cfg["order_queries"]
    db_images = _images(n_db, size, seed=1)
    q_images = db_images[:n_q] + 0.5 * _images(n_q, size, seed=2)
    images = torch.cat([db_images, q_images])
    feats = {p: _extract(model, images, device, p, batch=32) for p in EXTRACTION_PRECISIONS}
    k = min(cfg["order_k"], n_db)
    orders = {}
    for p, (local, glob) in feats.items():
        first = _l2_topk(glob[:n_db], glob[n_db:], k)
        orders[p] = (first, _rerank(first, local[n_db:], local[:n_db], device))
    # tf32 is the public release's arithmetic on Ampere and newer GPUs (torch's default for cuDNN
    # convolutions); on the CPU it computes as fp32, so its deviation there is 0.
    for p in EXTRACTION_PRECISIONS[1:]:
        dev = out[f"max_abs_deviation_{p}"] = dict(
            local=float(np.abs(feats[p][0] - feats["fp32"][0]).max()),
            global_=float(np.abs(feats[p][1] - feats["fp32"][1]).max()),
        )
        changed_first = int((orders[p][0] != orders["fp32"][0]).any(axis=1).sum())
        changed_rerank = int((orders[p][1] != orders["fp32"][1]).any(axis=1).sum())
        top1 = int((orders[p][1][:, 0] != orders["fp32"][1][:, 0]).sum())
        out[f"{p}_vs_fp32_orders"] = dict(
            images=n_db + n_q,
            queries=n_q,
            k=k,
            queries_first_stage_order_changed=changed_first,
            queries_reranked_order_changed=changed_rerank,
            queries_reranked_top1_changed=top1,
        )
        parts.append(
            f"{p} max |dev| local {dev['local']:.2g} global {dev['global_']:.2g}; {p} changes first-stage "
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
    precision = "tf32" if tf32_in_play(device) else "fp32"
    tol = TOLERANCES[precision]["loss_relative"]
    out["first_losses_fp32"] = {
        str(device): dev,
        "cpu": cpu,
        "max_relative_difference": rel,
        "tolerance": tol,
        "precision": precision,
    }
    parts.append(
        f"first losses fp32 {device} (global {dev[0]:.6f}, local {dev[1]:.6f}) vs cpu "
        f"({cpu[0]:.6f}, {cpu[1]:.6f}), rel. diff {rel:.1e} ({precision} tolerance {tol:g})"
    )
    out["status"] = "ok" if rel <= tol else "FAIL"
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


def _predictions(folder: str) -> Optional[List[Dict[str, Any]]]:
    """The records of the predictions.jsonl an eval.py run wrote below `folder` (None if none)."""
    for dirpath, _, files in os.walk(folder):
        if "predictions.jsonl" in files:
            with open(os.path.join(dirpath, "predictions.jsonl")) as f:
                return [json.loads(line) for line in f if line.strip()]
    return None


def tf32_in_play(device: torch.device) -> bool:
    """Do float32 matmuls or convolutions on `device` run in TF32 in this process (torch's cuDNN
    default on Ampere and newer, unless a command switched it off)?"""
    return device.type == "cuda" and (
        torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cudnn.allow_tf32)
    )


# Tolerances of the device-vs-CPU comparisons: float32 (IEEE) on both sides differs only by summation
# order (descriptors ~1e-6 apart); TF32 rounds the operands to 10 bits (~1e-3).
TOLERANCES = {
    "fp32": dict(l2_distance=1e-4, mutual_nn_share=0.005, loss_relative=1e-3),
    "tf32": dict(l2_distance=1e-2, mutual_nn_share=0.05, loss_relative=2e-2),
}


def _same_up_to_near_ties(a: List[Dict[str, Any]], b: List[Dict[str, Any]], key: str, tol: float) -> bool:
    """Two ranked lists (entries with "index" and `key`) agree where they differ only by candidates
    whose `key` values are within `tol` of each other: at every rank, the entry b holds has (in b) the
    value a's entry has there, within tol."""
    if len(a) != len(b):
        return False
    return all(ea["index"] == eb["index"] or abs(ea[key] - eb[key]) <= tol for ea, eb in zip(a, b))


def compare_predictions(
    cpu: List[Dict[str, Any]], dev: List[Dict[str, Any]], *, tol: Dict[str, float]
) -> Dict[str, Any]:
    """Rankings of two predictions.jsonl (the CPU's and the device's), compared as rankings: identical
    lists, lists equal up to near-ties (l2 distances / mutual-NN scores within tolerance; the score
    tolerance a share of the largest score), and the largest differences of the values themselves
    (over the candidates both lists hold)."""
    top = max((e["mutual_nn"] for r in cpu for e in r["reranked"]), default=0.0)
    score_tol = max(1.0, tol["mutual_nn_share"] * top)
    out = dict(queries=len(cpu), identical_first_stage=0, identical_reranked=0, near_tie_first=0, near_tie_reranked=0)
    max_d = max_s = 0.0
    for rc, rd in zip(cpu, dev):
        for part, key, t, name in (
            ("first_stage", "l2_distance", tol["l2_distance"], "first"),
            ("reranked", "mutual_nn", score_tol, "reranked"),
        ):
            a, b = rc[part], rd[part]
            if [e["index"] for e in a] == [e["index"] for e in b]:
                out[f"identical_{'first_stage' if name == 'first' else name}"] += 1
            elif a and key in a[0] and _same_up_to_near_ties(a, b, key, t):
                out[f"near_tie_{name}"] += 1
            common = {e["index"]: e for e in a}
            for e in b:
                if e["index"] in common and key in e:
                    diff = abs(e[key] - common[e["index"]][key])
                    max_d, max_s = (max(max_d, diff), max_s) if key == "l2_distance" else (max_d, max(max_s, diff))
    out["max_l2_distance_difference"] = max_d
    out["max_mutual_nn_difference"] = max_s
    out["tolerance"] = dict(l2_distance=tol["l2_distance"], mutual_nn=score_tol)
    n = len(cpu)
    out["rankings_ok"] = bool(
        len(cpu) == len(dev)
        and out["identical_first_stage"] + out["near_tie_first"] == n
        and out["identical_reranked"] + out["near_tie_reranked"] == n
        and max_d <= tol["l2_distance"]
        and max_s <= score_tol
    )
    return out


def row_end_to_end(cfg: Dict[str, Any], device: torch.device, deadline: float, work: str) -> Dict[str, Any]:
    data = _dataset(os.path.join(work, "datasets"))
    sides = [str(device.type), "cpu"]
    # On a GPU also --precision tf32: the arithmetic the public release's convolutions had there (torch's
    # default on Ampere and newer); its recalls against fp32's are the measurement, not a pass condition.
    precisions = ["fp32", "fp32"] + (["tf32"] if device.type == "cuda" else [])
    sides += sides[:1] * (len(precisions) - 2)
    out: Dict[str, Any] = {}
    results = {}
    for i, (dev, run_precision) in enumerate(zip(sides, precisions)):
        run_dir = os.path.join(work, f"e2e_{i}_{dev}_{run_precision}")
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
                "--precision",
                run_precision,
                *_model_flags(cfg),
            ],
            cwd=run_dir,
            timeout=deadline - time.monotonic(),
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"eval.py --device {dev} --precision {run_precision} failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout)[-1500:]}"
            )
        results[i] = (_recalls(proc.stdout + proc.stderr), _predictions(run_dir))
        out[f"{dev}_{run_precision}_{i}"] = results[i][0]
    same_recalls = results[0][0] == results[1][0] and None not in results[0][0].values()
    preds_dev, preds_cpu = results[0][1], results[1][1]
    # eval.py --precision fp32 is IEEE float32 on every device (it switches TF32 off at its start).
    precision = "fp32"
    rankings = (
        compare_predictions(preds_cpu, preds_dev, tol=TOLERANCES[precision])
        if preds_dev is not None and preds_cpu is not None
        else dict(rankings_ok=False, missing="predictions.jsonl")
    )
    out["identical_recalls"] = same_recalls
    out["identical_predictions"] = preds_dev is not None and preds_dev == preds_cpu
    out["rankings"] = rankings
    out["precision"] = precision
    note = "" if device.type == "cuda" else " (no CUDA: CPU run twice)"
    out["status"] = "ok" if same_recalls and rankings["rankings_ok"] else "FAIL"
    tf32_note = ""
    if 2 in results:
        fp32_recalls, tf32_recalls = results[0][0], results[2][0]
        out["tf32_recalls_equal_fp32"] = fp32_recalls == tf32_recalls
        tf32_note = (
            f"; --precision tf32 (the public release's GPU convolutions): recalls "
            f"{'identical to fp32' if out['tf32_recalls_equal_fp32'] else 'DIFFER from fp32'} "
            f"({tf32_recalls['reranked']})"
        )
    n = rankings.get("queries", 0)
    out["summary"] = (
        f"{sides[0]} vs cpu{note}: recalls {'identical' if same_recalls else 'DIFFER'} "
        f"({results[0][0]['reranked']}); rankings "
        + (
            f"first-stage {rankings['identical_first_stage']}/{n} identical (+{rankings['near_tie_first']} "
            f"near-ties), re-ranked {rankings['identical_reranked']}/{n} (+{rankings['near_tie_reranked']}); "
            f"max |d l2| {rankings['max_l2_distance_difference']:.2g}, max |d mutual-NN| "
            f"{rankings['max_mutual_nn_difference']:.0f} ({precision} tolerances "
            f"{rankings['tolerance']['l2_distance']:g} / {rankings['tolerance']['mutual_nn']:g})"
            if "queries" in rankings
            else "missing"
        )
        + tf32_note
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
    precision_line = ieee_fp32(device)
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
        precision=precision_line,
        threads=torch.get_num_threads(),
        rows=[],
    )
    _write_json(args.json, report)
    print(
        f"device report: {report['device_name']} ({device}), torch {torch.__version__}, "
        f"{'quick' if args.quick else 'full'} sizes, budget {args.budget_s:.0f} s\n{precision_line}",
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
