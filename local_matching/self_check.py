"""Which path serves a shape: the run-time exactness self-check of the tiled products, and the
record of the path each shape took (engine_paths).

The exact recomputations (exact.py) are exact only if the BLAS computes each entry of a tile or
segment product as the very float32 number it computes inside the whole product. That holds for
MKL's sgemm (one fused multiply-add chain per entry whatever the shape), but it is a property of
the BLAS, not of the arithmetic: another BLAS (OpenBLAS, Accelerate, cuBLAS, which pick kernels -
split-K included - by shape) may sum in another order for some shapes, and a near-tie could then
flip silently. So before the tiled engine serves a shape, it checks the property on that shape,
bit for bit, once per process, device, matmul setting, thread count and shape; when the check
fails, those candidates take the plain path (the whole product, as the reference), whose equality
does not depend on any tiling. The path taken is logged once per shape.

The GPU engine (device_engine.py) recomputes with other products - fixed-shape row tiles and
batched column products - and cuBLAS may also pick kernels by the batch size of the whole product,
so its check (gpu_engine=True) compares them with the plain path's product of a group of exactly as
many candidates as the group it is about to serve.
"""

import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import device_engine
from .exact import BLOCK, MIN_EXACT_SIDE, SEG, pad_index, pad_rows
from .screening import row_block_width

PATH_SCREENED = "screened-bf16+tiled-fp32"
PATH_TILED = "tiled-fp32"
PATH_PLAIN = "plain-fp32"
PATH_GPU_SCREENED = "gpu-screened-bf16x3+fp32"

_TILE_CHECK: Dict[tuple, Tuple[bool, str]] = {}
_TILE_CHECK_LOCK = threading.Lock()
_PATHS: Dict[tuple, str] = {}  # (device, Lc, Lq, C) -> "path (reason)" last taken
_PATHS_LOGGED: set = set()


def _matmul_setting() -> str:
    """The process-wide setting that changes float32 matmul results (TF32 on CUDA when 'high')."""
    return torch.get_float32_matmul_precision()


def _check_sizes_for(limit: int, largest: int) -> List[int]:
    """Row / column counts the self-check tries: the smallest the engine uses (1, padded to
    MIN_EXACT_SIDE), counts around BLOCK and SEG multiples, odd counts, and the largest."""
    sizes = {
        1,
        MIN_EXACT_SIDE - 1,
        MIN_EXACT_SIDE,
        MIN_EXACT_SIDE + 1,
        2 * SEG - 1,
        97,
        largest // 2 + 1,
        largest - 1,
        largest,
    }
    return sorted(s for s in sizes if 1 <= s <= min(limit, largest))


def _self_check_tiles(*, lc: int, lq: int, c: int, width: int, row_tile: int, device: torch.device) -> Tuple[bool, str]:
    """Compare, bit for bit, every kind of float32 product the tiled engine computes for candidates
    (lc, c) against query (lq, c) - row tiles, padded row sets against all columns and against one
    column block, column sets against all rows, batched (BLOCK x SEG) segments - with the
    reference's product of the whole candidate (the plain path's batched matmul of two
    candidates). Padding rows / columns must equal the row / column they repeat.
    Returns (all equal, a description of the first mismatch or of what was checked)."""
    gen = torch.Generator().manual_seed(20240613)
    x = torch.randn(2, lc, c, generator=gen).to(device)
    q = torch.randn(lq, c, generator=gen).to(device)
    xp, qp = pad_rows(x[1].contiguous(), BLOCK), pad_rows(q, width)
    lcp, lqp = xp.shape[0], qp.shape[0]
    # The reference (lc, lq), extended to the padded shape (padding repeats the last row / column), filled
    # in place: this check is the largest allocation of a re-ranking (3721 x 3721 floats are 55 MB).
    product = _tile_check_matmul(x, q.unsqueeze(0).transpose(1, 2))
    ref_p = torch.empty(lcp, lqp, dtype=product.dtype, device=device)
    ref_p[:lc, :lq] = product[1]
    del product
    ref_p[lc:, :lq] = ref_p[lc - 1, :lq]
    ref_p[:, lq:] = ref_p[:, lq - 1 : lq]
    checked = 0

    def same(got: torch.Tensor, want: torch.Tensor, what: str) -> Optional[str]:
        nonlocal checked
        checked += 1
        if got.shape == want.shape and torch.equal(got, want):
            return None
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        return f"{what}: differs from the whole product (max |diff| {diff:.3g})"

    def pick(n: int, high: int) -> torch.Tensor:
        if n <= high:
            return torch.randperm(high, generator=gen)[:n].sort().values.to(device)
        return torch.randint(0, high, (n,), generator=gen).to(device)

    problems: List[Optional[str]] = []
    for s in range(0, lcp, row_tile):  # exact.nn_tiled_exact
        problems.append(
            same(
                _tile_check_matmul(xp[s : s + row_tile], qp.t()),
                ref_p[s : s + row_tile],
                f"row tile {s}:{min(s + row_tile, lcp)} x {lqp}",
            )
        )
    n_blocks = lqp // width
    row_sizes = _check_sizes_for(lcp, row_tile)
    for n in sorted(set(row_sizes) | set(_check_sizes_for(lcp, lcp))):
        rows = pick(n, lc)
        if n in row_sizes:  # exact_rows: at most row_tile rows a product
            full = _tile_check_matmul(xp[pad_index(rows, MIN_EXACT_SIDE)], qp.t())[:n]
            problems.append(same(full, ref_p[rows], f"{n} rows x {lqp} columns"))
        for b in sorted({0, n_blocks - 1}):  # exact_rows_in_blocks: any number of rows
            part = _tile_check_matmul(xp[pad_index(rows, MIN_EXACT_SIDE)], qp[b * width : (b + 1) * width].t())[:n]
            problems.append(
                same(
                    part, ref_p[:, b * width : (b + 1) * width][rows], f"{n} rows x column block {b} ({width} columns)"
                )
            )
    for m in _check_sizes_for(lq, 512):  # exact_columns
        cols = pick(m, lq)
        block = _tile_check_matmul(xp, q[pad_index(cols, MIN_EXACT_SIDE)].t())[:, :m]
        problems.append(same(block, ref_p[:, cols], f"{lcp} rows x {m} columns"))
    n_groups = lcp // BLOCK
    for n_seg in sorted({1, 3, 37, 4 * n_groups}):  # exact_in_group, exact_columns_in_groups
        groups = torch.randint(0, n_groups, (n_seg,), generator=gen).to(device)
        members = torch.randint(0, lq, (n_seg, SEG), generator=gen).to(device)
        seg = torch.bmm(xp.view(-1, BLOCK, c)[groups], q[members].transpose(1, 2))
        rows = groups.unsqueeze(1) * BLOCK + torch.arange(BLOCK, device=device)
        problems.append(
            same(seg, ref_p[rows.unsqueeze(2), members.unsqueeze(1)], f"{n_seg} batched segments ({BLOCK} x {SEG})")
        )
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        return False, first
    return True, f"{checked} tile / segment products bit-identical to the whole product"


def _self_check_gpu(*, b: int, lc: int, lq: int, c: int, row_tile: int, device: torch.device) -> Tuple[bool, str]:
    """The GPU engine's products (device_engine.row_product: row_tile gathered rows x all Lq query
    columns; device_engine.column_product: COLUMN_JOBS batched (Lc, C) x (C, COLUMN_TILE)) against
    the plain path's product of a group of b candidates (one batched matmul, as
    reference.nearest_neighbours), bit for bit. Rows and columns are drawn from every candidate, with
    the repeats the engine pads with. Returns (all equal, what differed or what was checked)."""
    gen = torch.Generator().manual_seed(20240614)
    x = torch.randn(b, lc, c, generator=gen).to(device)
    q = torch.randn(lq, c, generator=gen).to(device)
    ref = _tile_check_matmul(x, q.unsqueeze(0).transpose(1, 2))  # (b, lc, lq)
    problems: List[str] = []
    for trial in range(3):
        cand = torch.randint(0, b, (row_tile,), generator=gen)
        rows = torch.randint(0, lc, (row_tile,), generator=gen)
        if trial == 1:  # a sorted run, as the engine's undecided rows come
            rows = torch.arange(row_tile) % lc
        if trial == 2:  # the last tile's padding: repeats of its last row
            cand[row_tile // 3 :], rows[row_tile // 3 :] = cand[row_tile // 3 - 1], rows[row_tile // 3 - 1]
        cand, rows = cand.to(device), rows.to(device)
        tile = _tile_check_matmul(x[cand, rows], q.t())
        if not torch.equal(tile, ref[cand, rows]):
            problems.append(f"row tile {trial} ({row_tile} rows x {lq} columns)")
    jobs, width = device_engine.COLUMN_JOBS, device_engine.COLUMN_TILE
    for trial in range(2):
        cand = torch.randint(0, b, (jobs,), generator=gen).to(device)
        cols = torch.randint(0, lq, (jobs, width), generator=gen)
        if trial == 1:
            cols[:, width // 2 :] = cols[:, width // 2 - 1 : width // 2]
        cols = cols.to(device)
        got = device_engine.column_product(x.index_select(0, cand), q[cols.reshape(-1)].view(jobs, width, c))
        want = ref.index_select(0, cand).gather(2, cols.unsqueeze(1).expand(jobs, lc, width))
        if not torch.equal(got, want):
            problems.append(f"column product {trial} ({jobs} x {lc} rows x {width} columns)")
    if problems:
        return False, "differs from the whole product: " + ", ".join(problems)
    return True, f"5 row-tile / column products bit-identical to the whole product of {b} candidates"


def _tile_check_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The product the self-check uses for the reference and for 2-D tiles (torch.matmul, as the
    engine's `@`); a separate name so a test can make the BLAS disagree with itself."""
    return torch.matmul(a, b)


def tile_self_check(
    *,
    candidate_positions: int,
    query_positions: int,
    channels: int,
    device: Any = "cpu",
    row_tile: int = 512,
    screen: bool = False,
    gpu_engine: bool = False,
    batch: int = 2,
) -> Tuple[bool, str]:
    """Run (or return the cached result of) the exactness self-check of the tiled engine for
    candidates (candidate_positions, channels) against a query (query_positions, channels) on
    `device`: (passed, description). `screen` selects the column-block width the CPU screen uses;
    gpu_engine=True checks the GPU engine's products instead, against the plain path's product of a
    group of `batch` candidates (cuBLAS may pick kernels by the batch size too)."""
    device = torch.device(device)
    width = row_block_width(query_positions) if screen else BLOCK
    # The calling thread's intra-op thread count is part of the key: a BLAS may split a product
    # differently between threads (the engine's workers run single-threaded).
    key = (
        str(device),
        _matmul_setting(),
        torch.get_num_threads(),
        candidate_positions,
        query_positions,
        channels,
        width,
        row_tile,
        "gpu" if gpu_engine else "cpu",
        batch if gpu_engine else None,
    )
    with _TILE_CHECK_LOCK:
        if key not in _TILE_CHECK:
            with torch.no_grad():
                if gpu_engine:
                    ok, detail = _self_check_gpu(
                        b=batch,
                        lc=candidate_positions,
                        lq=query_positions,
                        c=channels,
                        row_tile=row_tile,
                        device=device,
                    )
                else:
                    ok, detail = _self_check_tiles(
                        lc=candidate_positions,
                        lq=query_positions,
                        c=channels,
                        width=width,
                        row_tile=row_tile,
                        device=device,
                    )
            _TILE_CHECK[key] = (ok, detail)
            log = logging.info if ok else logging.warning
            log(
                f"re-rank engine self-check on {device} ({key[-2]} engine, float32 matmul precision "
                f"'{key[1]}'), candidates "
                f"{candidate_positions}x{channels} vs query {query_positions}x{channels}: "
                + (
                    f"passed, {detail}"
                    if ok
                    else f"FAILED, {detail}; these candidates use the plain "
                    f"full-product path ({PATH_PLAIN}), exact by construction"
                )
            )
        return _TILE_CHECK[key]


def note_path(device: torch.device, lc: int, lq: int, c: int, path: str) -> None:
    """Record (and log once) which engine path served candidates of this shape."""
    key = (str(device), lc, lq, c)
    _PATHS[key] = path
    if (key, path) not in _PATHS_LOGGED:
        _PATHS_LOGGED.add((key, path))
        logging.info(f"re-rank engine on {device}, candidates {lc}x{c} vs query {lq}x{c}: path {path}")


def engine_paths() -> Dict[str, str]:
    """The engine path last used for each (device, candidate and query shape) in this process,
    e.g. {'cpu 3721x128 vs 3721x128': 'screened-bf16+tiled-fp32 (tile self-check passed)'}."""
    return {f"{d} {lc}x{c} vs {lq}x{c}": p for (d, lc, lq, c), p in list(_PATHS.items())}
