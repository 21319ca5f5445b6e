"""Triplet mining: ``partial``, ``full``, ``random`` and ``msls_weighted``.

Mining works on GLOBAL descriptors only: it asks a caller-supplied ``descriptors_fn`` for the
descriptors of exactly the images a mode needs (each image once), so this module never runs a model
and never computes dense features (the public release computed and discarded them).

Randomness: NumPy's GLOBAL generator, with ``np.random.choice(..., replace=False)`` calls made in the
order of the public release (queries first, then the database sample) and with the same arguments,
so that a seeded run draws the same samples. Nearest-neighbour selections use faiss ``IndexFlatL2``
searches like the public release, so that near-ties resolve the same way.

Index conventions: a query is identified by its query index ``q`` (0..queries_num-1) inside the
dataset's per-query lists; its global index is ``database_num + q``. The mined rows are GLOBAL
indexes ``[database_num + q, best_positive, neg_1, ..., neg_k]``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

import faiss
import numpy as np
import torch

MINING_MODES = ("partial", "full", "random", "msls_weighted")

#: global_indexes (n,) int64 -> descriptors (n, D) float32, computed with the evaluation preprocessing.
DescriptorsFn = Callable[[np.ndarray], np.ndarray]


class MinableDataset(Protocol):
    """What mining reads from a dataset (``datasets_ws.TripletsDataset`` provides it)."""

    database_num: int
    queries_num: int
    hard_positives_per_query: Sequence[np.ndarray]
    soft_positives_per_query: Sequence[np.ndarray]
    is_night: np.ndarray
    is_sideways: np.ndarray
    triplets_global_indexes: np.ndarray


# ----------------------------------------------------------------------------------------------
# Pure selection functions
# ----------------------------------------------------------------------------------------------


def _nearest(query_descriptor: np.ndarray, descriptors: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the ``k`` rows of ``descriptors`` (n, D) nearest in L2 to ``query_descriptor`` (D,),
    by ascending distance (exact faiss IndexFlatL2 search)."""
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    query = np.ascontiguousarray(np.asarray(query_descriptor, dtype=np.float32).reshape(1, -1))
    if descriptors.ndim != 2 or descriptors.shape[1] != query.shape[1]:
        raise ValueError(f"Descriptor sizes differ: query {query.shape[1]}, candidates {descriptors.shape}")
    index = faiss.IndexFlatL2(descriptors.shape[1])
    index.add(descriptors)
    _, rows = index.search(query, k)
    rows = rows[0]
    if (rows < 0).any():
        # faiss pads with -1 when it cannot rank a candidate (NaN distances).
        raise ValueError("The mining descriptors contain NaN or infinite values: check the model and its weights.")
    return rows


def best_positive(
    query_descriptor: np.ndarray, positives_descriptors: np.ndarray, positives_indexes: np.ndarray
) -> int:
    """The hard positive nearest (L2) to the query.

    query_descriptor (D,), positives_descriptors (P, D) aligned with positives_indexes (P,) -> one index.
    """
    positives_indexes = np.asarray(positives_indexes)
    if len(positives_indexes) == 0:
        raise ValueError("A training query has no hard positive: such queries must be dropped by the dataset.")
    return int(positives_indexes[_nearest(query_descriptor, positives_descriptors, 1)[0]])


def hardest_negatives(
    query_descriptor: np.ndarray, candidates_descriptors: np.ndarray, candidates_indexes: np.ndarray, negs_num: int
) -> np.ndarray:
    """The ``negs_num`` candidates nearest (L2) to the query, by ascending distance.

    query_descriptor (D,), candidates_descriptors (C, D) aligned with candidates_indexes (C,) ->
    (negs_num,) int64 indexes. Fewer than ``negs_num`` candidates is an error.
    """
    candidates_indexes = np.asarray(candidates_indexes, dtype=np.int64)
    if len(candidates_indexes) < negs_num:
        raise ValueError(
            f"Only {len(candidates_indexes)} negative candidates for a query, fewer than "
            f"--negs_num_per_query={negs_num}: raise --neg_samples_num or lower --negs_num_per_query."
        )
    return candidates_indexes[_nearest(query_descriptor, candidates_descriptors, negs_num)]


def remove_soft_positives(candidates: np.ndarray, soft_positives: np.ndarray) -> np.ndarray:
    """``candidates`` without the query's soft positives, in the candidates' own order.

    ``np.setdiff1d(..., assume_unique=True)`` as the public release (candidates are distinct draws):
    it keeps the draw order, which the ``random`` mode relies on.
    """
    return np.setdiff1d(
        np.asarray(candidates, dtype=np.int64), np.asarray(soft_positives, dtype=np.int64), assume_unique=True
    )


def msls_query_weights(is_night: np.ndarray, is_sideways: np.ndarray) -> np.ndarray:
    """Query sampling probabilities of ``msls_weighted``: 1 + Q/#night (night queries)
    + Q/#sideways (sideways queries), normalised to sum 1. (Q,) bool, (Q,) bool -> (Q,) float64."""
    is_night = np.asarray(is_night, dtype=bool)
    is_sideways = np.asarray(is_sideways, dtype=bool)
    queries_num = len(is_night)
    night_num, sideways_num = int(is_night.sum()), int(is_sideways.sum())
    if night_num == 0 or sideways_num == 0:
        raise ValueError(
            f"--mining msls_weighted needs night and sideways queries (note field of the file names, as in "
            f"Mapillary SLS), but found {night_num} night and {sideways_num} sideways among {queries_num} "
            "queries: use another --mining mode for this data set."
        )
    weights = np.ones(queries_num, dtype=np.float64)
    weights[is_night] += queries_num / night_num
    weights[is_sideways] += queries_num / sideways_num
    return weights / weights.sum()


@dataclasses.dataclass(frozen=True)
class MiningSettings:
    """How train.py mines its triplets: the mode (--mining), the queries of an epoch, mined
    cache_refresh_rate at a time with the current model, each from neg_samples_num sampled database
    images, negs_num_per_query negatives per triplet."""

    mode: str
    queries_per_epoch: int
    cache_refresh_rate: int
    neg_samples_num: int
    negs_num_per_query: int

    @property
    def loops_num(self) -> int:
        """Mining loops of an epoch (the last queries_per_epoch % cache_refresh_rate are not used)."""
        return self.queries_per_epoch // self.cache_refresh_rate


# ----------------------------------------------------------------------------------------------
# The negatives cache of `full` mining
# ----------------------------------------------------------------------------------------------


class MiningState:
    """Per query, the hardest negatives found by the previous ``full`` mining loop (global indexes).

    Picklable, and ``state_dict()`` holds only tensors, so it can go into a checkpoint that is
    loaded back with ``torch.load(..., weights_only=True)``.
    """

    def __init__(self, queries_num: int) -> None:
        self.neg_cache: list[np.ndarray] = [np.empty(0, dtype=np.int64) for _ in range(int(queries_num))]

    @property
    def queries_num(self) -> int:
        return len(self.neg_cache)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"lengths": (Q,) int64, "negatives": (sum of lengths,) int64} tensors."""
        lengths = torch.tensor([len(c) for c in self.neg_cache], dtype=torch.long)
        flat = np.concatenate(self.neg_cache) if self.neg_cache else np.empty(0, dtype=np.int64)
        return {"lengths": lengths, "negatives": torch.from_numpy(flat.astype(np.int64))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        lengths = [int(n) for n in state["lengths"]]
        flat = state["negatives"].cpu().numpy().astype(np.int64)
        if sum(lengths) != len(flat):
            raise ValueError("Corrupt mining state: the negatives do not match their lengths.")
        self.neg_cache = [c.copy() for c in np.split(flat, np.cumsum(lengths)[:-1])] if lengths else []

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "MiningState":
        mining_state = cls(0)
        mining_state.load_state_dict(state)
        return mining_state


# ----------------------------------------------------------------------------------------------
# The mining step
# ----------------------------------------------------------------------------------------------


def _check_sample(size: int, population: int, flag: str, what: str) -> None:
    if size > population:
        raise ValueError(f"{flag}={size} is larger than the {population} {what}: set {flag} to at most {population}.")
    if size < 0:
        raise ValueError(f"{flag} must not be negative, got {size}")


def _fetch_descriptors(
    descriptors_fn: DescriptorsFn, global_indexes: np.ndarray, images_num: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ask ``descriptors_fn`` once for ``global_indexes`` (n,) -> (descriptors (n, D) float32,
    row_of (images_num,) int64 mapping a global index to its row, -1 when not computed)."""
    descriptors = np.asarray(descriptors_fn(global_indexes))
    if descriptors.ndim != 2 or descriptors.shape[0] != len(global_indexes):
        raise ValueError(
            f"descriptors_fn returned shape {descriptors.shape} for {len(global_indexes)} images: "
            "expected (n, D), one row per requested index."
        )
    row_of = np.full(images_num, -1, dtype=np.int64)
    row_of[global_indexes] = np.arange(len(global_indexes))
    return np.ascontiguousarray(descriptors, dtype=np.float32), row_of


def mine_triplets(
    dataset: MinableDataset,
    *,
    mode: str,
    descriptors_fn: DescriptorsFn,
    cache_refresh_rate: int,
    neg_samples_num: int,
    negs_num_per_query: int,
    state: MiningState | None = None,
) -> np.ndarray:
    """Mine one loop of triplets; store them in ``dataset.triplets_global_indexes`` and return them.

    Returns (cache_refresh_rate, 2 + negs_num_per_query) int64 GLOBAL indexes
    [query, best positive, hardest/random negatives...] (queries in their sampling order).
    ``descriptors_fn`` is called once, with the distinct global indexes the mode needs:
    partial / msls_weighted: the sampled database images, the hard positives of the sampled queries
    and the sampled queries; full: the whole database and the sampled queries; random: the hard
    positives of the sampled queries and the sampled queries.
    ``state`` (required for ``full``) carries each query's previous hardest negatives; it is updated.
    """
    if mode not in MINING_MODES:
        raise ValueError(f"Unknown --mining {mode!r}: choose one of {', '.join(MINING_MODES)}")
    if negs_num_per_query < 1:
        raise ValueError(f"--negs_num_per_query must be at least 1, got {negs_num_per_query}")
    dataset_negs = getattr(dataset, "negs_num_per_query", negs_num_per_query)
    if dataset_negs != negs_num_per_query:
        raise ValueError(
            f"negs_num_per_query={negs_num_per_query} differs from the dataset's {dataset_negs}: "
            "build the TripletsDataset with the same --negs_num_per_query."
        )
    database_num, queries_num = int(dataset.database_num), int(dataset.queries_num)
    hard, soft = dataset.hard_positives_per_query, dataset.soft_positives_per_query
    if len(hard) != queries_num or len(soft) != queries_num:
        raise ValueError(
            f"The dataset's positives lists ({len(hard)} hard, {len(soft)} soft) are not aligned "
            f"with its {queries_num} queries."
        )
    if mode == "full":
        if state is None:
            raise ValueError(
                "--mining full keeps each query's hardest negatives between loops: "
                "pass state=MiningState(dataset.queries_num) and reuse it for every loop."
            )
        if state.queries_num != queries_num:
            raise ValueError(
                f"The mining state holds {state.queries_num} queries but the dataset has "
                f"{queries_num}: it belongs to another data set or run; start a new MiningState."
            )

    # Validate every sample size before the first draw, so an error leaves the RNG untouched.
    _check_sample(cache_refresh_rate, queries_num, "--cache_refresh_rate", "training queries (with a hard positive)")
    if mode != "random":
        _check_sample(neg_samples_num, database_num, "--neg_samples_num", "database images")
    weights = msls_query_weights(dataset.is_night, dataset.is_sideways) if mode == "msls_weighted" else None

    # Draw 1: the queries of this loop.
    if weights is None:
        queries = np.random.choice(queries_num, cache_refresh_rate, replace=False)
    else:
        queries = np.random.choice(queries_num, cache_refresh_rate, replace=False, p=weights)
    queries = np.asarray(queries, dtype=np.int64)
    query_globals = queries + database_num

    if mode in ("partial", "msls_weighted"):
        # Draw 2: one shared set of database images, the negatives' candidates for every query.
        sampled_db = np.asarray(np.random.choice(database_num, neg_samples_num, replace=False), dtype=np.int64)
        positives = [hard[q] for q in queries]
        database_needed = np.unique(np.concatenate([sampled_db] + [np.asarray(p, dtype=np.int64) for p in positives]))
    elif mode == "full":
        database_needed = np.arange(database_num, dtype=np.int64)
    else:  # random
        longest_soft = max((len(soft[q]) for q in queries), default=0)
        if negs_num_per_query + longest_soft > database_num:
            raise ValueError(
                f"--mining random draws --negs_num_per_query + #soft positives = "
                f"{negs_num_per_query + longest_soft} database images for a query, more than the "
                f"{database_num} in the database: lower --negs_num_per_query."
            )
        database_needed = np.unique(
            np.concatenate([np.asarray(hard[q], dtype=np.int64) for q in queries] + [np.empty(0, dtype=np.int64)])
        )

    needed = np.concatenate([database_needed, query_globals])
    descriptors, row_of = _fetch_descriptors(descriptors_fn, needed, database_num + queries_num)

    def rows(global_indexes: np.ndarray) -> np.ndarray:
        return descriptors[row_of[np.asarray(global_indexes, dtype=np.int64)]]

    triplets = np.empty((len(queries), 2 + negs_num_per_query), dtype=np.int64)
    for i, q in enumerate(queries):
        query_descriptor = descriptors[row_of[database_num + q]]
        positive = best_positive(query_descriptor, rows(hard[q]), hard[q])
        if mode in ("partial", "msls_weighted"):
            candidates = remove_soft_positives(sampled_db, soft[q])
            negatives = _hardest_or_explain(
                query_descriptor, rows, candidates, negs_num_per_query, neg_samples_num, database_num + q
            )
        elif mode == "full":
            # Draw 3 (per query): fresh candidates, united with the query's previous hardest negatives.
            fresh = np.random.choice(database_num, neg_samples_num, replace=False)
            candidates = np.unique(np.concatenate([state.neg_cache[q], remove_soft_positives(fresh, soft[q])]))
            negatives = _hardest_or_explain(
                query_descriptor, rows, candidates, negs_num_per_query, neg_samples_num, database_num + q
            )
            state.neg_cache[q] = negatives.copy()
        else:  # random
            # Draw 3 (per query): enough images that, minus the soft positives, negs_num remain.
            drawn = np.random.choice(database_num, size=negs_num_per_query + len(soft[q]), replace=False)
            negatives = remove_soft_positives(drawn, soft[q])[:negs_num_per_query]
        triplets[i, 0] = database_num + q
        triplets[i, 1] = positive
        triplets[i, 2:] = negatives

    dataset.triplets_global_indexes = triplets
    return triplets


def _hardest_or_explain(
    query_descriptor: np.ndarray,
    rows: Callable[[np.ndarray], np.ndarray],
    candidates: np.ndarray,
    negs_num: int,
    neg_samples_num: int,
    query_global: int,
) -> np.ndarray:
    if len(candidates) < negs_num:
        raise ValueError(
            f"Query {query_global} has only {len(candidates)} negative candidates among the "
            f"--neg_samples_num={neg_samples_num} sampled database images (the others are its soft "
            f"positives), fewer than --negs_num_per_query={negs_num}: raise --neg_samples_num."
        )
    return hardest_negatives(query_descriptor, rows(candidates), candidates, negs_num)
