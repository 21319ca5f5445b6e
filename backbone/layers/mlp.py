"""Feed-forward layers: the GELU MLP of ViT-S/B/L and the SwiGLU of the public ViT-g weights."""

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """fc2(gelu(fc1(x))); (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(hidden: int) -> int:
    """2/3 of the nominal hidden size rounded up to a multiple of 8 (4096 for ViT-g's 6144)."""
    return (int(hidden * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """w3(silu(a) * b) with (a, b) = split(w12(x)); keys mlp.w12.* (2*h, dim) and mlp.w3.* (dim, h)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        h = swiglu_hidden(hidden)
        self.w12 = nn.Linear(dim, 2 * h)
        self.w3 = nn.Linear(h, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)
