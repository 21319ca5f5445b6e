"""test.py: recalls (pure functions) and the evaluation's result."""

import numpy as np

import predictions_io
import retrieval
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


def test_ranking_recalls_warns_about_capped_recall_values(caplog):
    ranking = retrieval.Ranking(
        first_predictions=np.array([[0, 1], [3, 2]]),
        first_distances=None,
        predictions=np.array([[1, 0], [2, 3]]),
        scores=np.zeros((2, 2), dtype=np.float32),
    )
    first, reranked = test.ranking_recalls(ranking, [np.array([1]), np.array([2])], [1, 2])
    assert first.tolist() == [0.0, 100.0] and reranked.tolist() == [100.0, 100.0] and "capped" not in caplog.text
    test.ranking_recalls(ranking, [np.array([1]), np.array([2])], [1, 5])
    assert "--recall_values above 2 (the number of re-ranked candidates) are capped at R@2" in caplog.text


def test_an_evaluation_result_is_a_ranking_that_the_records_read():
    result = test.EvalResult(
        first_predictions=np.array([[1, 0]]),
        first_distances=np.array([[4.0, 9.0]]),
        predictions=np.array([[0, 1]]),
        scores=np.array([[7.0, 2.0]], dtype=np.float32),
        recalls_first=np.array([0.0]),
        recalls=np.array([100.0]),
        positives=[np.array([0])],
    )
    assert isinstance(result, retrieval.Ranking) and result.summary([1]) == "R@1: 100.0"
    (record,) = predictions_io.prediction_records(
        queries_paths=["/d/q.jpg"], database_paths=["/d/a.jpg", "/d/b.jpg"], ranking=result, positives=result.positives
    )
    assert record["first_stage"] == [
        {"path": "/d/b.jpg", "index": 1, "correct": False, "l2_distance": 2.0},
        {"path": "/d/a.jpg", "index": 0, "correct": True, "l2_distance": 3.0},
    ]
    # One schema for every command: the re-ranked entries carry their first-stage distance too.
    assert record["reranked"] == [
        {"path": "/d/a.jpg", "index": 0, "mutual_nn": 7.0, "correct": True, "l2_distance": 3.0},
        {"path": "/d/b.jpg", "index": 1, "mutual_nn": 2.0, "correct": False, "l2_distance": 2.0},
    ]
