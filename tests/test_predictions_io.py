"""predictions_io.py: the records of predictions.jsonl (with and without ground truth)."""

import numpy as np

import predictions_io
import retrieval


def test_records_without_ground_truth_carry_no_correct_flags():
    # first_distances are faiss's squared distances; the records carry the distances themselves.
    ranking = retrieval.Ranking(
        first_predictions=np.array([[2, 0]]),
        first_distances=np.array([[0.25, 4.0]]),
        predictions=np.array([[0, 2]]),
        scores=np.array([[9.0, 3.0]], dtype=np.float32),
    )
    args = dict(
        queries_paths=["q.jpg"], database_paths=["a.jpg", "b.jpg", "c.jpg"], ranking=ranking, reranked_distances=True
    )
    plain = predictions_io.prediction_records(**args)[0]
    assert plain["reranked"] == [
        {"path": "a.jpg", "index": 0, "mutual_nn": 9.0, "l2_distance": 2.0},
        {"path": "c.jpg", "index": 2, "mutual_nn": 3.0, "l2_distance": 0.5},
    ]
    assert "positives" not in plain and all("correct" not in c for c in plain["first_stage"])
    known = predictions_io.prediction_records(**args, positives=[np.array([2])])[0]
    assert known["positives"] == [2] and [c["correct"] for c in known["reranked"]] == [False, True]


def test_merged_crop_lists_have_no_distances():
    ranking = retrieval.Ranking(
        first_predictions=np.array([[1, 0]]),
        first_distances=None,
        predictions=np.array([[0, 1]]),
        scores=np.array([[2.0, 1.0]], dtype=np.float32),
    )
    (record,) = predictions_io.prediction_records(
        queries_paths=["q.jpg"],
        database_paths=["a.jpg", "b.jpg"],
        ranking=ranking,
        positives=[np.array([1])],
        reranked_distances=True,
    )
    assert all("l2_distance" not in c for c in record["first_stage"] + record["reranked"])
    assert [c["correct"] for c in record["first_stage"]] == [True, False]
