"""Training losses: the global triplet loss and the local mutual-nearest-neighbour loss."""

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

import local_matching
import numerics


def local_triplet_loss(
    query_local: torch.Tensor, positive_local: torch.Tensor, negative_local: torch.Tensor
) -> torch.Tensor:
    """Sum over triplets of max(0, sim(q, neg) - sim(q, pos)); inputs (T, h, w, C) dense features.

    sim is the mean dot product over the mutual nearest neighbours (local_matching.mutual_nn_similarity).
    """
    sim_pos = local_matching.mutual_nn_similarity(query_local, positive_local)
    sim_neg = local_matching.mutual_nn_similarity(query_local, negative_local)
    return torch.clamp(sim_neg - sim_pos, min=0).sum()


def triplet_losses(
    local_features: torch.Tensor,
    global_features: torch.Tensor,
    triplets: torch.Tensor,
    *,
    margin: float,
    normaliser: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(global, local) losses of a batch, each summed over its triplets and divided by `normaliser`
    (train_batch_size * negs_num_per_query, as the public release).

    local_features (N, h, w, C), global_features (N, D) of the batch's images; triplets (T, 3) rows
    [query, positive, negative] indexing them.
    """
    q, p, n = triplets.to(global_features.device).T
    global_loss = nn.functional.triplet_margin_loss(
        global_features[q], global_features[p], global_features[n], margin=margin, p=2, eps=1e-6, reduction="sum"
    )
    local_loss = local_triplet_loss(local_features[q], local_features[p], local_features[n])
    return global_loss / normaliser, local_loss / normaliser


@dataclass(frozen=True)
class LossSettings:
    """The training loss: total = global triplet loss (margin `margin`) + local_weight * local loss.
    The paper adds the two (local_weight 1); 0 trains the global adaptation alone."""

    margin: float = 0.1
    local_weight: float = 1.0

    def total(self, global_loss: torch.Tensor, local_loss: torch.Tensor) -> torch.Tensor:
        # x * 1.0 is exact in floating point, so the paper's weight gives the plain sum bit for bit.
        return global_loss + self.local_weight * local_loss


def forward_features(
    model: nn.Module, images: torch.Tensor, *, precision: str = "fp32"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training forward: model(images) -> (local (N, h, w, C), global (N, D)), both float32.

    precision "fp32" and "tf32": the plain call (bit-identical to model(images); TF32 is the
    process-wide switch a command sets at its start, numerics.set_precision). "bf16": the forward runs
    under bfloat16 autocast on the images' device type (matmuls and convolutions in bf16, faster on GPUs
    and on CPUs with AMX); the parameters stay float32 (fp32 master weights: the optimizer updates them
    in float32) and the outputs are cast back to float32, so the losses and their mutual-NN matching
    are computed in float32.
    """
    with numerics.autocast(images.device.type, precision):
        local_features, global_features = model(images)
    return local_features.float(), global_features.float()
