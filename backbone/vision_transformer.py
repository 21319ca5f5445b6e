"""The DINOv2 vision transformer with SelaVPR adapters in every block."""

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Adapter, Block, PatchEmbed

# DINOv2 adds 0.1 to the target grid size before computing the interpolation factor, so that
# floor(37 * factor) lands exactly on the wanted size despite float rounding.
POS_EMBED_INTERPOLATE_OFFSET = 0.1


def _trunc_normal_(tensor: torch.Tensor, std: float) -> None:
    # Cut at +-2 absolute (timm / DINOv2 convention), not at +-2 std.
    nn.init.trunc_normal_(tensor, std=std, a=-2.0, b=2.0)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT; `forward_features` maps (B, 3, H, W) to normalised tokens.

    H and W must be multiples of `patch_size`. The positional table is sized for `img_size`
    (518 -> 37x37 patches + class token) and interpolated to other grids.
    """

    def __init__(
        self,
        *,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        num_register_tokens: int = 0,
        layerscale_init: float = 1.0,
        adapter_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.patch_embed = PatchEmbed(patch_size=patch_size, embed_dim=embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        # Unused at inference; kept so that the public weight files load with every key used.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                ffn=ffn,
                layerscale_init=layerscale_init,
                adapter_ratio=adapter_ratio,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    def init_weights(self) -> None:
        if self.pos_embed.is_meta:
            # Built on the meta device, to receive a checkpoint's tensors: there are no values to draw
            # (and the meta kernels of the normal initialisers would import sympy: 150 MB resident).
            return
        _trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Adapter):
                m.zero_init_output()

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Positional embeddings for a grid_h x grid_w patch grid -> (1, 1 + grid_h*grid_w, D)."""
        n = self.pos_embed.shape[1] - 1
        side = int(math.sqrt(n))
        if grid_h == grid_w == side:
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        table = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # The scale factor (not the size) defines the bicubic sampling grid, as in DINOv2: passing `size`
        # gives the same shape but different values.
        scale = ((grid_h + POS_EMBED_INTERPOLATE_OFFSET) / side, (grid_w + POS_EMBED_INTERPOLATE_OFFSET) / side)
        table = F.interpolate(table, scale_factor=scale, mode="bicubic", antialias=False)
        if table.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(
                f"positional table interpolated to {tuple(table.shape[-2:])}, expected {(grid_h, grid_w)}"
            )
        patch_pos = table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1).to(self.pos_embed.dtype)

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + R + h*w, D): class token, registers, patch tokens."""
        B, _, H, W = images.shape
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        if self.num_register_tokens:
            # Registers go in after the positional embeddings were added: they get none.
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> dict with x_norm_clstoken (B, D), x_norm_regtokens (B, R, D),
        x_norm_patchtokens (B, h*w, D) in row-major grid order, x_prenorm (B, 1 + R + h*w, D)."""
        x = self.prepare_tokens(images)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        r = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:r],
            "x_norm_patchtokens": x_norm[:, r:],
            "x_prenorm": x,
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised patch tokens (B, h*w, D)."""
        return self.forward_features(images)["x_norm_patchtokens"]


# Sizes of the DINOv2 family: (embed_dim, depth, num_heads, feed-forward).
ARCHITECTURES = {
    # Not a DINOv2 size: a small width for the tests and the CPU demo (no public weights exist for it).
    "vit_tiny": (192, 12, 3, "mlp"),
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant2": (1536, 40, 24, "swiglu"),
}


def _factory(name: str, *, registers: bool, **kwargs) -> DinoVisionTransformer:
    dim, depth, heads, ffn = ARCHITECTURES[name]
    params = dict(embed_dim=dim, depth=depth, num_heads=heads, ffn=ffn, num_register_tokens=4 if registers else 0)
    params.update(kwargs)
    return DinoVisionTransformer(**params)


def vit_small(*, registers: bool = False, **kwargs) -> DinoVisionTransformer:
    return _factory("vit_small", registers=registers, **kwargs)


def vit_base(*, registers: bool = False, **kwargs) -> DinoVisionTransformer:
    return _factory("vit_base", registers=registers, **kwargs)


def vit_large(*, registers: bool = False, **kwargs) -> DinoVisionTransformer:
    return _factory("vit_large", registers=registers, **kwargs)


def vit_giant2(*, registers: bool = False, **kwargs) -> DinoVisionTransformer:
    return _factory("vit_giant2", registers=registers, **kwargs)


def vit_tiny(*, registers: bool = False, **kwargs) -> DinoVisionTransformer:
    return _factory("vit_tiny", registers=registers, **kwargs)


FACTORIES = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}
