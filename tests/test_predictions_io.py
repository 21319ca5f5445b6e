"""predictions_io.py: the records of predictions.jsonl (with and without ground truth), one schema for
every command: absolute paths, l2_distance in both lists where known."""

import os

import numpy as np

import predictions_io
import retrieval


def test_records_without_ground_truth_carry_no_correct_flags(tmp_path, monkeypatch):
    # first_distances are faiss's squared distances; the records carry the distances themselves.
    monkeypatch.chdir(tmp_path)
    ranking = retrieval.Ranking(
        first_predictions=np.array([[2, 0]]),
        first_distances=np.array([[0.25, 4.0]]),
        predictions=np.array([[0, 2]]),
        scores=np.array([[9.0, 3.0]], dtype=np.float32),
    )
    args = dict(queries_paths=["q.jpg"], database_paths=["a.jpg", "b.jpg", "c.jpg"], ranking=ranking)
    plain = predictions_io.prediction_records(**args)[0]
    here = str(tmp_path)
    assert plain["query"] == os.path.join(here, "q.jpg")
    assert plain["reranked"] == [
        {"path": os.path.join(here, "a.jpg"), "index": 0, "mutual_nn": 9.0, "l2_distance": 2.0},
        {"path": os.path.join(here, "c.jpg"), "index": 2, "mutual_nn": 3.0, "l2_distance": 0.5},
    ]
    assert [c["path"] for c in plain["first_stage"]] == [os.path.join(here, n) for n in ("c.jpg", "a.jpg")]
    assert "positives" not in plain and all("correct" not in c for c in plain["first_stage"])
    known = predictions_io.prediction_records(**args, positives=[np.array([2])])[0]
    assert known["positives"] == [2] and [c["correct"] for c in known["reranked"]] == [False, True]


def test_paths_resolve_from_any_working_folder(tmp_path, monkeypatch):
    """Relative inputs (eval.py with a relative --datasets_folder) become absolute: the records resolve
    from the output folder, or from anywhere, as localize.py's always did."""
    (tmp_path / "data").mkdir()
    for name in ("q.jpg", "a.jpg"):
        (tmp_path / "data" / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    ranking = retrieval.Ranking(
        first_predictions=np.array([[0]]),
        first_distances=np.array([[1.0]]),
        predictions=np.array([[0]]),
        scores=np.array([[1.0]], dtype=np.float32),
    )
    (record,) = predictions_io.prediction_records(
        queries_paths=["data/q.jpg"], database_paths=["data/a.jpg"], ranking=ranking
    )
    monkeypatch.chdir("/")
    assert os.path.isfile(record["query"]) and os.path.isfile(record["reranked"][0]["path"])


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
    )
    assert all("l2_distance" not in c for c in record["first_stage"] + record["reranked"])
    assert [c["correct"] for c in record["first_stage"]] == [True, False]
