"""Exact float32 building blocks of the re-rank engine: arg-maxes of S = X @ Q.T computed on parts
of S (row tiles, row sets, column sets, blocks, groups) that take the same decisions as the whole
product, first index on ties included.

Why a part equals the whole, bit for bit: the CPU float32 matmul (MKL's sgemm) computes each entry
as ONE sequential chain of fused multiply-adds over the C channels, whatever the position of the
entry and the size of the matrices, as long as the product is not tiny (it switches to other
kernels below ~6 rows or ~4 columns). Every product here has at least MIN_EXACT_SIDE rows and
columns (padding by repeating a vector), so an entry S[i, j] computed here is the very float32
number the plain (K, Lc, Lq) product holds. That is a property of the BLAS, not of the
arithmetic, so the engine checks it at run time on the real shapes before it relies on it
(self_check.tile_self_check); tests/test_local_matching.py checks it for the shapes used here.

Padding never changes a decision: a repeated vector gives a bit-identical copy of the last row /
column of S at a larger index, which the first-index rule never selects.
"""

from typing import Tuple

import torch

# Columns of S are reduced in blocks of BLOCK, rows in groups of BLOCK; padded sizes are multiples.
BLOCK = 32
# The fewest rows and columns of any exact product (see the module doc: no small-matrix kernel).
MIN_EXACT_SIDE = 32
# Rows (columns) per segment of the group-wise recomputations (>= MIN_EXACT_SIDE).
SEG = 64
# Unproven rows (columns) are recomputed block by block when at most this share of their blocks
# can hold the maximum; otherwise whole rows (columns) in one product are cheaper.
BLOCK_FALLBACK_SHARE = 0.25


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Repeat the last row until the row count is a multiple of `multiple`."""
    extra = (-t.shape[0]) % multiple
    if extra:
        t = torch.cat([t, t[-1:].expand(extra, -1)], dim=0)
    return t


def pad_index(idx: torch.Tensor, minimum: int) -> torch.Tensor:
    """Repeat the first index until there are at least `minimum`."""
    if idx.numel() >= minimum:
        return idx
    return torch.cat([idx, idx[:1].expand(minimum - idx.numel())])


def first_block_argmax_rows(tile: torch.Tensor, nb: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact first argmax of each row of a float32 tile (r, nb * BLOCK) without torch.max's slow
    index tracking over the whole row: block maxima, the first block holding the row maximum, the
    first position inside it. Returns (value (r,), index (r,))."""
    r = tile.shape[0]
    blocks = tile.view(r, nb, BLOCK)
    val, bidx = torch.max(blocks.amax(dim=2), dim=1)  # first block with the row maximum
    inside = tile.reshape(r * nb, BLOCK).index_select(0, torch.arange(r) * nb + bidx)
    pos = (inside == val.unsqueeze(1)).to(torch.uint8).argmax(dim=1)  # first True
    return val, bidx * BLOCK + pos


def first_block_argmax_cols(tile: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact first argmax over the rows of each column of a float32 tile (r, L), r a multiple of
    BLOCK: group maxima, first group holding the column maximum, first row in it.
    Returns (value (L,), row within the tile (L,))."""
    r, width = tile.shape
    groups = tile.view(r // BLOCK, BLOCK, width)
    val, gidx = torch.max(groups.amax(dim=1), dim=0)
    inside = torch.gather(groups, 0, gidx.view(1, 1, width).expand(1, BLOCK, width)).squeeze(0)
    pos = (inside == val.unsqueeze(0)).to(torch.uint8).argmax(dim=0)
    return val, gidx * BLOCK + pos


def exact_rows(
    xp: torch.Tensor, rows: torch.Tensor, qp: torch.Tensor, row_tile: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nn12 and S[i, nn12[i]] for the given rows: (>= MIN_EXACT_SIDE rows) x (all Lqp query
    columns) float32 products. xp (Lcp, C), qp (Lqp, C) padded to multiples of BLOCK.
    Returns (idx (n,), value (n,))."""
    out_idx, out_val = [], []
    for s in range(0, rows.numel(), row_tile):
        sel = rows[s : s + row_tile]
        tile = xp[pad_index(sel, MIN_EXACT_SIDE)] @ qp.t()
        val, idx = first_block_argmax_rows(tile[: sel.numel()], qp.shape[0] // BLOCK)
        out_idx.append(idx)
        out_val.append(val)
    return torch.cat(out_idx), torch.cat(out_val)


def exact_columns(xp: torch.Tensor, cols: torch.Tensor, q: torch.Tensor, col_tile: int = 512) -> torch.Tensor:
    """Exact nn21 for the given query columns: (all candidate rows) x (>= MIN_EXACT_SIDE columns)
    float32 products, first maximum over the rows. Padded rows of xp repeat the last row, so they
    never win (first-index rule)."""
    out = []
    for s in range(0, cols.numel(), col_tile):
        sel = cols[s : s + col_tile]
        block = xp @ q[pad_index(sel, MIN_EXACT_SIDE)].t()
        out.append(torch.max(block[:, : sel.numel()], dim=0).indices)
    return torch.cat(out)


def _segments(
    pairs: torch.Tensor, n_keys: int, seg: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    first = torch.zeros(total, dtype=torch.long).scatter_reduce_(
        0, seg_of, torch.arange(pairs.shape[0]), reduce="amin", include_self=False
    )
    return seg_of, slot, seg_key, first


def _member_matrix(
    values: torch.Tensor, seg_of: torch.Tensor, slot: torch.Tensor, first: torch.Tensor, seg: int
) -> torch.Tensor:
    """(n_seg, seg) matrix of the members' values; empty slots repeat the segment's first member
    (repeated vectors give bit-identical products, so padding never changes a decision)."""
    mat = values[first].unsqueeze(1).repeat(1, seg)
    mat[seg_of, slot] = values
    return mat


def exact_rows_in_blocks(
    xp: torch.Tensor, rows: torch.Tensor, candidate: torch.Tensor, qp: torch.Tensor, width: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact nn12 and S[i, nn12[i]] of the given rows, computed on their candidate column blocks
    only (candidate (n, Lqp / width) bool; every other block is proven strictly below the row
    maximum).

    One float32 product per block (few: 13 for a 61x61 query): the rows that need it
    (>= MIN_EXACT_SIDE, padded with repeats) x the block's `width` columns; whole blocks rather
    than finer units gathered into batched products, whose gathers cost more than they save.
    Blocks are visited in increasing column order and only a strictly larger value replaces a
    row's running best: the first-index rule."""
    n = rows.numel()
    best_val = torch.full((n,), -float("inf"))
    best_idx = torch.zeros(n, dtype=torch.long)
    for b in candidate.any(dim=0).nonzero().flatten().tolist():
        k = candidate[:, b].nonzero().flatten()
        tile = xp[pad_index(rows[k], MIN_EXACT_SIDE)] @ qp[b * width : (b + 1) * width].t()
        val, pos = torch.max(tile[: k.numel()], dim=1)  # first column within the block
        better = val > best_val[k]
        best_val[k] = torch.where(better, val, best_val[k])
        best_idx[k] = torch.where(better, pos + b * width, best_idx[k])
    return best_idx, best_val


def exact_in_group(
    xp: torch.Tensor, groups: torch.Tensor, cols: torch.Tensor, q: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For pairs (group g, column j): the exact maximum of S over the BLOCK rows of group g in
    column j and its first row. Pairs are sorted by group and cut into segments of SEG columns;
    one batched float32 product (BLOCK rows) x (SEG columns) computes them all.
    Returns (value (P,), row (P,))."""
    c = q.shape[1]
    order = torch.argsort(groups, stable=True)
    pairs = torch.stack([groups[order], order], dim=1)  # [group, pair], sorted by group
    seg_of, slot, seg_group, first = _segments(pairs, xp.shape[0] // BLOCK, SEG)
    members = _member_matrix(cols[order], seg_of, slot, first, SEG)
    prod = torch.bmm(xp.view(-1, BLOCK, c)[seg_group], q[members].transpose(1, 2))  # (n_seg, B, SEG)
    val, pos = torch.max(prod, dim=1)  # first row within the group
    out_val = torch.empty(groups.numel(), dtype=val.dtype)
    out_row = torch.empty(groups.numel(), dtype=torch.long)
    out_val[order] = val[seg_of, slot]
    out_row[order] = seg_group[seg_of] * BLOCK + pos[seg_of, slot]
    return out_val, out_row


def exact_columns_in_groups(
    xp: torch.Tensor, cols: torch.Tensor, candidate: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """Exact nn21 of the given query columns, computed on their candidate row groups only
    (candidate (G, m) bool over groups of BLOCK candidate rows; every other group is proven
    strictly below the column maximum). Segments of SEG columns sharing a group, one batched
    product (BLOCK rows) x (SEG columns); among equal values the smallest row wins."""
    m, c = cols.numel(), q.shape[1]
    pairs = candidate.nonzero()  # [group, k], sorted by group
    seg_of, slot, seg_group, first = _segments(pairs, candidate.shape[0], SEG)
    members = _member_matrix(cols[pairs[:, 1]], seg_of, slot, first, SEG)
    x_groups = xp.view(-1, BLOCK, c)[seg_group]  # (n_seg, B, C)
    val, pos = torch.max(torch.bmm(x_groups, q[members].transpose(1, 2)), dim=1)  # (n_seg, SEG)
    k = pairs[:, 1]
    pair_val = val[seg_of, slot]
    pair_row = seg_group[seg_of] * BLOCK + pos[seg_of, slot]
    best = torch.full((m,), -float("inf")).scatter_reduce_(0, k, pair_val, reduce="amax")
    none = torch.full_like(pair_row, xp.shape[0])
    return torch.full((m,), xp.shape[0], dtype=torch.long).scatter_reduce_(
        0, k, torch.where(pair_val == best[k], pair_row, none), reduce="amin"
    )


def nn_tiled_exact(xp: torch.Tensor, qp: torch.Tensor, row_tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both arg-maxes over all of S, one float32 row tile at a time (peak memory: one tile).
    xp (Lcp, C), qp (Lqp, C) padded to multiples of BLOCK. Returns nn12 (Lcp,), nn21 (Lqp,)."""
    qt = qp.t()
    nn12, col_val, col_idx = [], [], []
    for s in range(0, xp.shape[0], row_tile):
        tile = xp[s : s + row_tile] @ qt
        nn12.append(first_block_argmax_rows(tile, qp.shape[0] // BLOCK)[1])
        val, row = first_block_argmax_cols(tile)
        col_val.append(val)
        col_idx.append(row + s)
    # Across tiles: the first tile holding the column maximum (tiles are in row order).
    _, t_star = torch.max(torch.stack(col_val), dim=0)
    nn21 = torch.gather(torch.stack(col_idx), 0, t_star.unsqueeze(0)).squeeze(0)
    return torch.cat(nn12), nn21
