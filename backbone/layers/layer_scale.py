"""Per-channel learnable residual scaling (LayerScale)."""

import torch
from torch import nn


class LayerScale(nn.Module):
    """x * gamma; gamma (dim,) starts at `init_value` (1.0 in DINOv2 ViT-L/14)."""

    def __init__(self, dim: int, *, init_value: float = 1.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
