"""Mutual-nearest-neighbour matching of dense local features: the re-rank score, the candidate
order and the training similarity of the local loss.

Definition (one for the whole project). For a query Q (Lq, C) and a candidate X (Lc, C), dense
features flattened row-major from (h, w, C), the similarity is S = X @ Q.T (Lc, Lq) in float32.
nn12[i] = argmax_j S[i, j] and nn21[j] = argmax_i S[i, j], both taking the FIRST index on exact
ties, as torch.max / torch.argmax do. Row i is a mutual nearest neighbour when nn21[nn12[i]] == i;
the pair is (i, nn12[i]). For finite inputs there is always at least one mutual pair: the first
occurrence (row-major) of the global maximum of S. reference.py is this definition in code
(reference_scores).

- mutual_nn_scores: re-rank score of each candidate = number of mutual pairs, as float32. A
  candidate with exactly one mutual pair scores 1 (the public release stores 0 there through a
  ``squeeze()`` quirk; we deliberately do not reproduce it: trained models never get there).
- rerank: the one place that defines the order of candidates from their scores.
- mutual_nn_pairs: the pairs themselves, for one pair of feature maps (match pictures).
- mutual_nn_similarity: the differentiable training similarity, the mean of S[i, nn12[i]] over
  the mutual pairs.

The first three find the pairs with the engine (engine.py); the training similarity uses the plain
definition (reference.py), one pair at a time, which is cheap there. The engine is exact: the same decisions as the
reference (one float32 matmul of the whole candidate, then max both ways) on the same device, ties
included, in memory that does not grow with the number of candidates. How: engine.py (the CPU
engine, and the dispatch) and device_engine.py (the GPU engine); their proofs: screening.py (the
bfloat16 screens and their error bounds), exact.py (float32 products on parts of S), self_check.py
(the run-time check of what the exact recomputations rely on, and engine_paths()). staging.py brings
the candidates to the device with at most one host copy each.
"""

import os
from typing import Any, Optional, Tuple

import numpy as np
import torch

from .engine import check_sizes, matches
from .reference import mutual_rows, nearest_neighbours, reference_scores
from .self_check import PATH_GPU_SCREENED, PATH_PLAIN, PATH_SCREENED, PATH_TILED, engine_paths, tile_self_check
from .staging import CandidateStager

__all__ = [
    "mutual_nn_scores",
    "rerank",
    "mutual_nn_pairs",
    "mutual_nn_similarity",
    "reference_scores",
    "tile_self_check",
    "engine_paths",
    "PATH_SCREENED",
    "PATH_TILED",
    "PATH_PLAIN",
    "PATH_GPU_SCREENED",
]


def mutual_nn_scores(
    query_local: Any,
    database_store: Any,
    candidate_indices: Any,
    *,
    chunk_size: int = 4,
    row_tile: int = 512,
    fast_path: Optional[bool] = None,
    gpu_engine: Optional[bool] = None,
) -> torch.Tensor:
    """Re-rank scores: the number of mutual nearest neighbours between the query and each candidate.

    query_local is (Lq, C) or (h, w, C), a tensor or an array; its device is where the work runs.
    database_store is indexable by an int database index and returns that image's dense features (L, C)
    or (h, w, C): a numpy array or memmap, a torch tensor, or a store object (a dense_store.DenseStore is
    read straight into the staging buffers, staging.py). candidate_indices: (K,) ints, the candidates'
    database indices. Returns a float32 tensor (K,) on query_local's device, exactly equal to counting
    on the full float32 similarity matrix (ties included); exactly one mutual pair scores 1 (see the
    module doc).

    chunk_size: at most this many candidates are loaded and processed together (one batched matmul on
    the plain path and on the GPU engine; on the CPU engine, batches of at most 4); a few such chunks are
    in memory at once, so peak memory does not grow with K. row_tile: rows of S per tile on the CPU
    engine, per exact recomputation on the GPU engine (a multiple of 32). fast_path: None uses the
    bfloat16 screen where it pays (a GPU with torch's bfloat16 -> float32 matmul; on a CPU with bf16
    matrix hardware, if it was faster than the float32 tiles on the first candidates of this shape,
    timed side by side); True / False forces it on / off; results are identical either way, only the
    speed differs. gpu_engine: None runs the GPU engine (engine.py) on any device but the CPU; True runs it on
    the CPU too (tests), False never.
    """
    check_sizes(chunk_size, row_tile)
    query = _as_feature_matrix(query_local, "query_local")
    indices = np.asarray(candidate_indices.cpu() if isinstance(candidate_indices, torch.Tensor) else candidate_indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(
            f"candidate_indices must be a 1-D array of int database indices, got shape "
            f"{indices.shape} and dtype {indices.dtype}."
        )
    if indices.size and indices.min() < 0:
        raise ValueError(
            f"candidate_indices contains the negative index {indices.min()} (faiss pads "
            f"missing results with -1): search at most the database size."
        )
    # A GPU reads the next candidates into page-locked buffers on a few threads while it works.
    readers = min(4, os.cpu_count() or 1) if query.device.type == "cuda" else 0
    with (
        torch.no_grad(),
        CandidateStager(
            database_store, indices.tolist(), query.device, buffers=2 * chunk_size, readers=readers
        ) as stager,
    ):
        query = query.detach()
        mutuals = []
        found = matches(
            query, stager, chunk_size=chunk_size, row_tile=row_tile, fast_path=fast_path, gpu_engine=gpu_engine
        )
        for k, (_, mutual) in enumerate(found):
            mutuals.append(mutual)
            stager.release(k)
    if not mutuals:
        return torch.zeros(0, dtype=torch.float32, device=query.device)
    if all(m.shape == mutuals[0].shape for m in mutuals):  # one reduction, not one per candidate
        return torch.stack(mutuals).sum(dim=1).to(device=query.device, dtype=torch.float32)
    return torch.stack([m.sum() for m in mutuals]).to(device=query.device, dtype=torch.float32)


def rerank(scores: Any) -> np.ndarray:
    """Candidate order from re-rank scores (K,): ``np.argsort(scores_float32)[::-1]``, exactly the
    public release's call on a float32 vector (numpy's default sort is not stable and its tie order
    depends on the dtype, so the dtype is fixed here). The one place that defines the order."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"rerank: scores must be 1-D (one per candidate), got shape {scores.shape}.")
    return np.argsort(scores.astype(np.float32))[::-1]


def mutual_nn_pairs(
    a_local: Any, b_local: Any, *, fast_path: Optional[bool] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbour pairs of ONE pair of dense feature maps.

    a_local (La, C) or (h, w, C), b_local (Lb, C) or (h', w', C); S = a @ b.T. Returns LongTensors
    (idx_a (M,), idx_b (M,)) of flat row-major indices, ascending in idx_a: i = idx_a[m] and
    j = idx_b[m] are each other's best match (first index on ties). On a_local's device.
    """
    a = _as_feature_matrix(a_local, "a_local")
    b = _as_feature_matrix(b_local, "b_local", a.device)
    with torch.no_grad():
        ((nn12, mutual),) = list(
            matches(b.detach(), [a.detach()], chunk_size=1, row_tile=512, fast_path=fast_path, workers=False)
        )
    idx_a = mutual.nonzero().flatten().to(a.device)
    return idx_a, nn12.to(a.device)[idx_a]


def mutual_nn_similarity(query_local: torch.Tensor, cand_local: torch.Tensor) -> torch.Tensor:
    """Training similarity of the local loss, differentiable w.r.t. both inputs.

    query_local, cand_local: (B, L, C) or (B, h, w, C) (L may differ between the two). Per item,
    S = cand @ query.T; returns (B,) = mean of S[i, nn12[i]] over the mutual pairs i. The pairs are
    found by the plain definition (reference.py: the whole float32 product, arg-max both ways; no
    gradient flows through an arg-max), not by the re-rank engine: in a training step one pair at a
    time is all there is, and the plain product costs 4% of a ViT-L/14 step on the CPU, less than the
    engine's set-up at the demo's size (benchmarks/train_step_local.py); the engine's decisions are the
    same. The values are the dot products cand[i] . query[nn12[i]], recomputed with autograd (equal to
    S's entries up to float32 summation order). Exactly one pair -> that pair's similarity (the public release uses
    the aligned-position mean there through a squeeze() quirk; we do not). No pair at all only
    happens with non-finite input: then, as the public release, the mean dot product of aligned
    positions i (i < min(Lc, Lq)) is returned (NaN with NaN input).
    """
    q = _as_batch(query_local, "query_local")
    x = _as_batch(cand_local, "cand_local")
    if q.shape[0] != x.shape[0] or q.shape[2] != x.shape[2]:
        raise ValueError(
            f"mutual_nn_similarity: query {tuple(query_local.shape)} and candidates "
            f"{tuple(cand_local.shape)} must have the same batch size and channels."
        )
    sims = []
    for b in range(q.shape[0]):
        qb, xb = q[b], x[b]
        with torch.no_grad():
            nn12, nn21 = nearest_neighbours(xb.detach().float().unsqueeze(0), qb.detach().float())
            nn12, mutual = nn12[0], mutual_rows(nn12, nn21)[0]
        rows = mutual.nonzero().flatten()
        if rows.numel():
            vals = (xb[rows] * qb[nn12[rows]]).sum(dim=-1)
        else:
            n = min(xb.shape[0], qb.shape[0])
            vals = (xb[:n] * qb[:n]).sum(dim=-1)
        sims.append(vals.mean())
    return torch.stack(sims)


# ------------------------------------------------------------------------------------------------
# Input handling
# ------------------------------------------------------------------------------------------------
def _as_feature_matrix(features: Any, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
    """(L, C) or (h, w, C) tensor / numpy array (memmap included) -> float32 tensor (L, C).

    float32 conversion is what the public release does (``torch.Tensor(array)``); float16 and
    float32 inputs convert exactly.
    """
    if isinstance(features, torch.Tensor):
        t = features
    else:
        # np.array copies out of a read-only memmap (torch.from_numpy warns on non-writable
        # buffers); the copy is one image, never the whole store.
        t = torch.from_numpy(np.array(features, dtype=np.float32, copy=True))
    if t.dim() == 3:
        t = t.reshape(-1, t.shape[-1])
    if t.dim() != 2:
        raise ValueError(
            f"{name}: dense local features must be (L, C) or (h, w, C), got shape "
            f"{tuple(t.shape)}; pass one image's features."
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(
            f"{name}: dense local features are empty (shape {tuple(t.shape)}); check the feature extraction."
        )
    if device is not None and t.device != device:
        t = t.to(device)  # one map of a pair (mutual_nn_pairs): candidates go through staging.py
    return t.float().contiguous()


def _as_batch(features: torch.Tensor, name: str) -> torch.Tensor:
    """(B, L, C) or (B, h, w, C) tensor -> (B, L, C) (a view where possible, float kept)."""
    if not isinstance(features, torch.Tensor):
        raise ValueError(
            f"{name}: expected a torch.Tensor of dense features (B, h, w, C) or (B, L, C), "
            f"got {type(features).__name__}."
        )
    if features.dim() == 4:
        features = features.reshape(features.shape[0], -1, features.shape[-1])
    if features.dim() != 3 or features.shape[1] == 0:
        raise ValueError(
            f"{name}: dense features must be (B, L, C) or (B, h, w, C), got shape {tuple(features.shape)}."
        )
    return features
