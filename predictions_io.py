"""Writing evaluation results: every query's ranked predictions (JSON lines) and picture rows."""

import json
import math
import os
from typing import Optional, Sequence

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
) -> list:
    """One dict per query of a retrieval.Ranking: its path, positives, first-stage and re-ranked lists
    (paths, scores, correct). The one schema of every command's predictions.jsonl:

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
    database_abs = [os.path.abspath(p) for p in database_paths]
    records = []
    for q, query_path in enumerate(queries_paths):
        truth = None if positives is None else set(int(p) for p in positives[q])
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
        record = {"query": os.path.abspath(query_path), "query_index": q, "first_stage": first, "reranked": reranked}
        if truth is not None:
            record["positives"] = sorted(truth)
            for entry in first + reranked:
                entry["correct"] = entry["index"] in truth
        records.append(record)
    return records


def write_predictions(path: str, records: list) -> None:
    """JSON lines, one query per line, written atomically."""
    atomic_files.atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def save_prediction_pictures(folder: str, records: list, *, num_preds: int, only_wrong: bool = False) -> int:
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
