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
    the granularity of the bf16 kernels (zeros add nothing to any sum). On side.hi's device."""
    out = torch.zeros(side.hi.shape[0], inner_size(channels), dtype=torch.bfloat16, device=side.hi.device)
    out[:, :channels] = side.hi
    return out


def inner_size(channels: int) -> int:
    """The screen's inner size: the channels rounded up to a multiple of 32 (padded with zeros)."""
    return -(-channels // 32) * 32


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


# ------------------------------------------------------------------------------------------------
# The float32-output screen of the GPU engine (device_engine.py)
# ------------------------------------------------------------------------------------------------
# Relative slack on every bound below for the float64 arithmetic that computes the bounds and compares
# them with the screen's values (a few roundings of 2^-53 each; the values compared are at most ~2^9
# times the bound, see fp32_output_bound).
_BOUND_ARITHMETIC = 1.0 + 2.0**-20
_NATIVE_BF16_FP32: Dict[str, bool] = {}
_FP32_SCREEN_SOUND: Dict[Tuple[str, int, int, int], bool] = {}


def gamma_any_order(terms: int) -> float:
    """8 n u / (1 - 8 n u), u = 2^-24: relative bound (to the sum of |terms|) on the error of ANY
    float32 summation of n terms, for the accumulators found in tensor cores as well as IEEE ones.

    Model. The terms are exact, or each rounded once (an unfused float32 product). They are summed
    by a tree of nodes, in any order and grouping (sequential, blocked, pairwise, split-K with
    float32 partial sums). A node adds m >= 2 values c_1..c_m (m = 2 for an ordinary addition or a
    fused multiply-add, more for a tensor core's multi-term adder): it aligns them to the exponent E
    of the largest (2^E <= max |c_i| < 2^(E+1)) keeping at least 24 bits below its leading bit,
    dropping (truncating) the rest, adds exactly, and rounds the result to float32 at most twice
    (normalisation, a conversion), each time to nearest OR toward zero.
      Alignment: each input loses < 2^(E-23) <= 2u max |c_i|: in all < 2u m sum |c_i|.
      Each rounding: < ulp(result) <= 2u |result| (toward zero; half that to nearest).
    So a node's error is <= delta_v sum |c_i| with delta_v = 2u (m + 2) (1 + O(u)): replacing u by
    2u per rounding is exactly what covers truncation; the m is what covers multi-term adders.
    Induction over the tree (children within W_i - 1 of their exact sums A_i, relative) gives
    |computed - exact| <= (W - 1) sum |terms|, W = max over root-to-leaf paths of prod (1 + delta_v)
    <= exp(sum over the path of delta_v). On any path, sum (m_v - 1) <= n - 1 (the siblings left off
    the path hold disjoint leaves) and the path has <= n - 1 nodes (every node has >= 2 children),
    so sum delta_v <= 2u ((n - 1) + 3 (n - 1)) (1 + O(u)) + 2u (a leaf's own rounding) <= 8 n u,
    and exp(x) - 1 <= x / (1 - x). What the model does not cover - accumulators keeping fewer than
    24 bits, bfloat16 partial sums, a bfloat16 output - the soundness probe rejects
    (fp32_screen_is_sound). Subnormals flushed to zero are the absolute slack's (fp32_output_slack).
    For 128 channels: 6.2e-5 (129 terms), 1.8e-4 for the GPU screen's 385 (fp32_output_bound)."""
    x = 8.0 * terms * _U32
    return x / (1.0 - x)


class SplitSide:
    """One side of the GPU screen (n vectors, C channels) split into two bfloat16 parts, v = hi + lo +
    r2 with hi = bf16(v), lo = bf16(v - hi) and r2 = v - hi - lo (both differences exact in float32:
    each part is within a factor 2 of what it rounds), with the norms the bound needs (float64,
    rounded up, as Bf16Side's): n = ||v||, n_hi, n_lo, n_r2."""

    FACTORS = ("n", "n_hi", "n_lo", "n_r2")

    def __init__(self, v: torch.Tensor):
        self.hi = v.bfloat16()
        r1 = v - self.hi.float()
        self.lo = r1.bfloat16()
        self.n = _norm_up(v)
        self.n_hi = _norm_up(self.hi.float())
        self.n_lo = _norm_up(self.lo.float())
        self.n_r2 = _norm_up(r1 - self.lo.float())

    def operand(self, order: Tuple[str, str, str], channels: int) -> torch.Tensor:
        """bfloat16 rows [p1, 0.., p2, 0.., p3, 0..] of the parts named in `order`, each padded with zeros
        to inner_size(channels): the screen is one product of inner size 3 K'."""
        k = inner_size(channels)
        out = torch.zeros(self.hi.shape[0], 3 * k, dtype=torch.bfloat16, device=self.hi.device)
        for i, name in enumerate(order):
            out[:, i * k : i * k + channels] = getattr(self, name)
        return out


# The screen's three products, x_hi.q_hi + x_hi.q_lo + x_lo.q_hi, as one: x's operand rows are
# [hi, hi, lo], q's [hi, lo, hi].
X_PARTS = ("hi", "hi", "lo")
Q_PARTS = ("hi", "lo", "hi")


def fp32_output_bound(x, q, *, inner: int, channels: int):
    """Bound on |O - S| for a screen value O = x_hi.q_hi + x_hi.q_lo + x_lo.q_hi (one product of the
    SplitSide operands, inner size `inner` = 3 K' with the padding zeros, float32 accumulation in any
    order and with any accumulator gamma_any_order covers, float32 output: no output rounding) and the
    reference S (the float32 product of x and q over `channels`, any order). x, q: SplitSide factors
    (tensors, broadcasting).

    With x = x_hi + x_lo + x_2 (exact), x.q minus the three products screened is
      x_hi.q_2 + x_lo.q_lo + x_lo.q_2 + x_2.q_hi + x_2.q_lo + x_2.q_2    (D, by Cauchy-Schwarz)
    the screen's accumulation of exact products (bfloat16 x bfloat16 fits float32):
      |O - screened| <= gamma_any_order(inner + 1) (|x_hi||q_hi| + |x_hi||q_lo| + |x_lo||q_hi|)   (A)
    (+ 1: the accumulator's start), and the reference's own float32 dot product:
      |S - x.q| <= gamma_any_order(channels + 1) ||x|| ||q||                                (G).
    For unit vectors D ~ 2^-17 and A ~ 2e-4 (the truncation-safe gamma over 385 terms): the bound is
    ~10x below a single bfloat16 product's, which leaves ~10x fewer decisions to recompute on smooth
    dense features (measured: 4.5% of rows instead of 51%). The factor _BOUND_ARITHMETIC covers the
    float64 arithmetic of the bound and of the comparisons made with it: A alone is at least
    gamma_any_order(inner + 1) >= 2^-21 times any value compared, whose float64 roundings are
    2^-53 relative."""
    d = x.n_hi * q.n_r2 + x.n_lo * q.n_lo + x.n_lo * q.n_r2 + x.n_r2 * q.n_hi + x.n_r2 * q.n_lo + x.n_r2 * q.n_r2
    a = gamma_any_order(inner + 1) * (x.n_hi * q.n_hi + x.n_hi * q.n_lo + x.n_lo * q.n_hi)
    g = gamma_any_order(channels + 1) * (x.n * q.n)
    return (d + a + g) * _BOUND_ARITHMETIC


def fp32_output_slack(x, q, *, inner: int, channels: int):
    """Absolute slack for subnormals flushed to zero (inputs of either side, products, partial sums
    of the screen and of the reference: each loses < 2^-126 times 1 + ||x|| + ||q||), counted
    generously: 8 (inner + channels) + 8 of them, times 2^16 for good measure. x, q: factors with the
    largest norms (tensors, broadcasting). ~1e-29 for unit vectors."""
    scale = 1.0 + x.n + q.n
    return 2.0**-110 * (8 * (inner + channels) + 8) * scale * scale


def native_bf16_fp32_matmul(device: torch.device) -> bool:
    """Does this torch offer a bfloat16 x bfloat16 -> float32 matmul on `device` (torch.mm with
    out_dtype: torch >= 2.8 on CUDA; not on the CPU)? Tried once per device."""
    key = str(torch.device(device))
    if key not in _NATIVE_BF16_FP32:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        try:
            out = torch.mm(a, a, out_dtype=torch.float32)
            _NATIVE_BF16_FP32[key] = out.dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):  # older torch, or no kernel there
            _NATIVE_BF16_FP32[key] = False
    return _NATIVE_BF16_FP32[key]


def screen_unavailable(device: torch.device) -> Optional[str]:
    """Why the GPU screen would not pay on `device` (None: it would): it needs torch's bfloat16 ->
    float32 matmul, and on CUDA bfloat16 tensor cores (compute capability 8.0, Ampere, or newer;
    elsewhere the three bfloat16 products run slower than the plain float32 one)."""
    device = torch.device(device)
    if not native_bf16_fp32_matmul(device):
        return (
            f"torch {torch.__version__} has no bfloat16 x bfloat16 -> float32 matmul on {device.type} "
            "(torch.mm out_dtype, torch >= 2.8)"
        )
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        name = torch.cuda.get_device_name(device)
        return f"{name} has no bfloat16 tensor cores (compute capability < 8.0)"
    return None


def screen_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The GPU engine's screen: a (m, K) @ b (K, n), both bfloat16, float32 accumulation and float32
    output. Natively (tensor cores) where this torch has it; elsewhere the same arithmetic in float32
    (products of bfloat16 numbers are exact in float32): the CPU's tests, and torch < 2.8 when asked
    for explicitly (no faster than the plain path there)."""
    if native_bf16_fp32_matmul(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def fp32_screen_is_sound(rows: int, inner: int, cols: int, device: torch.device) -> bool:
    """Does screen_product, for this shape on this device, compute what fp32_output_bound assumes:
    exact products, accumulation keeping 24 bits (rounding to nearest or truncating, any order),
    float32 output? `inner` is the product's inner size (3 K'). Checked once per device and shape
    (the BLAS picks kernels by shape) on integers whose sums need exactly 24 bits: every partial sum
    is then an integer below 2^24, exact for such an accumulator whatever its order or rounding, so
    the output must equal the exact sum; an odd sum >= 2^23 cannot be held in fewer bits (nor in
    bfloat16), so a narrower accumulator, bfloat16 partial sums or a bfloat16 output differ there.
    Row r holds 2^12 at position r mod inner, column c 2^11 at position c mod inner (so the 2^23
    product sits at every position of the sum in some entries, the sums stay below 2^24), the rest
    integers 0..15; half the rows negated."""
    key = (str(device), rows, inner, cols)
    if key not in _FP32_SCREEN_SOUND:
        gen = torch.Generator().manual_seed(24)
        a = torch.randint(0, 16, (rows, inner), generator=gen).float()
        b = torch.randint(0, 16, (cols, inner), generator=gen).float()
        a[torch.arange(rows), torch.arange(rows) % inner] = 4096.0
        b[torch.arange(cols), torch.arange(cols) % inner] = 2048.0
        a[1::2] = -a[1::2]
        got = screen_product(
            a.bfloat16().to(device), b.bfloat16().to(device).t().contiguous()
        )  # the engine's layouts: (m, K') and (K', n) contiguous
        # Rows checked: a run of `inner` consecutive ones (every position of the large product), random others.
        start = int(torch.randint(0, max(1, rows - inner + 1), (1,), generator=gen))
        sample = torch.cat(
            [torch.arange(start, min(rows, start + inner)), torch.randint(0, rows, (64,), generator=gen)]
        )
        exact = a[sample].double() @ b.double().t()  # integers below 2^24: exact in float64
        _FP32_SCREEN_SOUND[key] = bool(torch.equal(got[sample.to(got.device)].cpu().double(), exact))
    return _FP32_SCREEN_SOUND[key]
