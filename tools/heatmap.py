"""Feature heat map of one image: the negated channel mean of the patch features, min-max scaled, jet-coloured.

    python3 tools/heatmap.py IMAGE --output OUT.jpg [--alpha 0.6] <model flags>

The image goes through the evaluation preprocessing (normalise, then ``hard_resize`` to
``--resize``); the heat is the negated channel mean of the backbone's normalised patch-token
map (h, w, D), min-max scaled, upsampled (bilinear) to the ORIGINAL image size, coloured with
a jet-like map and blended over the image as ``alpha * heat + (1 - alpha) * image``.
Upsampling to the original size is exact because ``hard_resize`` scales each axis
independently, so every token still covers the same fraction of the picture.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from any current directory
    sys.path.insert(0, str(_ROOT))

import numpy as np
import torch

import commons
import datasets_ws
import network
import numerics
import parser as flags
import visualizations as vis

TOOL_GROUPS = (flags.WEIGHTS, flags.MODEL, flags.RUNTIME)


def build_argument_parser() -> argparse.ArgumentParser:
    """The project's model, weights and runtime flags plus this tool's own."""
    p = flags.CommandParser("Feature heat map of one image, blended over it", TOOL_GROUPS)
    tool = p.add_argument_group("heatmap")
    tool.add_argument("image", type=flags.path, metavar="IMAGE", help="image file")
    tool.add_argument("--output", required=True, type=flags.path, help="picture to write (.jpg or .png)")
    tool.add_argument(
        "--alpha", type=float, default=0.6, help="weight of the heat colours in the blend (the image gets 1 - alpha)"
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_argument_parser()
    args = p.parse(argv)
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha must lie in [0, 1], got {args.alpha}")
    return args


@torch.inference_mode()
def patch_heat(model: network.GeoLocalizationNet, images: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) model input -> (H/14, W/14) heat in [0, 1]."""
    tokens = model.patch_tokens(images)[0]  # (h, w, D)
    return vis.feature_heatmap(tokens.permute(2, 0, 1).float())  # channels first


def main(args: argparse.Namespace) -> Path:
    """Compute, colour, blend and save; returns the written path. Bad input raises
    ValueError / FileNotFoundError with a message naming the file or flag."""
    vis.image_format_for(args.output)  # fail before the model runs
    numerics.set_precision("fp32", device=args.device).log()  # IEEE float32, also where torch would use TF32
    commons.make_deterministic(args.seed)  # same picture for the same flags
    image = datasets_ws.open_image(args.image, min_side=datasets_ws.draft_min_side(args.resize))
    inputs = datasets_ws.hard_resize(datasets_ws.base_transform(image), args.resize)
    model = network.build_model(args).eval()
    heat = patch_heat(model, inputs.unsqueeze(0).to(args.device))
    picture = vis.overlay_heatmap(image, heat, alpha=args.alpha)
    written = vis.save_image_atomic(picture, args.output)
    logging.info(
        f"heat map of {heat.shape[0]}x{heat.shape[1]} patches over {image.width}x{image.height} pixels; saved {written}"
    )
    return written


if __name__ == "__main__":
    arguments = parse_args()
    commons.setup_logging(None)
    commons.run_main(main, arguments)
