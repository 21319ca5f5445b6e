"""Mutual-nearest-neighbour matching of dense local features: the re-rank engine and the
training similarity of the local loss.

Definition (one for the whole project). For a query Q (Lq, C) and a candidate X (Lc, C), dense
features flattened row-major from (h, w, C), the similarity is S = X @ Q.T (Lc, Lq) in float32.
nn12[i] = argmax_j S[i, j] and nn21[j] = argmax_i S[i, j], both taking the FIRST index on exact
ties, as torch.max / torch.argmax do. Row i is a mutual nearest neighbour when nn21[nn12[i]] == i;
the pair is (i, nn12[i]). For finite inputs there is always at least one mutual pair: the first
occurrence (row-major) of the global maximum of S.

- mutual_nn_scores: re-rank score of each candidate = number of mutual pairs, as float32. A
  candidate with exactly one mutual pair scores 1 (the public release stores 0 there through a
  ``squeeze()`` quirk; we deliberately do not reproduce it: trained models never get there).
- rerank: the one place that defines the order of candidates from their scores.
- mutual_nn_pairs: the pairs themselves, for one pair of feature maps (match pictures).
- mutual_nn_similarity: the differentiable training similarity, the mean of S[i, nn12[i]] over
  the mutual pairs.

"Exact" means: the same decisions as the plain computation (one float32 matmul of the whole
candidate, then max both ways) on the same device, ties included.

How the CPU engine gets there without ever building S (K x Lc x Lq floats, 5.5 GB at K = 100):
1. Screen. Tiles of rows of S, for a small batch of candidates at once, are computed as
   bfloat16 matmuls (AMX / AVX512-BF16: several times faster than float32). Each tile is
   reduced at once to block / group maxima, read as int16 keys (_screen_batch), then dropped.
2. Proofs. A rigorous bound (_base_bound, _RHO, _eta) holds for every screen value; a row's
   arg-max is accepted only if its margin over the runner-up exceeds the bounds of both.
3. Exact fallbacks. Unproven rows, the group of each candidate-mutual row in its column, and
   unproven columns are recomputed in float32 on the few candidate blocks the bounds leave
   (_exact_rows_in_blocks, _exact_in_group, _exact_columns_in_groups). These products have the
   shapes for which the CPU sgemm computes each entry exactly as it does inside the whole
   product (see "Exact float32 building blocks"), so the decisions are the reference's. That is a
   property of the BLAS, so it is checked at run time, bit for bit on the real shapes, once per
   process, device and shape (tile_self_check); where it fails, the plain path runs instead and
   the log says so (engine_paths() returns the path taken per shape).
Chunks of candidates run on worker threads (see _CpuWorkers). Elsewhere (CUDA, queries or
candidates with fewer than 64 positions, non-finite or huge values) the plain computation runs
in chunks of candidates, so peak memory never depends on K either.
"""
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Deque, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["mutual_nn_scores", "rerank", "mutual_nn_pairs", "mutual_nn_similarity", "tile_self_check",
           "engine_paths"]

# Columns of S are reduced in blocks of _BLOCK (and rows of a tile in groups of _BLOCK); tiles are
# padded to multiples of it by repeating the last feature vector. A repeated vector gives a
# bit-identical copy of the last row / column of S at a larger index, which the first-index rule
# never selects, so padding cannot change a decision.
_BLOCK = 32
# MKL's sgemm uses a different (small-matrix / gemv) kernel, with a different summation order, when
# one side of the product has fewer than ~6 rows or the other fewer than ~4 columns. Every exact
# recomputation here has at least _MIN_EXACT_SIDE rows and columns (padding with repeats), so it
# runs the same kernel - and therefore produces the same float32 value for every dot product - as
# the product of the whole candidate. Problems smaller than _MIN_TILED_SIDE use the plain path.
_MIN_EXACT_SIDE = 32
_MIN_TILED_SIDE = 64
# Inputs with entries above this magnitude (or non-finite) use the plain path: below it no product
# or sum of the screen can overflow, so the error analysis holds.
_MAX_SAFE_ABS = 2.0 ** 40
_INT16_MIN = -32768
# Unproven rows (columns) are recomputed block by block when at most this share of their blocks
# are candidates; otherwise whole rows (columns) in one product are cheaper.
_BLOCK_FALLBACK_SHARE = 0.25
# Rows (columns) per segment of the block-wise exact recomputation (>= _MIN_EXACT_SIDE).
_SEG = 64
# Candidates screened together on the CPU (one job of a worker thread).
_CPU_BATCH = 4

# Exactness of the bfloat16 kernel (float32 accumulation, one final round-to-nearest-even to
# bfloat16) is checked once per matmul shape; see _bf16_kernel_is_sound.
_BF16_SOUND: Dict[Tuple[int, int, int], bool] = {}


# ------------------------------------------------------------------------------------------------
# Input handling
# ------------------------------------------------------------------------------------------------
def _as_feature_matrix(features: Any, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
    """(L, C) or (h, w, C) tensor / numpy array (memmap included) -> float32 tensor (L, C).

    float32 conversion is what the public release does (``torch.Tensor(array)``); float16 and
    float32 inputs convert exactly.
    """
    if isinstance(features, torch.Tensor):
        t = features
    else:
        # np.array copies out of a read-only memmap (torch.from_numpy warns on non-writable
        # buffers); the copy is one image, never the whole store.
        t = torch.from_numpy(np.array(features, dtype=np.float32, copy=True))
    if t.dim() == 3:
        t = t.reshape(-1, t.shape[-1])
    if t.dim() != 2:
        raise ValueError(f"{name}: dense local features must be (L, C) or (h, w, C), got shape "
                         f"{tuple(t.shape)}; pass one image's features.")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: dense local features are empty (shape {tuple(t.shape)}); "
                         f"check the feature extraction.")
    if device is not None and t.device != device:
        if device.type == "cuda" and t.device.type == "cpu":
            # Page-locked host memory makes the copy asynchronous (no host synchronisation per
            # candidate); torch keeps the pinned block alive until the copy is done.
            t = t.pin_memory().to(device, non_blocking=True)
        else:
            t = t.to(device)
    return t.float().contiguous()


def _as_batch(features: torch.Tensor, name: str) -> torch.Tensor:
    """(B, L, C) or (B, h, w, C) tensor -> (B, L, C) (a view where possible, float kept)."""
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of dense features (B, h, w, C) or (B, L, C), "
                         f"got {type(features).__name__}.")
    if features.dim() == 4:
        features = features.reshape(features.shape[0], -1, features.shape[-1])
    if features.dim() != 3 or features.shape[1] == 0:
        raise ValueError(f"{name}: dense features must be (B, L, C) or (B, h, w, C), got shape "
                         f"{tuple(features.shape)}.")
    return features


def _is_safe(t: torch.Tensor) -> bool:
    """Finite and small enough that neither the screen nor the reference can overflow (amax
    propagates NaN, and NaN <= x is False)."""
    return float(t.abs().amax()) <= _MAX_SAFE_ABS


# ------------------------------------------------------------------------------------------------
# The plain computation (reference semantics), used where the tiled engine does not apply
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _plain_nn(xs: torch.Tensor, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """xs (b, Lc, C), q (Lq, C) -> nn12 (b, Lc), nn21 (b, Lq), with the batched matmul of the public
    release: S = xs @ q.T (b, Lc, Lq) materialised, then max both ways (first index on ties)."""
    sim = torch.matmul(xs, q.unsqueeze(0).transpose(1, 2))
    nn12 = torch.max(sim, dim=2).indices
    nn21 = torch.max(sim, dim=1).indices
    return nn12, nn21


def _mutual_from_nn(nn12: torch.Tensor, nn21: torch.Tensor) -> torch.Tensor:
    """nn12 (..., Lc), nn21 (..., Lq) -> bool (..., Lc): row i is mutual when nn21[nn12[i]] == i."""
    rows = torch.arange(nn12.shape[-1], device=nn12.device)
    return torch.gather(nn21, -1, nn12) == rows


# ------------------------------------------------------------------------------------------------
# Exact float32 building blocks
# ------------------------------------------------------------------------------------------------
# Why these reproduce the plain product bit for bit: MKL's sgemm (the CPU float32 matmul) computes
# each entry as ONE sequential chain of fused multiply-adds over k = 0..C-1, whatever the position
# of the entry and the size of the matrices, as long as the product is not tiny (it switches to
# other kernels below ~6 rows or ~4 columns). Every exact product below has >= _MIN_EXACT_SIDE
# rows and columns (padding by repeating a vector), so an entry S[i, j] computed here is the very
# float32 number the plain (k, Lc, Lq) product holds. tests/test_local_matching.py checks this for
# every shape used (mm and bmm), and the exactness of every public function against the plain
# computation, near-ties included.
def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Repeat the last row until the row count is a multiple of `multiple`."""
    extra = (-t.shape[0]) % multiple
    if extra:
        t = torch.cat([t, t[-1:].expand(extra, -1)], dim=0)
    return t


def _pad_index(idx: torch.Tensor, minimum: int) -> torch.Tensor:
    """Repeat the first index until there are at least `minimum`."""
    if idx.numel() >= minimum:
        return idx
    return torch.cat([idx, idx[:1].expand(minimum - idx.numel())])


def _first_block_argmax_rows(tile: torch.Tensor, nb: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact first argmax of each row of a float32 tile (r, nb * _BLOCK) without torch.max's slow
    index tracking over the whole row: block maxima, the first block holding the row maximum, the
    first position inside it. Returns (value (r,), index (r,))."""
    r = tile.shape[0]
    blocks = tile.view(r, nb, _BLOCK)
    val, bidx = torch.max(blocks.amax(dim=2), dim=1)       # first block with the row maximum
    inside = tile.reshape(r * nb, _BLOCK).index_select(0, torch.arange(r) * nb + bidx)
    pos = (inside == val.unsqueeze(1)).to(torch.uint8).argmax(dim=1)   # first True
    return val, bidx * _BLOCK + pos


def _first_block_argmax_cols(tile: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact first argmax over the rows of each column of a float32 tile (r, L), r a multiple of
    _BLOCK: group maxima, first group holding the column maximum, first row in it.
    Returns (value (L,), row within the tile (L,))."""
    r, width = tile.shape
    groups = tile.view(r // _BLOCK, _BLOCK, width)
    val, gidx = torch.max(groups.amax(dim=1), dim=0)
    inside = torch.gather(groups, 0, gidx.view(1, 1, width).expand(1, _BLOCK, width)).squeeze(0)
    pos = (inside == val.unsqueeze(0)).to(torch.uint8).argmax(dim=0)
    return val, gidx * _BLOCK + pos


def _exact_rows(xp: torch.Tensor, rows: torch.Tensor, qp: torch.Tensor,
                row_tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nn12 and S[i, nn12[i]] for the given rows: (>= _MIN_EXACT_SIDE rows) x (all Lqp
    query columns) float32 products. Returns (idx (n,), value (n,))."""
    out_idx, out_val = [], []
    for s in range(0, rows.numel(), row_tile):
        sel = rows[s:s + row_tile]
        tile = xp[_pad_index(sel, _MIN_EXACT_SIDE)] @ qp.t()
        val, idx = _first_block_argmax_rows(tile[:sel.numel()], qp.shape[0] // _BLOCK)
        out_idx.append(idx)
        out_val.append(val)
    return torch.cat(out_idx), torch.cat(out_val)


def _exact_columns(xp: torch.Tensor, cols: torch.Tensor, q: torch.Tensor, col_tile: int = 512) -> torch.Tensor:
    """Exact nn21 for the given query columns: (all candidate rows) x (>= _MIN_EXACT_SIDE columns)
    float32 products, first maximum over the rows. Padded rows of xp repeat the last row, so they
    never win (first-index rule)."""
    out = []
    for s in range(0, cols.numel(), col_tile):
        sel = cols[s:s + col_tile]
        block = xp @ q[_pad_index(sel, _MIN_EXACT_SIDE)].t()
        out.append(torch.max(block[:, :sel.numel()], dim=0).indices)
    return torch.cat(out)


def _segments(pairs: torch.Tensor, n_keys: int,
              seg: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut (P, 2) pairs [key, member], sorted by key, into segments of at most `seg` members that
    share one key. Returns (segment of each pair (P,), slot in it (P,), key of each segment,
    first pair of each segment)."""
    key = pairs[:, 0]
    counts = torch.bincount(key, minlength=n_keys)
    start = torch.cumsum(counts, 0) - counts
    n_seg = (counts + seg - 1) // seg
    seg_start = torch.cumsum(n_seg, 0) - n_seg
    rank = torch.arange(pairs.shape[0]) - start[key]
    seg_of = seg_start[key] + torch.div(rank, seg, rounding_mode="floor")
    slot = rank % seg
    total = int(n_seg.sum())
    seg_key = torch.zeros(total, dtype=torch.long).scatter_(0, seg_of, key)
    first = torch.zeros(total, dtype=torch.long).scatter_reduce_(0, seg_of, torch.arange(pairs.shape[0]),
                                                                  reduce="amin", include_self=False)
    return seg_of, slot, seg_key, first


def _member_matrix(values: torch.Tensor, seg_of: torch.Tensor, slot: torch.Tensor, first: torch.Tensor,
                   seg: int) -> torch.Tensor:
    """(n_seg, seg) matrix of the members' values; empty slots repeat the segment's first member
    (repeated vectors give bit-identical products, so padding never changes a decision)."""
    mat = values[first].unsqueeze(1).repeat(1, seg)
    mat[seg_of, slot] = values
    return mat


def _exact_rows_in_blocks(xp: torch.Tensor, rows: torch.Tensor, candidate: torch.Tensor,
                          qp: torch.Tensor, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nn12 and S[i, nn12[i]] of the given rows, computed on their candidate column blocks
    only (candidate (n, Lqp / width) bool; every other block is proven strictly below the row
    maximum).

    One float32 product per block (there are few, 13 for a 61x61 query): the rows that need it
    (>= _MIN_EXACT_SIDE, padded with repeats) x the block's `width` columns. (Measured faster than
    finer units gathered into batched products: the gathers cost more than the saved FLOPs.)
    Blocks are visited in increasing column order and only a strictly larger value replaces a
    row's running best: the first-index rule."""
    n = rows.numel()
    best_val = torch.full((n,), -float("inf"))
    best_idx = torch.zeros(n, dtype=torch.long)
    for b in candidate.any(dim=0).nonzero().flatten().tolist():
        k = candidate[:, b].nonzero().flatten()
        tile = xp[_pad_index(rows[k], _MIN_EXACT_SIDE)] @ qp[b * width:(b + 1) * width].t()
        val, pos = torch.max(tile[:k.numel()], dim=1)      # first column within the block
        better = val > best_val[k]
        best_val[k] = torch.where(better, val, best_val[k])
        best_idx[k] = torch.where(better, pos + b * width, best_idx[k])
    return best_idx, best_val


def _exact_in_group(xp: torch.Tensor, groups: torch.Tensor, cols: torch.Tensor,
                    q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For pairs (group g, column j): the exact maximum of S over the _BLOCK rows of group g in
    column j and its first row. Pairs are sorted by group and cut into segments of _SEG columns;
    one batched float32 product (_BLOCK rows) x (_SEG columns) computes them all.
    Returns (value (P,), row (P,))."""
    c = q.shape[1]
    order = torch.argsort(groups, stable=True)
    pairs = torch.stack([groups[order], order], dim=1)      # [group, pair], sorted by group
    seg_of, slot, seg_group, first = _segments(pairs, xp.shape[0] // _BLOCK, _SEG)
    members = _member_matrix(cols[order], seg_of, slot, first, _SEG)
    prod = torch.bmm(xp.view(-1, _BLOCK, c)[seg_group], q[members].transpose(1, 2))   # (n_seg, B, _SEG)
    val, pos = torch.max(prod, dim=1)                       # first row within the group
    out_val = torch.empty(groups.numel(), dtype=val.dtype)
    out_row = torch.empty(groups.numel(), dtype=torch.long)
    out_val[order] = val[seg_of, slot]
    out_row[order] = seg_group[seg_of] * _BLOCK + pos[seg_of, slot]
    return out_val, out_row


def _exact_columns_in_groups(xp: torch.Tensor, cols: torch.Tensor, candidate: torch.Tensor,
                             q: torch.Tensor) -> torch.Tensor:
    """Exact nn21 of the given query columns, computed on their candidate row groups only
    (candidate (G, m) bool over groups of _BLOCK candidate rows; every other group is proven
    strictly below the column maximum). Segments of _SEG columns sharing a group, one batched
    product (_BLOCK rows) x (_SEG columns); among equal values the smallest row wins."""
    m, c = cols.numel(), q.shape[1]
    pairs = candidate.nonzero()                             # [group, k], sorted by group
    seg_of, slot, seg_group, first = _segments(pairs, candidate.shape[0], _SEG)
    members = _member_matrix(cols[pairs[:, 1]], seg_of, slot, first, _SEG)
    x_groups = xp.view(-1, _BLOCK, c)[seg_group]                          # (n_seg, B, C)
    val, pos = torch.max(torch.bmm(x_groups, q[members].transpose(1, 2)), dim=1)   # (n_seg, _SEG)
    k = pairs[:, 1]
    pair_val = val[seg_of, slot]
    pair_row = seg_group[seg_of] * _BLOCK + pos[seg_of, slot]
    best = torch.full((m,), -float("inf")).scatter_reduce_(0, k, pair_val, reduce="amax")
    none = torch.full_like(pair_row, xp.shape[0])
    return torch.full((m,), xp.shape[0], dtype=torch.long).scatter_reduce_(
        0, k, torch.where(pair_val == best[k], pair_row, none), reduce="amin")


# ------------------------------------------------------------------------------------------------
# Run-time exactness self-check of the tiled float32 products
# ------------------------------------------------------------------------------------------------
# The exact fallbacks above are exact only if the BLAS computes each entry of a tile or segment
# product as the very float32 number it computes inside the whole product. That holds for the MKL
# sgemm measured (one fused multiply-add chain per entry whatever the shape), but it is a property
# of the BLAS, not of the arithmetic: another BLAS (OpenBLAS, Accelerate, cuBLAS, which pick
# kernels - split-K included - by shape) may sum in another order for some shapes, and a near-tie
# could then flip silently. So before the tiled engine serves a shape, it checks the property on
# that shape, bit for bit, once per process, device, matmul setting and shape; when the check
# fails, those candidates take the plain path (the whole product, as the reference), whose
# equality does not depend on any tiling. The path taken is logged once per shape (engine_paths()
# returns it for reports).
PATH_SCREENED = "screened-bf16+tiled-fp32"
PATH_TILED = "tiled-fp32"
PATH_PLAIN = "plain-fp32"

_TILE_CHECK: Dict[tuple, Tuple[bool, str]] = {}
_TILE_CHECK_LOCK = threading.Lock()
_PATHS: Dict[tuple, str] = {}            # (device, Lc, Lq, C) -> "path (reason)" last taken
_PATHS_LOGGED: set = set()


def _matmul_setting() -> str:
    """The process-wide setting that changes float32 matmul results (TF32 on CUDA when 'high')."""
    return torch.get_float32_matmul_precision()


def _check_sizes_for(limit: int, largest: int) -> List[int]:
    """Row / column counts the self-check tries: the smallest the engine uses (1, padded to
    _MIN_EXACT_SIDE), counts around _BLOCK and _SEG multiples, odd counts, and the largest."""
    sizes = {1, _MIN_EXACT_SIDE - 1, _MIN_EXACT_SIDE, _MIN_EXACT_SIDE + 1, 2 * _SEG - 1, 97,
             largest // 2 + 1, largest - 1, largest}
    return sorted(s for s in sizes if 1 <= s <= min(limit, largest))


def _self_check_tiles(*, lc: int, lq: int, c: int, width: int, row_tile: int,
                      device: torch.device) -> Tuple[bool, str]:
    """Compare, bit for bit, every kind of float32 product the tiled engine computes for candidates
    (lc, c) against query (lq, c) - row tiles, padded row sets against all columns and against one
    column block, column sets against all rows, batched (_BLOCK x _SEG) segments - with the
    reference's product of the whole candidate (the plain path's batched matmul of two
    candidates). Padding rows / columns must equal the row / column they repeat.
    Returns (all equal, a description of the first mismatch or of what was checked)."""
    gen = torch.Generator().manual_seed(20240613)
    x = torch.randn(2, lc, c, generator=gen).to(device)
    q = torch.randn(lq, c, generator=gen).to(device)
    ref = _tile_check_matmul(x, q.unsqueeze(0).transpose(1, 2))[1]          # (lc, lq), the reference
    xp, qp = _pad_rows(x[1].contiguous(), _BLOCK), _pad_rows(q, width)
    lcp, lqp = xp.shape[0], qp.shape[0]
    # The reference extended to the padded shape: padding repeats the last row / column.
    row_of = torch.arange(lcp, device=device).clamp(max=lc - 1)
    col_of = torch.arange(lqp, device=device).clamp(max=lq - 1)
    ref_p = ref[row_of][:, col_of]
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
    for s in range(0, lcp, row_tile):                                        # _nn_tiled_exact
        problems.append(same(_tile_check_matmul(xp[s:s + row_tile], qp.t()), ref_p[s:s + row_tile],
                             f"row tile {s}:{min(s + row_tile, lcp)} x {lqp}"))
    n_blocks = lqp // width
    row_sizes = _check_sizes_for(lcp, row_tile)
    for n in sorted(set(row_sizes) | set(_check_sizes_for(lcp, lcp))):
        rows = pick(n, lc)
        if n in row_sizes:                     # _exact_rows: at most row_tile rows a product
            full = _tile_check_matmul(xp[_pad_index(rows, _MIN_EXACT_SIDE)], qp.t())[:n]
            problems.append(same(full, ref_p[rows], f"{n} rows x {lqp} columns"))
        for b in sorted({0, n_blocks - 1}):    # _exact_rows_in_blocks: any number of rows
            part = _tile_check_matmul(xp[_pad_index(rows, _MIN_EXACT_SIDE)], qp[b * width:(b + 1) * width].t())[:n]
            problems.append(same(part, ref_p[:, b * width:(b + 1) * width][rows],
                                 f"{n} rows x column block {b} ({width} columns)"))
    for m in _check_sizes_for(lq, 512):                                      # _exact_columns
        cols = pick(m, lq)
        block = _tile_check_matmul(xp, q[_pad_index(cols, _MIN_EXACT_SIDE)].t())[:, :m]
        problems.append(same(block, ref_p[:, cols], f"{lcp} rows x {m} columns"))
    n_groups = lcp // _BLOCK
    for n_seg in sorted({1, 3, 37, 4 * n_groups}):                           # _exact_in_group, _exact_columns_in_groups
        groups = torch.randint(0, n_groups, (n_seg,), generator=gen).to(device)
        members = torch.randint(0, lq, (n_seg, _SEG), generator=gen).to(device)
        seg = torch.bmm(xp.view(-1, _BLOCK, c)[groups], q[members].transpose(1, 2))
        rows = groups.unsqueeze(1) * _BLOCK + torch.arange(_BLOCK, device=device)
        problems.append(same(seg, ref_p[rows.unsqueeze(2), members.unsqueeze(1)],
                             f"{n_seg} batched segments ({_BLOCK} x {_SEG})"))
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        return False, first
    return True, f"{checked} tile / segment products bit-identical to the whole product"


def _tile_check_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The product the self-check uses for the reference and for 2-D tiles (torch.matmul, as the
    engine's `@`); a separate name so a test can make the BLAS disagree with itself."""
    return torch.matmul(a, b)


def tile_self_check(*, candidate_positions: int, query_positions: int, channels: int,
                    device: Any = "cpu", row_tile: int = 512, screen: bool = False) -> Tuple[bool, str]:
    """Run (or return the cached result of) the exactness self-check of the tiled engine for
    candidates (candidate_positions, channels) against a query (query_positions, channels) on
    `device`: (passed, description). `screen` selects the column-block width the screen uses."""
    device = torch.device(device)
    width = _row_block_width(query_positions) if screen else _BLOCK
    # The calling thread's intra-op thread count is part of the key: a BLAS may split a product
    # differently between threads (the engine's workers run single-threaded).
    key = (str(device), _matmul_setting(), torch.get_num_threads(), candidate_positions, query_positions,
           channels, width, row_tile)
    with _TILE_CHECK_LOCK:
        if key not in _TILE_CHECK:
            with torch.no_grad():
                ok, detail = _self_check_tiles(lc=candidate_positions, lq=query_positions, c=channels,
                                               width=width, row_tile=row_tile, device=device)
            _TILE_CHECK[key] = (ok, detail)
            log = logging.info if ok else logging.warning
            log(f"re-rank engine self-check on {device} (float32 matmul precision '{key[1]}'), candidates "
                f"{candidate_positions}x{channels} vs query {query_positions}x{channels}: "
                + (f"passed, {detail}" if ok else f"FAILED, {detail}; these candidates use the plain "
                                                   f"full-product path ({PATH_PLAIN}), exact by construction"))
        return _TILE_CHECK[key]


def _note_path(device: torch.device, lc: int, lq: int, c: int, path: str) -> None:
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


class _QueryPlan:
    """Everything derived from the query once and reused for all its candidates: q (Lq, C), qp
    (Lqp, C) padded to a multiple of _BLOCK (repeats of the last row) and, for the screen, its
    bfloat16 operand and error-bound factors."""

    def __init__(self, q: torch.Tensor, use_screen: bool):
        self.q = q
        self.lq, self.c = q.shape
        self.width = _row_block_width(self.lq) if use_screen else _BLOCK
        self.qp = _pad_rows(q, self.width)
        self.lqp = self.qp.shape[0]
        self.nb = self.lqp // _BLOCK
        self.screen = _ScreenQuery(self.qp, _SCREEN_SPLIT) if use_screen else None


def _row_block_width(lq: int) -> int:
    """Width of the screen's column blocks for the row maxima: a multiple of _BLOCK near 288.
    Wide blocks make the block maxima (a reduction along the contiguous dimension) cheap; the
    width with the least padding of the query is taken (3721 -> 288: padded to 3744)."""
    if lq <= 416:
        return -(-lq // _BLOCK) * _BLOCK
    return min(range(416, 191, -_BLOCK), key=lambda w: (-(-lq // w) * w, abs(w - 288)))


def _nn_tiled_exact(x: torch.Tensor, plan: _QueryPlan, row_tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 tiled engine (no screen): nn12 (Lc,), nn21 (Lq,). Peak memory: one tile."""
    lc = x.shape[0]
    xp = _pad_rows(x, _BLOCK)
    qt = plan.qp.t()
    nn12, col_val, col_idx = [], [], []
    for s in range(0, xp.shape[0], row_tile):
        tile = xp[s:s + row_tile] @ qt
        nn12.append(_first_block_argmax_rows(tile, plan.nb)[1])
        val, row = _first_block_argmax_cols(tile)
        col_val.append(val)
        col_idx.append(row + s)
    # Across tiles: the first tile holding the column maximum (tiles are in row order).
    _, t_star = torch.max(torch.stack(col_val), dim=0)
    nn21 = torch.gather(torch.stack(col_idx), 0, t_star.unsqueeze(0)).squeeze(0)
    return torch.cat(nn12)[:lc], nn21[:plan.lq]


# ------------------------------------------------------------------------------------------------
# The bfloat16 screen and its error bound
# ------------------------------------------------------------------------------------------------
_U32 = 2.0 ** -24   # unit roundoff of float32
_UBF = 2.0 ** -8    # unit roundoff of bfloat16 (8 significant bits)
# Output rounding: |bf16(y) - y| <= 2^-8 |y| and |y| <= |bf16(y)| / (1 - 2^-8) (round to nearest).
_RHO = _UBF / (1.0 - _UBF)


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u), float32: a float32 sum of n + 1 terms, in ANY order
    (sequential, blocked, tree; with or without FMA), is within gamma_n * sum |terms|."""
    return n * _U32 / (1.0 - n * _U32)


def _norm_up(v: torch.Tensor) -> torch.Tensor:
    """Row norms (float32 in, float64 out) rounded UP: float32 accumulation of C squares is within
    a relative (C + 4) 2^-23 of the exact norm; underflowing squares cost < 2^-60 absolute."""
    c = v.shape[1]
    return torch.linalg.vector_norm(v, dim=1).double() * (1.0 + (c + 4) * 2.0 ** -23) + 2.0 ** -60


class _Split:
    """A side of the product (n vectors, C channels) as two bfloat16 parts, v ~ hi + lo, with the
    norms the error bound needs (float64, rounded up): n = ||v||, hi = ||hi||, lo = ||lo||,
    hl = ||hi|| + ||lo|| >= ||hi + lo||, rest = ||v - hi - lo|| (<= 2^-16 ||v||).
    hi = bf16(v) and lo = bf16(v - hi); both differences are exact in float32."""

    def __init__(self, v: torch.Tensor, split: bool = True):
        self.hi = v.bfloat16()
        r1 = v - self.hi.float()
        self.n = _norm_up(v)
        self.n_hi = _norm_up(self.hi.float())
        self.n_r1 = _norm_up(r1)
        if split:
            self.lo = r1.bfloat16()
            self.n_lo = _norm_up(self.lo.float())
            self.n_hl = self.n_hi + self.n_lo
            self.n_rest = _norm_up(r1 - self.lo.float())
        else:   # unused by the bound without split operands
            self.lo = None
            self.n_lo = self.n_hl = self.n_rest = torch.zeros_like(self.n)

    FACTORS = ("n", "n_hi", "n_lo", "n_hl", "n_rest", "n_r1")

    def worst(self) -> "_Split":
        """The same factors maximised over the vectors (floats): bounds valid for every vector."""
        out = _Split.__new__(_Split)
        for name in _Split.FACTORS:
            setattr(out, name, float(getattr(self, name).max()))
        return out


def _base_bound(x, q, c_abs, channels: int, split: bool):
    """Bound on |(screen sum before output rounding) + c - reference S| for row factors x and
    column factors q (_Split or its worst(); broadcasting), c_abs >= |offset|.

    split=True: the operands are A_i = [x_hi, x_hi, x_lo, -c] and B_j = [q_hi, q_lo, q_hi, 1], so
    the screen sums P = x_hi.q_hi + x_hi.q_lo + x_lo.q_hi - c of exactly-formed products (bf16 x
    bf16 has 16 significant bits: exact in float32). With x = (x_hi + x_lo) + x_r, q likewise:
      x.q - c - P = x_lo.q_lo + (x_hi + x_lo).q_r + x_r.(q_hi + q_lo) + x_r.q_r       (D, Cauchy-Schwarz)
    and the kernel's float32 accumulation of the 3C + 1 terms, in any order:
      |y - P| <= gamma_3C (|x_hi||q_hi| + |x_hi||q_lo| + |x_lo||q_hi| + |c|)           (A).
    split=False: A_i = [x_hi, -c], B_j = [q_hi, 1]; with x = x_hi + x_1, q = q_hi + q_1:
      x.q - c - P = x_hi.q_1 + x_1.q_hi + x_1.q_1,   |y - P| <= gamma_C (|x_hi||q_hi| + |c|).
    Plus the reference's own float32 dot product: |S - x.q| <= gamma_C ||x|| ||q||        (G).
    For unit vectors D + A + G ~ 3e-5 (split) or ~3e-3 (not split, the bfloat16 rounding of the
    inputs); the output's bfloat16 rounding, rho |o|, comes on top (kept small by the offset c)."""
    if split:
        d = x.n_lo * q.n_lo + x.n_hl * q.n_rest + x.n_rest * q.n_hl + x.n_rest * q.n_rest
        a = _gamma(3 * channels) * (x.n_hi * q.n_hi + x.n_hi * q.n_lo + x.n_lo * q.n_hi + c_abs)
    else:
        d = x.n_hi * q.n_r1 + x.n_r1 * q.n_hi + x.n_r1 * q.n_r1
        a = _gamma(channels) * (x.n_hi * q.n_hi + c_abs)
    g = _gamma(channels) * x.n * q.n
    return d + a + g


def _eta(x_worst: "_Split", q_worst: "_Split", channels: int) -> float:
    """Absolute slack for subnormals: the bf16 hardware flushes subnormal inputs, products and
    outputs to zero (each costs < 2^-126 times the other factor) and the reference may underflow
    gradually. Negligible (~1e-30) for unit vectors, but it keeps the bound rigorous."""
    scale = 1.0 + x_worst.n + q_worst.n
    return 2.0 ** -110 * (3 * channels + 2) * scale * scale


def _bf16_kernel_is_sound(rows: int, k: int, cols: int) -> bool:
    """Does the bfloat16 matmul (rows, k) @ (k, cols) accumulate in float32 and round once to
    nearest-even bfloat16? Checked on small integers: every product and partial sum is then exact
    in float32 in any order, and many totals need more than 8 bits, so another accumulation or
    rounding (truncation, bfloat16 partial sums) shows up as a mismatch. Cached per shape."""
    key = (rows, k, cols)
    if key not in _BF16_SOUND:
        gen = torch.Generator().manual_seed(12345)
        a = torch.randint(-15, 16, (rows, k), generator=gen).bfloat16()
        b = torch.randint(-15, 16, (cols, k), generator=gen).bfloat16()
        got = a @ b.t().contiguous()          # the shape under test
        # Exact reference on a sample of rows: |sum| <= k * 225 < 2^24, exact in float32.
        sample = torch.randperm(rows, generator=gen)[:64]
        exact = a[sample].float() @ b.float().t()
        _BF16_SOUND[key] = bool(torch.equal(got[sample], exact.bfloat16()))
    return _BF16_SOUND[key]


def _bf16_available(device: torch.device) -> bool:
    """The screen pays off only with bfloat16 matrix hardware (AMX / AVX512-BF16) on the CPU."""
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: stay on the exact float32 engine
        return False


def _screen_width(channels: int, split: bool) -> int:
    """Inner size of the screen product: (3C if split else C) + 1 operand columns (the last holds
    the offset), rounded up to a multiple of 32 with zeros, the granularity of the bf16 kernels."""
    return -(-((3 if split else 1) * channels + (1 if _SCREEN_OFFSET else 0)) // 32) * 32


def _offset_column(channels: int, split: bool) -> int:
    return (3 if split else 1) * channels


def _screen_operand(parts: _Split, channels: int, split: bool, query: bool) -> torch.Tensor:
    """bfloat16 operand rows: candidate [hi, hi, lo, (-c), 0...] or query [hi, lo, hi, 1, 0...]
    (split), or [hi, (-c) / 1, 0...] (not split). The candidate's offset column is left 0 here."""
    n = parts.hi.shape[0]
    out = torch.zeros(n, _screen_width(channels, split), dtype=torch.bfloat16)
    out[:, :channels] = parts.hi
    if split:
        out[:, channels:2 * channels] = parts.lo if query else parts.hi
        out[:, 2 * channels:3 * channels] = parts.hi if query else parts.lo
    if query and _SCREEN_OFFSET:
        out[:, _offset_column(channels, split)] = 1.0
    return out


class _ScreenQuery:
    """Query side of the screen: B (K', Lqp) in bfloat16 (contiguous, the layout the bf16 kernel is
    fastest with; see _screen_operand) and its bound factors."""

    def __init__(self, qp: torch.Tensor, split: bool):
        self.split_mode = split
        self.split = _Split(qp, split)
        self.worst = self.split.worst()
        self.b = _screen_operand(self.split, qp.shape[1], split, query=True).t().contiguous()


def _decode(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """int16 keys (bit patterns of bfloat16 outputs) -> (value float64, valid bool).

    The screen takes maxima of the bfloat16 bit patterns read as int16, several times faster than
    bfloat16 maxima. For values >= +0 the pattern grows with the value and every negative value
    (sign bit set) reads as a negative int16, so the int16 maximum of a set is its true maximum
    whenever the set holds a value >= 0. A negative key means "every value <= 0": valid=False and
    0.0 is returned, still a correct UPPER bound of the set."""
    valid = keys >= 0
    vals = keys.view(torch.bfloat16).double()
    return torch.where(valid, vals, torch.zeros_like(vals)), valid


_PROBE_ROWS = 16
# Two options of the screen, both exact (tested); the defaults were the fastest measured on the
# 61x61x128 benchmark (CPU time per candidate, one thread: 27 ms with both off, 30-32 ms with
# the offset, 36-44 ms with split operands; the plain reference 180-200 ms):
# - split operands: inner size 3C (bound ~3e-5) instead of C (bound ~3e-3, more decisions left
#   to the exact fallbacks);
# - an offset column: a per-tile offset c subtracted inside the product keeps the bfloat16
#   rounding of the outputs near the maxima small (rho |S - c| instead of rho |S|), at the price
#   of one more inner column (C + 1 is padded to C + 32) and a probe product per tile.
_SCREEN_SPLIT = False
_SCREEN_OFFSET = False


def _screen_batch(a: torch.Tensor, plan: "_QueryPlan", row_tile: int) -> Optional[Dict[str, torch.Tensor]]:
    """Run the screen over n candidates at once, operands A (n, Lcp, K'), tile by tile: one tile is
    `row_tile` rows of S of every candidate, (n, row_tile, Lqp), and only one exists at a time.
    Batching the candidates keeps the number of torch calls (each a parallel region, costly on a
    busy machine) low. Per tile only the reductions that need the tile run:
      rows: maxima of blocks of plan.width columns, the best block and its keys;
      columns: maxima of groups of _BLOCK rows.
    With _SCREEN_OFFSET each (candidate, tile) gets its own offset c (the offset column of A holds
    -c): a bfloat16 number just below the smallest probed row maximum, so that outputs o = S - c
    are small near the maxima (small bfloat16 rounding rho |o|) and mostly >= 0 (see _decode).
    Without it c = 0. Any offset is correct: the bound holds for every c.
    Returns int16 keys / indices with a leading candidate dimension, or None if the bf16 kernel is
    not sound for these shapes."""
    sq = plan.screen
    n, lcp, k_width = a.shape
    width, w = plan.lqp, plan.width
    off_col = _offset_column(plan.c, sq.split_mode)
    parts: Dict[str, List[torch.Tensor]] = {name: [] for name in (
        "r_top", "r_bidx", "r_inside", "r_bmax", "c_gmax", "c_top", "off")}
    # One buffer for every tile of the batch: a fresh multi-MB tensor per tile would be page-faulted
    # in again each time, which was measured to cost several times the product itself.
    buffer = torch.empty(n * min(row_tile, lcp), width, dtype=torch.bfloat16)
    for s in range(0, lcp, row_tile):
        at = a[:, s:s + row_tile]
        r = at.shape[1]
        if not _bf16_kernel_is_sound(n * r, k_width, width):
            return None
        if _SCREEN_OFFSET:
            step = max(1, r // _PROBE_ROWS)
            probe = at[:, ::step][:, :_PROBE_ROWS].clone()
            if not _bf16_kernel_is_sound(n * probe.shape[1], k_width, width):
                return None
            probe[:, :, off_col] = 0.0
            # 2-D products, exactly the shapes _bf16_kernel_is_sound checked.
            pkeys = (probe.reshape(-1, k_width) @ sq.b).view(torch.int16)
            pmax, _ = _decode(pkeys.amax(dim=1).view(n, -1))
            low = pmax.amin(dim=1)
            offset = (low - _UBF * low.abs()).to(torch.bfloat16)              # (n,)
            at[:, :, off_col] = -offset.unsqueeze(1)
        else:
            offset = torch.zeros(n, dtype=torch.bfloat16)
        tile = buffer[:n * r]
        torch.mm(at.reshape(n * r, k_width), sq.b, out=tile)
        keys = tile.view(torch.int16).view(n, r, width)                      # the tile
        blocks = keys.view(n, r, width // w, w)
        bmax = blocks.amax(dim=3)                                             # (n, r, Lqp / w)
        top, bidx = torch.max(bmax, dim=2)
        # The best block's keys: a row gather (index_select of contiguous blocks), ~10x faster
        # than an elementwise torch.gather.
        nbr = width // w
        flat = torch.arange(n * r) * nbr + bidx.reshape(-1)
        parts["r_inside"].append(keys.reshape(n * r * nbr, w).index_select(0, flat).view(n, r, w))
        parts["r_top"].append(top)
        parts["r_bidx"].append(bidx)
        parts["r_bmax"].append(bmax)
        gmax = keys.view(n, r // _BLOCK, _BLOCK, width).amax(dim=2)           # (n, r / B, Lqp)
        parts["c_gmax"].append(gmax)
        parts["c_top"].append(gmax.amax(dim=1))
        parts["off"].append(offset.double())
    out = {name: torch.cat(parts[name], dim=1) for name in ("r_top", "r_bidx", "r_inside", "r_bmax", "c_gmax")}
    for name in ("c_top", "off"):
        out[name] = torch.stack(parts[name], dim=1)                           # (n, T, ...)
    return out


def _nn_screened(xs: List[torch.Tensor], plan: "_QueryPlan",
                 row_tile: int) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Screened engine for candidates of one shape (Lc, C): [(nn12 (Lc,), mutual (Lc,) bool)], exact.
    Returns None if the bf16 kernel is not sound on this machine (caller: exact engine)."""
    lc, c = xs[0].shape
    xps = [_pad_rows(x, _BLOCK) for x in xs]
    split = plan.screen.split_mode
    splits = [_Split(xp, split) for xp in xps]
    a = torch.stack([_screen_operand(sp, c, split, query=False) for sp in splits])
    st = _screen_batch(a, plan, row_tile)
    if st is None:
        return None
    del a
    return [_finish_screened(xs[k], xps[k], splits[k], {name: v[k] for name, v in st.items()}, plan, row_tile)
            for k in range(len(xs))]


def _first_equal(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index of the first entry along dim 1 of (n, m) `values` equal to target (n,)."""
    return (values == target.unsqueeze(1)).to(torch.uint8).argmax(dim=1)


def _finish_screened(x: torch.Tensor, xp: torch.Tensor, xs: _Split, st: Dict[str, torch.Tensor],
                     plan: "_QueryPlan", row_tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decisions for one screened candidate: (nn12 (Lc,), mutual (Lc,) bool), exact.

    Every decision taken from the screen is proven by the bound of _base_bound: a screen value o
    (offset c) lies within base + rho |o| + eta of the reference value. What cannot be proven is
    recomputed in float32 exactly, on candidate blocks / groups only."""
    lc, c = x.shape
    lcp = xp.shape[0]
    sq, w = plan.screen, plan.width
    xw = xs.worst()
    tile_off = st["off"]                                          # (T,) offset of each tile
    off = tile_off.repeat_interleave(row_tile)[:lcp]              # (Lcp,) offset of each row
    c_abs = float(tile_off.abs().max())
    eta = _eta(xw, sq.worst, c)
    rho = _RHO

    # ---- rows: top key, its column (best block -> best 32-column sub-block -> first position),
    # and the runner-up key (best other block, other sub-block, other position).
    top, bidx, bmax, inside = st["r_top"], st["r_bidx"], st["r_bmax"], st["r_inside"]
    sub = inside.view(lcp, w // _BLOCK, _BLOCK).amax(dim=2)                    # (Lcp, w / B)
    sidx = _first_equal(sub, top)
    n_sub = w // _BLOCK
    fine = inside.reshape(lcp * n_sub, _BLOCK).index_select(0, torch.arange(lcp) * n_sub + sidx)  # (Lcp, B)
    pos = _first_equal(fine, top)
    second = bmax.scatter(1, bidx.unsqueeze(1), _INT16_MIN).amax(dim=1)
    second = torch.maximum(second, sub.scatter(1, sidx.unsqueeze(1), _INT16_MIN).amax(dim=1))
    second = torch.maximum(second, fine.scatter(1, pos.unsqueeze(1), _INT16_MIN).amax(dim=1))
    o1, ok1 = _decode(top[:lc])
    o2, _ = _decode(second[:lc])
    row_base = _base_bound(_rows(xs, lc), sq.worst, c_abs, c, sq.split_mode)
    row_lo = o1 - rho * o1.abs() - row_base - eta               # (+ offset) lower bound of the top entry
    row_ok = ok1 & (row_lo > o2 + rho * o2.abs() + row_base + eta)
    nn12 = (bidx * w + sidx * _BLOCK + pos)[:lc].clone()
    # Upper bound of the reference value S[i, nn12[i]] (proven rows; exact for recomputed ones).
    pair_base = _base_bound(_rows(xs, lc), _cols(sq.split, nn12), c_abs, c, sq.split_mode)
    hi = off[:lc] + o1 + rho * o1.abs() + pair_base + eta
    # Unproven rows whose top is known (key >= 0): exact values on their candidate blocks, those
    # whose upper bound reaches the lower bound of the top. Rows whose every screen value is below
    # the tile's offset (negative key, top unknown): whole rows.
    for rows_bad, full in (((~row_ok & ok1).nonzero().flatten(), False), ((~ok1).nonzero().flatten(), True)):
        if rows_bad.numel() == 0:
            continue
        if not full:
            # Candidate blocks: those whose upper bound reaches the lower bound of the row's top.
            b_val, _ = _decode(bmax[rows_bad])
            rb = row_base[rows_bad].unsqueeze(1)
            candidate = b_val + rho * b_val.abs() + rb + eta >= row_lo[rows_bad].unsqueeze(1)
            full = int(candidate.sum()) > _BLOCK_FALLBACK_SHARE * candidate.numel()
        if full:
            idx, val = _exact_rows(xp, rows_bad, plan.qp, row_tile)
        else:
            idx, val = _exact_rows_in_blocks(xp, rows_bad, candidate, plan.qp, w)
        nn12[rows_bad] = idx
        hi[rows_bad] = val.double()
    # (A row whose top is a padded query column - a repeat of the last one - is never proven, so
    # nn12 < Lq everywhere.)

    # ---- columns. Bounds of the column maximum from the group maxima of each tile:
    col_base = _base_bound(xw, sq.split, c_abs, c, sq.split_mode)                             # (Lqp,)
    t_off = tile_off.unsqueeze(1)                                              # (T, 1)
    t_top, t_ok = _decode(st["c_top"])                                         # (T, Lqp)
    col_lo = torch.where(t_ok, t_off + t_top - rho * t_top.abs(), -float("inf")).amax(dim=0) - col_base - eta
    t_hi = t_off + t_top + rho * t_top.abs()                                   # per tile, + col_base + eta
    # Proven not mutual: the column's maximum is surely above S[i, j].
    j = nn12
    mutual = torch.zeros(lc, dtype=torch.bool)
    maybe = (hi >= col_lo[j]).nonzero().flatten()
    if maybe.numel() == 0:
        return nn12, mutual
    # For the others: the exact values of row i's own group of _BLOCK rows in column j. Row i must
    # be their first maximum, and beat the upper bound of every other group of the column.
    jm = j[maybe]
    g = maybe // _BLOCK
    val, first_row = _exact_in_group(xp, g, jm, plan.q)
    wins_group = first_row == maybe
    tile = maybe // row_tile
    other_tiles = t_hi[:, jm].scatter(0, tile.unsqueeze(0), -float("inf")).amax(dim=0) \
        if t_hi.shape[0] > 1 else torch.full((maybe.numel(),), -float("inf"), dtype=torch.float64)
    # Other groups of row i's own tile.
    per_tile = row_tile // _BLOCK
    g0 = tile * per_tile
    n_groups = lcp // _BLOCK
    g_idx = (g0.unsqueeze(1) + torch.arange(per_tile).unsqueeze(0)).clamp(max=n_groups - 1)   # (P, per_tile)
    keys = st["c_gmax"][g_idx, jm.unsqueeze(1)]
    keys = torch.where(g_idx == g.unsqueeze(1), torch.full_like(keys, _INT16_MIN), keys).amax(dim=1)
    o_in, _ = _decode(keys)
    same_tile = tile_off[tile] + o_in + rho * o_in.abs()
    others_hi = torch.maximum(other_tiles, same_tile) + col_base[jm] + eta
    proven = wins_group & (val.double() > others_hi)
    mutual[maybe[proven]] = True
    unknown = wins_group & ~proven
    if bool(unknown.any()):
        ui = maybe[unknown]
        cols = torch.unique(j[ui])
        g_val, _ = _decode(st["c_gmax"][:, cols])                             # (G, m)
        g_off = off.view(-1, _BLOCK)[:, 0].unsqueeze(1)                       # offset of each group
        candidate = g_off + g_val + rho * g_val.abs() + col_base[cols] + eta >= col_lo[cols]
        lookup = torch.full((plan.lqp,), -1, dtype=torch.long)
        if int(candidate.sum()) <= _BLOCK_FALLBACK_SHARE * candidate.numel():
            lookup[cols] = _exact_columns_in_groups(xp, cols, candidate, plan.q)
        else:
            lookup[cols] = _exact_columns(xp, cols, plan.q)
        mutual[ui] = lookup[j[ui]] == ui
    return nn12, mutual


def _rows(s: _Split, n: int) -> _Split:
    """The factors of the first n vectors (drops the padding rows)."""
    out = _Split.__new__(_Split)
    for name in _Split.FACTORS:
        setattr(out, name, getattr(s, name)[:n])
    return out


def _cols(s: _Split, idx: torch.Tensor) -> _Split:
    """The factors of the vectors idx."""
    out = _Split.__new__(_Split)
    for name in _Split.FACTORS:
        setattr(out, name, getattr(s, name)[idx])
    return out


@torch.no_grad()
def _nn_tiled(xs: List[torch.Tensor], plan: _QueryPlan, row_tile: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Candidates of one shape on the CPU: [(nn12 (Lc,), mutual (Lc,) bool)], exact."""
    lc, c = xs[0].shape
    if plan.screen is not None:
        out = _nn_screened(xs, plan, row_tile)
        if out is not None:
            _note_path(xs[0].device, lc, plan.lq, c, f"{PATH_SCREENED} (tile self-check passed)")
            return out
        _note_path(xs[0].device, lc, plan.lq, c, f"{PATH_TILED} (tile self-check passed; the bfloat16 "
                                                 f"kernel failed its soundness check)")
    else:
        _note_path(xs[0].device, lc, plan.lq, c, f"{PATH_TILED} (tile self-check passed)")
    res = []
    for x in xs:
        nn12, nn21 = _nn_tiled_exact(x, plan, row_tile)
        res.append((nn12, _mutual_from_nn(nn12, nn21)))
    return res


# ------------------------------------------------------------------------------------------------
# Dispatcher shared by the public functions
# ------------------------------------------------------------------------------------------------
def _process_chunk(query: torch.Tensor, plan: Optional[_QueryPlan], chunk: List[torch.Tensor],
                   row_tile: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(nn12, mutual) for a chunk of candidates, in order. Consecutive candidates of one shape and
    one path are processed together: the tiled engine screens them as one batch, the plain path
    multiplies them in one batched matmul like the public release."""
    paths = [plan is not None and x.shape[0] >= _MIN_TILED_SIDE and _is_safe(x) for x in chunk]
    out: List[Tuple[torch.Tensor, torch.Tensor]] = []
    start = 0
    while start < len(chunk):
        end = start + 1
        while end < len(chunk) and chunk[end].shape == chunk[start].shape and paths[end] == paths[start]:
            end += 1
        group = chunk[start:end]
        lc = group[0].shape[0]
        if paths[start]:
            exact_tiles, _ = tile_self_check(candidate_positions=lc, query_positions=plan.lq, channels=plan.c,
                                             device=query.device, row_tile=row_tile,
                                             screen=plan.screen is not None)
            if exact_tiles:
                out.extend(_nn_tiled(group, plan, row_tile))
                start = end
                continue
            reason = "tile self-check failed"
        elif plan is None:
            reason = ("the tiled engine runs on the CPU only" if query.device.type != "cpu" else
                      f"query with fewer than {_MIN_TILED_SIDE} positions or non-finite / huge values")
        else:
            reason = f"candidate with fewer than {_MIN_TILED_SIDE} positions or non-finite / huge values"
        _note_path(query.device, lc, query.shape[0], query.shape[1], f"{PATH_PLAIN} ({reason})")
        nn12, nn21 = _plain_nn(torch.stack(group), query)
        out.extend(zip(nn12.unbind(0), _mutual_from_nn(nn12, nn21).unbind(0)))
        start = end
    return out


class _CpuWorkers:
    """Worker threads for the CPU engine, one per intra-op thread of the caller, each running its
    chunks with ONE intra-op thread (torch ops release the GIL, so the workers run in parallel).

    Why: the engine issues many mid-sized torch calls; with an OpenMP team per call, a busy
    machine (or a shared one) makes each call wait at its barrier for a descheduled thread, which
    was measured to make it ~10x slower. Independent single-threaded workers never wait on each
    other. torch.set_num_threads(1) in a worker sets that thread's OpenMP / MKL thread count (a
    per-thread setting) and torch's default for threads started later; all workers set it before
    any of them computes, and the default is put back to the caller's count when they are done,
    so nothing changes for the caller."""

    def __init__(self, workers: int):
        self.workers = workers
        self.restore = torch.get_num_threads()
        self.pool: Optional[ThreadPoolExecutor] = None

    def __enter__(self) -> ThreadPoolExecutor:
        self.pool = ThreadPoolExecutor(max_workers=self.workers)
        ready = threading.Barrier(self.workers)

        def single_threaded():
            torch.set_num_threads(1)
            ready.wait()      # every worker is up (and configured) before any work starts

        for future in [self.pool.submit(single_threaded) for _ in range(self.workers)]:
            future.result()
        return self.pool

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)
        torch.set_num_threads(self.restore)


def _matches(query: torch.Tensor, candidates: Iterable[torch.Tensor], *, chunk_size: int, row_tile: int,
             fast_path: Optional[bool], workers: bool = True) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield (nn12 (Lc,), mutual (Lc,) bool) for each candidate (L, C) float32 tensor, on the query's
    device, in order. Candidates arrive as an iterable and are taken `chunk_size` at a time, so
    that at most a few chunks (and their similarity matrices on the plain path) are held at once.
    workers=False runs in the calling thread (single pairs: not worth starting threads)."""
    device = query.device

    def make_plan() -> Optional[_QueryPlan]:
        if device.type == "cpu" and query.shape[0] >= _MIN_TILED_SIDE and _is_safe(query):
            use_screen = _bf16_available(device) if fast_path is None else bool(fast_path)
            return _QueryPlan(query, use_screen)
        return None

    # On the CPU, jobs of at most _CPU_BATCH candidates: small enough for the tiles to stay in cache
    # and to share the work evenly between the workers.
    job_size = min(chunk_size, _CPU_BATCH) if device.type == "cpu" else chunk_size

    def chunks():
        chunk: List[torch.Tensor] = []
        for x in candidates:
            if x.shape[1] != query.shape[1]:
                raise ValueError(f"candidate dense features have {x.shape[1]} channels but the query has "
                                 f"{query.shape[1]}; both must come from the same model.")
            chunk.append(x)
            if len(chunk) >= job_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    n_workers = torch.get_num_threads() if device.type == "cpu" and workers else 1
    if n_workers <= 1:
        plan = make_plan()
        for chunk in chunks():
            yield from _process_chunk(query, plan, chunk, row_tile)
        return
    with _CpuWorkers(n_workers) as pool:
        plan = pool.submit(make_plan).result()      # single-threaded too
        in_flight: Deque = deque()
        for chunk in chunks():
            in_flight.append(pool.submit(_process_chunk, query, plan, chunk, row_tile))
            if len(in_flight) > n_workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


def _check_sizes(chunk_size: int, row_tile: int) -> None:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 (candidates per chunk), got {chunk_size}.")
    if int(row_tile) < _BLOCK or int(row_tile) % _BLOCK:
        raise ValueError(f"row_tile must be a positive multiple of {_BLOCK}, got {row_tile}.")


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def mutual_nn_scores(query_local: Any, database_store: Any, candidate_indices: Any, *,
                     chunk_size: int = 4, row_tile: int = 512,
                     fast_path: Optional[bool] = None) -> torch.Tensor:
    """Re-rank scores: the number of mutual nearest neighbours between the query and each candidate.

    Args:
        query_local: (Lq, C) or (h, w, C) tensor or array; its device is where the work runs.
        database_store: indexable by an int database index, returning that image's dense features
            (L, C) or (h, w, C): a numpy array / memmap, a torch tensor, or a store object.
        candidate_indices: (K,) ints, database indices of the candidates.
        chunk_size: at most this many candidates are loaded and processed together (one batched
            matmul on the plain path; on the CPU engine, batches of at most 4); a few such chunks
            are in memory at once, so peak memory is independent of K.
        row_tile: rows of S per tile on the CPU engine (a multiple of 32).
        fast_path: None = bfloat16 screen when the CPU has bf16 matrix hardware; True / False forces
            it on / off. Results are identical either way; only the speed differs.
    Returns:
        float32 tensor (K,) on query_local's device. Exact: equal to counting on the full float32
        similarity matrix (ties included). Exactly one mutual pair scores 1 (see module doc).
    """
    _check_sizes(chunk_size, row_tile)
    query = _as_feature_matrix(query_local, "query_local")
    indices = np.asarray(candidate_indices.cpu() if isinstance(candidate_indices, torch.Tensor)
                         else candidate_indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"candidate_indices must be a 1-D array of int database indices, got shape "
                         f"{indices.shape} and dtype {indices.dtype}.")
    if indices.size and indices.min() < 0:
        raise ValueError(f"candidate_indices contains the negative index {indices.min()} (faiss pads "
                         f"missing results with -1): search at most the database size.")
    with torch.no_grad():
        query = query.detach()

        def load():
            for k, db_index in enumerate(indices.tolist()):
                try:
                    feats = database_store[int(db_index)]
                except (IndexError, KeyError) as err:
                    raise ValueError(f"candidate_indices[{k}] = {db_index} is not in the database "
                                     f"store ({err}); check the retrieval step.") from err
                yield _as_feature_matrix(feats, f"database_store[{db_index}]", query.device).detach()

        counts = [mutual.sum() for _, mutual in _matches(query, load(), chunk_size=chunk_size,
                                                          row_tile=row_tile, fast_path=fast_path)]
    if not counts:
        return torch.zeros(0, dtype=torch.float32, device=query.device)
    return torch.stack(counts).to(device=query.device, dtype=torch.float32)


def rerank(scores: Any) -> np.ndarray:
    """Candidate order from re-rank scores (K,): ``np.argsort(scores_float32)[::-1]``, exactly the
    public release's call on a float32 vector (numpy's default sort is not stable and its tie order
    depends on the dtype, so the dtype is fixed here). The one place that defines the order."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"rerank: scores must be 1-D (one per candidate), got shape {scores.shape}.")
    return np.argsort(scores.astype(np.float32))[::-1]


def mutual_nn_pairs(a_local: Any, b_local: Any, *,
                    fast_path: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbour pairs of ONE pair of dense feature maps.

    a_local (La, C) or (h, w, C), b_local (Lb, C) or (h', w', C); S = a @ b.T. Returns LongTensors
    (idx_a (M,), idx_b (M,)) of flat row-major indices, ascending in idx_a: i = idx_a[m] and
    j = idx_b[m] are each other's best match (first index on ties). On a_local's device.
    """
    a = _as_feature_matrix(a_local, "a_local")
    b = _as_feature_matrix(b_local, "b_local", a.device)
    with torch.no_grad():
        (nn12, mutual), = list(_matches(b.detach(), [a.detach()], chunk_size=1, row_tile=512,
                                        fast_path=fast_path, workers=False))
    idx_a = mutual.nonzero().flatten().to(a.device)
    return idx_a, nn12.to(a.device)[idx_a]


def mutual_nn_similarity(query_local: torch.Tensor, cand_local: torch.Tensor) -> torch.Tensor:
    """Training similarity of the local loss, differentiable w.r.t. both inputs.

    query_local, cand_local: (B, L, C) or (B, h, w, C) (L may differ between the two). Per item,
    S = cand @ query.T; returns (B,) = mean of S[i, nn12[i]] over the mutual pairs i. The pairs are
    found exactly by the re-rank engine (no gradient flows through an arg-max); the values are the
    dot products cand[i] . query[nn12[i]], recomputed with autograd (equal to S's entries up to
    float32 summation order). Exactly one pair -> that pair's similarity (the public release uses
    the aligned-position mean there through a squeeze() quirk; we do not). No pair at all only
    happens with non-finite input: then, as the public release, the mean dot product of aligned
    positions i (i < min(Lc, Lq)) is returned (NaN with NaN input).
    """
    q = _as_batch(query_local, "query_local")
    x = _as_batch(cand_local, "cand_local")
    if q.shape[0] != x.shape[0] or q.shape[2] != x.shape[2]:
        raise ValueError(f"mutual_nn_similarity: query {tuple(query_local.shape)} and candidates "
                         f"{tuple(cand_local.shape)} must have the same batch size and channels.")
    sims = []
    for b in range(q.shape[0]):
        qb, xb = q[b], x[b]
        with torch.no_grad():
            (nn12, mutual), = list(_matches(qb.detach().float().contiguous(), [xb.detach().float().contiguous()],
                                            chunk_size=1, row_tile=512, fast_path=None, workers=False))
        rows = mutual.nonzero().flatten()
        if rows.numel():
            vals = (xb[rows] * qb[nn12[rows]]).sum(dim=-1)
        else:
            n = min(xb.shape[0], qb.shape[0])
            vals = (xb[:n] * qb[:n]).sum(dim=-1)
        sims.append(vals.mean())
    return torch.stack(sims)
