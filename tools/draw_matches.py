"""Draw the dense mutual-nearest-neighbour matches between two images, as the public release's picture script.

    python3 tools/draw_matches.py IMAGE_A IMAGE_B --output OUT.jpg \\
        [--features dense|patch] [--no_ransac] [--ransac_threshold 5] <model flags>

Both images go through the evaluation preprocessing (normalise, then ``hard_resize`` to
``--resize``). Their local features (``dense``: the (h', w', 128) maps of the local head,
61x61 at 224x224; ``patch``: the L2-normalised (h, w, D) backbone patch tokens, 16x16) are
matched by mutual nearest neighbours, and the matches are drawn as lines between the two
original images shown side by side (aspect ratios kept, ``--display_height`` high, default
the ``--resize`` height). By default only matches consistent with a RANSAC fundamental
matrix are kept; RANSAC works in the pixels of the ``--resize`` input, where the inlier
distance ``--ransac_threshold`` means what the public release's 5 px at 224x224 means. The
RANSAC check is OpenCV's (``cv2.findFundamentalMat``), an optional dependency of this tool only
(``pip install opencv-python-headless``); without it the tool stops at once with that command,
unless ``--no_ransac`` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run from any current directory
    sys.path.insert(0, str(_ROOT))

import torch
import torch.nn.functional as F
from PIL import Image

import commons
import datasets_ws
import network
import numerics
import parser as flags
import visualizations as vis
from local_matching import mutual_nn_pairs

TOOL_GROUPS = (flags.WEIGHTS, flags.MODEL, flags.RUNTIME)


def build_argument_parser() -> argparse.ArgumentParser:
    """The project's model, weights and runtime flags plus this tool's own."""
    p = flags.CommandParser("Draw mutual-nearest-neighbour matches between two images", TOOL_GROUPS)
    tool = p.add_argument_group("draw_matches")
    tool.add_argument("image_a", type=flags.path, metavar="IMAGE_A", help="first image file")
    tool.add_argument("image_b", type=flags.path, metavar="IMAGE_B", help="second image file")
    tool.add_argument("--output", required=True, type=flags.path, help="picture to write (.jpg or .png)")
    tool.add_argument(
        "--features",
        choices=["dense", "patch"],
        default="dense",
        help="dense: local-head features (61x61 at 224); patch: L2-normalised backbone patch tokens (16x16 at 224)",
    )
    tool.add_argument(
        "--no_ransac", action="store_true", help="draw every mutual match (no RANSAC fundamental-matrix check)"
    )
    tool.add_argument(
        "--ransac_threshold", type=float, default=5.0, help="RANSAC inlier distance, in pixels of the --resize picture"
    )
    tool.add_argument(
        "--max_lines",
        type=int,
        default=None,
        help="draw at most this many lines (evenly spaced among the kept matches)",
    )
    tool.add_argument(
        "--display_height",
        type=int,
        default=None,
        help="height of the drawn pictures (aspect kept); default: --resize's height",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_argument_parser()
    args = p.parse(argv)
    if not args.ransac_threshold > 0:
        p.error(f"--ransac_threshold must be a positive number of pixels, got {args.ransac_threshold}")
    if args.max_lines is not None and args.max_lines < 0:
        p.error(f"--max_lines must be >= 0, got {args.max_lines}")
    if args.display_height is not None and args.display_height <= 0:
        p.error(f"--display_height must be a positive number of pixels, got {args.display_height}")
    return args


def load_input(path: str, resize: list[int], device: str) -> tuple[Image.Image, torch.Tensor]:
    """(the RGB image as read, its (1, 3, H, W) evaluation input)."""
    image = datasets_ws.open_image(path, min_side=datasets_ws.draft_min_side(resize))
    tensor = datasets_ws.hard_resize(datasets_ws.base_transform(image), resize)
    return image, tensor.unsqueeze(0).to(device)


@torch.inference_mode()
def local_features(
    model: network.GeoLocalizationNet, images: torch.Tensor, kind: str
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(h*w, C) L2-normalised features of one image, row-major, and the grid (h, w)."""
    if kind == "dense":
        grid_features = model(images)[0][0]  # (h', w', 128), normalised
    else:
        grid_features = F.normalize(model.patch_tokens(images)[0], p=2.0, dim=-1)  # (h, w, D)
    h, w, channels = grid_features.shape
    return grid_features.reshape(h * w, channels), (h, w)


def main(args: argparse.Namespace) -> Path:
    """Compute, match, draw and save; returns the written path. Bad input raises
    ValueError / FileNotFoundError with a message naming the file or flag."""
    vis.image_format_for(args.output)  # fail before the model runs
    if not args.no_ransac:
        vis.opencv()  # likewise a missing OpenCV
    numerics.set_precision("fp32", device=args.device).log()  # IEEE float32, also where torch would use TF32
    commons.make_deterministic(args.seed)  # same picture for the same flags
    image_a, input_a = load_input(args.image_a, args.resize, args.device)
    image_b, input_b = load_input(args.image_b, args.resize, args.device)
    model = network.build_model(args).eval()
    feats_a, grid_a = local_features(model, input_a, args.features)
    feats_b, grid_b = local_features(model, input_b, args.features)
    idx_a, idx_b = mutual_nn_pairs(feats_a, feats_b)
    idx_a = torch.as_tensor(idx_a).cpu().numpy()
    idx_b = torch.as_tensor(idx_b).cpu().numpy()
    message = (
        f"{len(idx_a)} mutual nearest-neighbour matches ({args.features} features, "
        f"grids {grid_a[0]}x{grid_a[1]} and {grid_b[0]}x{grid_b[1]})"
    )
    if not args.no_ransac:
        # RANSAC here rather than inside draw_matches: in the pixels of the model input (the
        # threshold's unit), and to report how many matches survive.
        input_size = (args.resize[1], args.resize[0])  # PIL order (W, H)
        _, keep = vis.fundamental_ransac(
            vis.grid_indices_to_pixels(idx_a, grid_a, input_size),
            vis.grid_indices_to_pixels(idx_b, grid_b, input_size),
            threshold=args.ransac_threshold,
        )
        idx_a, idx_b = idx_a[keep], idx_b[keep]
        message += f", {int(keep.sum())} consistent with RANSAC ({args.ransac_threshold} px)"
    # Grid cells map onto the original pictures exactly: hard_resize scales each axis alone.
    picture = vis.draw_matches(
        image_a,
        image_b,
        idx_a,
        idx_b,
        grid_a,
        grid_b,
        ransac=False,
        max_lines=args.max_lines,
        height=args.display_height or args.resize[0],
    )
    written = vis.save_image_atomic(picture, args.output)
    logging.info(f"{message}; saved {written}")
    return written


if __name__ == "__main__":
    arguments = parse_args()
    commons.setup_logging(None)
    commons.run_main(main, arguments)
