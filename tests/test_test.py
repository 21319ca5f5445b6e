"""test.py: recalls, crop merging, majority voting, the dense store, extraction and evaluation."""
import os

import numpy as np
import pytest

import test


def test_recalls_against_hand_computed_values():
    predictions = [np.array([3, 1, 2, 0]), np.array([0, 2, 5, 4]), np.array([7, 6, 5, 4]), np.array([1, 2, 3, 4])]
    positives = [np.array([3]), np.array([5]), np.array([], dtype=int), np.array([9])]
    # query 0 hit at rank 1, query 1 at rank 3, query 2 has no positive (a miss), query 3 misses.
    recalls = test.compute_recalls(predictions, positives, [1, 2, 3, 10])
    assert np.allclose(recalls, [25.0, 25.0, 50.0, 50.0])
    assert test.recalls_to_str(recalls, [1, 2, 3, 10]) == "R@1: 25.0, R@2: 25.0, R@3: 50.0, R@10: 50.0"


def test_recall_values_above_the_list_are_capped():
    recalls = test.compute_recalls([np.array([4, 5])], [np.array([5])], [1, 5, 10])
    assert np.allclose(recalls, [0.0, 100.0, 100.0])


def test_merge_crop_candidates_keeps_nearest_occurrence_once():
    distances = np.array([[0.5, 0.9], [0.1, 0.7], [0.3, 0.4], [0.2, 0.95], [0.6, 0.8]])
    predictions = np.array([[1, 2], [3, 1], [2, 4], [1, 3], [5, 6]])
    merged = test.merge_crop_candidates(distances, predictions, 4)
    assert merged.tolist() == [3, 1, 2, 4]


def test_majority_voting_lowers_recurring_candidates():
    predictions = np.array([[1, 2], [1, 3], [4, 1], [5, 6], [7, 8]])
    distances = np.ones((5, 2))
    out = test.majority_voting(distances, predictions, 0.3)
    # candidate 1: top-1 window twice (0.3*2/1); top-5 and top-10 windows (all columns) three times
    # (0.3*3/5 and 0.3*3/10)
    lowered = 0.3 * 2 / 1 + 0.3 * 3 / 5 + 0.3 * 3 / 10
    assert np.isclose(out[0, 0], 1 - lowered) and np.isclose(out[1, 0], 1 - lowered)
    assert np.isclose(out[2, 1], 1 - 0.3 * 3 / 5 - 0.3 * 3 / 10)  # not in a top-1 window
    assert np.isclose(out[3, 0], 1.0) and np.array_equal(distances, np.ones((5, 2)))


@pytest.mark.parametrize("on_disk", [False, True])
def test_dense_store_round_trip_with_ragged_shapes(tmp_path, on_disk):
    rng = np.random.default_rng(0)
    store = test.DenseStore(str(tmp_path / "store") if on_disk else None)
    a, b = rng.random((2, 5, 4, 3), dtype=np.float32), rng.random((1, 7, 2, 3), dtype=np.float32)
    store.append(a)
    store.append(b)
    store.finish()
    assert len(store) == 3 and store.nbytes() == (a.size + b.size) * 4
    assert np.array_equal(store[0], a[0]) and np.array_equal(store[1], a[1]) and np.array_equal(store[2], b[0])
    if on_disk:
        assert store.on_disk and os.path.getsize(store.path) == store.nbytes()
    store.close()
    if on_disk:
        assert not list((tmp_path / "store").iterdir())


def test_l2_search_is_exact():
    rng = np.random.default_rng(1)
    db, q = rng.random((50, 8), dtype=np.float32), rng.random((4, 8), dtype=np.float32)
    distances, predictions = test.l2_search(db, q, 5)
    brute = ((q[:, None] - db[None]) ** 2).sum(-1)
    assert np.array_equal(predictions, np.argsort(brute, axis=1)[:, :5])
    assert np.allclose(distances, np.sort(brute, axis=1)[:, :5], atol=1e-5)
