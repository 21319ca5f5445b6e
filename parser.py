"""Command-line flags in shared groups; each command builds its own parser from the groups it uses.

A group is one coherent set of flags (shown under its title in --help) with the checks between them.
`CommandParser(description, groups)` puts the chosen groups together and its `parse(...)` returns the
final arguments: flags parsed, then every group's checks and parse-time filling (model settings from a
checkpoint, $DATASETS_FOLDER, the dense map size), all before the namespace is built, which nothing
edits afterwards. A command gets exactly the flags of its groups (plus its own); any other flag is
argparse's "unrecognized arguments" error.

train.py and eval.py take PUBLIC_GROUPS: every flag of the public release (both parse the same set
there, so a command line can be pasted from one to the other; eval.py adds --continue_run). Public
flags keep the public release's names, types and defaults; flags marked (ours) are additions.
"""

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import checkpoints
import dense_store
import network
import numerics
import run_progress
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


Values = Dict[str, object]  # the parsed flags, before they become the command's namespace


@dataclass(frozen=True)
class Group:
    """A set of flags shown under `title` in --help.

    add: adds the flags to an argparse argument group. finish: the checks between them (a bad
    combination calls parser.error, which exits with the usage line) and their parse-time filling,
    on the parsed values before the namespace is built. presets: values the namespace starts with
    (argparse keeps a value already there when a flag is not given, instead of its default).
    requires: groups a command must also have (their flags are read here).
    """

    title: str
    add: Callable[[argparse._ArgumentGroup], None]
    finish: Optional[Callable[[argparse.ArgumentParser, Values], None]] = None
    presets: Tuple[Tuple[str, object], ...] = ()
    requires: Tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------
# Model and weights
# ---------------------------------------------------------------------------------------------------


def expected_dense_size(resize: List[int]) -> List[int]:
    """--dense_feature_map_size for an H x W input: (4h - 3, 4w - 3, 128) with h = H/14, w = W/14."""
    return [*network.dense_map_size(resize, patch_size=PATCH_SIZE), network.LOCAL_DIM]


def _add_model(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--backbone",
        type=str,
        default="vit_large",
        choices=list(FACTORIES),
        help="(ours) ViT size; the paper uses vit_large; vit_tiny is a test/demo size",
    )
    g.add_argument(
        "--backbone_depth",
        type=_positive_int,
        default=None,
        help="(ours) number of blocks, default that of --backbone (tests/demo use 2)",
    )
    g.add_argument("--registers", action="store_true", help="DINOv2 with 4 register tokens")
    g.add_argument(
        "--resize", type=int, default=[224, 224], nargs=2, metavar=("H", "W"), help="input size, multiples of 14"
    )
    g.add_argument(
        "--dense_feature_map_size",
        type=int,
        default=None,
        nargs=3,
        metavar=("H", "W", "C"),
        help="local feature map size; default 61 61 128 at 224x224, computed from --resize",
    )


def _finish_model(p: argparse.ArgumentParser, values: Values) -> None:
    """--resize must fit the patch size; --dense_feature_map_size is computed from it (or must match it)."""
    resize = values["resize"]
    if any(s <= 0 or s % PATCH_SIZE for s in resize):
        p.error(
            f"--resize {resize[0]} {resize[1]}: both sides must be positive multiples of the patch "
            f"size {PATCH_SIZE} (e.g. 224 224 or 322 322)"
        )
    expected = expected_dense_size(resize)
    given = values["dense_feature_map_size"]
    if given is None:
        values["dense_feature_map_size"] = expected
    elif list(given) != expected:
        p.error(
            f"--dense_feature_map_size {' '.join(map(str, given))} does not match "
            f"--resize {resize[0]} {resize[1]}, which gives {' '.join(map(str, expected))}; "
            "drop the flag or fix it"
        )


MODEL = Group("model", _add_model, _finish_model)


def _add_weights(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--foundation_model_path", type=path, default=None, help="DINOv2 weights (.pth)")
    g.add_argument(
        "--resume",
        type=path,
        default=None,
        help="SelaVPR checkpoint: its weights; train.py also continues from its epoch, best R@5, "
        "patience counter (and optimizer and random states when the file has them)",
    )
    g.add_argument(
        "--load_weights",
        type=path,
        default=None,
        help="(ours) SelaVPR checkpoint whose weights alone are loaded (a fresh fine-tune)",
    )
    g.add_argument(
        "--allow_random_weights",
        action="store_true",
        help="(ours) allow running with no weights file at all (random initialisation: demos/tests)",
    )


_UNSET = object()


def _saved_model_settings(p: argparse.ArgumentParser, values: Values) -> Tuple[Optional[dict], Optional[str]]:
    """(settings stored in the --resume / --load_weights file, "--flag path"), or (None, None) without a
    readable file of this project."""
    for flag in ("resume", "load_weights"):
        file = values[flag]
        if file and os.path.isfile(file):
            source = f"--{flag} {file}"
            try:
                # Memory-mapped where torch can: only the small settings entry is read (the weights are
                # loaded, and checked for NaN / Inf, later, by network.build_model).
                checkpoint = checkpoints.load_weights_file(file, what=f"--{flag}", mmap=True, check=False)
            except (ValueError, OSError):
                return None, source  # a bad file: loading the weights reports it, in full, in its place
            try:
                return checkpoints.saved_model_settings(checkpoint, path=file, what=f"--{flag}"), source
            except ValueError as e:
                p.error(str(e))
    return None, None


def _finish_weights(p: argparse.ArgumentParser, values: Values) -> None:
    """One checkpoint at most; then the model flags: given ones, else those stored in the checkpoint
    (files written by train.py), else the defaults. Runs before the model group's checks."""
    if values["resume"] and values["load_weights"]:
        p.error("give either --resume (continue a run) or --load_weights (weights only), not both")
    given = {flag: values[flag] for flag in checkpoints.MODEL_FLAGS if values[flag] is not _UNSET}
    defaults = {flag: p.get_default(flag) for flag in checkpoints.MODEL_FLAGS}
    saved, source = _saved_model_settings(p, values)
    try:
        settings, note = checkpoints.resolve_model_settings(given, saved, defaults, source=source or "the checkpoint")
    except ValueError as e:
        p.error(str(e))
    for flag, value in settings.items():
        values[flag] = list(value) if flag == "resize" else value
    values["model_settings_note"] = note


# The model flags start as _UNSET when a command has a checkpoint flag, so that a flag given on the
# command line can be told from its default: the settings stored in a checkpoint of this project fill
# in the flags that were not given.
WEIGHTS = Group(
    "weights",
    _add_weights,
    _finish_weights,
    presets=tuple((flag, _UNSET) for flag in checkpoints.MODEL_FLAGS),
    requires=("model",),
)


# ---------------------------------------------------------------------------------------------------
# Runtime and feature extraction
# ---------------------------------------------------------------------------------------------------


def _add_runtime(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--device",
        type=str,
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=["cuda", "cpu"],
        help="cuda when available, else cpu",
    )
    g.add_argument("--seed", type=int, default=0, help="-1: no seeding")


def _finish_runtime(p: argparse.ArgumentParser, values: Values) -> None:
    if values["device"] == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; use --device cpu")


RUNTIME = Group("runtime", _add_runtime, _finish_runtime)


def _add_extraction(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--infer_batch_size", type=_positive_int, default=16, help="batch size for feature extraction")
    g.add_argument("--num_workers", type=_non_negative_int, default=8, help="data loader processes")
    g.add_argument(
        "--precision",
        type=str,
        default="fp32",
        choices=list(numerics.PRECISIONS),
        help="(ours) arithmetic of feature extraction and of the training forward. fp32: IEEE float32 "
        "everywhere (also on GPUs, where torch would run convolutions in TF32). tf32: TF32 tensor-core "
        "matmuls and convolutions on NVIDIA Ampere and newer GPUs (as fp32 elsewhere). bf16: bfloat16 "
        "autocast, fp32 master weights and losses. tf32 and bf16 are faster on GPUs (bf16 also on CPUs "
        "with AMX) and change results slightly; the re-ranking stays exact",
    )


EXTRACTION = Group("feature extraction", _add_extraction)


# ---------------------------------------------------------------------------------------------------
# Evaluation, re-ranking, outputs
# ---------------------------------------------------------------------------------------------------


def _add_evaluation(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--test_method",
        type=str,
        default="hard_resize",
        choices=list(TEST_METHODS),
        help="query preprocessing at test time",
    )
    g.add_argument("--majority_weight", type=float, default=0.01, help="for --test_method maj_voting")
    g.add_argument(
        "--efficient_ram_testing",
        action="store_true",
        help="keep dense features in a file on disk (read back with positional reads) instead of RAM: "
        "same results, bounded memory",
    )
    g.add_argument(
        "--dense_store_dtype",
        type=str,
        default="float32",
        choices=list(dense_store.DTYPES),
        help="(ours) what the dense features are kept as, in RAM or on disk: float16 halves their size; "
        "the re-rank similarities are still computed in float32 from them, results change slightly",
    )
    g.add_argument("--val_positive_dist_threshold", type=_positive_int, default=25, help="metres")
    g.add_argument(
        "--recall_values", type=_positive_int, default=[1, 5, 10, 20], nargs="+", help="N of the reported recalls R@N"
    )


def _finish_evaluation(p: argparse.ArgumentParser, values: Values) -> None:
    if sorted(set(values["recall_values"])) != list(values["recall_values"]):
        p.error("--recall_values must be increasing and distinct, e.g. 1 5 10 20")


EVALUATION = Group("evaluation", _add_evaluation, _finish_evaluation)


def _add_rerank(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--rerank_num", type=_positive_int, default=100, help="candidates re-ranked per query")


RERANK = Group("re-ranking", _add_rerank)


def _add_rerank_features(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--rerank_features",
        type=str,
        default="local",
        choices=["local", "patch"],
        help="(ours) dense features that re-rank: local = the local head's (LocalAdapt, the paper's); patch = "
        "the backbone's L2-normalised patch tokens, which need no trained head (a frozen foundation model's "
        "own re-ranking)",
    )


# train.py and eval.py only: localize.py's saved databases hold the local head's features.
RERANK_FEATURES = Group("re-ranking features", _add_rerank_features)


def _add_outputs(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--save_dir", type=str, default="default", help="name of the output sub-folder")
    g.add_argument(
        "--num_preds_to_save",
        type=_non_negative_int,
        default=0,
        help="(ours) picture rows with each query's top N predictions",
    )
    g.add_argument(
        "--save_only_wrong_preds",
        action="store_true",
        help="(ours) with --num_preds_to_save: only queries whose first prediction is wrong",
    )


def _finish_outputs(p: argparse.ArgumentParser, values: Values) -> None:
    if values["save_only_wrong_preds"] and values["num_preds_to_save"] == 0:
        p.error("--save_only_wrong_preds needs --num_preds_to_save N (N > 0)")


OUTPUTS = Group("outputs", _add_outputs, _finish_outputs)


# ---------------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------------


def _add_datasets_folder(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--datasets_folder", type=path, default=None, help="falls back to $DATASETS_FOLDER")


def _finish_datasets_folder(p: argparse.ArgumentParser, values: Values) -> None:
    if values["datasets_folder"] is None and os.environ.get("DATASETS_FOLDER"):
        values["datasets_folder"] = path(os.environ["DATASETS_FOLDER"])
    if values["datasets_folder"] is None:
        p.error("--datasets_folder is required (or set the DATASETS_FOLDER environment variable)")


DATASETS_FOLDER = Group("data sets", _add_datasets_folder, _finish_datasets_folder)


def _add_dataset(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--dataset_name", type=str, default="pitts30k", help="folder name of the data set")
    g.add_argument(
        "--query_keys_file",
        type=path,
        default=None,
        help="(ours) MSLS-val protocol: keep only the queries whose key (field 7 of the file name) is listed "
        "in this file, or in a built-in list given by name: msls_val_740 (the paper's 740 MSLS-val queries)",
    )


DATASET = Group("data set", _add_dataset, requires=("data sets",))


def _add_descriptors(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--l2",
        type=str,
        default="before_pool",
        choices=["before_pool", "after_pool", "none"],
        help="accepted for compatibility; the public release does not use it either",
    )
    g.add_argument("--pca_dim", type=_positive_int, default=None, help="needs --pca_dataset_folder")
    g.add_argument("--pca_dataset_folder", type=path, default=None, help="relative to --datasets_folder")


def _finish_descriptors(p: argparse.ArgumentParser, values: Values) -> None:
    if values["pca_dim"] is not None and values["pca_dataset_folder"] is None:
        p.error("--pca_dim needs --pca_dataset_folder (the images to fit the PCA on)")


DESCRIPTORS = Group("global descriptors", _add_descriptors, _finish_descriptors, requires=("data sets",))


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def _add_training(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--train_batch_size", type=_positive_int, default=4, help="queries per training batch")
    g.add_argument(
        "--criterion",
        type=str,
        default="triplet",
        choices=["triplet", "sare_ind", "sare_joint"],
        help="loss; only triplet is implemented (the SARE ones are refused with an error)",
    )
    g.add_argument("--margin", type=float, default=0.1, help="triplet margin")
    g.add_argument("--epochs_num", type=_positive_int, default=50, help="maximum number of epochs")
    g.add_argument("--patience", type=_positive_int, default=3, help="epochs without a better val R@5 before stopping")
    g.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    g.add_argument(
        "--optim",
        type=str,
        default="adam",
        choices=["adam", "sgd"],
        help="optimizer (sgd: momentum 0.9, weight decay 0.001)",
    )
    g.add_argument("--cache_refresh_rate", type=_positive_int, default=1000, help="queries mined per loop")
    g.add_argument(
        "--queries_per_epoch", type=_positive_int, default=5000, help="must be a multiple of --cache_refresh_rate"
    )
    g.add_argument("--negs_num_per_query", type=_positive_int, default=2, help="negatives per training query")
    g.add_argument("--neg_samples_num", type=_positive_int, default=1000, help="database images sampled for mining")
    g.add_argument(
        "--mining",
        type=str,
        default="partial",
        choices=["partial", "full", "random", "msls_weighted"],
        help="triplet mining mode",
    )
    g.add_argument("--train_positives_dist_threshold", type=_positive_int, default=10, help="metres")
    g.add_argument(
        "--train_backbone",
        action="store_true",
        help="(ours) also train the whole backbone, not only adapters and heads (full fine-tuning, or "
        "training from random weights); the paper's recipe keeps it frozen",
    )
    g.add_argument(
        "--local_loss_weight",
        type=float,
        default=1.0,
        help="(ours) weight of the local mutual-NN loss beside the global triplet loss (the paper: 1); "
        "0 trains the global adaptation alone",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="(ours) seeded GPU training reproducible bit for bit: training steps use torch's deterministic "
        "algorithms and the math attention kernel (slower); seeded CPU runs are reproducible without it",
    )


def _finish_training(p: argparse.ArgumentParser, values: Values) -> None:
    if values["criterion"] != "triplet":
        p.error(
            f"--criterion {values['criterion']} is not implemented (the public release accepts it but has no "
            "SARE loss either); use --criterion triplet"
        )
    if not values["local_loss_weight"] >= 0:  # also refuses nan
        p.error(f"--local_loss_weight must be >= 0, got {values['local_loss_weight']}")
    if values["deterministic"] and values["seed"] == -1:
        p.error("--deterministic needs a seeded run: drop --seed -1 (or --deterministic)")
    if values["deterministic"] and values["train_backbone"] and values["device"] == "cuda":
        p.error(
            "--deterministic with --train_backbone on a GPU: the backward of the positional table's bicubic "
            "interpolation has no deterministic CUDA implementation in torch; drop one of the two"
        )
    if values["queries_per_epoch"] % values["cache_refresh_rate"] != 0:
        p.error(
            f"--queries_per_epoch ({values['queries_per_epoch']}) must be a multiple of --cache_refresh_rate "
            f"({values['cache_refresh_rate']})"
        )


TRAINING = Group("training", _add_training, _finish_training, requires=("runtime",))


def _add_augmentation(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--brightness", type=float, default=None, help="query augmentation: ColorJitter brightness")
    g.add_argument("--contrast", type=float, default=None, help="query augmentation: ColorJitter contrast")
    g.add_argument("--saturation", type=float, default=None, help="query augmentation: ColorJitter saturation")
    g.add_argument("--hue", type=float, default=None, help="query augmentation: ColorJitter hue")
    g.add_argument(
        "--rand_perspective", type=float, default=None, help="query augmentation: RandomPerspective distortion"
    )
    g.add_argument("--horizontal_flip", action="store_true", help="flip a whole training batch (or none)")
    g.add_argument(
        "--random_resized_crop", type=float, default=None, help="query augmentation: RandomResizedCrop scale (1 - x, 1)"
    )
    g.add_argument("--random_rotation", type=float, default=None, help="query augmentation: RandomRotation degrees")


AUGMENTATION = Group("training augmentation", _add_augmentation)


def _add_continue(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--continue_run",
        type=path,
        default=None,
        metavar="RUN_FOLDER",
        help="(ours) continue the interrupted eval.py run in RUN_FOLDER (e.g. test/default/<time>), given "
        "with the same weights and flags: what it finished is not done again; the outputs are those of an "
        "uninterrupted run",
    )


def _finish_continue(p: argparse.ArgumentParser, values: Values) -> None:
    folder = values["continue_run"]
    if folder is None:
        return
    if not os.path.isdir(folder):
        p.error(f"--continue_run {folder}: no such folder; give the output folder of the interrupted eval.py run")
    if not os.path.isfile(os.path.join(folder, run_progress.RUN_FILE)):
        p.error(
            f"--continue_run {folder} has no {run_progress.RUN_FILE}: it is not the output folder of an eval.py "
            "run, or that run stopped before it began its work; run without --continue_run"
        )


CONTINUE = Group("continuing an evaluation", _add_continue, _finish_continue)


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------

# Every group, in the order of --help and of the checks (the weights' model settings come before the
# model group's size checks).
ALL_GROUPS = (
    WEIGHTS,
    MODEL,
    RUNTIME,
    EXTRACTION,
    EVALUATION,
    RERANK,
    RERANK_FEATURES,
    OUTPUTS,
    DESCRIPTORS,
    DATASETS_FOLDER,
    DATASET,
    TRAINING,
    AUGMENTATION,
    CONTINUE,
)
# train.py and eval.py: every flag of the public release (and ours); eval.py also takes --continue_run.
PUBLIC_GROUPS = tuple(g for g in ALL_GROUPS if g is not CONTINUE)
EVAL_GROUPS = PUBLIC_GROUPS + (CONTINUE,)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser made of groups; `groups` holds them (in ALL_GROUPS order). A command adds its
    own flags with add_argument_group."""

    def __init__(self, description: str, groups: Sequence[Group]):
        super().__init__(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        titles = {g.title for g in groups}
        for g in groups:
            missing = [t for t in g.requires if t not in titles]
            if g not in ALL_GROUPS or missing:
                raise ValueError(f"group {g.title!r}: not a group of parser.py, or without {missing}")
        self.groups = tuple(g for g in ALL_GROUPS if g in groups)
        for g in self.groups:
            g.add(self.add_argument_group(g.title))

    def parse(
        self,
        argv: Optional[Sequence[str]] = None,
        finish: Optional[Callable[[argparse.ArgumentParser, Values], None]] = None,
    ) -> argparse.Namespace:
        """Parse `argv` (default: the command line), run the groups' checks, then the command's own
        `finish` (its checks and conversions, on the values); return the final namespace."""
        presets = {name: value for g in self.groups for name, value in g.presets}
        values = vars(
            self.parse_args(sys.argv[1:] if argv is None else list(argv), namespace=argparse.Namespace(**presets))
        )
        for g in self.groups:
            if g.finish is not None:
                g.finish(self, values)
        if finish is not None:
            finish(self, values)
        return argparse.Namespace(**values)


def build_parser(description: str = "SelaVPR") -> CommandParser:
    """train.py's and eval.py's parser: every public flag (and ours)."""
    return CommandParser(description, PUBLIC_GROUPS)


def parse_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """train.py's arguments, checked; a bad combination exits with argparse's usage line and a message
    saying what to do."""
    return build_parser().parse(argv)


def build_eval_parser(description: str = "SelaVPR: evaluate") -> CommandParser:
    """eval.py's parser: train.py's flags and --continue_run."""
    return CommandParser(description, EVAL_GROUPS)


def parse_eval_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """eval.py's arguments, checked as parse_arguments'."""
    return build_eval_parser().parse(argv)
