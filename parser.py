"""Every command-line flag, its default, and the checks between flags (done once, at parse time).

Public flags keep the public release's names, types and defaults; flags marked (ours) are additions.
"""
import argparse
import os
import sys
from typing import List, Optional

import torch

import network
from backbone import FACTORIES
from datasets_ws import PATCH_SIZE, TEST_METHODS


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def path(text: str) -> str:
    """argparse type of every path-valued flag: `~` and `~user` are expanded here, since the shell
    leaves them alone in `--flag=~/x` (and in quotes); otherwise a folder literally named `~` would be
    created in the working directory."""
    return os.path.expanduser(text)


def build_parser(description: str = "SelaVPR") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Training
    p.add_argument("--train_batch_size", type=_positive_int, default=4, help="queries per training batch")
    p.add_argument("--infer_batch_size", type=_positive_int, default=16, help="batch size for feature extraction")
    p.add_argument("--criterion", type=str, default="triplet", choices=["triplet", "sare_ind", "sare_joint"],
                   help="loss; only triplet is implemented (the SARE ones are refused with an error)")
    p.add_argument("--margin", type=float, default=0.1, help="triplet margin")
    p.add_argument("--epochs_num", type=_positive_int, default=50, help="maximum number of epochs")
    p.add_argument("--patience", type=_positive_int, default=3, help="epochs without a better val R@5 before stopping")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    p.add_argument("--optim", type=str, default="adam", choices=["adam", "sgd"], help="optimizer (sgd: momentum 0.9, weight decay 0.001)")
    p.add_argument("--cache_refresh_rate", type=_positive_int, default=1000, help="queries mined per loop")
    p.add_argument("--queries_per_epoch", type=_positive_int, default=5000,
                   help="must be a multiple of --cache_refresh_rate")
    p.add_argument("--negs_num_per_query", type=_positive_int, default=2, help="negatives per training query")
    p.add_argument("--neg_samples_num", type=_positive_int, default=1000, help="database images sampled for mining")
    p.add_argument("--mining", type=str, default="partial", choices=["partial", "full", "random", "msls_weighted"],
                   help="triplet mining mode")
    p.add_argument("--train_backbone", action="store_true",
                   help="(ours) also train the whole backbone, not only adapters and heads: for the demo "
                        "from random weights; the paper's recipe keeps it frozen")
    # Model
    p.add_argument("--l2", type=str, default="before_pool", choices=["before_pool", "after_pool", "none"],
                   help="accepted for compatibility; the public release does not use it either")
    p.add_argument("--pca_dim", type=_positive_int, default=None, help="needs --pca_dataset_folder")
    p.add_argument("--registers", action="store_true", help="DINOv2 with 4 register tokens")
    p.add_argument("--backbone", type=str, default="vit_large", choices=list(FACTORIES),
                   help="(ours) ViT size; the paper uses vit_large; vit_tiny is a test/demo size")
    p.add_argument("--backbone_depth", type=_positive_int, default=None,
                   help="(ours) number of blocks, default that of --backbone (tests/demo use 2)")
    p.add_argument("--seed", type=int, default=0, help="-1: no seeding")
    p.add_argument("--foundation_model_path", type=path, default=None, help="DINOv2 weights (.pth)")
    p.add_argument("--resume", type=path, default=None,
                   help="SelaVPR checkpoint: its weights; train.py also continues from its epoch, best R@5, "
                        "patience counter (and optimizer and random states when the file has them)")
    p.add_argument("--load_weights", type=path, default=None,
                   help="(ours) SelaVPR checkpoint whose weights alone are loaded (a fresh fine-tune)")
    p.add_argument("--allow_random_weights", action="store_true",
                   help="(ours) allow running with no weights file at all (random initialisation: demos/tests)")
    p.add_argument("--precision", type=str, default="fp32", choices=["fp32", "bf16"],
                   help="(ours) precision of feature extraction and of the training forward (bf16 autocast, "
                        "fp32 master weights and losses); faster on GPUs (and CPUs with AMX), changes results "
                        "slightly")
    # Runtime
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cuda", "cpu"], help="cuda when available, else cpu")
    p.add_argument("--num_workers", type=_non_negative_int, default=8, help="data loader processes")
    p.add_argument("--resize", type=int, default=[224, 224], nargs=2, metavar=("H", "W"),
                   help="input size, multiples of 14")
    p.add_argument("--dense_feature_map_size", type=int, default=None, nargs=3, metavar=("H", "W", "C"),
                   help="local feature map size; default 61 61 128 at 224x224, computed from --resize")
    p.add_argument("--test_method", type=str, default="hard_resize", choices=list(TEST_METHODS),
                   help="query preprocessing at test time")
    p.add_argument("--majority_weight", type=float, default=0.01, help="for --test_method maj_voting")
    p.add_argument("--efficient_ram_testing", action="store_true",
                   help="keep dense features in a file on disk (read back with positional reads) instead of RAM: same results, bounded memory")
    p.add_argument("--val_positive_dist_threshold", type=_positive_int, default=25, help="metres")
    p.add_argument("--train_positives_dist_threshold", type=_positive_int, default=10, help="metres")
    p.add_argument("--recall_values", type=_positive_int, default=[1, 5, 10, 20], nargs="+",
                   help="N of the reported recalls R@N")
    p.add_argument("--rerank_num", type=_positive_int, default=100, help="candidates re-ranked per query")
    p.add_argument("--num_preds_to_save", type=_non_negative_int, default=0,
                   help="(ours) picture rows with each query's top N predictions")
    p.add_argument("--save_only_wrong_preds", action="store_true",
                   help="(ours) with --num_preds_to_save: only queries whose first prediction is wrong")
    p.add_argument("--query_keys_file", type=path, default=None,
                   help="(ours) official MSLS-val protocol: keep only the queries whose key is in this file")
    # Data augmentation
    p.add_argument("--brightness", type=float, default=None, help="query augmentation: ColorJitter brightness")
    p.add_argument("--contrast", type=float, default=None, help="query augmentation: ColorJitter contrast")
    p.add_argument("--saturation", type=float, default=None, help="query augmentation: ColorJitter saturation")
    p.add_argument("--hue", type=float, default=None, help="query augmentation: ColorJitter hue")
    p.add_argument("--rand_perspective", type=float, default=None, help="query augmentation: RandomPerspective distortion")
    p.add_argument("--horizontal_flip", action="store_true", help="flip a whole training batch (or none)")
    p.add_argument("--random_resized_crop", type=float, default=None,
                   help="query augmentation: RandomResizedCrop scale (1 - x, 1)")
    p.add_argument("--random_rotation", type=float, default=None, help="query augmentation: RandomRotation degrees")
    # Paths
    p.add_argument("--datasets_folder", type=path, default=None, help="falls back to $DATASETS_FOLDER")
    p.add_argument("--dataset_name", type=str, default="pitts30k", help="folder name of the data set")
    p.add_argument("--pca_dataset_folder", type=path, default=None, help="relative to --datasets_folder")
    p.add_argument("--save_dir", type=str, default="default", help="name of the output sub-folder")
    return p


def expected_dense_size(resize: List[int]) -> List[int]:
    """--dense_feature_map_size for an H x W input: (4h - 3, 4w - 3, 128) with h = H/14, w = W/14."""
    return [*network.dense_map_size(resize, patch_size=PATCH_SIZE), network.LOCAL_DIM]


_UNSET = object()


def _resolve_model_settings(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill --backbone, --backbone_depth, --registers and --resize: given flags, else the values stored in
    the --resume / --load_weights checkpoint (files written by train.py), else the defaults."""
    given = {flag: getattr(args, flag) for flag in network.MODEL_FLAGS if getattr(args, flag) is not _UNSET}
    defaults = {flag: p.get_default(flag) for flag in network.MODEL_FLAGS}
    saved, source = None, None
    for flag in ("resume", "load_weights"):
        path = getattr(args, flag, None)
        if path and os.path.isfile(path):
            source = f"--{flag} {path}"
            try:
                # Memory-mapped where torch can: only the small settings entry is read (the weights are
                # loaded later, by network.build_model).
                checkpoint = network.load_weights_file(path, what=f"--{flag}", mmap=True)
            except (ValueError, OSError):
                break  # a bad file: loading the weights reports it, with the whole message, in its place
            try:
                saved = network.saved_model_settings(checkpoint, path=path, what=f"--{flag}")
            except ValueError as e:
                p.error(str(e))
            break
    try:
        settings, note = network.resolve_model_settings(given, saved, defaults, source=source or "the checkpoint")
    except ValueError as e:
        p.error(str(e))
    for flag, value in settings.items():
        setattr(args, flag, list(value) if flag == "resize" else value)
    args.model_settings_note = note


def parse_arguments(argv: Optional[List[str]] = None, parser: Optional[argparse.ArgumentParser] = None, *,
                    needs_data: bool = True) -> argparse.Namespace:
    """Parse and validate; a bad combination exits with argparse's usage line and a message saying
    what to do. `needs_data=False` for tools that work without a data set."""
    p = parser or build_parser()
    # The model flags start as UNSET (argparse keeps a value already in the namespace instead of the
    # default), so that a flag given on the command line can be told from its default: the settings
    # stored in a checkpoint of this project fill in the flags that were not given.
    unset = {flag: _UNSET for flag in network.MODEL_FLAGS}
    args = p.parse_args(sys.argv[1:] if argv is None else argv, namespace=argparse.Namespace(**unset))
    _resolve_model_settings(p, args)

    if args.datasets_folder is None and os.environ.get("DATASETS_FOLDER"):
        args.datasets_folder = path(os.environ["DATASETS_FOLDER"])
    if needs_data and args.datasets_folder is None:
        p.error("--datasets_folder is required (or set the DATASETS_FOLDER environment variable)")
    if args.criterion != "triplet":
        p.error(f"--criterion {args.criterion} is not implemented (the public release accepts it but has no "
                "SARE loss either); use --criterion triplet")
    if args.queries_per_epoch % args.cache_refresh_rate != 0:
        p.error(f"--queries_per_epoch ({args.queries_per_epoch}) must be a multiple of --cache_refresh_rate "
                f"({args.cache_refresh_rate})")
    if any(s <= 0 or s % PATCH_SIZE for s in args.resize):
        p.error(f"--resize {args.resize[0]} {args.resize[1]}: both sides must be positive multiples of the patch "
                f"size {PATCH_SIZE} (e.g. 224 224 or 322 322)")
    expected = expected_dense_size(args.resize)
    if args.dense_feature_map_size is None:
        args.dense_feature_map_size = expected
    elif list(args.dense_feature_map_size) != expected:
        p.error(f"--dense_feature_map_size {' '.join(map(str, args.dense_feature_map_size))} does not match "
                f"--resize {args.resize[0]} {args.resize[1]}, which gives {' '.join(map(str, expected))}; "
                "drop the flag or fix it")
    if args.pca_dim is not None and args.pca_dataset_folder is None:
        p.error("--pca_dim needs --pca_dataset_folder (the images to fit the PCA on)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; use --device cpu")
    if args.resume and args.load_weights:
        p.error("give either --resume (continue a run) or --load_weights (weights only), not both")
    if sorted(set(args.recall_values)) != list(args.recall_values):
        p.error("--recall_values must be increasing and distinct, e.g. 1 5 10 20")
    if args.save_only_wrong_preds and args.num_preds_to_save == 0:
        p.error("--save_only_wrong_preds needs --num_preds_to_save N (N > 0)")
    return args
