"""Writing evaluation results: every query's ranked predictions (JSON lines) and picture rows."""
import json
import math
import os
from typing import Sequence

import atomic_files
import visualizations


def l2_distance(squared: float) -> float:
    """The Euclidean distance from faiss IndexFlatL2's output, which is its square (clipped at 0:
    float rounding can make the square of a near-zero distance slightly negative)."""
    return math.sqrt(max(float(squared), 0.0))


def prediction_records(*, queries_paths: Sequence[str], database_paths: Sequence[str], result) -> list:
    """One dict per query: its path, positives, first-stage and re-ranked lists (paths, scores, correct).

    `l2_distance` of a first-stage entry is the Euclidean distance between the query's and the database
    image's global descriptors (result.first_distances holds faiss's squared distances)."""
    records = []
    for q, query_path in enumerate(queries_paths):
        positives = set(int(p) for p in result.positives[q])
        first = []
        for rank, db in enumerate(result.first_predictions[q]):
            entry = {"path": database_paths[int(db)], "index": int(db), "correct": int(db) in positives}
            if result.first_distances is not None:
                entry["l2_distance"] = l2_distance(result.first_distances[q][rank])
            first.append(entry)
        reranked = [{"path": database_paths[int(db)], "index": int(db), "mutual_nn": float(score),
                     "correct": int(db) in positives}
                    for db, score in zip(result.predictions[q], result.scores[q])]
        records.append({"query": query_path, "query_index": q, "positives": sorted(positives),
                        "first_stage": first, "reranked": reranked})
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
        row = visualizations.prediction_row(r["query"], [t["path"] for t in top], [t["correct"] for t in top],
                                            scores=[t["mutual_nn"] for t in top])
        name = f"{r['query_index']:06d}_{'correct' if top and top[0]['correct'] else 'wrong'}.jpg"
        visualizations.save_image_atomic(row, os.path.join(folder, name))
        written += 1
    return written
