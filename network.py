"""SelaVPR's network: a DINOv2 ViT with adapters (backbone/), the global head (L2Norm, GeM) and the
local head (LocalAdapt).

load_model(...) is the one place that turns model settings and weight files into a ready model (the files
themselves are checkpoints.py's); build_model(args) calls it with the command line's flags.
"""

import contextlib
import logging
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import backbone as vit
import checkpoints

LOCAL_DIM = 128


class L2Norm(nn.Module):
    """L2-normalise along `dim` (channels of a (B, C, h, w) map by default)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=self.dim)


class GeM(nn.Module):
    """Generalised-mean pooling: (B, C, h, w) -> (B, C, 1, 1), avg(clamp(x, eps)^p)^(1/p), p learnable."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        # ones(1) * p, written as a fill: the same float32 value, and on the meta device (a model built to
        # receive a checkpoint) a scalar product would import torch's compiler stack (sympy: 150 MB).
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.size(-2), x.size(-1))).pow(1.0 / self.p)


class LocalAdapt(nn.Module):
    """Local adaptation: two stride-2 up-convolutions, (B, in_dim, h, w) -> (B, 128, 4h-3, 4w-3)."""

    def __init__(self, in_dim: int, *, hidden_dim: int = 256, out_dim: int = LOCAL_DIM) -> None:
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(in_dim, hidden_dim, kernel_size=3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.upconv2 = nn.ConvTranspose2d(hidden_dim, out_dim, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upconv2(self.relu(self.upconv1(x)))


def dense_map_size(resize: Sequence[int], *, patch_size: int) -> Tuple[int, int]:
    """Spatial size of the local features for an H x W input: each up-convolution maps n to 2n - 1."""
    h, w = resize[0] // patch_size, resize[1] // patch_size
    return 4 * h - 3, 4 * w - 3


class GeoLocalizationNet(nn.Module):
    """Backbone + global head (`aggregation`) + local head (`LocalAdapt`).

    forward(images (B, 3, H, W)) -> (local (B, 4h-3, 4w-3, 128), global (B, D)), h = H/14, w = W/14,
    both L2-normalised (the local features at every location).
    """

    def __init__(
        self, *, backbone: str = "vit_large", registers: bool = False, backbone_depth: Optional[int] = None
    ) -> None:
        super().__init__()
        if backbone not in vit.FACTORIES:
            raise ValueError(f"unknown --backbone {backbone!r}: choose one of {', '.join(vit.FACTORIES)}")
        kwargs = {} if backbone_depth is None else {"depth": backbone_depth}
        self.backbone = vit.FACTORIES[backbone](registers=registers, **kwargs)
        self.backbone_name = backbone  # the factory's name (the flag's value), for messages and checkpoints
        dim = self.backbone.embed_dim
        self.aggregation = nn.Sequential(L2Norm(), GeM(), nn.Flatten())
        self.LocalAdapt = LocalAdapt(dim)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised patch tokens as a grid (B, H/14, W/14, D)."""
        if images.dim() != 4 or images.shape[1] != 3:
            hint = (
                ": one image needs a batch dimension, e.g. model(image.unsqueeze(0))"
                if images.dim() == 3 and images.shape[0] == 3
                else ""
            )
            raise ValueError(
                f"the model takes a batch of RGB images (B, 3, H, W), got a tensor of shape {tuple(images.shape)}{hint}"
            )
        p = self.backbone.patch_size
        h, w = images.shape[-2] // p, images.shape[-1] // p
        tokens = self.backbone(images)
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fmap = self.patch_tokens(images).permute(0, 3, 1, 2)  # (B, D, h, w)
        local_features = F.normalize(self.LocalAdapt(fmap).permute(0, 2, 3, 1), p=2.0, dim=-1)
        return local_features, self._global_head(fmap)

    def global_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> global descriptors (B, D) alone: mining needs no dense features."""
        return self._global_head(self.patch_tokens(images).permute(0, 3, 1, 2))

    def _global_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.aggregation(fmap), p=2.0, dim=-1)

    def trainable_parameter_names(self, *, train_backbone: bool = False) -> list:
        """Adapters, LocalAdapt and GeM p (the paper trains only these); with train_backbone, everything."""
        return [
            n for n, _ in self.named_parameters() if train_backbone or not n.startswith("backbone.") or ".adapter" in n
        ]

    def freeze(self, *, train_backbone: bool = False) -> None:
        """Freeze the pre-trained backbone, leaving adapters and heads trainable."""
        trainable = set(self.trainable_parameter_names(train_backbone=train_backbone))
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable)


class PatchTokenFeatures(nn.Module):
    """A model's view whose dense features are the backbone's L2-normalised patch tokens (B, h, w, D)
    instead of the local head's (B, 4h-3, 4w-3, 128); the global descriptors are the model's own.

    Mutual nearest neighbours of the patch tokens re-rank with the foundation model alone: how a frozen,
    unadapted backbone re-ranks (the paper's frozen-DINOv2 baseline, and the matches that
    tools/draw_matches.py --features patch draws), without a LocalAdapt head that was never trained.
    """

    def __init__(self, model: GeoLocalizationNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.patch_tokens(images)  # (B, h, w, D)
        return F.normalize(tokens, p=2.0, dim=-1), self.model._global_head(tokens.permute(0, 3, 1, 2))

    def global_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.global_descriptors(images)


def ranking_model(model: GeoLocalizationNet, *, rerank_features: str = "local") -> nn.Module:
    """The model that evaluation extracts features with: `model` itself (re-ranking with its local head),
    or PatchTokenFeatures(model) for --rerank_features patch."""
    if rerank_features == "local":
        return model
    if rerank_features == "patch":
        return PatchTokenFeatures(model)
    raise ValueError(f"--rerank_features must be local or patch, got {rerank_features!r}")


def load_model(
    *,
    backbone: str = "vit_large",
    backbone_depth: Optional[int] = None,
    registers: bool = False,
    foundation_model_path: Optional[str] = None,
    checkpoint: Optional[str] = None,
    checkpoint_flag: str = "--resume",
    allow_random_weights: bool = False,
    train_backbone: bool = False,
    keep_random_stream: bool = False,
    device: str = "cpu",
    names: checkpoints.ArgNames = checkpoints.FLAGS,
) -> GeoLocalizationNet:
    """The one place that turns model settings and weight files into a ready GeoLocalizationNet.

    foundation_model_path: DINOv2 backbone weights (adapters start at zero output); checkpoint: a
    SelaVPR checkpoint (every weight, loaded last; `checkpoint_flag` names it in messages); neither:
    refused unless allow_random_weights (then a loud warning). The backbone is frozen except its adapters
    (everything trains with train_backbone); the model is moved to `device`. names: how error messages
    name the settings (the scripts' flags, or the hub entry's Python arguments).

    With a checkpoint, every weight comes from it, so the model is built on the meta device (no memory,
    no random initialisation) and the file's memory-mapped tensors become its weights: ViT-L's 1.3 GiB of
    initial weights are never drawn only to be replaced (the model is ready in 2.4 s on a 2-core CPU
    instead of 7.8-9.3 s). keep_random_stream (train.py) initialises
    anyway, so that the random numbers drawn after the model is built (shuffling, mining, augmentation)
    are those of the public code, which initialises before loading.
    """
    skeleton = bool(checkpoint) and not keep_random_stream and checkpoints.torch_can_map_files()
    with torch.device("meta") if skeleton else contextlib.nullcontext():
        model = GeoLocalizationNet(backbone=backbone, registers=registers, backbone_depth=backbone_depth)
    # in_place: the weights files are memory-mapped and their tensors become the model's where this torch
    # can (checkpoints.torch_can_map_files): one copy of the weights in memory, not two while loading.
    if foundation_model_path:
        checkpoints.load_foundation_weights(model, foundation_model_path, in_place=True, names=names)
    if checkpoint:
        checkpoints.load_model_weights(model, checkpoint, what=checkpoint_flag, in_place=True, names=names)
    if not foundation_model_path and not checkpoint:
        if not allow_random_weights:
            raise ValueError(
                "no weights given: pass --foundation_model_path (DINOv2 weights) and/or --resume "
                "(a SelaVPR checkpoint), or --allow_random_weights to run with random weights on "
                "purpose (demos and tests only)."
            )
        logging.warning("!" * 80)
        logging.warning("RUNNING WITH RANDOM WEIGHTS (--allow_random_weights): results mean nothing for real data.")
        logging.warning("!" * 80)
    if skeleton and any(t.is_meta for t in model.state_dict().values()):  # a strict load leaves none
        raise RuntimeError(f"{checkpoint} left weights of the model unset; please report this")
    model.freeze(train_backbone=train_backbone)
    return model.to(device)


def build_model(
    args, *, device: Optional[str] = None, train_backbone: bool = False, keep_random_stream: bool = False
) -> GeoLocalizationNet:
    """load_model with the command line's model, weights and runtime flags (--resume or --load_weights
    as the checkpoint), on `device` (default --device; under torchrun each process's own device).
    train_backbone: train.py's --train_backbone (the other commands have no training flags);
    keep_random_stream: see load_model (train.py)."""
    flag = "--resume" if args.resume else "--load_weights"
    return load_model(
        backbone=args.backbone,
        backbone_depth=args.backbone_depth,
        registers=args.registers,
        foundation_model_path=args.foundation_model_path,
        checkpoint=args.resume or args.load_weights,
        checkpoint_flag=flag,
        allow_random_weights=args.allow_random_weights,
        train_backbone=train_backbone,
        keep_random_stream=keep_random_stream,
        device=device or args.device,
    )
