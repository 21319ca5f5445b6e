"""Writing evaluation results: every query's ranked predictions (JSON lines) and picture rows."""

import json
import math
import os
from collections import abc
from typing import Iterable, List, Optional, Sequence

import atomic_files
import visualizations


def l2_distance(squared: float) -> float:
    """The Euclidean distance from faiss IndexFlatL2's output, which is its square (clipped at 0:
    float rounding can make the square of a near-zero distance slightly negative)."""
    return math.sqrt(max(float(squared), 0.0))


def prediction_records(
    *,
    queries_paths: Sequence[str],
    database_paths: Sequence[str],
    ranking,
    positives: Optional[Sequence[Sequence[int]]] = None,
) -> "PredictionRecords":
    """One dict per query of a retrieval.Ranking: its path, positives, first-stage and re-ranked lists
    (paths, scores, correct), as a sequence that builds each record when it is read. The one schema of
    every command's predictions.jsonl:

    - `query`, every entry's `path`: absolute paths (os.path.abspath of the paths the command read, so
      they resolve from any working folder, the output folder included); `query_index`, `index`: the
      query's and database image's positions in the command's lists.
    - `first_stage`: the first-stage candidates, nearest first, each with `l2_distance`, the Euclidean
      distance between the query's and the database image's global descriptors (ranking.first_distances
      holds faiss's squared distances; the merged five-crop lists of nearest_crop / maj_voting have no
      single distance per candidate, so none there).
    - `reranked`: the same candidates re-ranked, each with `mutual_nn` (its score) and the same
      `l2_distance` as in `first_stage` where that one has it.
    - With ground truth: `positives` (the query's database indexes) and each entry's `correct`. Without
      (positives None) both are left out rather than filled with guesses.
    """
    return PredictionRecords(queries_paths, [os.path.abspath(p) for p in database_paths], ranking, positives)


class PredictionRecords(abc.Sequence):
    """prediction_records' records, each built when it is read (indexing or iterating), never all at once:
    as dicts, the records of a benchmark-size evaluation would take gigabytes (6,816 queries x 100
    candidates x 2 lists took 1.2 GB; Nordland's 27,592 queries four times that)."""

    def __init__(self, queries_paths: Sequence[str], database_abs: List[str], ranking, positives) -> None:
        self.queries_paths = queries_paths
        self.database_abs = database_abs
        self.ranking = ranking
        self.positives = positives

    def __len__(self) -> int:
        return len(self.queries_paths)

    def __getitem__(self, q):
        if isinstance(q, slice):
            return [self[i] for i in range(*q.indices(len(self)))]
        if not -len(self) <= q < len(self):
            raise IndexError(f"query index {q} out of range for {len(self)} queries")
        return self._record(q % len(self))

    def _record(self, q: int) -> dict:
        ranking, database_abs = self.ranking, self.database_abs
        truth = None if self.positives is None else set(int(p) for p in self.positives[q])
        distances = {}
        first = []
        for rank, db in enumerate(ranking.first_predictions[q]):
            entry = {"path": database_abs[int(db)], "index": int(db)}
            if ranking.first_distances is not None:
                entry["l2_distance"] = distances[int(db)] = l2_distance(ranking.first_distances[q][rank])
            first.append(entry)
        reranked = []
        for db, score in zip(ranking.predictions[q], ranking.scores[q]):
            entry = {"path": database_abs[int(db)], "index": int(db), "mutual_nn": float(score)}
            if int(db) in distances:
                entry["l2_distance"] = distances[int(db)]
            reranked.append(entry)
        path = os.path.abspath(self.queries_paths[q])
        record = {"query": path, "query_index": q, "first_stage": first, "reranked": reranked}
        if truth is not None:
            record["positives"] = sorted(truth)
            for entry in first + reranked:
                entry["correct"] = entry["index"] in truth
        return record


def write_predictions(path: str, records: Iterable[dict]) -> None:
    """JSON lines, one query per line, written atomically, one record at a time (records may be a
    PredictionRecords: nothing of the whole file is held in memory)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    atomic_files.atomic_write(path, write)


def save_prediction_pictures(folder: str, records: Sequence[dict], *, num_preds: int, only_wrong: bool = False) -> int:
    """A picture row per query (query, then its top `num_preds` re-ranked predictions framed green or red);
    returns how many were written."""
    os.makedirs(folder, exist_ok=True)
    written = 0
    for r in records:
        top = r["reranked"][:num_preds]
        if only_wrong and top and top[0]["correct"]:
            continue
        row = visualizations.prediction_row(
            r["query"], [t["path"] for t in top], [t["correct"] for t in top], scores=[t["mutual_nn"] for t in top]
        )
        name = f"{r['query_index']:06d}_{'correct' if top and top[0]['correct'] else 'wrong'}.jpg"
        visualizations.save_image_atomic(row, os.path.join(folder, name))
        written += 1
    return written
