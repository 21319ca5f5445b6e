"""The effect of --dense_store_dtype float16 against the float32 default, side by side in one run.

    python3 benchmarks/store_dtype.py                 # the tiny model on the synthetic set, then a ViT-L
    python3 benchmarks/store_dtype.py --skip_vit_large

For each model the data set's features are extracted once (float32, as eval.py does), then ranked twice
with the same global descriptors: from float32 dense stores, and from float16 ones (the same features
rounded to float16 on append, which is what a --dense_store_dtype float16 run stores; read back as
float32, so the similarities are float32 either way). Printed per model: the stores' sizes, the share of
queries whose re-ranked top-1 and top-10 (the ordered list) change, the share of query-candidate scores
that change, and the recalls of both with their difference.

Models (random weights, seeded: no weights are downloaded):
1. the tiny model (vit_tiny, 112x112) on the synthetic set's test split (--preset, default: 300 database
   images, 150 queries), rerank_num 100;
2. a ViT-L/14 (the paper's backbone, 61x61x128 dense features) at 224x224 on the tiny synthetic set
   (40 database images, 15 queries), rerank_num 20.
Random weights give features with less structure than trained ones: more near-ties between candidates,
so this likely overstates how often float16 changes a ranking (stated with the numbers).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import datasets_ws
import network
import retrieval
import synthetic_dataset
import test
from dense_store import DenseStore

RECALLS = (1, 5, 10, 20)


def as_float16(store: DenseStore) -> DenseStore:
    """A float16 RAM store of `store`'s features (rounded on append, as a float16 run stores them)."""
    half = DenseStore(None, dtype="float16")
    for i in range(len(store)):
        half.append(np.asarray(store[i])[None])
    return half.finish()


def compare(model: torch.nn.Module, dataset: datasets_ws.BaseDataset, *, rerank_num: int) -> Dict[str, float]:
    db_num, q_num = dataset.database_num, dataset.queries_num
    with retrieval.Retrieval(model, batch_size=8, num_workers=0, device="cpu") as engine:
        start = time.perf_counter()
        database = engine.build_database(dataset, range(db_num))
        queries = engine.extract_queries(dataset, range(db_num, db_num + q_num), method="hard_resize")
        extraction_s = time.perf_counter() - start
        rankings, sizes = {}, {}
        for dtype in ("float32", "float16"):
            db_dense = database.dense if dtype == "float32" else as_float16(database.dense)
            q_dense = queries.dense if dtype == "float32" else as_float16(queries.dense)
            sizes[dtype] = db_dense.nbytes() + q_dense.nbytes()
            rankings[dtype] = engine.rank(
                retrieval.Database(global_descriptors=database.global_descriptors, dense=db_dense),
                retrieval.Queries(global_descriptors=queries.global_descriptors, dense=q_dense, method="hard_resize"),
                rerank_num=rerank_num,
            )
    full, half = rankings["float32"], rankings["float16"]
    assert np.array_equal(full.first_predictions, half.first_predictions)  # the global search is the same
    # Scores of the same candidates, in the first stage's order.
    scores = {}
    for dtype, r in rankings.items():
        by_candidate = np.empty_like(r.scores)
        for q in range(len(r.predictions)):
            position = {int(c): i for i, c in enumerate(r.predictions[q])}
            by_candidate[q] = [r.scores[q][position[int(c)]] for c in r.first_predictions[q]]
        scores[dtype] = by_candidate
    positives = dataset.get_positives()
    recalls = {dtype: test.compute_recalls(r.predictions, positives, RECALLS) for dtype, r in rankings.items()}
    return {
        "database": db_num,
        "queries": q_num,
        "rerank_num": full.predictions.shape[1],
        "extraction_s": extraction_s,
        "store_float32_bytes": sizes["float32"],
        "store_float16_bytes": sizes["float16"],
        "top1_changed": float(np.mean(full.predictions[:, 0] != half.predictions[:, 0])),
        "top10_changed": float(np.mean(np.any(full.predictions[:, :10] != half.predictions[:, :10], axis=1))),
        "scores_changed": float(np.mean(scores["float32"] != scores["float16"])),
        "mean_abs_score_change": float(np.mean(np.abs(scores["float32"] - scores["float16"]))),
        "recalls_float32": recalls["float32"].tolist(),
        "recalls_float16": recalls["float16"].tolist(),
    }


def report(title: str, r: Dict[str, float]) -> None:
    print(f"\n{title}: {r['database']} database images, {r['queries']} queries, rerank_num {r['rerank_num']}")
    print(
        f"  dense stores: float32 {r['store_float32_bytes'] / 2**20:.1f} MiB, float16 "
        f"{r['store_float16_bytes'] / 2**20:.1f} MiB ({r['store_float16_bytes'] / r['store_float32_bytes']:.2f}x)"
    )
    print(
        f"  queries whose re-ranked top-1 changes: {r['top1_changed'] * 100:.1f} %; top-10 list: "
        f"{r['top10_changed'] * 100:.1f} %; candidate scores (mutual-NN counts) that change: "
        f"{r['scores_changed'] * 100:.1f} % (mean |change| {r['mean_abs_score_change']:.2f})"
    )
    diff = [b - a for a, b in zip(r["recalls_float32"], r["recalls_float16"])]
    line = lambda v: ", ".join(f"R@{n}: {x:.1f}" for n, x in zip(RECALLS, v))  # noqa: E731
    print(f"  recalls float32: {line(r['recalls_float32'])}")
    print(f"  recalls float16: {line(r['recalls_float16'])}")
    print(f"  difference:      {', '.join(f'R@{n}: {d:+.1f}' for n, d in zip(RECALLS, diff))}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", choices=sorted(synthetic_dataset.PRESETS))
    p.add_argument("--skip_vit_large", action="store_true")
    p.add_argument("--folder", default=None, help="where the synthetic sets are generated (default: a temp folder)")
    args = p.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="selavpr_store_dtype_")
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; data in {folder}")

    synthetic_dataset.ensure_dataset(
        folder, f"synthetic_{args.preset}", synthetic_dataset.SyntheticOptions(seed=0, preset=args.preset)
    )
    torch.manual_seed(0)
    tiny = network.GeoLocalizationNet(backbone="vit_tiny").eval()
    dataset = datasets_ws.BaseDataset(folder, f"synthetic_{args.preset}", "test", resize=(112, 112))
    report(f"vit_tiny 112x112, synthetic ({args.preset})", compare(tiny, dataset, rerank_num=100))

    if not args.skip_vit_large:
        synthetic_dataset.ensure_dataset(
            folder, "synthetic_tiny", synthetic_dataset.SyntheticOptions(seed=0, preset="tiny")
        )
        torch.manual_seed(0)
        large = network.GeoLocalizationNet(backbone="vit_large").eval()
        dataset = datasets_ws.BaseDataset(folder, "synthetic_tiny", "test", resize=(224, 224))
        report("vit_large 224x224 (random weights), synthetic (tiny)", compare(large, dataset, rerank_num=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
