"""The re-rank engine for GPUs: the same decisions as the plain computation (reference.py: the whole
float32 product of a group of candidates, max both ways, first index on ties), with the float32
product replaced by a bfloat16 tensor-core screen wherever a proven bound decides.

A group of b candidates of one shape, X (b, Lc, C), against the query Q (Lq, C), goes through:
1. the screen: O = X_hi Q_hi^T + X_hi Q_lo^T + X_lo Q_hi^T, X = X_hi + X_lo + (rest) split into
   two bfloat16 parts, as ONE tensor-core product of inner size 3 C with float32 accumulation and
   float32 output (screening.SplitSide, screen_product) - three times the products of a single
   bfloat16 screen, the same output traffic, a bound ~10x tighter - reduced to each row's top value,
   its column and the runner-up (via the maxima of column blocks), and the same for each column (via
   the maxima of row groups);
2. what the bound proves (screening.fp32_output_bound: any summation order, truncating and
   multi-term accumulators included): a row's arg-max when its margin over the runner-up exceeds
   twice the bound, a column's likewise, and "not mutual" when a row's value is surely below its
   column's maximum;
3. everything else recomputed exactly in float32: undecided rows in tiles of `row_tile` rows
   against all query columns, undecided columns in batched products of COLUMN_JOBS x (Lc, C) x
   (C, COLUMN_TILE). These products have fixed shapes, so that the run-time self-check
   (self_check.tile_self_check with gpu_engine=True) has verified on this device that cuBLAS gives
   them the very float32 numbers of the plain path's whole product; only then does this path run.
Host synchronisation: once per query (are its values finite and small?) and twice per group (how
many rows, then columns, are undecided); never per candidate. The memory of a group is the plain
path's: one (b, Lc, Lq) float32 matrix.

Device-agnostic torch: every tensor is made on the inputs' device; the functions that move data to
the host (_nonzero, _to_host, _flag) are the only synchronisation points, so a test can run the
engine on the `meta` device with them faked, where mixing in a CPU tensor raises.
"""

from typing import List, Optional, Tuple

import numpy as np
import torch

from .exact import BLOCK, pad_rows
from .screening import (
    Q_PARTS,
    X_PARTS,
    SplitSide,
    fp32_output_bound,
    fp32_output_slack,
    inner_size,
    row_block_width,
    screen_product,
)

# Undecided columns are recomputed COLUMN_TILE at a time per candidate, COLUMN_JOBS such products in
# one batched matmul (fixed shapes: see the module doc). 128 columns rather than fewer: an ordinary
# GEMM shape, for which cuBLAS is likeliest to sum each entry as in the whole product (skinny ones may
# get other kernels, e.g. split inner dimensions); the work is small either way.
COLUMN_TILE = 128
COLUMN_JOBS = 8
_NEG_INF = float("-inf")
# What the screen left to recompute, summed over this process's screened groups (host integers the
# engine has anyway): rows screened, rows recomputed, (candidate, column) pairs recomputed. The device
# report prints the shares; they decide how much the exact recomputation costs.
STATS = {"groups": 0, "rows": 0, "rows_recomputed": 0, "columns": 0, "columns_recomputed": 0}


class Norms:
    """The bound's factors of a set of vectors (screening.SplitSide: n, n_hi, n_lo, n_r2, float64
    tensors rounded up), reshaped / gathered / maximised as the bounds need them."""

    def __init__(self, **factors: torch.Tensor):
        for name in SplitSide.FACTORS:
            setattr(self, name, factors[name])

    @classmethod
    def of(cls, side: SplitSide) -> "Norms":
        return cls(**{name: getattr(side, name) for name in SplitSide.FACTORS})

    def map(self, fn) -> "Norms":
        return Norms(**{name: fn(getattr(self, name)) for name in SplitSide.FACTORS})


class GpuQueryPlan:
    """What the query gives once for all its candidates: q (Lq, C); the screen's operand (3 K', Lqp)
    bfloat16 contiguous ([hi, lo, hi] parts, screening.Q_PARTS), q padded (repeats of its last row) to
    Lqp, a multiple of the column-block width; and the bound factors of those Lqp columns."""

    def __init__(self, q: torch.Tensor):
        self.q = q
        self.lq, self.c = q.shape
        self.inner = 3 * inner_size(self.c)
        self.width = row_block_width(self.lq)
        qp = pad_rows(q, self.width)
        self.lqp = qp.shape[0]
        side = SplitSide(qp)
        self.cols = Norms.of(side)  # (Lqp,)
        self.worst = self.cols.map(lambda t: t.amax())  # 0-dim tensors: no host synchronisation
        self.b = side.operand(Q_PARTS, self.c).t().contiguous()


# ------------------------------------------------------------------------------------------------
# Host synchronisation points (faked by the meta-device test)
# ------------------------------------------------------------------------------------------------
def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    """mask.nonzero(): its size depends on the data, so the host waits for the device here."""
    return mask.nonzero()


def _to_host(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


def _flag(t: torch.Tensor) -> bool:
    return bool(t)


# ------------------------------------------------------------------------------------------------
# The screen's reductions
# ------------------------------------------------------------------------------------------------
def _row_stats(o: torch.Tensor, width: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of o (b, Lcp, Lqp), Lqp a multiple of width: (top value, runner-up = the largest value
    at any other column, first column of the top), via the maxima of blocks of `width` columns:
    one pass over o, then only the best block of each row."""
    b, lcp, lqp = o.shape
    nb = lqp // width
    block_max = o.view(b, lcp, nb, width).amax(dim=3)
    top, block = torch.max(block_max, dim=2)  # the first block holding the row maximum
    other_blocks = block_max.scatter(2, block.unsqueeze(2), _NEG_INF).amax(dim=2)
    flat = torch.arange(b * lcp, device=o.device) * nb + block.reshape(-1)
    inside = o.view(b * lcp * nb, width).index_select(0, flat).view(b, lcp, width)
    _, pos = torch.max(inside, dim=2)  # first position of the top inside its block
    runner_up = torch.maximum(other_blocks, inside.scatter(2, pos.unsqueeze(2), _NEG_INF).amax(dim=2))
    return top, runner_up, block * width + pos


def _col_stats(o: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column of o (b, Lcp, Lqp), Lcp a multiple of BLOCK: (top value, runner-up, first row of
    the top), via the maxima of groups of BLOCK rows (a reduction over a strided dimension whose
    inner dimension is contiguous: one coalesced pass), then only the best group of each column."""
    b, lcp, lqp = o.shape
    groups = o.view(b, lcp // BLOCK, BLOCK, lqp)
    group_max = groups.amax(dim=2)  # (b, G, Lqp)
    top, group = torch.max(group_max, dim=1)
    other_groups = group_max.scatter(1, group.unsqueeze(1), _NEG_INF).amax(dim=1)
    inside = torch.gather(groups, 1, group.view(b, 1, 1, lqp).expand(b, 1, BLOCK, lqp)).squeeze(1)
    _, pos = torch.max(inside, dim=1)
    runner_up = torch.maximum(other_groups, inside.scatter(1, pos.unsqueeze(1), _NEG_INF).amax(dim=1))
    return top, runner_up, group * BLOCK + pos


# ------------------------------------------------------------------------------------------------
# The exact float32 products (their shapes are what the self-check verifies)
# ------------------------------------------------------------------------------------------------
def row_product(rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exact rows of S: rows (row_tile, C) @ q.T -> (row_tile, Lq), float32."""
    return torch.matmul(rows, q.t())


def column_product(xs: torch.Tensor, q_cols: torch.Tensor) -> torch.Tensor:
    """Exact columns of S: xs (COLUMN_JOBS, Lc, C) @ q_cols (COLUMN_JOBS, COLUMN_TILE, C).T ->
    (COLUMN_JOBS, Lc, COLUMN_TILE), float32."""
    return torch.bmm(xs, q_cols.transpose(1, 2))


def _exact_rows(
    xs: torch.Tensor, pairs: torch.Tensor, q: torch.Tensor, row_tile: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """First arg-max and value of the rows pairs[:, 1] of candidates pairs[:, 0] over all query
    columns, in tiles of exactly row_tile rows (the last padded by repeating its last row)."""
    n = pairs.shape[0]
    idx = torch.empty(n, dtype=torch.long, device=xs.device)
    val = torch.empty(n, dtype=xs.dtype, device=xs.device)
    for s in range(0, n, row_tile):
        sel = pairs[s : s + row_tile]
        m = sel.shape[0]
        if m < row_tile:
            sel = torch.cat([sel, sel[-1:].expand(row_tile - m, 2)])
        tile_val, tile_idx = torch.max(row_product(xs[sel[:, 0], sel[:, 1]], q), dim=1)
        idx[s : s + m] = tile_idx[:m]
        val[s : s + m] = tile_val[:m]
    return idx, val


def _column_jobs(pairs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(candidate, column) pairs sorted by candidate -> jobs: candidate (J,), columns (J, COLUMN_TILE),
    each job COLUMN_TILE columns of one candidate (the last of a candidate padded by repeating its last
    column), J a multiple of COLUMN_JOBS (the last job repeated)."""
    cands, cols = [], []
    for c in np.unique(pairs[:, 0]):
        mine = pairs[pairs[:, 0] == c, 1]
        for s in range(0, len(mine), COLUMN_TILE):
            tile = mine[s : s + COLUMN_TILE]
            cols.append(np.concatenate([tile, np.repeat(tile[-1:], COLUMN_TILE - len(tile))]))
            cands.append(c)
    extra = (-len(cands)) % COLUMN_JOBS
    cands += cands[-1:] * extra
    cols += cols[-1:] * extra
    return np.asarray(cands, dtype=np.int64), np.stack(cols).astype(np.int64)


def _exact_columns(xs: torch.Tensor, pairs: np.ndarray, q: torch.Tensor) -> torch.Tensor:
    """First arg-max over all candidate rows of the given (candidate, column) pairs -> (b, Lq) long,
    -1 where not computed."""
    b, lc, c = xs.shape
    cands, cols = _column_jobs(pairs)
    cands_d = torch.from_numpy(cands).to(xs.device)
    cols_d = torch.from_numpy(cols).to(xs.device)
    out = torch.full((b, q.shape[0]), -1, dtype=torch.long, device=xs.device)
    for s in range(0, len(cands), COLUMN_JOBS):
        job_c, job_cols = cands_d[s : s + COLUMN_JOBS], cols_d[s : s + COLUMN_JOBS]
        prod = column_product(xs.index_select(0, job_c), q[job_cols.reshape(-1)].view(COLUMN_JOBS, COLUMN_TILE, c))
        best = torch.max(prod, dim=1).indices  # (COLUMN_JOBS, COLUMN_TILE): first row of each column
        out[job_c.unsqueeze(1).expand_as(job_cols), job_cols] = best
    return out


# ------------------------------------------------------------------------------------------------
# One group of candidates
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def nn_screened_gpu(
    xs: torch.Tensor, plan: GpuQueryPlan, row_tile: int, safe_max: float
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """xs (b, Lc, C) float32 -> (nn12 (b, Lc), mutual (b, Lc) bool), exactly the plain path's, or None
    when a candidate has non-finite values or values above safe_max (the caller then takes the plain
    path: the bound's products could overflow). Every nn12 is exact, not only the mutual rows'."""
    b, lc, c = xs.shape
    dev = xs.device
    xp = torch.cat([xs, xs[:, -1:].expand(b, (-lc) % BLOCK, c)], dim=1) if lc % BLOCK else xs
    lcp = xp.shape[1]
    side = SplitSide(xp.reshape(b * lcp, c))
    rows = Norms.of(side).map(lambda t: t.view(b, lcp))
    unsafe = ~(xs.abs().amax(dim=2).amax(dim=1) <= safe_max)  # NaN <= x is False
    o = screen_product(side.operand(X_PARTS, c), plan.b).view(b, lcp, plan.lqp)
    r_top, r_second, r_col = _row_stats(o, plan.width)
    c_top, c_second, c_row = _col_stats(o)
    del o, side

    x_worst = rows.map(lambda t: t.amax(dim=1, keepdim=True))  # (b, 1)
    bound = dict(inner=plan.inner, channels=c)
    slack = fp32_output_slack(x_worst, plan.worst, **bound)  # (b, 1)
    e_row = fp32_output_bound(rows, plan.worst, **bound) + slack  # (b, Lcp)
    row_ok = (r_top.double() - e_row > r_second.double() + e_row) & (r_col < plan.lq)
    cols = plan.cols.map(lambda t: t.unsqueeze(0))
    e_col = fp32_output_bound(x_worst, cols, **bound) + slack  # (b, Lqp)
    col_lo = c_top.double() - e_col  # a lower bound of the column's maximum of S
    col_ok = (col_lo > c_second.double() + e_col) & (c_row < lc)

    # Rows: the screen's arg-max where proven, else recomputed (exact value then known).
    nn12 = r_col[:, :lc].clone()
    pair_q = plan.cols.map(lambda t: t[nn12])
    hi = r_top[:, :lc].double() + fp32_output_bound(rows.map(lambda t: t[:, :lc]), pair_q, **bound) + slack
    bad = _nonzero(~row_ok[:, :lc])  # (n, 2): [candidate, row]
    if _flag(unsafe.any()):
        return None
    STATS["groups"] += 1
    STATS["rows"] += b * lc
    STATS["columns"] += b * plan.lq
    STATS["rows_recomputed"] += bad.shape[0]
    if bad.shape[0]:
        idx, val = _exact_rows(xs, bad, plan.q, row_tile)
        nn12[bad[:, 0], bad[:, 1]] = idx
        hi[bad[:, 0], bad[:, 1]] = val.double()

    # Mutual: row i with j = nn12[i] is mutual when nn21[j] == i. Known where column j is proven;
    # surely not where S[i, j] <= hi < the column's lower bound; else nn21[j] is recomputed.
    row_index = torch.arange(lc, device=dev)
    proven_col = col_ok.gather(1, nn12)
    mutual = proven_col & (c_row.gather(1, nn12) == row_index)
    need = ~proven_col & ~(hi < col_lo.gather(1, nn12))
    wanted = torch.zeros(b, plan.lq, dtype=torch.int32, device=dev).scatter_add_(1, nn12, need.int()) > 0
    pairs = _nonzero(wanted)  # (m, 2): [candidate, column]
    STATS["columns_recomputed"] += pairs.shape[0]
    if pairs.shape[0]:
        nn21 = _exact_columns(xs, _to_host(pairs), plan.q)
        mutual = torch.where(need, nn21.gather(1, nn12) == row_index, mutual)
    return nn12, mutual


def split(result: Tuple[torch.Tensor, torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(nn12 (b, Lc), mutual (b, Lc)) -> [(nn12 (Lc,), mutual (Lc,))] per candidate."""
    return list(zip(result[0].unbind(0), result[1].unbind(0)))
