"""Pre-train the project's small foundation model: a DINOv2-layout ViT taught without place labels.

    python3 tools/pretrain_foundation.py --output weights/foundation_vit_tiny_d4.pth

What it does, in order:

1. Generates its own pool of images with the built-in synthetic generator, with OTHER seeds and other
   settings than the demo's data set (which is seed 0 with the default preset): streets, facades and
   light it never evaluates on. Only the pixels are used: no file name, position, split or place.
2. Checks that no image file of the pool is byte-identical to one of the demo's data set (SHA-256 of
   every file of both; the demo's set is generated for the check, ~10 s), and stops if one is.
3. Trains the backbone by self-supervised contrastive learning on two augmented views of each image
   (random resized crops with their boxes known, colour, gamma, grey, blur and noise):
   * image level: InfoNCE between the two views' class tokens (through a small projection head): a
     view must find its sibling among all the views of the batch (SimCLR's objective);
   * patch level: InfoNCE between the patch tokens of the two views: a patch must find, among the
     other view's patches, the one that covers the same point of the image (the crop boxes say which),
     so the normalised patch tokens become matchable across viewpoint and light - what mutual
     nearest-neighbour re-ranking needs.
   The adapters of the blocks are not part of the foundation: they stay at zero output and frozen.
4. Saves only the backbone's weights, fp32, in exactly the key layout of the public
   dinov2_vitl14_pretrain.pth (a flat state dict: cls_token, pos_embed for 37x37 patches, mask_token,
   patch_embed, blocks.<i>.*, norm; no adapter keys), loads it back through the project's DINOv2
   loader (checkpoints.load_foundation_weights) as a check, and writes beside it
   <name>.provenance.json (command, seeds, data settings, versions, threads, wall time, final losses,
   SHA-256, the full log) and <name>.log.

Deterministic for the same seed, flags, torch version, CPU and --threads (bit-identical files on the same
machine); on another CPU or BLAS the floating-point sums differ in their last bits, the runs drift apart and
give a file of the same quality, not the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from any current directory
    sys.path.insert(0, str(_ROOT))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import atomic_files
import backbone as vit
import checkpoints
import network
import synthetic
from datasets_ws import IMAGENET_MEAN, IMAGENET_STD

# The demo's data set (demo.py, synthetic_dataset.py's defaults): never trained on.
DEMO_DATA = dict(seed=0, preset="default")

# The pre-training pool: one synthetic data set per seed, with settings unlike the demo's (denser
# database, more night and sideways shots, more look-alike buildings). Every split's images are used as
# plain pictures; the generator's labels are never read.
POOL_SETTINGS = dict(db_spacing_m=4.0, night_fraction=0.35, sideways_fraction=0.5, lookalikes_per_km=4.0)
POOL_SIZES = dict(
    train_database_num=1500,
    train_queries_num=500,
    val_database_num=500,
    val_queries_num=200,
    test_database_num=500,
    test_queries_num=200,
)


@dataclass(frozen=True)
class Views:
    """How the two views of an image are drawn: crop area fraction (low, high) of the image, crop aspect
    range in the image's own normalised coordinates (1 = the whole image's shape, squeezed to the view as
    evaluation's hard_resize does), output size, and the photometric changes (each applied with
    probability `color_p`)."""

    size: Tuple[int, int] = (112, 112)
    scale: Tuple[float, float] = (0.25, 1.0)
    aspect: Tuple[float, float] = (0.75, 1.333)
    color_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.5
    gamma: Tuple[float, float] = (0.6, 2.0)
    grey_p: float = 0.2
    blur_p: float = 0.3
    noise: float = 0.03


@dataclass(frozen=True)
class Schedule:
    """Optimisation: AdamW with linear warm-up then cosine decay to zero, gradient-norm clipping."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    clip_grad: float = 3.0


@dataclass(frozen=True)
class Objective:
    """The two InfoNCE terms: temperatures, the patch term's weight, the projection heads' sizes."""

    global_temperature: float = 0.2
    dense_temperature: float = 0.2
    dense_weight: float = 1.0
    dense_head: bool = False
    head_hidden: int = 512
    head_dim: int = 128


@dataclass
class Log:
    """Everything the run logged, for the provenance file."""

    lines: List[str] = field(default_factory=list)

    def __call__(self, message: str) -> None:
        logging.info(message)
        self.lines.append(message)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def build_pool(folder: str, *, seeds: Sequence[int], preset: str, log: Log) -> List[str]:
    """Generate (or reuse, when made with the same options) one synthetic set per seed under `folder`;
    returns every image path of all of them, sorted."""
    if DEMO_DATA["seed"] in seeds:
        raise ValueError(
            f"--data_seeds must not contain {DEMO_DATA['seed']}: that is the demo's data set, which the "
            "foundation must never see. Choose other seeds."
        )
    sizes = POOL_SIZES if preset == "default" else {}
    paths = []
    for seed in seeds:
        start = time.perf_counter()
        root = synthetic.ensure_dataset(
            folder,
            f"pretrain_seed{seed}",
            synthetic.SyntheticOptions(seed=seed, preset=preset, **sizes, **POOL_SETTINGS),
        )
        found = sorted(str(p) for p in Path(root, "images").rglob("*.jpg"))
        log(f"Pool: seed {seed}: {len(found)} images in {root} ({time.perf_counter() - start:.1f} s)")
        paths += found
    return sorted(paths)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_disjoint_from_demo(paths: Sequence[str], *, log: Log) -> dict:
    """SHA-256 of every pool file against every file of the demo's data set (generated in a temporary
    folder); stops if any is shared. Returns the numbers for the provenance."""
    with tempfile.TemporaryDirectory(prefix="selavpr-demo-check-") as tmp:
        root = synthetic.generate(tmp, "synthetic", synthetic.SyntheticOptions(**DEMO_DATA))
        demo = {file_sha256(str(p)) for p in Path(root, "images").rglob("*.jpg")}
    pool = {file_sha256(p) for p in paths}
    shared = pool & demo
    log(f"Disjointness: {len(pool)} distinct pool files, {len(demo)} demo files, {len(shared)} shared (SHA-256)")
    if shared:
        raise RuntimeError(f"{len(shared)} pool images are byte-identical to images of the demo's data set")
    return {"pool_files": len(paths), "pool_distinct": len(pool), "demo_files": len(demo), "shared": 0}


def read_batch(paths: Sequence[str]) -> torch.Tensor:
    """Images as a (B, 3, H, W) float tensor in [0, 1]; all must have one size (one generator image size)."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"pool images differ in size ({sorted(shapes)}): generate the pool with one image size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)


# ------------------------------------------------------------------------------------------------
# Views with known boxes
# ------------------------------------------------------------------------------------------------


def sample_boxes(n: int, views: Views, gen: torch.Generator) -> torch.Tensor:
    """(n, 4) crop boxes (x0, y0, w, h) in normalised image coordinates [0, 1]."""
    area = torch.empty(n).uniform_(views.scale[0], views.scale[1], generator=gen)
    log_aspect = torch.empty(n).uniform_(math.log(views.aspect[0]), math.log(views.aspect[1]), generator=gen)
    aspect = log_aspect.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    x0 = torch.rand(n, generator=gen) * (1 - w)
    y0 = torch.rand(n, generator=gen) * (1 - h)
    return torch.stack([x0, y0, w, h], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear crop of every image's box, resized to `size` (no antialias, as evaluation's resize)."""
    x0, y0, w, h = boxes.unbind(1)
    theta = torch.zeros(len(boxes), 2, 3)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1].
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * x0 + w - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * y0 + h - 1
    grid = F.affine_grid(theta, [len(boxes), 3, size[0], size[1]], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _chance(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=gen) < p).float().view(n, 1, 1, 1)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=gen).view(n, 1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def photometric(x: torch.Tensor, views: Views, gen: torch.Generator) -> torch.Tensor:
    """Per-image random brightness, contrast, saturation, gamma, grey, blur and noise on (B, 3, H, W) in
    [0, 1]; every draw comes from `gen` (the same draws whatever is skipped)."""
    n = len(x)
    on = _chance(n, views.color_p, gen)
    b = _uniform(n, 1 - views.brightness, 1 + views.brightness, gen)
    c = _uniform(n, 1 - views.contrast, 1 + views.contrast, gen)
    s = _uniform(n, 1 - views.saturation, 1 + views.saturation, gen)
    g = _uniform(n, math.log(views.gamma[0]), math.log(views.gamma[1]), gen).exp()
    grey = _chance(n, views.grey_p, gen)
    blur = _chance(n, views.blur_p, gen)
    sigma = _uniform(n, 0.3, 1.5, gen).view(n)
    noise = _uniform(n, 0.0, views.noise, gen) * torch.randn(x.shape, generator=gen)

    y = x * b
    mean = _grey(y).mean(dim=(2, 3), keepdim=True)
    y = (y - mean) * c + mean
    lum = _grey(y)
    y = ((y - lum) * s + lum).clamp(0, 1).pow(g)
    x = on * y + (1 - on) * x
    x = grey * _grey(x).expand_as(x) + (1 - grey) * x
    # A separable Gaussian (radius 3) on the images drawn for it: one grouped convolution for all of them.
    picked = blur.view(n).nonzero().view(-1)
    if len(picked):
        m = len(picked)
        taps = torch.arange(-3, 4, dtype=x.dtype)
        kernel = torch.exp(-(taps.view(1, -1) ** 2) / (2 * sigma[picked].view(-1, 1) ** 2))
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, dim=0)  # (3m, 7)
        flat = x[picked].reshape(1, 3 * m, *x.shape[-2:])
        flat = F.conv2d(F.pad(flat, (3, 3, 0, 0), mode="replicate"), kernel.view(3 * m, 1, 1, 7), groups=3 * m)
        flat = F.conv2d(F.pad(flat, (0, 0, 3, 3), mode="replicate"), kernel.view(3 * m, 1, 7, 1), groups=3 * m)
        x = x.clone()
        x[picked] = flat.view(m, 3, *x.shape[-2:])
    return (x + noise).clamp(0, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def make_views(images: torch.Tensor, views: Views, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two views of every image: (2, B, 3, h, w) normalised views and their (2, B, 4) boxes."""
    boxes = torch.stack([sample_boxes(len(images), views, gen) for _ in range(2)])
    out = torch.stack([normalise(photometric(crop_resize(images, b, views.size), views, gen)) for b in boxes])
    return out, boxes


def patch_targets(src: torch.Tensor, dst: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every patch of the source views, the patch of the destination view that covers the same image
    point (its centre): (B, h*w) row-major indexes and a (B, h*w) mask of those that fall inside it.
    src, dst: (B, 4) boxes (x0, y0, w, h) in image coordinates."""
    gh, gw = grid
    cy = (torch.arange(gh, dtype=src.dtype) + 0.5) / gh
    cx = (torch.arange(gw, dtype=src.dtype) + 0.5) / gw
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")
    # Patch centres in image coordinates, then in the destination view's coordinates [0, 1).
    x = src[:, 0:1] + src[:, 2:3] * cx.reshape(1, -1)
    y = src[:, 1:2] + src[:, 3:4] * cy.reshape(1, -1)
    u = (x - dst[:, 0:1]) / dst[:, 2:3]
    v = (y - dst[:, 1:2]) / dst[:, 3:4]
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    col = (u * gw).floor().clamp(0, gw - 1).long()
    row = (v * gh).floor().clamp(0, gh - 1).long()
    return row * gw + col, inside


# ------------------------------------------------------------------------------------------------
# Model and objective
# ------------------------------------------------------------------------------------------------


def projection_head(dim: int, objective: Objective) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim, objective.head_hidden), nn.GELU(), nn.Linear(objective.head_hidden, objective.head_dim)
    )


def build_backbone(name: str, *, depth: int) -> vit.DinoVisionTransformer:
    """The DINOv2-layout backbone to pre-train, built as network.GeoLocalizationNet builds it (same
    factory, default 518-pixel positional table: 37x37), with its adapters frozen at zero output."""
    model = vit.FACTORIES[name](depth=depth)
    for n, p in model.named_parameters():
        p.requires_grad_(".adapter" not in n)
    return model


def info_nce(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of softmax(q . k / t) towards `targets`; q (..., n, d), k (..., m, d) L2-normalised."""
    logits = queries @ keys.transpose(-1, -2) / temperature
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")


def losses(
    backbone: nn.Module,
    heads: nn.ModuleDict,
    views: torch.Tensor,
    boxes: torch.Tensor,
    objective: Objective,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image-level, patch-level) InfoNCE of a batch: views (2, B, 3, H, W), boxes (2, B, 4)."""
    two, b = views.shape[:2]
    out = backbone.forward_features(views.flatten(0, 1))
    cls = F.normalize(heads["global"](out["x_norm_clstoken"]), dim=-1)  # (2B, d)
    # Every view's sibling is the other view of its image; every other view of the batch is a negative.
    sim = cls @ cls.T / objective.global_temperature
    sim = sim.masked_fill(torch.eye(two * b, dtype=torch.bool), float("-inf"))
    sibling = torch.arange(two * b).roll(b)
    global_loss = F.cross_entropy(sim, sibling)

    p = backbone.patch_size
    grid = (views.shape[-2] // p, views.shape[-1] // p)
    tokens = F.normalize(heads["dense"](out["x_norm_patchtokens"]), dim=-1).view(two, b, grid[0] * grid[1], -1)
    dense = []
    for src, dst in ((0, 1), (1, 0)):
        targets, inside = patch_targets(boxes[src], boxes[dst], grid)
        per_patch = info_nce(tokens[src], tokens[dst], targets, objective.dense_temperature)
        dense.append(per_patch[inside.reshape(-1)])
    dense_loss = torch.cat(dense).mean()
    return global_loss, dense_loss


def learning_rate(step: int, schedule: Schedule) -> float:
    if step < schedule.warmup_steps:
        return schedule.lr * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
    return schedule.lr * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list:
    """Weight decay on matrices only (not on norms, biases, LayerScale, tokens or positions)."""
    decay, plain = [], []
    for module in modules:
        for n, p in module.named_parameters():
            if not p.requires_grad:
                continue
            matrix = p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token", "mask_token"))
            (decay if matrix else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def pretrain(
    backbone: nn.Module,
    paths: Sequence[str],
    *,
    views: Views,
    schedule: Schedule,
    objective: Objective,
    seed: int,
    log: Log,
) -> Dict[str, float]:
    """Train `backbone` in place; returns the final losses (means over the last 10% of the steps)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dense_head = projection_head(backbone.embed_dim, objective) if objective.dense_head else nn.Identity()
    heads = nn.ModuleDict({"global": projection_head(backbone.embed_dim, objective), "dense": dense_head})
    optimizer = torch.optim.AdamW(param_groups([backbone, heads], schedule.weight_decay), lr=schedule.lr)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    order, cursor = torch.randperm(len(paths), generator=gen), 0
    history = []
    start = time.perf_counter()
    backbone.train()
    for step in range(schedule.steps):
        if cursor + schedule.batch_size > len(order):  # a new pass over the pool, reshuffled
            order, cursor = torch.randperm(len(paths), generator=gen), 0
        batch = [paths[i] for i in order[cursor : cursor + schedule.batch_size].tolist()]
        cursor += schedule.batch_size
        view_images, boxes = make_views(read_batch(batch), views, gen)
        lr = learning_rate(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        global_loss, dense_loss = losses(backbone, heads, view_images, boxes, objective)
        total = global_loss + objective.dense_weight * dense_loss
        if not math.isfinite(total.item()):
            raise RuntimeError(f"the pre-training loss became {total.item()} at step {step}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, schedule.clip_grad)
        optimizer.step()
        history.append((global_loss.item(), dense_loss.item()))
        if step % 10 == 0 or step == schedule.steps - 1:
            elapsed = time.perf_counter() - start
            log(
                f"step {step + 1:4d}/{schedule.steps}  image loss {history[-1][0]:.4f}  patch loss "
                f"{history[-1][1]:.4f}  lr {lr:.2e}  {elapsed / 60:.1f} min"
            )
    tail = history[-max(1, len(history) // 10) :]
    return {"image_loss": float(np.mean([h[0] for h in tail])), "patch_loss": float(np.mean([h[1] for h in tail]))}


# ------------------------------------------------------------------------------------------------
# The weight file
# ------------------------------------------------------------------------------------------------


def foundation_state_dict(backbone: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The backbone's weights in the public DINOv2 layout: every key but the adapters', fp32, own storage."""
    return OrderedDict(
        (k, v.detach().to(torch.float32).clone().contiguous())
        for k, v in backbone.state_dict().items()
        if ".adapter" not in k
    )


def check_loads(path: str, *, name: str, depth: int) -> None:
    """Load the written file the way --foundation_model_path does (every key used, only adapters missing)."""
    model = network.GeoLocalizationNet(backbone=name, backbone_depth=depth)
    checkpoints.load_foundation_weights(model, path)


def versions() -> Dict[str, str]:
    import PIL
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "Pillow": PIL.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="weight file to write (.pth); provenance and log go beside it")
    p.add_argument("--data_folder", default="datasets", help="where the pre-training pool is generated (reused)")
    p.add_argument("--data_seeds", type=int, nargs="+", default=[101, 102, 103], help="generator seeds (not 0)")
    p.add_argument("--data_preset", default="default", choices=sorted(synthetic.PRESETS))
    p.add_argument("--backbone", default="vit_tiny", choices=sorted(vit.FACTORIES))
    p.add_argument("--backbone_depth", type=int, default=4)
    p.add_argument("--resize", type=int, nargs=2, default=[112, 112], metavar=("H", "W"), help="view size")
    p.add_argument("--steps", type=int, default=Schedule.steps)
    p.add_argument("--batch_size", type=int, default=Schedule.batch_size, help="images per step (two views each)")
    p.add_argument("--lr", type=float, default=Schedule.lr)
    p.add_argument("--warmup_steps", type=int, default=Schedule.warmup_steps)
    p.add_argument("--dense_weight", type=float, default=Objective.dense_weight, help="weight of the patch term")
    p.add_argument(
        "--dense_head",
        action="store_true",
        help="patch term through a projection head (default: on the L2-normalised patch tokens themselves, "
        "the features that --rerank_features patch matches)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (results are bit-identical per count)")
    p.add_argument(
        "--skip_disjoint_check",
        action="store_true",
        help="do not check the pool against the demo's data set (tests only)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    patch = 14
    if any(v <= 0 or v % patch for v in args.resize):
        parser.error(f"--resize must be two positive multiples of the patch size {patch}, got {args.resize}")
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch_size >= 2 (each image's sibling needs other views)")
    if args.backbone_depth < 1:
        parser.error(f"--backbone_depth must be >= 1, got {args.backbone_depth}")
    output = Path(args.output)
    if output.suffix != ".pth":
        parser.error(f"--output must end in .pth, got {args.output}")
    stem = output.with_suffix("")
    output.parent.mkdir(parents=True, exist_ok=True)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s   %(message)s", stream=sys.stdout, force=True)
    log = Log()
    torch.set_num_threads(args.threads)
    command = "python3 " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, os.getcwd()), *(argv or sys.argv[1:])]
    )
    log(f"Command: {command}")
    started, cpu_started = time.perf_counter(), time.process_time()
    paths = build_pool(args.data_folder, seeds=args.data_seeds, preset=args.data_preset, log=log)
    disjoint = None if args.skip_disjoint_check else check_disjoint_from_demo(paths, log=log)
    if len(paths) < args.batch_size:
        parser.error(f"the pool has {len(paths)} images, fewer than --batch_size {args.batch_size}")

    views = Views(size=(args.resize[0], args.resize[1]))
    schedule = Schedule(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(args.warmup_steps, args.steps)
    )
    objective = Objective(dense_weight=args.dense_weight, dense_head=args.dense_head)
    torch.manual_seed(args.seed)
    model = build_backbone(args.backbone, depth=args.backbone_depth)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"Backbone {args.backbone}, {args.backbone_depth} blocks, {trained:,} trained parameters; {len(paths)} images")
    final = pretrain(model, paths, views=views, schedule=schedule, objective=objective, seed=args.seed, log=log)
    checkpoints.atomic_torch_save(foundation_state_dict(model), str(output))
    check_loads(str(output), name=args.backbone, depth=args.backbone_depth)
    digest = file_sha256(str(output))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    log(f"Wrote {output} ({output.stat().st_size / 1e6:.1f} MB, SHA-256 {digest}) in {wall / 60:.1f} min")
    log(f"Final losses (mean of the last 10% of the steps): {final}")

    provenance = {
        "file": output.name,
        "sha256": digest,
        "command": command,
        "script_sha256": file_sha256(__file__),
        "seed": args.seed,
        "threads": args.threads,
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "cpu_count": os.cpu_count(),
        "final_losses": final,
        "model": {"backbone": args.backbone, "backbone_depth": args.backbone_depth, "pos_embed_grid": 37},
        "data": {
            "generator_version": synthetic.GENERATOR_VERSION,
            "seeds": list(args.data_seeds),
            "preset": args.data_preset,
            "settings": {**(POOL_SIZES if args.data_preset == "default" else {}), **POOL_SETTINGS},
            "images": len(paths),
            "demo_data_set": DEMO_DATA,
            "disjoint_from_demo": disjoint,
        },
        "views": asdict(views),
        "schedule": asdict(schedule),
        "objective": asdict(objective),
        "versions": versions(),
        "log": log.lines,
    }
    atomic_files.atomic_write_text(str(stem) + ".provenance.json", json.dumps(provenance, indent=1) + "\n")
    atomic_files.atomic_write_text(str(stem) + ".log", "\n".join(log.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
