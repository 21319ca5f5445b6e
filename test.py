"""Evaluation on a data set: the retrieval engine over its database and queries, then recalls.

The data's way through (retrieval.py holds every step up to the rankings):
    images -> model -> global descriptors -> faiss top-k ------------------------------.
                    `-> dense features -> DenseStore (RAM | file) -> re-rank engine -> recalls
`--efficient_ram_testing` only changes where the dense features are kept (RAM or a disk file).
"""

import logging
import os
import random
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import commons
import dense_store
import distributed
import retrieval
from datasets_ws import BaseDataset, PCADataset

PCA_MAX_IMAGES = 2**14


def compute_pca(
    model: torch.nn.Module,
    *,
    datasets_folder: str,
    pca_dataset_folder: str,
    pca_dim: int,
    resize: Sequence[int],
    batch_size: int,
    num_workers: int,
    device: str,
) -> PCA:
    """Fit PCA(pca_dim) (no whitening) on global descriptors of at most 2^14 shuffled images."""
    pca_ds = PCADataset(datasets_folder, pca_dataset_folder, resize=resize)
    n = min(len(pca_ds), PCA_MAX_IMAGES)
    idxs = random.sample(range(len(pca_ds)), k=n) if n < len(pca_ds) else list(range(len(pca_ds)))
    loader = DataLoader(Subset(pca_ds, idxs), batch_size=batch_size, num_workers=num_workers)
    descriptors = []
    model.eval()
    with torch.inference_mode():
        for images in tqdm(loader, desc="PCA features", ncols=100, leave=False, disable=None):
            descriptors.append(model.global_descriptors(images.to(device)).float().cpu().numpy())
    descriptors = np.concatenate(descriptors)
    if pca_dim > min(descriptors.shape):
        raise ValueError(
            f"--pca_dim {pca_dim} is larger than min(#images, descriptor size) = "
            f"{min(descriptors.shape)} of --pca_dataset_folder {pca_dataset_folder}"
        )
    pca = PCA(pca_dim)
    pca.fit(descriptors)
    return pca


# ------------------------------------------------------------------------------------------------
# Recalls (pure functions)
# ------------------------------------------------------------------------------------------------


def compute_recalls(
    predictions: Sequence[np.ndarray], positives_per_query: Sequence[np.ndarray], recall_values: Sequence[int]
) -> np.ndarray:
    """Recall@N in percent: share of queries with a positive among their first N predictions.

    Every query counts in the denominator, also one without any positive (always a miss); an N above
    the number of predictions uses them all (capped, as the public release).
    """
    recalls = np.zeros(len(recall_values))
    for preds, positives in zip(predictions, positives_per_query):
        hits = np.isin(np.asarray(preds), positives)
        for i, n in enumerate(recall_values):
            if hits[:n].any():
                recalls[i:] += 1
                break
    return recalls / max(len(predictions), 1) * 100


def recalls_to_str(recalls: Sequence[float], recall_values: Sequence[int]) -> str:
    return ", ".join(f"R@{n}: {r:.1f}" for n, r in zip(recall_values, recalls))


def capped_note(recall_values: Sequence[int], k: int) -> str:
    """ "" when every N of recall_values fits the k candidates of each query, else the note that says the
    larger ones are capped (the public release's recalls count only the candidates searched): appended
    to a recalls line, so that "R@1: 13.3, R@5: 13.3" with --rerank_num 1 is not read as a broken search."""
    capped = [n for n in recall_values if n > k]
    if not capped:
        return ""
    names = ", ".join(f"R@{n}" for n in capped)
    return (
        f" (capped at N = {k}: each query has only {k} candidate{'s' if k > 1 else ''} (--rerank_num, "
        f"or the database size), so {names} equal{'s' if len(capped) == 1 else ''} R@{k})"
    )


def ranking_recalls(ranking: retrieval.Ranking, positives: Sequence[np.ndarray], recall_values: Sequence[int]):
    """(first-stage recalls, re-ranked recalls) of `ranking` (compute_recalls), with a warning when
    some N of recall_values is above the number of candidates (those recalls are capped)."""
    k = ranking.predictions.shape[1]
    if max(recall_values) > k:
        logging.warning(f"--recall_values above {k} (the number of re-ranked candidates) are capped at R@{k}")
    return (
        compute_recalls(ranking.first_predictions, positives, recall_values),
        compute_recalls(ranking.predictions, positives, recall_values),
    )


# ------------------------------------------------------------------------------------------------
# What an evaluation writes (for the free-space check before it starts)
# ------------------------------------------------------------------------------------------------

# Bytes of a predictions.jsonl entry beside its path (index, scores, distance, flags, JSON syntax).
PREDICTION_ENTRY_BYTES = 110


def planned_writes(
    dataset: BaseDataset,
    *,
    output_folder: str,
    efficient_ram_testing: bool,
    dense_shape: Sequence[int],
    rerank_num: int,
    predictions: bool = True,
    element_size: int = 4,
) -> List[commons.PlannedWrite]:
    """What evaluating `dataset` writes below output_folder: with --efficient_ram_testing the dense store
    (every database image and query at the dense map size (h, w, C), `element_size` bytes a value; a
    single_query query's map follows its own aspect ratio, so that part is an estimate), and, with
    `predictions`, predictions.jsonl (2 lists of min(rerank_num, database) entries per query)."""
    writes = []
    if efficient_ram_testing:
        images = dataset.database_num + dataset.queries_num
        writes.append(
            commons.PlannedWrite(
                output_folder,
                dense_store.estimated_bytes(images, dense_shape, element_size=element_size),
                f"dense features of {images} images (--efficient_ram_testing)",
            )
        )
    if predictions:
        k = min(rerank_num, dataset.database_num)
        paths = dataset.database_paths
        path_bytes = sum(len(os.path.abspath(p)) for p in paths) / max(len(paths), 1)
        nbytes = int(dataset.queries_num * (2 * k + 1) * (path_bytes + PREDICTION_ENTRY_BYTES))
        writes.append(
            commons.PlannedWrite(output_folder, nbytes, f"predictions.jsonl of {dataset.queries_num} queries")
        )
    return writes


# ------------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------------


@dataclass
class EvalResult(retrieval.Ranking):
    """The ranking of every query of a data set (retrieval.Ranking's arrays), with its recalls in percent
    before (recalls_first) and after re-ranking (recalls), the positives per query and the time spent
    in each stage."""

    recalls_first: np.ndarray
    recalls: np.ndarray
    positives: List[np.ndarray] = field(default_factory=list)
    times: retrieval.StageTimes = field(default_factory=retrieval.StageTimes)

    def summary(self, recall_values: Sequence[int]) -> str:
        return recalls_to_str(self.recalls, recall_values)


def evaluate(
    model: torch.nn.Module,
    eval_ds: BaseDataset,
    *,
    test_method: str = "hard_resize",
    rerank_num: int = 100,
    recall_values: Sequence[int] = (1, 5, 10, 20),
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "cpu",
    store_folder: Optional[str] = None,
    pca: Optional[PCA] = None,
    majority_weight: float = 0.01,
    precision: str = "fp32",
    rerank_chunk_size: int = 16,
    dist_ctx: Optional[distributed.Context] = None,
) -> Optional[EvalResult]:
    """Two-stage evaluation of `eval_ds`; returns recalls before/after re-ranking and the rankings.

    store_folder: None keeps the dense features in RAM; a folder (--efficient_ram_testing) keeps them in
    raw files there, removed at the end (with the folder when this call created it).
    dist_ctx (torchrun, several processes): every rank extracts its share of the images; rank 0
    gathers them, searches, re-ranks and returns the result, the other ranks return None (same result as one
    process). Every rank must call evaluate with the same arguments.
    """
    db_num, q_num = eval_ds.database_num, eval_ds.queries_num
    with retrieval.Retrieval(
        model,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        precision=precision,
        store_folder=store_folder,
        rerank_chunk_size=rerank_chunk_size,
        dist_ctx=dist_ctx,
    ) as engine:
        database = engine.build_database(eval_ds, range(db_num), paths=eval_ds.database_paths)
        queries = engine.extract_queries(eval_ds, range(db_num, db_num + q_num), method=test_method)
        if not engine.dist_ctx.is_main:
            return None  # rank 0 holds every feature now: it searches and re-ranks alone
        ranking = engine.rank(database, queries, rerank_num=rerank_num, majority_weight=majority_weight, pca=pca)
    positives = eval_ds.get_positives()
    recalls_first, recalls = ranking_recalls(ranking, positives, recall_values)
    capped = capped_note(recall_values, ranking.first_predictions.shape[1])
    logging.info(f"First ranking recalls: {recalls_to_str(recalls_first, recall_values)}{capped}")
    return EvalResult(
        **vars(ranking), recalls_first=recalls_first, recalls=recalls, positives=positives, times=engine.times
    )
