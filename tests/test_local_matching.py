"""local_matching: exactness of the re-rank engine against the plain public computation (full
similarity matrix, max both ways), ties and near-ties, stores, order, pairs, training similarity."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import local_matching as lm
from dense_store import DenseStore
from local_matching import device_engine, engine, exact, screening, self_check, staging

C = 128


# ------------------------------------------------------------------------------------------------
# Plain reference (the public algorithm): the whole similarity matrix, max both ways.
# ------------------------------------------------------------------------------------------------
def ref_nn(x: torch.Tensor, q: torch.Tensor):
    """x (K, Lc, C), q (Lq, C) -> nn12 (K, Lc), nn21 (K, Lq) from S = x @ q.T (K, Lc, Lq)."""
    sim = torch.matmul(x, q.unsqueeze(0).transpose(1, 2))
    return torch.max(sim, dim=2).indices, torch.max(sim, dim=1).indices


def ref_scores(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    nn12, nn21 = ref_nn(x, q)
    return (torch.gather(nn21, 1, nn12) == torch.arange(x.shape[1])).sum(1).float()


def ref_pairs(a: torch.Tensor, b: torch.Tensor):
    nn12, nn21 = ref_nn(a.unsqueeze(0), b)
    nn12, nn21 = nn12[0], nn21[0]
    idx_a = (nn21[nn12] == torch.arange(a.shape[0])).nonzero().flatten()
    return idx_a, nn12[idx_a]


def ref_similarity(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = []
    for qb, xb in zip(q, x):
        sim = xb @ qb.T
        nn12, nn21 = sim.argmax(1), sim.argmax(0)
        rows = (nn21[nn12] == torch.arange(xb.shape[0])).nonzero().flatten()
        out.append(sim[rows, nn12[rows]].mean())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# Data: unit-norm features with spatial structure (smooth random fields, as dense CNN features).
# ------------------------------------------------------------------------------------------------
def field(gen, h, w, coarse=6):
    z = torch.randn(1, C, coarse, coarse, generator=gen)
    return F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)[0]


def unit(f):
    """(C, h, w) -> (h * w, C) unit vectors."""
    return F.normalize(f.permute(1, 2, 0).reshape(-1, C), dim=1)


def scene_and_candidates(seed, hq, wq, hc, wc, k):
    """A query and k candidates: shifted noisy copies of the query's scene mixed with other scenes
    in varying proportions (scores from dozens to ~all), plus one unrelated candidate."""
    gen = torch.Generator().manual_seed(seed)
    scene = field(gen, max(hq, hc), max(wq, wc))
    q = unit(scene[:, :hq, :wq] + 0.3 * torch.randn(C, hq, wq, generator=gen))
    cands = []
    for i in range(k):
        share = 0.0 if i == k - 1 else 1.0 - i / k  # candidate 0: a noisy copy
        other = field(gen, max(hq, hc), max(wq, wc))
        mix = share * torch.roll(scene, (i % 3, i % 2), (1, 2)) + (1 - share**2) ** 0.5 * other
        noise = 0.15 if i == 0 else 0.4
        cands.append(unit(mix[:, :hc, :wc] + noise * torch.randn(C, hc, wc, generator=gen)))
    return q, torch.stack(cands)


# ------------------------------------------------------------------------------------------------
# The float32 sub-products the engine relies on equal the whole product bit for bit
# ------------------------------------------------------------------------------------------------
def test_sub_products_equal_the_plain_product_bitwise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 700, C, generator=gen)
    q = torch.randn(650, C, generator=gen)
    sim = torch.matmul(x, q.unsqueeze(0).transpose(1, 2))
    xp = exact.pad_rows(x[1], exact.BLOCK)
    qp = exact.pad_rows(q, 288)
    # Row tiles and padded row sets (>= 32 rows) against all (padded) columns.
    rows = torch.tensor([5, 77, 300, 699])
    tile = xp[exact.pad_index(rows, exact.MIN_EXACT_SIDE)] @ qp.t()
    assert torch.equal(tile[:4, :650], sim[1][rows])
    assert torch.equal((xp[256:512] @ qp.t())[:, :650], sim[1][256:512])
    # Column sets (>= 32 columns) against all rows.
    cols = torch.tensor([3, 640])
    block = xp @ q[exact.pad_index(cols, exact.MIN_EXACT_SIDE)].t()
    assert torch.equal(block[:700, :2], sim[1][:, cols])
    # Batched segments (bmm) used by the block-wise fallbacks.
    r_idx = torch.randint(0, 700, (5, exact.SEG), generator=gen)
    c_idx = torch.randint(0, 650, (5, exact.BLOCK), generator=gen)
    seg = torch.bmm(xp[r_idx], q[c_idx].transpose(1, 2))
    assert torch.equal(seg, sim[1][r_idx.unsqueeze(2), c_idx.unsqueeze(1)])


# ------------------------------------------------------------------------------------------------
# Scores: exact equality with the plain computation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hq,wq,hc,wc,k", [(61, 61, 61, 61, 4), (20, 23, 17, 19, 5), (9, 7, 12, 11, 3)])
@pytest.mark.parametrize("fast_path", [True, False])
def test_scores_equal_reference(hq, wq, hc, wc, k, fast_path):
    q, x = scene_and_candidates(1, hq, wq, hc, wc, k)
    got = lm.mutual_nn_scores(q.view(hq, wq, C), x.numpy(), np.arange(k), chunk_size=2, fast_path=fast_path)
    want = ref_scores(q, x)
    assert got.dtype == torch.float32 and got.shape == (k,)
    assert torch.equal(got, want)
    assert want.max() > 1.5 * want.min() and want.min() >= 1  # a spread of scores


def test_reference_scores_are_the_definition():
    """The package's plain reference (the fallback path) counts the same pairs as this file's
    independent full-matrix computation, and the engine agrees with it."""
    q, x = scene_and_candidates(16, 20, 20, 18, 18, 3)
    want = ref_scores(q, x)
    assert torch.equal(lm.reference_scores(q, x), want)
    assert torch.equal(lm.mutual_nn_scores(q, x, np.arange(3)), want)


def test_scores_plain_random_and_chunking_independent():
    gen = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(300, C, generator=gen), dim=1)
    x = F.normalize(torch.randn(9, 250, C, generator=gen), dim=1)
    want = ref_scores(q, x)
    for chunk in (1, 4, 20):
        got = lm.mutual_nn_scores(q, x, np.arange(9), chunk_size=chunk, row_tile=64)
        assert torch.equal(got, want)
    # Candidates in any order, repeated.
    order = np.array([8, 0, 0, 5])
    assert torch.equal(lm.mutual_nn_scores(q, x, order), want[order])


def test_memmap_store_and_torch_store(tmp_path):
    q, x = scene_and_candidates(3, 30, 30, 30, 30, 4)
    path = tmp_path / "db.npy"
    np.save(path, x.view(4, 30, 30, C).numpy())
    store = np.load(path, mmap_mode="r")
    want = ref_scores(q, x)
    idx = np.array([3, 1, 2, 0])
    assert torch.equal(lm.mutual_nn_scores(q.view(30, 30, C), store, idx), want[idx])
    assert torch.equal(lm.mutual_nn_scores(q, x.view(4, 30, 30, C), torch.tensor(idx)), want[idx])
    # float16 store: converted to float32 like the public torch.Tensor(array).
    half = x.half()
    assert torch.equal(lm.mutual_nn_scores(q, half.numpy(), np.arange(4)), ref_scores(q, half.float()))


# ------------------------------------------------------------------------------------------------
# Ties and near-ties
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast_path", [True, False])
def test_exact_ties_duplicated_vectors(fast_path):
    """Duplicated database vectors (tied columns of S^T: nn21 first index) and duplicated query
    vectors (tied rows: nn12 first index)."""
    q, x = scene_and_candidates(4, 20, 20, 20, 20, 3)
    q = q.clone()
    x = x.clone()
    q[200:260] = q[100:160]  # duplicated query vectors -> exact ties in rows of S
    q[399] = q[0]
    x[:, 300:380] = x[:, 10:90]  # duplicated candidate vectors -> ties in columns
    x[1, 399] = x[1, 398]
    x[2, ::2] = x[2, 1::2]
    got = lm.mutual_nn_scores(q, x, np.arange(3), fast_path=fast_path)
    assert torch.equal(got, ref_scores(q, x))


@pytest.mark.parametrize("fast_path", [True, False])
def test_constant_features_give_exactly_one_pair(fast_path):
    """All-equal features: every entry of S ties, the only mutual pair is (0, 0) -> score 1
    (the public release's squeeze() quirk would store 0)."""
    q = torch.full((100, C), 0.25)
    x = torch.full((2, 90, C), -0.5)
    got = lm.mutual_nn_scores(q, x, np.arange(2), fast_path=fast_path)
    assert torch.equal(got, torch.ones(2)) and torch.equal(got, ref_scores(q, x))
    ia, ib = lm.mutual_nn_pairs(x[0], q)
    assert ia.tolist() == [0] and ib.tolist() == [0]


def _near_tie_data(seed):
    """Query and candidates where pairs of query (and candidate) vectors differ by one float32 ulp
    in one channel, so that S has near-ties ~1e-8 apart: far below what bfloat16 can resolve."""
    gen = torch.Generator().manual_seed(seed)
    q, x = scene_and_candidates(seed, 18, 18, 18, 18, 3)
    q, x = q.clone(), x.clone()
    src = torch.randperm(324, generator=gen)[:120]
    dst = torch.randperm(324, generator=gen)[:120]
    q[dst] = torch.nextafter(q[src], torch.full_like(q[src], 2.0))  # each entry moved by 1 ulp
    x[:, dst[:60]] = torch.nextafter(x[:, src[:60]], torch.full_like(x[:, src[:60]], -2.0))
    return q, x


@pytest.mark.parametrize("seed", [5, 6])
def test_near_ties_where_bfloat16_flips_decisions(seed):
    q, x = _near_tie_data(seed)
    want = ref_scores(q, x)
    # The test is meaningful: arg-maxes from a bfloat16 product differ from the float32 ones.
    sim32 = torch.matmul(x, q.t())
    sim16 = torch.matmul(x.bfloat16(), q.t().bfloat16()).float()
    assert (sim16.argmax(2) != sim32.argmax(2)).any()
    for fast_path in (True, False):
        assert torch.equal(lm.mutual_nn_scores(q, x, np.arange(3), fast_path=fast_path), want)


def test_screen_runs_and_is_exact_on_full_size_candidates():
    """61x61 features (the real size), screened engine called directly: proven decisions and
    recomputed ones together must equal the reference for every row."""
    q, x = scene_and_candidates(7, 61, 61, 61, 61, 2)
    out = screening.nn_screened(list(x), screening.ScreenQuery(q), row_tile=256)
    assert out is not None, "the bfloat16 kernel failed its soundness check on this machine"
    nn12, nn21 = ref_nn(x, q)
    for k, (got_nn12, got_mutual) in enumerate(out):
        want_mutual = nn21[k][nn12[k]] == torch.arange(x.shape[1])
        assert torch.equal(got_mutual, want_mutual)
        # nn12 is exact wherever it matters (mutual rows) and everywhere for the proven rows.
        assert torch.equal(got_nn12[want_mutual], nn12[k][want_mutual])


@pytest.mark.parametrize("scale", [1e-3, 1.0, 37.0])
def test_error_bound_of_the_screen_holds(scale):
    """|screen value - float32 reference| <= base + rho |o| + eta for every entry, also for
    features that are not unit-norm."""
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(320, C, generator=gen) * scale
    x = torch.randn(64, C, generator=gen) * scale * torch.rand(64, 1, generator=gen)
    qs, xs = screening.Bf16Side(q), screening.Bf16Side(x)
    b = screening.screen_operand(qs, C).t().contiguous()
    a = screening.screen_operand(xs, C)
    assert screening.bf16_kernel_is_sound(64, a.shape[1], 320)
    o = (a @ b).double()
    ref = (x @ q.t()).double()
    err = (o - ref).abs()
    base = screening.base_bound(_col(xs), _row(qs, 320), C)
    bound = base + screening.RHO * o.abs() + screening.eta(xs.worst(), qs.worst(), C)
    assert (err <= bound).all()
    assert err.max() > 0  # the screen is not exact: the bound is doing work
    assert (err > 0.25 * bound).any()  # and it is not loose by orders of magnitude


def _col(s):
    """Row factors of a Bf16Side as a column vector (broadcast over query columns)."""
    out = screening.Bf16Side.__new__(screening.Bf16Side)
    for name in screening.Bf16Side.FACTORS:
        setattr(out, name, getattr(s, name).unsqueeze(1))
    return out


def _row(s, n):
    out = screening.Bf16Side.__new__(screening.Bf16Side)
    for name in screening.Bf16Side.FACTORS:
        setattr(out, name, getattr(s, name)[:n].unsqueeze(0))
    return out


# ------------------------------------------------------------------------------------------------
# Special inputs
# ------------------------------------------------------------------------------------------------
def test_tiny_and_non_finite_inputs_follow_the_reference():
    gen = torch.Generator().manual_seed(9)
    for lq, lc in [(1, 5), (5, 1), (1, 1), (3, 70), (70, 3)]:
        q = torch.randn(lq, C, generator=gen)
        x = torch.randn(2, lc, C, generator=gen)
        assert torch.equal(lm.mutual_nn_scores(q, x, np.arange(2)), ref_scores(q, x))
    q = torch.randn(100, C, generator=gen)
    x = torch.randn(2, 90, C, generator=gen)
    x[1, 5, 7] = float("nan")
    x[0, 3, 3] = float("inf")
    assert torch.equal(lm.mutual_nn_scores(q, x, np.arange(2)), ref_scores(q, x))


def test_worker_threads_leave_the_callers_thread_setting_alone():
    q, x = scene_and_candidates(13, 12, 12, 12, 12, 5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = lm.mutual_nn_scores(q, x, np.arange(5), chunk_size=1)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert torch.equal(lm.mutual_nn_scores(q, x, np.arange(5), chunk_size=2), got)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, ref_scores(q, x))


def test_empty_candidate_list():
    q = torch.randn(100, C)
    out = lm.mutual_nn_scores(q, np.zeros((3, 100, C), np.float32), np.array([], dtype=np.int64))
    assert out.shape == (0,) and out.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(100, C)
    store = np.zeros((3, 100, C), np.float32)
    with pytest.raises(ValueError, match="candidate_indices"):
        lm.mutual_nn_scores(q, store, np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="not in the database"):
        lm.mutual_nn_scores(q, store, np.array([5]))
    with pytest.raises(ValueError, match="negative"):
        lm.mutual_nn_scores(q, store, np.array([-1]))
    with pytest.raises(ValueError, match="channels"):
        lm.mutual_nn_scores(torch.randn(100, 64), store, np.array([0]))
    with pytest.raises(ValueError, match=r"\(L, C\) or \(h, w, C\)"):
        lm.mutual_nn_scores(torch.randn(2, 3, 4, 5), store, np.array([0]))
    with pytest.raises(ValueError, match="chunk_size"):
        lm.mutual_nn_scores(q, store, np.array([0]), chunk_size=0)


# ------------------------------------------------------------------------------------------------
# Order
# ------------------------------------------------------------------------------------------------
def test_rerank_is_numpy_argsort_reversed_on_float32():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=40).astype(np.float64)  # many ties
    want = np.argsort(scores.astype(np.float32))[::-1]
    assert np.array_equal(lm.rerank(scores), want)
    assert np.array_equal(lm.rerank(torch.tensor(scores, dtype=torch.float32)), want)
    q, x = scene_and_candidates(10, 15, 15, 15, 15, 6)
    s = lm.mutual_nn_scores(q, x, np.arange(6))
    order = lm.rerank(s)
    assert np.array_equal(order, np.argsort(s.numpy())[::-1])
    assert s[order[0]] == s.max()


# ------------------------------------------------------------------------------------------------
# Pairs (match pictures)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast_path", [None, False])
def test_mutual_nn_pairs_equal_reference(fast_path):
    q, x = scene_and_candidates(11, 25, 25, 20, 22, 2)
    a, b = x[0], q
    ia, ib = lm.mutual_nn_pairs(a.view(20, 22, C), b.view(25, 25, C), fast_path=fast_path)
    ra, rb = ref_pairs(a, b)
    assert ia.dtype == torch.long and ib.dtype == torch.long
    assert torch.equal(ia, ra) and torch.equal(ib, rb)
    assert len(ia) > 50
    # Swapping the roles gives the same pairs, swapped.
    ja, jb = lm.mutual_nn_pairs(b, a, fast_path=fast_path)
    assert sorted(zip(jb.tolist(), ja.tolist())) == sorted(zip(ia.tolist(), ib.tolist()))


# ------------------------------------------------------------------------------------------------
# Training similarity
# ------------------------------------------------------------------------------------------------
def test_mutual_nn_similarity_value_and_gradient():
    q, x = scene_and_candidates(12, 14, 14, 14, 14, 3)
    qb = q.view(1, 14, 14, C).repeat(3, 1, 1, 1).requires_grad_(True)
    xb = x.view(3, 14, 14, C).clone().requires_grad_(True)
    sim = lm.mutual_nn_similarity(qb, xb)
    want = ref_similarity(qb.detach().view(3, -1, C), xb.detach().view(3, -1, C))
    assert sim.shape == (3,)
    assert torch.allclose(sim, want, rtol=1e-6, atol=1e-6)
    sim.sum().backward()
    for g in (qb.grad, xb.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_mutual_nn_similarity_one_pair_and_nan():
    # Constant features: one mutual pair (0, 0) -> its similarity (not the aligned-position mean).
    q = torch.full((1, 50, C), 0.1)
    x = torch.cat([torch.full((1, 1, C), 0.2), torch.full((1, 49, C), 0.05)], dim=1)
    sim = lm.mutual_nn_similarity(q, x)
    assert torch.allclose(sim, torch.tensor([0.2 * 0.1 * C]))
    # Non-finite input: NaN in, NaN out (never a silently finite loss).
    xn = x.clone()
    xn[0, :, 0] = float("nan")
    assert torch.isnan(lm.mutual_nn_similarity(q, xn)).all()


def test_mutual_nn_similarity_shape_errors():
    with pytest.raises(ValueError, match="batch size"):
        lm.mutual_nn_similarity(torch.randn(2, 10, C), torch.randn(3, 10, C))


# ------------------------------------------------------------------------------------------------
# Run-time exactness self-check of the tiled products, and its fallback
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_self_check(monkeypatch):
    """Empty self-check cache and path records, so that this test's check and logs really run."""
    monkeypatch.setattr(self_check, "_TILE_CHECK", {})
    monkeypatch.setattr(self_check, "_PATHS", {})
    monkeypatch.setattr(self_check, "_PATHS_LOGGED", set())


def _one_ulp_off_on_tiles():
    """A float32 matmul that agrees with torch's on the whole product (3-D, the reference) but is
    one ulp off in one entry of every 2-D tile: a BLAS whose tile kernels sum differently."""
    real = torch.matmul

    def matmul(a, b):
        out = real(a, b)
        if out.dim() == 2:
            out = out.clone()
            out[0, 0] = torch.nextafter(out[0, 0], torch.tensor(float("inf")))
        return out

    return matmul


def test_self_check_passes_here_and_the_log_names_the_path(fresh_self_check, caplog):
    q, x = scene_and_candidates(21, 61, 61, 61, 61, 2)
    with caplog.at_level("INFO"):
        got = lm.mutual_nn_scores(q, x, np.arange(2), fast_path=False)
    assert torch.equal(got, ref_scores(q, x))
    assert lm.engine_paths() == {"cpu 3721x128 vs 3721x128": f"{lm.PATH_TILED} (tile self-check passed)"}
    text = caplog.text
    assert "self-check on cpu" in text and "passed" in text and "bit-identical" in text
    assert f"path {lm.PATH_TILED}" in text
    ok, detail = lm.tile_self_check(candidate_positions=3721, query_positions=3721, channels=C, screen=True)
    assert ok, detail


def test_self_check_sees_a_one_ulp_difference(fresh_self_check, monkeypatch):
    monkeypatch.setattr(self_check, "_tile_check_matmul", _one_ulp_off_on_tiles())
    ok, detail = lm.tile_self_check(candidate_positions=300, query_positions=250, channels=C)
    assert not ok
    assert "row tile 0:" in detail and "differs from the whole product" in detail
    # Cached per shape: the same answer without recomputation, another shape is checked anew.
    assert lm.tile_self_check(candidate_positions=300, query_positions=250, channels=C) == (ok, detail)
    monkeypatch.setattr(self_check, "_tile_check_matmul", torch.matmul)
    assert lm.tile_self_check(candidate_positions=300, query_positions=250, channels=C) == (ok, detail)
    assert lm.tile_self_check(candidate_positions=301, query_positions=250, channels=C)[0]


def test_path_race_alternates_skips_warm_up_and_keeps_the_faster():
    """The timing race between the screen and the float32 tiles: chunks alternate, each path's
    first chunk (one-time checks) is not counted, the lower time per candidate wins, and after
    the decision every chunk takes the winner."""
    race = engine._PathRace()
    race.RACE_CANDIDATES = 8
    order = []
    for _ in range(6):
        screen = race.pick(4)
        order.append(screen)
        # Warm-up chunks are slow on both sides; then the screen takes 3 s, the tiles 1 s a chunk.
        seconds = 100.0 if order.count(screen) == 1 else (3.0 if screen else 1.0)
        decided = race.record(screen, seconds, 4)
    assert order == [True, False, True, False, True, False]
    assert decided and race.winner is False
    assert "timing 16 candidates" in race.how and "750.0 ms" in race.how and "250.0 ms" in race.how
    assert [race.pick(4) for _ in range(3)] == [False, False, False]
    assert not race.record(True, 0.001, 4)  # decided once: later timings change nothing
    assert race.winner is False
    # The other way round, and a withdrawn path hands the race to the other one.
    fast_screen = engine._PathRace()
    fast_screen.RACE_CANDIDATES = 4
    for seconds in (9.0, 9.0, 1.0, 2.0):
        fast_screen.record(fast_screen.pick(4), seconds, 4)
    assert fast_screen.winner is True
    withdrawn = engine._PathRace()
    withdrawn.withdraw(True)
    assert withdrawn.winner is False and withdrawn.pick(4) is False


def test_raced_paths_give_the_reference_scores_and_the_log_names_the_choice(fresh_self_check, monkeypatch, caplog):
    """fast_path=None where the screen is available (forced here, so that the race runs on any
    CPU): candidates go through both paths while they are timed, then through the winner; every
    score equals the full-matrix reference, near-ties included, and the log states the choice."""
    monkeypatch.setattr(engine, "bf16_available", lambda device: True)
    monkeypatch.setattr(engine, "_RACES", {})
    monkeypatch.setattr(engine._PathRace, "RACE_CANDIDATES", 4)
    q, x = scene_and_candidates(31, 20, 20, 20, 20, 24)
    q, x = q.clone(), x.clone()
    x[1, 50:60] = torch.nextafter(x[1, 0:10], torch.full_like(x[1, 0:10], 2.0))  # one-ulp near-ties
    x[2, 100:110] = x[2, 0:10]  # exact ties
    with caplog.at_level("INFO"):
        got = lm.mutual_nn_scores(q, x, np.arange(24), chunk_size=4)
    assert torch.equal(got, ref_scores(q, x))
    race = engine._RACES[("cpu", 400, 400, C, 512)]
    assert race.winner is not None and "chosen by timing" in race.how
    assert f"timing {race.candidates[True] + race.candidates[False]} candidates" in caplog.text
    assert lm.engine_paths()["cpu 400x128 vs 400x128"].endswith(f"({race.how})")


@pytest.mark.parametrize("fast_path", [True, False])
def test_failed_self_check_falls_back_to_the_full_product(fresh_self_check, monkeypatch, caplog, fast_path):
    """The check is forced to fail (a one-ulp disagreement between tile and whole products); the
    tiled engine must then never run (it raises here) and the scores must still equal the
    full-matrix reference, near-ties included; the log names the path in use."""
    monkeypatch.setattr(self_check, "_tile_check_matmul", _one_ulp_off_on_tiles())

    def tiled_must_not_run(*args, **kwargs):
        raise AssertionError("the tiled engine ran although its self-check failed")

    monkeypatch.setattr(engine, "_nn_tiled", tiled_must_not_run)
    q, x = scene_and_candidates(22, 61, 61, 61, 61, 3)
    q, x = q.clone(), x.clone()
    x[1, 500:600] = torch.nextafter(x[1, 0:100], torch.full_like(x[1, 0:100], 2.0))  # one-ulp near-ties
    x[2, 1000:1100] = x[2, 0:100]  # exact ties
    with caplog.at_level("INFO"):
        got = lm.mutual_nn_scores(q, x, np.arange(3), chunk_size=2, fast_path=fast_path)
    assert torch.equal(got, ref_scores(q, x))
    path = f"{lm.PATH_PLAIN} (tile self-check failed)"
    assert lm.engine_paths() == {"cpu 3721x128 vs 3721x128": path}
    assert "FAILED" in caplog.text and f"path {path}" in caplog.text
    # The training similarity and the match pairs go through the same dispatcher.
    ia, ib = lm.mutual_nn_pairs(x[1], q, fast_path=fast_path)
    want_a, want_b = ref_pairs(x[1], q)
    assert torch.equal(ia, want_a) and torch.equal(ib, want_b)


def test_plain_path_is_logged_for_small_inputs(fresh_self_check, caplog):
    q = torch.randn(40, C)
    x = torch.randn(2, 30, C)
    with caplog.at_level("INFO"):
        assert torch.equal(lm.mutual_nn_scores(q, x, np.arange(2)), ref_scores(q, x))
    assert lm.engine_paths()["cpu 30x128 vs 40x128"].startswith(f"{lm.PATH_PLAIN} (query with fewer than 64")
    assert "path plain-fp32" in caplog.text


# ------------------------------------------------------------------------------------------------
# The GPU engine (device_engine.py), run on the CPU with gpu_engine=True: the same code, the screen's
# bfloat16 product emulated in float32 (exact products, float32 accumulation: what the bound assumes)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def recomputed(monkeypatch):
    """Counts of the rows and (candidate, column) pairs the GPU engine recomputed exactly."""
    counts = {"rows": 0, "columns": 0}
    rows, columns = device_engine._exact_rows, device_engine._exact_columns

    def count_rows(xs, pairs, q, row_tile):
        counts["rows"] += pairs.shape[0]
        return rows(xs, pairs, q, row_tile)

    def count_columns(xs, pairs, q):
        counts["columns"] += pairs.shape[0]
        return columns(xs, pairs, q)

    monkeypatch.setattr(device_engine, "_exact_rows", count_rows)
    monkeypatch.setattr(device_engine, "_exact_columns", count_columns)
    return counts


def _gpu_engine_results(q, x, chunk_size=3, row_tile=64):
    """(nn12, mutual) of every candidate from the GPU engine, forced on the CPU."""
    return list(engine.matches(q, list(x), chunk_size=chunk_size, row_tile=row_tile, fast_path=None, gpu_engine=True))


def _assert_gpu_engine_is_the_reference(q, x, **kwargs):
    got = _gpu_engine_results(q, x, **kwargs)
    nn12, nn21 = ref_nn(x, q)
    for k, (got_nn12, got_mutual) in enumerate(got):
        assert torch.equal(got_nn12, nn12[k])  # every row's arg-max, not only the mutual rows'
        assert torch.equal(got_mutual, nn21[k][nn12[k]] == torch.arange(x.shape[1]))
    scores = lm.mutual_nn_scores(q, x, np.arange(x.shape[0]), chunk_size=kwargs.get("chunk_size", 3), gpu_engine=True)
    assert torch.equal(scores, ref_scores(q, x))


@pytest.mark.parametrize("hq,wq,hc,wc,k", [(20, 23, 17, 19, 5), (9, 9, 12, 11, 4)])
def test_gpu_engine_equals_the_reference(hq, wq, hc, wc, k, fresh_self_check, recomputed):
    q, x = scene_and_candidates(1, hq, wq, hc, wc, k)
    _assert_gpu_engine_is_the_reference(q, x)  # groups of 3 and of 2 / 1 candidates
    path = lm.engine_paths()[f"cpu {hc * wc}x{C} vs {hq * wq}x{C}"]
    assert path.startswith(lm.PATH_GPU_SCREENED), path
    assert recomputed["rows"] > 0  # the recomputation ran, and the screen decided most rows
    assert recomputed["rows"] < 2 * 0.25 * k * hc * wc  # (the helper runs the engine twice)


def test_gpu_engine_on_full_size_and_random_features(fresh_self_check, recomputed):
    q, x = scene_and_candidates(7, 61, 61, 61, 61, 2)
    _assert_gpu_engine_is_the_reference(q, x, chunk_size=2, row_tile=512)
    assert 0 < recomputed["rows"] < 2 * 0.1 * 2 * 3721 and recomputed["columns"] > 0  # two runs of 2 x 3721
    gen = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(300, C, generator=gen), dim=1)
    x = F.normalize(torch.randn(4, 250, C, generator=gen), dim=1) * torch.rand(4, 250, 1, generator=gen)
    _assert_gpu_engine_is_the_reference(q, x * 37.0)  # not unit-norm either


def test_gpu_engine_exact_ties_and_one_ulp_near_ties(fresh_self_check, recomputed):
    q, x = scene_and_candidates(4, 20, 20, 20, 20, 3)
    q, x = q.clone(), x.clone()
    q[200:260] = q[100:160]  # exact ties in rows of S
    q[399] = q[0]
    x[:, 300:380] = x[:, 10:90]  # exact ties in columns
    x[1, 399] = x[1, 398]
    x[2, ::2] = x[2, 1::2]
    _assert_gpu_engine_is_the_reference(q, x)
    ties = recomputed["rows"]
    assert ties > 0 and recomputed["columns"] > 0
    for seed in (5, 6):
        q, x = _near_tie_data(seed)
        _assert_gpu_engine_is_the_reference(q, x)
    assert recomputed["rows"] > ties
    # All-equal features: every entry of S ties; the only pair is (0, 0).
    q, x = torch.full((100, C), 0.25), torch.full((2, 90, C), -0.5)
    _assert_gpu_engine_is_the_reference(q, x)


def test_gpu_engine_non_finite_and_small_inputs_take_the_plain_path(fresh_self_check):
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(100, C, generator=gen)
    x = torch.randn(3, 90, C, generator=gen)
    x[1, 5, 7] = float("nan")
    x[2, 3, 3] = float("inf")
    _assert_gpu_engine_is_the_reference(q, x, chunk_size=1)
    assert lm.engine_paths()["cpu 90x128 vs 100x128"].startswith(f"{lm.PATH_PLAIN} (candidate with non-finite")
    small = torch.randn(2, 30, C, generator=gen)
    _assert_gpu_engine_is_the_reference(q, small)
    assert lm.engine_paths()["cpu 30x128 vs 100x128"].startswith(f"{lm.PATH_PLAIN} (candidate with fewer than 64")
    q[0, 0] = float("nan")
    _assert_gpu_engine_is_the_reference(q, x[:1])
    assert "query with non-finite" in lm.engine_paths()["cpu 90x128 vs 100x128"]


@pytest.mark.parametrize("failing", ["self_check", "screen"])
def test_the_self_check_and_the_screen_probe_decide_the_gpu_path(fresh_self_check, monkeypatch, caplog, failing):
    """On any device: a failing tile self-check (the BLAS one ulp off on row tiles) or a screen whose
    arithmetic the bound does not cover (a bfloat16 output) sends the group to the plain path, which
    the log says; the screened engine never runs; the scores are still the reference's."""
    if failing == "self_check":
        monkeypatch.setattr(self_check, "_tile_check_matmul", _one_ulp_off_on_tiles())
    else:
        monkeypatch.setattr(screening, "_FP32_SCREEN_SOUND", {})
        monkeypatch.setattr(screening, "screen_product", lambda a, b: torch.mm(a.float(), b.float()).bfloat16().float())

    def must_not_run(*args, **kwargs):
        raise AssertionError("the screened GPU engine ran although its checks failed")

    monkeypatch.setattr(device_engine, "nn_screened_gpu", must_not_run)
    q, x = _near_tie_data(5)
    with caplog.at_level("INFO"):
        _assert_gpu_engine_is_the_reference(q, x)
    reason = "tile self-check failed" if failing == "self_check" else "failed its soundness check"
    path = lm.engine_paths()["cpu 324x128 vs 324x128"]
    assert path.startswith(lm.PATH_PLAIN) and reason in path, path
    assert f"path {lm.PATH_PLAIN} (" in caplog.text and reason in caplog.text
    if failing == "self_check":
        assert "FAILED" in caplog.text and "gpu engine" in caplog.text


def test_gpu_engine_self_check_passes_here_and_sees_a_one_ulp_difference(fresh_self_check, monkeypatch):
    ok, detail = lm.tile_self_check(
        candidate_positions=250, query_positions=300, channels=C, row_tile=64, gpu_engine=True, batch=3
    )
    assert ok and "bit-identical" in detail, detail
    monkeypatch.setattr(self_check, "_tile_check_matmul", _one_ulp_off_on_tiles())
    ok, detail = lm.tile_self_check(
        candidate_positions=250, query_positions=300, channels=C, row_tile=64, gpu_engine=True, batch=2
    )
    assert not ok and "row tile" in detail
    # The batch size is part of what is checked (cuBLAS picks kernels by it): cached per batch.
    assert lm.tile_self_check(
        candidate_positions=250, query_positions=300, channels=C, row_tile=64, gpu_engine=True, batch=3
    )[0]


def test_gpu_plan_refuses_tf32_products_and_missing_kernels(monkeypatch):
    q = torch.randn(100, C)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        plan, reason = engine._gpu_plan(q, None)
        assert plan is None and "TF32" in reason
    finally:
        torch.set_float32_matmul_precision(before)
    assert engine._gpu_plan(q, None)[0] is not None  # the CPU: the float32 emulation
    assert "fast_path=False" in engine._gpu_plan(q, False)[1]
    # A GPU whose torch has no bfloat16 -> float32 matmul: the plain path unless forced.
    monkeypatch.setitem(screening._NATIVE_BF16_FP32, "meta", False)
    meta = q.to("meta")
    monkeypatch.setattr(engine, "_query_is_safe", lambda query: True)
    plan, reason = engine._gpu_plan(meta, None)
    assert plan is None and "bfloat16 x bfloat16 -> float32" in reason
    assert engine._gpu_plan(meta, True)[0] is not None
    # A GPU without bfloat16 tensor cores (V100, T4): the three bf16 products would be slower than one
    # float32 product there.
    monkeypatch.setitem(screening._NATIVE_BF16_FP32, "cuda", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert screening.screen_unavailable(torch.device("cuda")) == (
        "Tesla V100-SXM2-16GB has no bfloat16 tensor cores (compute capability < 8.0)"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert screening.screen_unavailable(torch.device("cuda")) is None


def test_gpu_engine_runs_on_the_meta_device(monkeypatch):
    """The whole GPU path on `meta` tensors (shapes only; any CPU tensor mixed into the device
    computation raises there), the host synchronisation points faked."""
    monkeypatch.setattr(engine, "tile_self_check", lambda **kwargs: (True, "not run on meta"))
    monkeypatch.setattr(engine, "fp32_screen_is_sound", lambda *args: True)
    monkeypatch.setattr(engine, "_query_is_safe", lambda query: True)
    monkeypatch.setattr(device_engine, "_flag", lambda t: False)
    monkeypatch.setattr(
        device_engine, "_nonzero", lambda m: torch.zeros((5, m.dim()), dtype=torch.long, device=m.device)
    )
    monkeypatch.setattr(device_engine, "_to_host", lambda t: np.array([[0, 3], [0, 7], [1, 2]]))
    monkeypatch.setattr(self_check, "_PATHS", {})
    q = torch.empty(3721, C, device="meta")
    x = torch.empty(5, 3721, C, device="meta")
    scores = lm.mutual_nn_scores(q, x, np.arange(5), chunk_size=2, fast_path=True)
    assert scores.device.type == "meta" and scores.shape == (5,)
    assert lm.engine_paths()["meta 3721x128 vs 3721x128"].startswith(lm.PATH_GPU_SCREENED)


# ------------------------------------------------------------------------------------------------
# The GPU screen's bound and its soundness probe, with emulated accumulators
# ------------------------------------------------------------------------------------------------
def _keep_bits(v: torch.Tensor, bits: int) -> torch.Tensor:
    """float64 values truncated (toward zero) to `bits` significant bits."""
    mant, exp = torch.frexp(v)
    return torch.ldexp(torch.trunc(mant * 2.0**bits) / 2.0**bits, exp)


def _sequential_product(bits: int, output=None):
    """A screen product whose accumulator keeps `bits` bits and truncates after every addition
    (sequential order over the inner dimension), then optionally rounds its output (`output`)."""

    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a64, b64 = a.double(), b.double()
        acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
        for k in range(a.shape[1]):
            acc = _keep_bits(acc + a64[:, k : k + 1] * b64[k : k + 1, :], bits)
        out = acc.float()
        return output(out) if output else out

    return product


def test_bound_of_the_gpu_screen_holds_for_truncating_accumulators():
    """|O - S| <= fp32_output_bound + slack for every entry, with the screen computed by the float32
    emulation and by a 24-bit accumulator that truncates after every addition."""
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(96, C, generator=gen) * 3.0
    x = torch.randn(64, C, generator=gen) * torch.rand(64, 1, generator=gen)
    qs, xs = screening.SplitSide(q), screening.SplitSide(x)
    a, b = xs.operand(screening.X_PARTS, C), qs.operand(screening.Q_PARTS, C).t().contiguous()
    inner = a.shape[1]
    ref = (x @ q.t()).double()
    xn = device_engine.Norms.of(xs).map(lambda t: t.unsqueeze(1))
    qn = device_engine.Norms.of(qs).map(lambda t: t.unsqueeze(0))
    bound = screening.fp32_output_bound(xn, qn, inner=inner, channels=C)
    bound = bound + screening.fp32_output_slack(xn, qn, inner=inner, channels=C)
    errors = {}
    for name, product in (("emulated", screening.screen_product), ("truncating", _sequential_product(24))):
        err = (product(a, b).double() - ref).abs()
        assert (err <= bound).all(), name
        errors[name] = err
    assert (errors["truncating"] > errors["emulated"]).float().mean() > 0.5  # truncation costs more
    # The bound's size is the docstring's: ~2.6e-4 relative (the worst-case accumulation term dominates;
    # real errors, even truncating ones, are ~100x smaller).
    assert (bound <= 3e-4 * xn.n * qn.n).all() and (errors["truncating"] > 0).any()
    # The 3-part split is far tighter than a single bfloat16 product's bound (the CPU screen's).
    single = screening.base_bound(_col(screening.Bf16Side(x)), _row(screening.Bf16Side(q), 96), C)
    assert (bound < 0.25 * single).all()


@pytest.mark.parametrize(
    "accumulator,sound",
    [
        ("float32 emulation", True),
        ("24 bits, truncating", True),
        ("23 bits, truncating", False),
        ("bfloat16 output", False),
        ("bfloat16 partial sums", False),
    ],
)
def test_screen_probe_accepts_truncating_accumulators_iff_the_bound_covers_them(monkeypatch, accumulator, sound):
    products = {
        "float32 emulation": lambda a, b: torch.mm(a.float(), b.float()),
        "24 bits, truncating": _sequential_product(24),
        "23 bits, truncating": _sequential_product(23),
        "bfloat16 output": lambda a, b: torch.mm(a.float(), b.float()).bfloat16().float(),
        "bfloat16 partial sums": lambda a, b: sum(
            torch.mm(a[:, s : s + 32].float(), b[s : s + 32].float()).bfloat16().float()
            for s in range(0, a.shape[1], 32)
        ),
    }
    monkeypatch.setattr(screening, "_FP32_SCREEN_SOUND", {})
    monkeypatch.setattr(screening, "screen_product", products[accumulator])
    assert screening.fp32_screen_is_sound(200, 3 * C, 96, torch.device("cpu")) is sound


def test_gamma_any_order_covers_multi_term_truncating_adders():
    """A tensor-core-like adder: 8 products and the accumulator aligned to the largest, keeping 24
    bits below its leading bit, truncated, then the sum truncated to float32 - on adversarial terms
    (one large, many just below its last kept bit): the error stays within gamma_any_order."""
    gen = torch.Generator().manual_seed(3)
    n = 384
    terms = torch.rand(500, n, generator=gen, dtype=torch.float64) * 2.0**-23
    terms[:, ::9] = 1.0 + torch.rand(500, (n + 8) // 9, generator=gen, dtype=torch.float64)
    acc = torch.zeros(500, dtype=torch.float64)
    for s in range(0, n, 8):
        group = torch.cat([acc.unsqueeze(1), terms[:, s : s + 8]], dim=1)
        ulp = torch.ldexp(torch.ones_like(acc), torch.frexp(group.abs().amax(dim=1))[1] - 24)
        aligned = torch.trunc(group / ulp.unsqueeze(1)) * ulp.unsqueeze(1)
        acc = _keep_bits(aligned.sum(dim=1), 24)
    err = (acc - terms.sum(dim=1)).abs()
    bound = screening.gamma_any_order(n + 1) * terms.abs().sum(dim=1)
    assert (err <= bound).all() and (err > 0).all()  # every sum lost its small terms, within the bound


# ------------------------------------------------------------------------------------------------
# Staging (staging.py): host copies per candidate, counted on the stores and buffers
# ------------------------------------------------------------------------------------------------
class _CountingStore(DenseStore):
    """A DenseStore that counts how its features are taken: read_into (with each destination's
    address) and __getitem__."""

    def __init__(self, folder):
        super().__init__(folder)
        self.reads, self.items = [], 0

    def read_into(self, i, out):
        self.reads.append((int(i), out.ctypes.data, out.nbytes))
        super().read_into(i, out)

    def __getitem__(self, i):
        self.items += 1
        return super().__getitem__(i)


def _counting_store(folder, x):
    store = _CountingStore(folder)
    store.append(x.view(x.shape[0], 12, -1, C).numpy())
    return store.finish()


def _spy_engine(monkeypatch):
    """Replace the engine by one that records the tensors it receives (data pointer, values)."""
    seen = []

    def spy(query, candidates, **kwargs):
        for x in candidates:
            seen.append((x.data_ptr(), x.clone()))
            yield torch.zeros(x.shape[0], dtype=torch.long), torch.ones(x.shape[0], dtype=torch.bool)

    monkeypatch.setattr(lm, "matches", spy)
    return seen


@pytest.mark.parametrize("preadv", [True, False])
def test_disk_store_candidates_are_read_once_straight_into_the_engines_tensors(tmp_path, monkeypatch, preadv):
    """One host copy per candidate from a disk store: one positional read per candidate, written
    directly into the memory of the tensor the engine then reads (so there is no room for another
    copy); the store's __getitem__ (which makes a copy of its own) is never used."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 144, C, generator=gen)
    store = _counting_store(str(tmp_path), x)
    syscalls = []
    real_preadv, real_pread = getattr(os, "preadv", None), os.pread
    if preadv and real_preadv is not None:
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: syscalls.append(1) or real_preadv(fd, bufs, off))
    monkeypatch.setattr(os, "pread", lambda fd, n, off: syscalls.append(1) or real_pread(fd, n, off))
    if not preadv:  # a platform without os.preadv: still one read per candidate (plus one copy)
        monkeypatch.setattr(sys.modules["dense_store"], "_PREADV", False)
    seen = _spy_engine(monkeypatch)
    order = [4, 0, 4, 2]
    lm.mutual_nn_scores(torch.randn(100, C), store, np.array(order), chunk_size=2)
    assert store.items == 0
    assert [i for i, _, _ in store.reads] == order and len(syscalls) == len(order)
    for (i, address, nbytes), (pointer, values) in zip(store.reads, seen):
        assert nbytes == 144 * C * 4 and torch.equal(values, x[i])
        if preadv:
            assert address == pointer  # the read's destination is the engine's tensor
    store.close()


def test_ram_store_candidates_reach_the_cpu_engine_without_a_copy(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 144, C, generator=gen)
    store = _counting_store(None, x)
    seen = _spy_engine(monkeypatch)
    lm.mutual_nn_scores(torch.randn(100, C), store, np.array([3, 1, 3]), chunk_size=2)
    assert store.reads == []
    for i, (pointer, values) in zip([3, 1, 3], seen):
        assert pointer == store._arrays[i].ctypes.data and torch.equal(values, x[i])  # the stored array itself
    # A numpy array store: in place when float32 and writable; one copy (with the float32 conversion)
    # when it is a read-only memory map or float16.
    seen.clear()
    array = x.numpy().copy()
    lm.mutual_nn_scores(torch.randn(100, C), array, np.array([2]))
    assert seen[0][0] == array[2].ctypes.data
    seen.clear()
    lm.mutual_nn_scores(torch.randn(100, C), array.astype(np.float16), np.array([2]))
    assert seen[0][0] != array[2].ctypes.data and torch.equal(seen[0][1], torch.from_numpy(array[2]).half().float())


class _FakeEvent:
    """A CUDA event stand-in: done once the fake device has run `lag` more transfers, or when waited
    for; remembers whether it was waited for."""

    clock = 0

    def __init__(self, lag):
        self.due = _FakeEvent.clock + lag
        self.waited = False

    def query(self):
        return _FakeEvent.clock >= self.due

    def synchronize(self):
        self.waited = True
        self.due = min(self.due, _FakeEvent.clock)


@pytest.mark.parametrize("on_disk", [True, False])
def test_device_staging_reuses_a_buffer_only_after_its_transfer_is_done(tmp_path, monkeypatch, on_disk):
    """The device path (on `meta`, with fake CUDA events): one host copy per candidate (the read into
    a staging buffer), at most `buffers` buffers, and a buffer is refilled only once the event behind
    its previous transfer says that transfer is done (else the stager waits for it)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 144, C, generator=gen)
    store = _counting_store(str(tmp_path) if on_disk else None, x)
    events = {}  # buffer address -> the event of its last transfer
    refills_in_flight = []
    real_read = store.read_into

    def read_into(i, out):
        event = events.get(out.ctypes.data)
        refills_in_flight.append(event is not None and not event.query())
        real_read(i, out)

    monkeypatch.setattr(store, "read_into", read_into)
    _FakeEvent.clock = 0
    made = []

    def new_event(device):
        made.append(_FakeEvent(lag=6))
        return made[-1]

    def record(event, device):
        _FakeEvent.clock += 1

    monkeypatch.setattr(staging, "_new_event", new_event)
    monkeypatch.setattr(staging, "_record", record)
    real_deliver = staging.CandidateStager._deliver

    def deliver(self, k, shape, slot, work):
        out = real_deliver(self, k, shape, slot, work)
        events[slot.host.data_ptr()] = slot.event
        return out

    monkeypatch.setattr(staging.CandidateStager, "_deliver", deliver)
    with staging.CandidateStager(store, list(range(9)) * 2, torch.device("meta"), buffers=4, readers=2) as stager:
        got = list(stager)
        assert len(stager.slots) <= 4
    assert len(got) == 18 and all(t.device.type == "meta" and t.shape == (144, C) for t in got)
    assert store.items == 0 and len(store.reads) == 18  # one copy (the read) per candidate
    assert not any(refills_in_flight)
    assert any(e.waited for e in made)  # 4 buffers, a device 6 transfers behind: it had to wait
