"""Feature-extraction throughput: the project's path against a plain explicit-attention reference.

Both sides run the same weights (one GeoLocalizationNet, random weights, fp32) on the same batches:

* project:   ``model(images)`` under ``torch.inference_mode`` (attention through SDPA);
* reference: :func:`reference_forward`, which walks the very same modules but writes every step out
  with functional calls, attention as ``softmax(q k^T / sqrt(d)) v``, under ``torch.no_grad``.

Batches are timed interleaved (project, reference, then reference, project, ...) so that load from
other processes on a shared machine hits both sides alike; the rates printed first are those of the
fastest batch of each side (the least disturbed), the means over all batches and the process CPU
time per image follow. The adapters' output layers get small random weights (they start at zero) so
that the adapter paths count too. The outputs must agree: the largest absolute difference of the
local (B, h', w', 128) and global (B, D) features is printed. Then the
DataLoader feeding is measured: images/s of ``retrieval.extract_features`` over a small synthetic folder
with ``num_workers`` 0 and 2, next to the rate of the loader alone (no model).

    python3 benchmarks/extract.py                              # ViT-L/14, CPU, 8 images, batch 2
    python3 benchmarks/extract.py --device cuda --images 64 --batch_size 16 --warmup_images 16
    python3 benchmarks/extract.py --backbone vit_tiny --backbone_depth 2 --images 2   # smoke size

Prints e.g. ``extract: project 0.52 img/s, reference 0.50 img/s, 1.04x, max |diff| 2.1e-06`` and the
peak RSS of the process.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import network

# The reference states the model from the paper's definition (ViT block with adapters, heads), not from the
# project's code: the parallel adapter's weight and DINOv2's positional-table interpolation offset.
PARALLEL_ADAPTER_WEIGHT = 0.2
POS_OFFSET = 0.1


# ------------------------------------------------------------------------------------------------
# The reference forward
# ------------------------------------------------------------------------------------------------


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out; q, k, v (B, heads, N, d) -> (B, heads, N, d)."""
    weights = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def _layer_norm(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _adapter(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """D_fc2(relu(D_fc1(x))), plus x for the serial adapter (module.skip)."""
    out = _linear(module.D_fc2, torch.relu(_linear(module.D_fc1, x)))
    return x + out if module.skip else out


def _feed_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(module, "w12"):  # SwiGLU (ViT-g)
        a, b = _linear(module.w12, x).chunk(2, dim=-1)
        return _linear(module.w3, F.silu(a) * b)
    return _linear(module.fc2, F.gelu(_linear(module.fc1, x)))


def _positional_table(vit: torch.nn.Module, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1, 1 + grid_h*grid_w, D): class entry as is, the square patch table resized bicubically by
    scale factor ((grid + 0.1) / side) when the grid differs from it."""
    pos = vit.pos_embed
    side = math.isqrt(pos.shape[1] - 1)
    if (grid_h, grid_w) == (side, side):
        return pos
    table = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    table = F.interpolate(
        table,
        scale_factor=((grid_h + POS_OFFSET) / side, (grid_w + POS_OFFSET) / side),
        mode="bicubic",
        antialias=False,
    )
    table = table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(pos.dtype)
    return torch.cat([pos[:, :1], table], dim=1)


def _block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One block: x += ls1(adapter1(attn(norm1 x))); x += ls2(mlp(norm2 x) + 0.2 adapter2(norm2 x))."""
    B, N, D = x.shape
    heads = block.attn.num_heads
    y = _layer_norm(block.norm1, x)
    q, k, v = _linear(block.attn.qkv, y).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    attended = explicit_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
    attended = _linear(block.attn.proj, attended)
    x = x + block.ls1.gamma * _adapter(block.adapter1, attended)
    y = _layer_norm(block.norm2, x)
    return x + block.ls2.gamma * (_feed_forward(block.mlp, y) + PARALLEL_ADAPTER_WEIGHT * _adapter(block.adapter2, y))


def reference_forward(model: network.GeoLocalizationNet, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model's forward written out on its own parameters, explicit softmax attention.

    images (B, 3, H, W) -> (local (B, 4h-3, 4w-3, 128), global (B, D)), h = H/p, w = W/p.
    """
    vit = model.backbone
    p = vit.patch_size
    B, _, H, W = images.shape
    h, w = H // p, W // p
    proj = vit.patch_embed.proj
    x = F.conv2d(images, proj.weight, proj.bias, stride=p).flatten(2).transpose(1, 2)  # (B, h*w, D)
    x = torch.cat([vit.cls_token.expand(B, -1, -1), x], dim=1) + _positional_table(vit, h, w)
    registers = vit.num_register_tokens
    if registers:  # registers follow the class token and get no positional embedding
        x = torch.cat([x[:, :1], vit.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
    for block in vit.blocks:
        x = _block(block, x)
    tokens = _layer_norm(vit.norm, x)[:, 1 + registers :]
    fmap = tokens.reshape(B, h, w, -1).permute(0, 3, 1, 2)  # (B, D, h, w)

    gem = model.aggregation[1]
    pooled = F.normalize(fmap, dim=1).clamp(min=gem.eps).pow(gem.p).mean(dim=(-2, -1)).pow(1.0 / gem.p)
    global_features = F.normalize(pooled.flatten(1), dim=-1)

    up = model.LocalAdapt
    local = F.conv_transpose2d(fmap, up.upconv1.weight, up.upconv1.bias, stride=2, padding=1)
    local = F.conv_transpose2d(torch.relu(local), up.upconv2.weight, up.upconv2.bias, stride=2, padding=1)
    local_features = F.normalize(local.permute(0, 2, 3, 1), dim=-1)
    return local_features, global_features


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load_average() -> str:
    """1-minute load average against the CPU count: on a shared machine it says how far to trust timings."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: a timer read without a sync measures the launch, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def randomize_adapters(model: torch.nn.Module, *, std: float = 0.02, seed: int = 0) -> None:
    """Give every adapter a non-zero output layer (they start at zero), so that the adapter paths
    take part in the timing and in the agreement check."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".D_fc2." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def time_forwards(
    model: network.GeoLocalizationNet, batches: Sequence[torch.Tensor], *, device: torch.device, warmup_images: int = 1
) -> Dict[str, float]:
    """Time project and reference on every batch (B, 3, H, W), interleaved (ABBA order), after an
    untimed warm-up on the first `warmup_images` images of the first batch (0: none). Returns images/s
    of both sides and the max |diff| of local and global features over all timed batches."""
    model.eval()

    def project(x):
        with torch.inference_mode():
            return model(x)

    def reference(x):
        with torch.no_grad():
            return reference_forward(model, x)

    sides = {"project": project, "reference": reference}
    if warmup_images:  # warm-up: allocator, kernel selection, lazy inits
        for fn in sides.values():
            fn(batches[0][:warmup_images].to(device))
    _sync(device)
    elapsed = {name: 0.0 for name in sides}
    cpu = {name: 0.0 for name in sides}  # process CPU seconds: less sensitive to being descheduled
    best = {name: math.inf for name in sides}  # fastest seconds per image of any batch
    diff_local = diff_global = 0.0
    images = 0
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        outputs = {}
        for name in ("project", "reference") if i % 2 == 0 else ("reference", "project"):
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs[name] = sides[name](batch)
            _sync(device)
            seconds = time.perf_counter() - start
            cpu[name] += time.process_time() - cpu_start
            elapsed[name] += seconds
            best[name] = min(best[name], seconds / batch.shape[0])
        (lp, gp), (lr, gr) = outputs["project"], outputs["reference"]
        diff_local = max(diff_local, (lp - lr).abs().max().item())
        diff_global = max(diff_global, (gp - gr).abs().max().item())
        images += batch.shape[0]
    # Best-batch rates lead: on a shared machine, load from other processes only ever slows a batch
    # down, so the fastest batch is the least disturbed estimate (as timeit's min); the means are kept.
    return {
        "project_ips": 1.0 / best["project"],
        "reference_ips": 1.0 / best["reference"],
        "project_mean_ips": images / elapsed["project"],
        "reference_mean_ips": images / elapsed["reference"],
        "project_cpu_s_per_image": cpu["project"] / images,
        "reference_cpu_s_per_image": cpu["reference"] / images,
        "max_diff_local": diff_local,
        "max_diff_global": diff_global,
        "images": images,
        "batches": len(batches),
    }


def loader_throughput(
    model: torch.nn.Module, dataset, indexes: Sequence[int], *, batch_size: int, num_workers: int, device: str
) -> Dict[str, float]:
    """images/s of retrieval.extract_features (model included) and of its DataLoader alone."""
    from torch.utils.data import DataLoader

    import retrieval
    from datasets_ws import ImagesSubset

    start = time.perf_counter()
    for _ in DataLoader(ImagesSubset(dataset, indexes, "hard_resize"), batch_size=batch_size, num_workers=num_workers):
        pass
    loader_alone = len(indexes) / (time.perf_counter() - start)
    store = retrieval.DenseStore()  # in RAM: a few images only
    _sync(torch.device(device))
    start = time.perf_counter()
    retrieval.extract_features(
        model,
        dataset,
        indexes,
        extraction=retrieval.Extraction(batch_size=batch_size, num_workers=num_workers, device=device),
        method="hard_resize",
        local_store=store,
    )
    _sync(torch.device(device))
    with_model = len(indexes) / (time.perf_counter() - start)
    store.close()
    return {"extract_ips": with_model, "loader_ips": loader_alone}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--backbone", default="vit_large", help="backbone of network.GeoLocalizationNet")
    parser.add_argument("--backbone_depth", type=int, default=None, help="fewer blocks (smoke runs)")
    parser.add_argument("--registers", action="store_true", help="the DINOv2 variant with 4 registers")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--images", type=int, default=8, help="images timed per side")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=2,
        help="images per forward (4 batches per side by default: best-of-4 and ABBA order)",
    )
    parser.add_argument(
        "--warmup_images", type=int, default=1, help="untimed images per side before timing (raise it for CUDA runs)"
    )
    parser.add_argument("--resize", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    parser.add_argument(
        "--loader_images",
        type=int,
        default=4,
        help="images of the synthetic folder per DataLoader measurement (0: skip it)",
    )
    parser.add_argument(
        "--loader_batch_size",
        type=int,
        default=2,
        help="batch size of the DataLoader measurement (small: every worker gets a batch)",
    )
    parser.add_argument("--loader_workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seed", type=int, default=0)
    return parser


@dataclasses.dataclass(frozen=True)
class Backbone:
    """The model measured: a backbone of network.GeoLocalizationNet, optionally cut to its first blocks."""

    name: str = "vit_large"
    depth: Optional[int] = None
    registers: bool = False


@dataclasses.dataclass(frozen=True)
class LoaderRun:
    """The extract_features pass over synthetic images: how many, in batches of how many, and with which
    numbers of loader processes (one measurement each; 0 images: skipped)."""

    images: int = 4
    batch_size: int = 2
    workers: Sequence[int] = (0, 2)


def run(
    *,
    backbone: Backbone = Backbone(),
    device: str = "cpu",
    images: int = 8,
    batch_size: int = 2,
    warmup_images: int = 1,
    resize: Sequence[int] = (224, 224),
    loader: LoaderRun = LoaderRun(),
    seed: int = 0,
) -> Dict[str, float]:
    """Run every measurement, print the report, return the numbers (images/s, max |diff|, peak RSS)."""
    backbone_depth, registers = backbone.depth, backbone.registers
    loader_images, loader_batch_size, loader_workers = loader.images, loader.batch_size, loader.workers
    backbone = backbone.name
    for flag, value in (("images", images), ("batch_size", batch_size), ("loader_batch_size", loader_batch_size)):
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1 (got {value})")
    if warmup_images < 0 or loader_images < 0 or any(w < 0 for w in loader_workers):
        raise ValueError("--warmup_images, --loader_images and --loader_workers must not be negative")
    if resize[0] % 14 or resize[1] % 14:
        raise ValueError(f"--resize {resize[0]} {resize[1]} must be multiples of the patch size 14")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    torch_device = torch.device(device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = network.GeoLocalizationNet(backbone=backbone, registers=registers, backbone_depth=backbone_depth)
    randomize_adapters(model, seed=seed)
    model = model.to(torch_device).eval()
    print(
        f"model: {backbone}{'' if backbone_depth is None else f' depth {backbone_depth}'}"
        f"{' +registers' if registers else ''}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters, fp32, {torch_device}, {torch.get_num_threads()} threads, built in "
        f"{time.perf_counter() - start:.1f} s; load average {_load_average()}",
        flush=True,
    )

    gen = torch.Generator().manual_seed(seed)
    sizes = [min(batch_size, images - i) for i in range(0, images, batch_size)]
    batches = [torch.randn(n, 3, *resize, generator=gen) for n in sizes]
    result = time_forwards(model, batches, device=torch_device, warmup_images=warmup_images)
    ratio = result["project_ips"] / result["reference_ips"]
    max_diff = max(result["max_diff_local"], result["max_diff_global"])
    result["speedup"] = ratio
    print(
        f"extract: project {result['project_ips']:.3g} img/s, reference {result['reference_ips']:.3g} img/s, "
        f"{ratio:.2f}x, max |diff| {max_diff:.1e} (local {result['max_diff_local']:.1e}, global "
        f"{result['max_diff_global']:.1e}); best of {result['batches']} batches of {batch_size}, "
        f"{resize[0]}x{resize[1]}; means over all {result['images']} images: project "
        f"{result['project_mean_ips']:.3g}, reference {result['reference_mean_ips']:.3g} img/s "
        f"({result['project_mean_ips'] / result['reference_mean_ips']:.2f}x); CPU time per image: project "
        f"{result['project_cpu_s_per_image']:.3g} s, reference {result['reference_cpu_s_per_image']:.3g} s",
        flush=True,
    )

    if loader_images:
        import synthetic_dataset
        from datasets_ws import BaseDataset

        with tempfile.TemporaryDirectory(prefix="selavpr_extract_bench_") as folder:
            synthetic_dataset.generate(folder, "synthetic", synthetic_dataset.SyntheticOptions(preset="tiny"))
            dataset = BaseDataset(folder, "synthetic", "test", resize=resize)
            indexes = list(range(min(loader_images, len(dataset))))
            dataset.load(indexes[0], "hard_resize")  # untimed: first-call set-up of decoding and resizing
            parts = []
            for workers in loader_workers:
                r = loader_throughput(
                    model, dataset, indexes, batch_size=loader_batch_size, num_workers=workers, device=device
                )
                result[f"extract_ips_workers{workers}"] = r["extract_ips"]
                result[f"loader_ips_workers{workers}"] = r["loader_ips"]
                parts.append(
                    f"num_workers {workers}: {r['extract_ips']:.3g} img/s (loader alone {r['loader_ips']:.3g} img/s)"
                )
        print(
            f"extract_features over {len(indexes)} synthetic images, batch {loader_batch_size}: " + " | ".join(parts),
            flush=True,
        )

    result["peak_rss_bytes"] = peak_rss_bytes()
    line = f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB"
    if torch_device.type == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(torch_device)
        line += f", peak CUDA memory {result['peak_cuda_bytes'] / 2**30:.2f} GiB"
    print(f"{line}; load average {_load_average()}", flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(
            backbone=Backbone(name=args.backbone, depth=args.backbone_depth, registers=args.registers),
            device=args.device,
            images=args.images,
            batch_size=args.batch_size,
            warmup_images=args.warmup_images,
            resize=args.resize,
            loader=LoaderRun(images=args.loader_images, batch_size=args.loader_batch_size, workers=args.loader_workers),
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
