"""The definition in code: the whole similarity matrix, arg-max both ways, mutual rows, as the
public release computes them. This is also the engine's plain path (where the tiled engine does not
apply); the tests hold the engine to the same computation, ties and near-ties included."""

from typing import Tuple

import torch


@torch.no_grad()
def nearest_neighbours(xs: torch.Tensor, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """xs (b, Lc, C), q (Lq, C) float32 -> nn12 (b, Lc), nn21 (b, Lq).

    S = xs @ q.T (b, Lc, Lq) in one batched float32 matmul, as the public release; nn12[i] is the
    best query position of candidate row i, nn21[j] the best candidate row of query position j,
    both the first index on exact ties (torch.max)."""
    sim = torch.matmul(xs, q.unsqueeze(0).transpose(1, 2))
    nn12 = torch.max(sim, dim=2).indices
    nn21 = torch.max(sim, dim=1).indices
    return nn12, nn21


def mutual_rows(nn12: torch.Tensor, nn21: torch.Tensor) -> torch.Tensor:
    """nn12 (..., Lc), nn21 (..., Lq) -> bool (..., Lc): row i is mutual when nn21[nn12[i]] == i."""
    rows = torch.arange(nn12.shape[-1], device=nn12.device)
    return torch.gather(nn21, -1, nn12) == rows


def reference_scores(query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """query (Lq, C), candidates (K, Lc, C) float32 -> (K,) float32: the number of mutual pairs of
    each candidate, on the whole (K, Lc, Lq) similarity matrix (memory grows with K; the public
    mutual_nn_scores gives the same numbers in bounded memory)."""
    nn12, nn21 = nearest_neighbours(candidates, query)
    return mutual_rows(nn12, nn21).sum(dim=-1).float()
