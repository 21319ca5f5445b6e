"""Building blocks of the DINOv2 vision transformer, one short module each."""

from .adapter import Adapter
from .attention import Attention
from .block import Block
from .layer_scale import LayerScale
from .mlp import Mlp, SwiGLUFFN
from .patch_embed import PatchEmbed

__all__ = ["Adapter", "Attention", "Block", "LayerScale", "Mlp", "SwiGLUFFN", "PatchEmbed"]
