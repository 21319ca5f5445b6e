"""DINOv2 vision transformers with SelaVPR adapters; keyword-only factories."""

from .vision_transformer import (
    ARCHITECTURES,
    FACTORIES,
    DinoVisionTransformer,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHITECTURES",
    "FACTORIES",
    "DinoVisionTransformer",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_large",
    "vit_giant2",
]
