"""Multi-head self-attention through PyTorch's fused scaled_dot_product_attention."""

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Standard softmax attention; (B, N, dim) -> (B, N, dim). Keys: qkv.*, proj.*."""

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        # (B, N, 3*D) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # The default scale is head_dim ** -0.5, as in DINOv2; SDPA picks a fused kernel where one exists.
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))
