"""A transformer block with SelaVPR's two adapters."""

import torch
from torch import nn

from .adapter import Adapter
from .attention import Attention
from .layer_scale import LayerScale
from .mlp import Mlp, SwiGLUFFN

# Weight of the parallel adapter's output beside the MLP (SelaVPR).
PARALLEL_ADAPTER_SCALE = 0.2


class Block(nn.Module):
    """Pre-norm ViT block; (B, N, dim) -> (B, N, dim).

    x = x + ls1(adapter1(attn(norm1(x))))                         # serial adapter, with skip
    x = x + ls2(mlp(norm2(x)) + 0.2 * adapter2(norm2(x)))         # parallel adapter, no skip
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        layerscale_init: float = 1.0,
        norm_eps: float = 1e-6,
        adapter_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads)
        self.ls1 = LayerScale(dim, init_value=layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn == "mlp":
            self.mlp = Mlp(dim, hidden)
        elif ffn == "swiglu":
            self.mlp = SwiGLUFFN(dim, hidden)
        else:
            raise ValueError(f"unknown feed-forward layer {ffn!r}: use 'mlp' or 'swiglu'")
        self.ls2 = LayerScale(dim, init_value=layerscale_init)
        self.adapter1 = Adapter(dim, ratio=adapter_ratio, skip=True)
        self.adapter2 = Adapter(dim, ratio=adapter_ratio, skip=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.adapter1(self.attn(self.norm1(x))))
        y = self.norm2(x)
        return x + self.ls2(self.mlp(y) + PARALLEL_ADAPTER_SCALE * self.adapter2(y))
