"""Image to patch tokens."""

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, (H/p)*(W/p), dim), tokens in row-major order of the patch grid."""

    def __init__(self, *, patch_size: int, in_chans: int = 3, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)
