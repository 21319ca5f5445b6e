"""The bfloat16 screen of the CPU engine and the error bound that makes it exact.

Most arg-max decisions are far from ties, so they need no float32 product. The screen computes
S in bfloat16 (a matmul with float32 accumulation, several times faster than float32 on CPUs with
bf16 matrix hardware), tile by tile, and keeps only block / group maxima of each tile (read as
int16 keys, see _decode). A rigorous bound on |screen value - float32 reference value| (base_bound,
RHO, eta) then proves most decisions: a row's arg-max is taken from the screen only when its
margin over the runner-up exceeds the bounds of both, and a row is declared not mutual only when
its column surely holds a larger value. Everything else is recomputed exactly in float32 (exact.py),
on the few blocks / groups the bounds leave, so the decisions are the reference's, ties included.

Operands are the inputs rounded once to bfloat16 (inner size C): the bound is ~3e-3 for unit
vectors, wide enough that the exact recomputations stay a small share of the work and narrow
enough that most decisions are proven.
"""

from typing import Dict, List, Optional, Tuple

import torch

from .exact import (
    BLOCK,
    BLOCK_FALLBACK_SHARE,
    exact_columns,
    exact_columns_in_groups,
    exact_in_group,
    exact_rows,
    exact_rows_in_blocks,
    pad_rows,
)

_U32 = 2.0**-24  # unit roundoff of float32
_UBF = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
# Output rounding: |bf16(y) - y| <= 2^-8 |y| and |y| <= |bf16(y)| / (1 - 2^-8) (round to nearest).
RHO = _UBF / (1.0 - _UBF)
_INT16_MIN = -32768

# Exactness of the bfloat16 kernel (float32 accumulation, one final round-to-nearest-even to
# bfloat16) is checked once per matmul shape; see bf16_kernel_is_sound.
_BF16_SOUND: Dict[Tuple[int, int, int], bool] = {}


# ------------------------------------------------------------------------------------------------
# The error bound
# ------------------------------------------------------------------------------------------------
def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u), float32: a float32 sum of n + 1 terms, in ANY order
    (sequential, blocked, tree; with or without FMA), is within gamma_n * sum |terms|."""
    return n * _U32 / (1.0 - n * _U32)


def _norm_up(v: torch.Tensor) -> torch.Tensor:
    """Row norms (float32 in, float64 out) rounded UP: float32 accumulation of C squares is within
    a relative (C + 4) 2^-23 of the exact norm; underflowing squares cost < 2^-60 absolute."""
    c = v.shape[1]
    return torch.linalg.vector_norm(v, dim=1).double() * (1.0 + (c + 4) * 2.0**-23) + 2.0**-60


class Bf16Side:
    """One side of the product (n vectors, C channels) rounded to bfloat16, hi = bf16(v), with the
    norms the error bound needs (float64, rounded up): n = ||v||, n_hi = ||hi||, n_r1 = ||v - hi||
    (v - hi is exact in float32)."""

    FACTORS = ("n", "n_hi", "n_r1")

    def __init__(self, v: torch.Tensor):
        self.hi = v.bfloat16()
        self.n = _norm_up(v)
        self.n_hi = _norm_up(self.hi.float())
        self.n_r1 = _norm_up(v - self.hi.float())

    def part(self, index) -> "Bf16Side":
        """The factors of the vectors `index` (a slice or an index tensor)."""
        out = Bf16Side.__new__(Bf16Side)
        for name in Bf16Side.FACTORS:
            setattr(out, name, getattr(self, name)[index])
        return out

    def worst(self) -> "Bf16Side":
        """The same factors maximised over the vectors (floats): bounds valid for every vector."""
        out = Bf16Side.__new__(Bf16Side)
        for name in Bf16Side.FACTORS:
            setattr(out, name, float(getattr(self, name).max()))
        return out


def base_bound(x, q, channels: int):
    """Bound on |(screen sum before output rounding) - reference S| for row factors x and column
    factors q (Bf16Side or its worst(); broadcasting).

    The screen sums P = x_hi . q_hi of exactly-formed products (bf16 x bf16 has 16 significant
    bits: exact in float32). With x = x_hi + x_1 and q = q_hi + q_1:
      x.q - P = x_hi.q_1 + x_1.q_hi + x_1.q_1                                        (D, Cauchy-Schwarz)
    the kernel's float32 accumulation of the C terms, in any order:
      |y - P| <= gamma_C |x_hi||q_hi|                                                 (A)
    and the reference's own float32 dot product: |S - x.q| <= gamma_C ||x|| ||q||     (G).
    For unit vectors D + A + G ~ 3e-3 (mostly D, the bfloat16 rounding of the inputs); the
    output's bfloat16 rounding, RHO |o|, comes on top."""
    d = x.n_hi * q.n_r1 + x.n_r1 * q.n_hi + x.n_r1 * q.n_r1
    a = _gamma(channels) * (x.n_hi * q.n_hi)
    g = _gamma(channels) * x.n * q.n
    return d + a + g


def eta(x_worst: Bf16Side, q_worst: Bf16Side, channels: int) -> float:
    """Absolute slack for subnormals: the bf16 hardware flushes subnormal inputs, products and
    outputs to zero (each costs < 2^-126 times the other factor) and the reference may underflow
    gradually. 3C + 2 such terms are counted, a generous count: the slack is ~1e-30 for unit
    vectors either way, but it keeps the bound rigorous."""
    scale = 1.0 + x_worst.n + q_worst.n
    return 2.0**-110 * (3 * channels + 2) * scale * scale


# ------------------------------------------------------------------------------------------------
# The bfloat16 kernel
# ------------------------------------------------------------------------------------------------
def bf16_kernel_is_sound(rows: int, k: int, cols: int) -> bool:
    """Does the bfloat16 matmul (rows, k) @ (k, cols) accumulate in float32 and round once to
    nearest-even bfloat16, as the bound assumes? Checked on small integers: every product and
    partial sum is then exact in float32 in any order, and many totals need more than 8 bits, so
    another accumulation or rounding (truncation, bfloat16 partial sums) shows up as a mismatch.
    Cached per shape."""
    key = (rows, k, cols)
    if key not in _BF16_SOUND:
        gen = torch.Generator().manual_seed(12345)
        a = torch.randint(-15, 16, (rows, k), generator=gen).bfloat16()
        b = torch.randint(-15, 16, (cols, k), generator=gen).bfloat16()
        got = a @ b.t().contiguous()  # the shape under test
        # Exact reference on a sample of rows: |sum| <= k * 225 < 2^24, exact in float32.
        sample = torch.randperm(rows, generator=gen)[:64]
        exact = a[sample].float() @ b.float().t()
        _BF16_SOUND[key] = bool(torch.equal(got[sample], exact.bfloat16()))
    return _BF16_SOUND[key]


def bf16_available(device: torch.device) -> bool:
    """The screen pays off only with bfloat16 matrix hardware (AMX / AVX512-BF16) on the CPU."""
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: stay on the exact float32 engine
        return False


def screen_operand(side: Bf16Side, channels: int) -> torch.Tensor:
    """bfloat16 operand rows [hi, 0...]: the inner size rounded up to a multiple of 32 with zeros,
    the granularity of the bf16 kernels (zeros add nothing to any sum)."""
    out = torch.zeros(side.hi.shape[0], -(-channels // 32) * 32, dtype=torch.bfloat16)
    out[:, :channels] = side.hi
    return out


def row_block_width(lq: int) -> int:
    """Width of the screen's column blocks for the row maxima: a multiple of BLOCK near 288.
    Wide blocks make the block maxima (a reduction along the contiguous dimension) cheap; the
    width with the least padding of the query is taken (3721 -> 288: padded to 3744)."""
    if lq <= 416:
        return -(-lq // BLOCK) * BLOCK
    return min(range(416, 191, -BLOCK), key=lambda w: (-(-lq // w) * w, abs(w - 288)))


class ScreenQuery:
    """Query side of the screen, prepared once per query: q (Lq, C); qp (Lqp, C) padded (repeats
    of the last row) to a multiple of the column-block width; B (K', Lqp) in bfloat16, contiguous
    (the layout the bf16 kernel is fastest with); and the bound factors of qp."""

    def __init__(self, q: torch.Tensor):
        self.q = q
        self.width = row_block_width(q.shape[0])
        self.qp = pad_rows(q, self.width)
        self.lqp = self.qp.shape[0]
        self.side = Bf16Side(self.qp)
        self.worst = self.side.worst()
        self.b = screen_operand(self.side, q.shape[1]).t().contiguous()


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


# ------------------------------------------------------------------------------------------------
# The screen and the decisions it proves
# ------------------------------------------------------------------------------------------------
def _screen_batch(a: torch.Tensor, sq: ScreenQuery, row_tile: int) -> Optional[Dict[str, torch.Tensor]]:
    """Run the screen over n candidates at once, operands A (n, Lcp, K'), tile by tile: one tile is
    `row_tile` rows of S of every candidate, (n, row_tile, Lqp), and only one exists at a time.
    Batching the candidates keeps the number of torch calls (each a parallel region, costly on a
    busy machine) low. Per tile only the reductions that need the tile run:
      rows: maxima of blocks of sq.width columns, the best block and its keys;
      columns: maxima of groups of BLOCK rows.
    Returns int16 keys / indices with a leading candidate dimension, or None if the bf16 kernel is
    not sound for these shapes."""
    n, lcp, k_width = a.shape
    width, w = sq.lqp, sq.width
    parts: Dict[str, List[torch.Tensor]] = {
        name: [] for name in ("r_top", "r_bidx", "r_inside", "r_bmax", "c_gmax", "c_top")
    }
    # One buffer for every tile of the batch: a fresh multi-MB tensor per tile would be page-faulted
    # in again each time, which costs several times the product itself.
    buffer = torch.empty(n * min(row_tile, lcp), width, dtype=torch.bfloat16)
    for s in range(0, lcp, row_tile):
        at = a[:, s : s + row_tile]
        r = at.shape[1]
        if not bf16_kernel_is_sound(n * r, k_width, width):
            return None
        tile = buffer[: n * r]
        torch.mm(at.reshape(n * r, k_width), sq.b, out=tile)
        keys = tile.view(torch.int16).view(n, r, width)  # the tile
        blocks = keys.view(n, r, width // w, w)
        bmax = blocks.amax(dim=3)  # (n, r, Lqp / w)
        top, bidx = torch.max(bmax, dim=2)
        # The best block's keys: a row gather (index_select of contiguous blocks), ~10x faster
        # than an elementwise torch.gather.
        nbr = width // w
        flat = torch.arange(n * r) * nbr + bidx.reshape(-1)
        parts["r_inside"].append(keys.reshape(n * r * nbr, w).index_select(0, flat).view(n, r, w))
        parts["r_top"].append(top)
        parts["r_bidx"].append(bidx)
        parts["r_bmax"].append(bmax)
        gmax = keys.view(n, r // BLOCK, BLOCK, width).amax(dim=2)  # (n, r / B, Lqp)
        parts["c_gmax"].append(gmax)
        parts["c_top"].append(gmax.amax(dim=1))
    out = {name: torch.cat(parts[name], dim=1) for name in ("r_top", "r_bidx", "r_inside", "r_bmax", "c_gmax")}
    out["c_top"] = torch.stack(parts["c_top"], dim=1)  # (n, T, Lqp)
    return out


def nn_screened(
    xs: List[torch.Tensor], sq: ScreenQuery, row_tile: int
) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Screened engine for candidates of one shape (Lc, C): [(nn12 (Lc,), mutual (Lc,) bool)], exact.
    Returns None if the bf16 kernel is not sound on this machine (caller: the exact tiled engine)."""
    c = xs[0].shape[1]
    xps = [pad_rows(x, BLOCK) for x in xs]
    sides = [Bf16Side(xp) for xp in xps]
    a = torch.stack([screen_operand(side, c) for side in sides])
    st = _screen_batch(a, sq, row_tile)
    if st is None:
        return None
    del a
    return [
        _finish_screened(xs[k], xps[k], sides[k], {name: v[k] for name, v in st.items()}, sq, row_tile)
        for k in range(len(xs))
    ]


def _first_equal(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index of the first entry along dim 1 of (n, m) `values` equal to target (n,)."""
    return (values == target.unsqueeze(1)).to(torch.uint8).argmax(dim=1)


def _finish_screened(
    x: torch.Tensor, xp: torch.Tensor, xs: Bf16Side, st: Dict[str, torch.Tensor], sq: ScreenQuery, row_tile: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decisions for one screened candidate: (nn12 (Lc,), mutual (Lc,) bool), exact.

    Every decision taken from the screen is proven: a screen value o lies within
    base_bound + RHO |o| + eta of the reference value. What cannot be proven is recomputed in
    float32 exactly, on candidate blocks / groups only."""
    lc, c = x.shape
    lcp = xp.shape[0]
    w = sq.width
    xw = xs.worst()
    slack = eta(xw, sq.worst, c)
    rho = RHO

    # ---- rows: top key, its column (best block -> best 32-column sub-block -> first position),
    # and the runner-up key (best other block, other sub-block, other position).
    top, bidx, bmax, inside = st["r_top"], st["r_bidx"], st["r_bmax"], st["r_inside"]
    sub = inside.view(lcp, w // BLOCK, BLOCK).amax(dim=2)  # (Lcp, w / B)
    sidx = _first_equal(sub, top)
    n_sub = w // BLOCK
    fine = inside.reshape(lcp * n_sub, BLOCK).index_select(0, torch.arange(lcp) * n_sub + sidx)  # (Lcp, B)
    pos = _first_equal(fine, top)
    second = bmax.scatter(1, bidx.unsqueeze(1), _INT16_MIN).amax(dim=1)
    second = torch.maximum(second, sub.scatter(1, sidx.unsqueeze(1), _INT16_MIN).amax(dim=1))
    second = torch.maximum(second, fine.scatter(1, pos.unsqueeze(1), _INT16_MIN).amax(dim=1))
    o1, ok1 = _decode(top[:lc])
    o2, _ = _decode(second[:lc])
    row_base = base_bound(xs.part(slice(None, lc)), sq.worst, c)
    row_lo = o1 - rho * o1.abs() - row_base - slack  # lower bound of the top entry
    row_ok = ok1 & (row_lo > o2 + rho * o2.abs() + row_base + slack)
    nn12 = (bidx * w + sidx * BLOCK + pos)[:lc].clone()
    # Upper bound of the reference value S[i, nn12[i]] (proven rows; exact for recomputed ones).
    pair_base = base_bound(xs.part(slice(None, lc)), sq.side.part(nn12), c)
    hi = o1 + rho * o1.abs() + pair_base + slack
    # Unproven rows whose top is known (key >= 0): exact values on their candidate blocks, those
    # whose upper bound reaches the lower bound of the top. Rows whose every screen value is <= 0
    # (negative key, top unknown): whole rows.
    for rows_bad, full in (((~row_ok & ok1).nonzero().flatten(), False), ((~ok1).nonzero().flatten(), True)):
        if rows_bad.numel() == 0:
            continue
        if not full:
            b_val, _ = _decode(bmax[rows_bad])
            rb = row_base[rows_bad].unsqueeze(1)
            candidate = b_val + rho * b_val.abs() + rb + slack >= row_lo[rows_bad].unsqueeze(1)
            full = int(candidate.sum()) > BLOCK_FALLBACK_SHARE * candidate.numel()
        if full:
            idx, val = exact_rows(xp, rows_bad, sq.qp, row_tile)
        else:
            idx, val = exact_rows_in_blocks(xp, rows_bad, candidate, sq.qp, w)
        nn12[rows_bad] = idx
        hi[rows_bad] = val.double()
    # (A row whose top is a padded query column - a repeat of the last one - is never proven, so
    # nn12 < Lq everywhere.)

    # ---- columns. Bounds of the column maximum from the group maxima of each tile:
    col_base = base_bound(xw, sq.side, c)  # (Lqp,)
    t_top, t_ok = _decode(st["c_top"])  # (T, Lqp)
    col_lo = torch.where(t_ok, t_top - rho * t_top.abs(), -float("inf")).amax(dim=0) - col_base - slack
    t_hi = t_top + rho * t_top.abs()  # per tile, + col_base + slack
    # Proven not mutual: the column's maximum is surely above S[i, j].
    j = nn12
    mutual = torch.zeros(lc, dtype=torch.bool)
    maybe = (hi >= col_lo[j]).nonzero().flatten()
    if maybe.numel() == 0:
        return nn12, mutual
    # For the others: the exact values of row i's own group of BLOCK rows in column j. Row i must
    # be their first maximum, and beat the upper bound of every other group of the column.
    jm = j[maybe]
    g = maybe // BLOCK
    val, first_row = exact_in_group(xp, g, jm, sq.q)
    wins_group = first_row == maybe
    tile = maybe // row_tile
    other_tiles = (
        t_hi[:, jm].scatter(0, tile.unsqueeze(0), -float("inf")).amax(dim=0)
        if t_hi.shape[0] > 1
        else torch.full((maybe.numel(),), -float("inf"), dtype=torch.float64)
    )
    # Other groups of row i's own tile.
    per_tile = row_tile // BLOCK
    g0 = tile * per_tile
    n_groups = lcp // BLOCK
    g_idx = (g0.unsqueeze(1) + torch.arange(per_tile).unsqueeze(0)).clamp(max=n_groups - 1)  # (P, per_tile)
    keys = st["c_gmax"][g_idx, jm.unsqueeze(1)]
    keys = torch.where(g_idx == g.unsqueeze(1), torch.full_like(keys, _INT16_MIN), keys).amax(dim=1)
    o_in, _ = _decode(keys)
    same_tile = o_in + rho * o_in.abs()
    others_hi = torch.maximum(other_tiles, same_tile) + col_base[jm] + slack
    proven = wins_group & (val.double() > others_hi)
    mutual[maybe[proven]] = True
    unknown = wins_group & ~proven
    if bool(unknown.any()):
        ui = maybe[unknown]
        cols = torch.unique(j[ui])
        g_val, _ = _decode(st["c_gmax"][:, cols])  # (G, m)
        candidate = g_val + rho * g_val.abs() + col_base[cols] + slack >= col_lo[cols]
        lookup = torch.full((sq.lqp,), -1, dtype=torch.long)
        if int(candidate.sum()) <= BLOCK_FALLBACK_SHARE * candidate.numel():
            lookup[cols] = exact_columns_in_groups(xp, cols, candidate, sq.q)
        else:
            lookup[cols] = exact_columns(xp, cols, sq.q)
        mutual[ui] = lookup[j[ui]] == ui
    return nn12, mutual
