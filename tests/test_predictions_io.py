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


def test_records_are_built_one_at_a_time_and_written_as_a_stream(tmp_path):
    """A benchmark-size evaluation's records as dicts take gigabytes (1.2 GB for Pitts30k's 6,816 queries
    at k = 100): they are built when read, and predictions.jsonl is written record by record, so writing
    500 queries x 100 candidates holds a small fraction of what the list of all records would."""
    import json
    import tracemalloc

    rng = np.random.default_rng(0)
    queries, database, k = 500, 5000, 100
    first = np.stack([rng.permutation(database)[:k] for _ in range(queries)])
    ranking = retrieval.Ranking(
        first_predictions=first,
        first_distances=np.sort(rng.random((queries, k)), axis=1),
        predictions=first[:, ::-1].copy(),
        scores=np.arange(k, 0, -1, dtype=np.float32)[None].repeat(queries, 0),
    )
    records = predictions_io.prediction_records(
        queries_paths=[f"/q/{i:06d}.jpg" for i in range(queries)],
        database_paths=[f"/db/{i:06d}.jpg" for i in range(database)],
        ranking=ranking,
        positives=[np.array([int(first[i, 3])]) for i in range(queries)],
    )
    assert len(records) == queries and records[-1]["query_index"] == queries - 1
    assert records[5]["reranked"][-4]["correct"] and records[1:3] == [records[1], records[2]]
    path = str(tmp_path / "predictions.jsonl")
    tracemalloc.start()
    predictions_io.write_predictions(path, records)
    streamed = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    everything = list(records)
    whole = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert streamed < whole / 20, (streamed, whole)
    with open(path) as f:
        lines = f.readlines()
    assert len(lines) == queries
    assert [json.loads(lines[i]) for i in (0, 250, 499)] == [everything[i] for i in (0, 250, 499)]
