"""Tests of mining.py: invariants of every mode on fake descriptors, RNG order, errors, the `full` cache.

The fake data set is a plain namespace with the attributes mining reads; positives are computed here
by brute force from random UTMs, and descriptors are a random table indexed by global index.
"""

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mining

DB_NUM, Q_NUM, DIM = 40, 12, 8


def fake_dataset(seed=0, negs=2, night=None, sideways=None):
    rng = np.random.default_rng(seed)
    db_utms = rng.uniform(0, 200, size=(DB_NUM, 2))
    # Every query close to some database image, so each has a hard positive (10 m).
    q_utms = db_utms[rng.choice(DB_NUM, Q_NUM, replace=False)] + rng.uniform(-4, 4, size=(Q_NUM, 2))
    d2 = ((q_utms[:, None] - db_utms[None]) ** 2).sum(-1)
    hard = [np.flatnonzero(row <= 10**2) for row in d2]
    soft = [np.flatnonzero(row <= 25**2) for row in d2]
    assert all(len(h) for h in hard)
    return SimpleNamespace(
        database_num=DB_NUM,
        queries_num=Q_NUM,
        negs_num_per_query=negs,
        hard_positives_per_query=hard,
        soft_positives_per_query=soft,
        is_night=np.zeros(Q_NUM, bool) if night is None else np.asarray(night),
        is_sideways=np.zeros(Q_NUM, bool) if sideways is None else np.asarray(sideways),
        triplets_global_indexes=np.empty((0, 2 + negs), dtype=np.int64),
    )


class RecordingDescriptors:
    """descriptors_fn over a fixed random table, recording the indexes it is asked for."""

    def __init__(self, seed=1, table=None):
        self.table = (
            np.random.default_rng(seed).normal(size=(DB_NUM + Q_NUM, DIM)).astype(np.float32)
            if table is None
            else table
        )
        self.calls = []

    def __call__(self, global_indexes):
        self.calls.append(np.array(global_indexes))
        return self.table[global_indexes]


def l2(table, a, bs):
    return np.linalg.norm(table[np.asarray(bs)] - table[a], axis=1)


def nearest(table, a, candidates, k):
    candidates = np.asarray(candidates)
    return candidates[np.argsort(l2(table, a, candidates), kind="stable")[:k]]


def check_common(ds, triplets, desc, cache_refresh_rate, negs):
    """Invariants shared by every mode."""
    assert triplets.shape == (cache_refresh_rate, 2 + negs) and triplets.dtype == np.int64
    assert ds.triplets_global_indexes is triplets
    queries = triplets[:, 0] - DB_NUM
    assert len(set(queries.tolist())) == cache_refresh_rate and queries.min() >= 0 and queries.max() < Q_NUM
    for row in triplets:
        q = row[0] - DB_NUM
        assert row[1] in ds.hard_positives_per_query[q]
        assert row[1] == nearest(desc.table, row[0], ds.hard_positives_per_query[q], 1)[0]
        negatives = row[2:]
        assert len(set(negatives.tolist())) == negs and (negatives < DB_NUM).all() and (negatives >= 0).all()
        assert not set(negatives.tolist()) & set(ds.soft_positives_per_query[q].tolist())
    assert len(desc.calls) == 1
    asked = desc.calls[0]
    assert len(asked) == len(set(asked.tolist())), "each image's descriptor is computed once"
    return queries, asked


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


def test_pure_selection_functions():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(30, 6)).astype(np.float32)
    candidates = rng.permutation(np.arange(1, 30))[:17]
    got = mining.hardest_negatives(table[0], table[candidates], candidates, 4)
    assert got.tolist() == nearest(table, 0, candidates, 4).tolist()
    assert mining.best_positive(table[0], table[candidates], candidates) == nearest(table, 0, candidates, 1)[0]
    with pytest.raises(ValueError, match="--negs_num_per_query=18"):
        mining.hardest_negatives(table[0], table[candidates], candidates, 18)
    # Order of the candidates is kept (draw order matters to `random` mining).
    assert mining.remove_soft_positives(np.array([9, 3, 7, 1, 5]), np.array([7, 2])).tolist() == [9, 3, 1, 5]


def test_msls_weights():
    night = np.array([True, False, False, False, False])
    side = np.array([False, True, True, False, True])
    w = mining.msls_query_weights(night, side)
    q = len(night)
    expected = 1 + night * q / night.sum() + side * q / side.sum()
    np.testing.assert_allclose(w, expected / expected.sum())
    assert abs(w.sum() - 1) < 1e-12 and w[0] > w[1] > w[3]
    with pytest.raises(ValueError, match="msls_weighted.*0 night"):
        mining.msls_query_weights(np.zeros(5, bool), side)
    with pytest.raises(ValueError, match="0 sideways"):
        mining.msls_query_weights(night, np.zeros(5, bool))


# ----------------------------------------------------------------------------------------------
# The four modes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["partial", "msls_weighted"])
def test_partial_and_msls_weighted(mode):
    night = np.arange(Q_NUM) % 4 == 0
    side = np.arange(Q_NUM) % 3 == 0
    ds, desc = fake_dataset(night=night, sideways=side), RecordingDescriptors()
    np.random.seed(5)
    triplets = mining.mine_triplets(
        ds, mode=mode, descriptors_fn=desc, cache_refresh_rate=6, neg_samples_num=15, negs_num_per_query=2
    )
    queries, asked = check_common(ds, triplets, desc, 6, 2)
    # Replay the draws in the public release's order: queries (weighted for msls), then the database sample.
    np.random.seed(5)
    p = mining.msls_query_weights(night, side) if mode == "msls_weighted" else None
    expected_queries = np.random.choice(Q_NUM, 6, replace=False, p=p)
    sampled_db = np.random.choice(DB_NUM, 15, replace=False)
    assert queries.tolist() == expected_queries.tolist()
    positives = np.concatenate([ds.hard_positives_per_query[q] for q in queries])
    assert set(asked.tolist()) == set(sampled_db.tolist()) | set(positives.tolist()) | set((queries + DB_NUM).tolist())
    for row in triplets:
        q = row[0] - DB_NUM
        candidates = [d for d in sampled_db if d not in ds.soft_positives_per_query[q]]
        assert row[2:].tolist() == nearest(desc.table, row[0], candidates, 2).tolist()


def test_msls_weighted_prefers_rare_queries():
    night = np.arange(Q_NUM) == 0
    side = np.arange(Q_NUM) == 1
    ds = fake_dataset(night=night, sideways=side)
    counts = np.zeros(Q_NUM)
    np.random.seed(0)
    for _ in range(30):
        t = mining.mine_triplets(
            ds,
            mode="msls_weighted",
            descriptors_fn=RecordingDescriptors(),
            cache_refresh_rate=1,
            neg_samples_num=DB_NUM,
            negs_num_per_query=2,
        )
        counts[t[0, 0] - DB_NUM] += 1
    # Weight of queries 0 and 1: 1 + 12 = 13 each, others 1: they are drawn about 13x more often.
    assert counts[0] + counts[1] > counts[2:].sum()


def test_full_mining_and_negative_cache():
    ds, desc = fake_dataset(), RecordingDescriptors()
    state = mining.MiningState(Q_NUM)
    np.random.seed(11)
    triplets = mining.mine_triplets(
        ds,
        mode="full",
        descriptors_fn=desc,
        cache_refresh_rate=5,
        neg_samples_num=10,
        negs_num_per_query=2,
        state=state,
    )
    queries, asked = check_common(ds, triplets, desc, 5, 2)
    assert sorted(asked.tolist()) == list(range(DB_NUM)) + sorted((queries + DB_NUM).tolist())
    np.random.seed(11)
    assert np.random.choice(Q_NUM, 5, replace=False).tolist() == queries.tolist()
    for row in triplets:  # per query draw, after the query sample, in query order
        q = row[0] - DB_NUM
        fresh = np.random.choice(DB_NUM, 10, replace=False)
        candidates = [d for d in fresh if d not in ds.soft_positives_per_query[q]]
        assert row[2:].tolist() == nearest(desc.table, row[0], candidates, 2).tolist()
        assert state.neg_cache[q].tolist() == row[2:].tolist()
    untouched = sorted(set(range(Q_NUM)) - set(queries.tolist()))
    assert all(len(state.neg_cache[q]) == 0 for q in untouched)


def test_full_mining_carries_previous_hardest_negatives():
    ds = fake_dataset()
    table = np.random.default_rng(2).normal(size=(DB_NUM + Q_NUM, DIM)).astype(np.float32) * 10
    state = mining.MiningState(Q_NUM)
    planted, used = {}, set()
    for q in range(Q_NUM):
        # Two non-soft database images (distinct across queries) cached as the previous hardest negatives,
        # and made the query's nearest in descriptor space.
        non_soft = [d for d in range(DB_NUM) if d not in ds.soft_positives_per_query[q] and d not in used]
        planted[q] = non_soft[-2:]
        used.update(planted[q])
        state.neg_cache[q] = np.array(planted[q], dtype=np.int64)
        for j, d in enumerate(planted[q]):
            table[d] = table[DB_NUM + q] + 0.01 * (j + 1)
    desc = RecordingDescriptors(table=table)
    np.random.seed(0)
    triplets = mining.mine_triplets(
        ds,
        mode="full",
        descriptors_fn=desc,
        cache_refresh_rate=Q_NUM,
        neg_samples_num=3,
        negs_num_per_query=2,
        state=state,
    )
    check_common(ds, triplets, desc, Q_NUM, 2)
    for row in triplets:
        q = row[0] - DB_NUM
        assert sorted(row[2:].tolist()) == sorted(planted[q])
    # Without the cache the small fresh draws (3 images) would rarely contain both planted images.
    np.random.seed(0)
    fresh_only = mining.mine_triplets(
        ds,
        mode="full",
        descriptors_fn=RecordingDescriptors(table=table),
        cache_refresh_rate=Q_NUM,
        neg_samples_num=3,
        negs_num_per_query=2,
        state=mining.MiningState(Q_NUM),
    )
    assert sum(sorted(r[2:].tolist()) != sorted(planted[r[0] - DB_NUM]) for r in fresh_only) > Q_NUM // 2


def test_random_mining():
    ds, desc = fake_dataset(negs=3), RecordingDescriptors()
    np.random.seed(4)
    triplets = mining.mine_triplets(
        ds, mode="random", descriptors_fn=desc, cache_refresh_rate=7, neg_samples_num=10**6, negs_num_per_query=3
    )  # unused by random
    queries, asked = check_common(ds, triplets, desc, 7, 3)
    positives = np.concatenate([ds.hard_positives_per_query[q] for q in queries])
    assert set(asked.tolist()) == set(positives.tolist()) | set((queries + DB_NUM).tolist())
    np.random.seed(4)
    assert np.random.choice(Q_NUM, 7, replace=False).tolist() == queries.tolist()
    for row in triplets:
        q = row[0] - DB_NUM
        soft = ds.soft_positives_per_query[q]
        drawn = np.random.choice(DB_NUM, size=3 + len(soft), replace=False)
        assert row[2:].tolist() == [d for d in drawn if d not in soft][:3]


# ----------------------------------------------------------------------------------------------
# Errors and state
# ----------------------------------------------------------------------------------------------


def test_errors_leave_rng_untouched():
    ds = fake_dataset()
    np.random.seed(9)
    before = np.random.get_state()[1].copy()
    kwargs = dict(descriptors_fn=RecordingDescriptors(), negs_num_per_query=2)
    with pytest.raises(ValueError, match=rf"--cache_refresh_rate=13 .* {Q_NUM} training queries"):
        mining.mine_triplets(ds, mode="partial", cache_refresh_rate=13, neg_samples_num=5, **kwargs)
    with pytest.raises(ValueError, match=rf"--neg_samples_num=41 .* {DB_NUM} database images"):
        mining.mine_triplets(ds, mode="partial", cache_refresh_rate=2, neg_samples_num=41, **kwargs)
    with pytest.raises(ValueError, match=r"--neg_samples_num=41"):
        mining.mine_triplets(
            ds, mode="full", cache_refresh_rate=2, neg_samples_num=41, state=mining.MiningState(Q_NUM), **kwargs
        )
    with pytest.raises(ValueError, match="msls_weighted needs night and sideways"):
        mining.mine_triplets(ds, mode="msls_weighted", cache_refresh_rate=2, neg_samples_num=5, **kwargs)
    with pytest.raises(ValueError, match="state=MiningState"):
        mining.mine_triplets(ds, mode="full", cache_refresh_rate=2, neg_samples_num=5, **kwargs)
    with pytest.raises(ValueError, match="another data set"):
        mining.mine_triplets(
            ds, mode="full", cache_refresh_rate=2, neg_samples_num=5, state=mining.MiningState(Q_NUM + 1), **kwargs
        )
    with pytest.raises(ValueError, match="--mining 'hard'"):
        mining.mine_triplets(ds, mode="hard", cache_refresh_rate=2, neg_samples_num=5, **kwargs)
    assert np.array_equal(np.random.get_state()[1], before)
    assert kwargs["descriptors_fn"].calls == []


def test_too_few_negative_candidates():
    ds = fake_dataset()
    # Every database image is a soft positive of every query: no negative candidate is left.
    ds.soft_positives_per_query = [np.arange(DB_NUM) for _ in range(Q_NUM)]
    for mode, state in (("partial", None), ("full", mining.MiningState(Q_NUM))):
        with pytest.raises(ValueError, match="raise --neg_samples_num"):
            mining.mine_triplets(
                ds,
                mode=mode,
                descriptors_fn=RecordingDescriptors(),
                cache_refresh_rate=2,
                neg_samples_num=5,
                negs_num_per_query=2,
                state=state,
            )
    with pytest.raises(ValueError, match="lower --negs_num_per_query"):
        mining.mine_triplets(
            ds,
            mode="random",
            descriptors_fn=RecordingDescriptors(),
            cache_refresh_rate=2,
            neg_samples_num=5,
            negs_num_per_query=2,
        )


def test_bad_descriptors():
    ds = fake_dataset()
    with pytest.raises(ValueError, match="descriptors_fn returned shape"):
        mining.mine_triplets(
            ds,
            mode="partial",
            descriptors_fn=lambda idx: np.zeros((len(idx) - 1, 4), np.float32),
            cache_refresh_rate=2,
            neg_samples_num=5,
            negs_num_per_query=2,
        )
    with pytest.raises(ValueError, match="NaN"):
        mining.mine_triplets(
            ds,
            mode="partial",
            descriptors_fn=lambda idx: np.full((len(idx), 4), np.nan, np.float32),
            cache_refresh_rate=2,
            neg_samples_num=5,
            negs_num_per_query=2,
        )


def test_mining_state_roundtrip(tmp_path):
    state = mining.MiningState(4)
    state.neg_cache[1] = np.array([5, 3], dtype=np.int64)
    state.neg_cache[3] = np.array([7, 8], dtype=np.int64)
    path = os.path.join(str(tmp_path), "state.pth")
    torch.save({"mining_state": state.state_dict()}, path)
    loaded = mining.MiningState.from_state_dict(torch.load(path, weights_only=True)["mining_state"])
    assert [c.tolist() for c in loaded.neg_cache] == [[], [5, 3], [], [7, 8]]
    unpickled = pickle.loads(pickle.dumps(state))
    assert [c.tolist() for c in unpickled.neg_cache] == [c.tolist() for c in state.neg_cache]


# ----------------------------------------------------------------------------------------------
# With a real TripletsDataset on disk
# ----------------------------------------------------------------------------------------------


def test_mining_on_a_real_triplets_dataset(tmp_path):
    from PIL import Image

    import datasets_ws as dw

    rng = np.random.default_rng(0)
    folder = tmp_path / "toy" / "images" / "train"
    for split, coords in (
        ("database", [(i * 30.0, 0.0) for i in range(8)]),
        ("queries", [(i * 30.0 + 2.0, 0.0) for i in range(0, 8, 2)]),
    ):
        os.makedirs(folder / split)
        for e, n in coords:
            name = f"@{500000 + e}@{4000000 + n}@10@S@@@@@@@@@@@.jpg"
            Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(folder / split / name)
    ds = dw.TripletsDataset(str(tmp_path), "toy", "train", resize=(8, 8), negs_num_per_query=2)

    def descriptors_fn(global_indexes):  # a stand-in "model": mean colour of the hard-resized image
        subset = dw.ImagesSubset(ds, global_indexes)
        return np.stack([subset[k][0].mean(dim=(1, 2)).numpy() for k in range(len(subset))]).astype(np.float32)

    np.random.seed(0)
    triplets = mining.mine_triplets(
        ds, mode="partial", descriptors_fn=descriptors_fn, cache_refresh_rate=4, neg_samples_num=6, negs_num_per_query=2
    )
    assert len(ds) == 4 and triplets[:, 0].min() >= ds.database_num
    images, local, global_ = ds[0]
    assert images.shape == (4, 3, 8, 8) and global_.tolist() == triplets[0].tolist()
    batch = dw.collate_fn([ds[i] for i in range(4)])
    assert batch[0].shape == (16, 3, 8, 8) and batch[1].shape == (8, 3)
