"""Robustness and safety, end to end: every bad input gets one clear message, faults lose nothing.

The matrix runs each entry script (train.py, eval.py, localize.py, tools/*.py, synthetic_dataset.py,
reproduce.py) as a subprocess on one bad input and checks that it
  - exits with status 2 (a user error: argparse's usage error or commons.run_main's "error: ..." line),
  - prints exactly one "error: " line, saying what is wrong and naming the flag or the file,
  - prints no Python traceback (stdout and stderr),
  - writes nothing and deletes nothing: the data set folders are unchanged, and in the run's working
    folder the only files a failed run may leave are the info.log / debug.log of the new, timestamped
    log folder that it made before the failure (the error is logged there, its traceback in debug.log
    only) -- never a checkpoint, prediction, picture or dense-feature file.

Accepted on purpose (converted to RGB, like any other image): grayscale, CMYK and PNG content in a file
named .jpg. Refused, naming the file: empty, truncated and corrupt images (also when they are found by a
DataLoader worker, num_workers > 0).

Faults: a full disk while saving a checkpoint (simulated by handing the checkpoint's temp file
/dev/full, which fails every write with ENOSPC as a full disk does) keeps the previous checkpoint and
says the disk is full, and training resumes from that checkpoint; an --efficient_ram_testing run killed
during extraction leaves only its own temp file, which a later run neither reads nor needs. (Killed
during a checkpoint save and exact resume: tests/test_train.py.)

Safety: weight files are only ever loaded with weights_only=True or, on torch < 2.6, checkpoints.py's
restricted unpickler (a scan of every .py file); a crafted pickle that would run code is refused through
eval.py --resume / --foundation_model_path, reproduce.py and the torch.hub entry point; files planted in a
data folder (.py, .pth) are never opened or run.

Cost: most cases stop at parse time or before the model is built, and run in forks of one process that
imported the project once (see RUNNER); a few run in a fresh interpreter. Two processes at a time (the
machine has 2 cores).
"""

import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Dict, List, Optional

import pytest
import torch
from conftest import ROOT, TINY, TINY_FLAGS, kill_once_marker_appears, tiny_eval_flags
from PIL import Image
from test_train import TRAIN_FLAGS, _train

import checkpoints
import datasets_ws
import network

PARALLEL = 2
FAST = ["--rerank_num", "2", "--recall_values", "1", "2"]  # re-ranking is not what these tests are about
TOOL_FLAGS = ["--backbone", "vit_tiny", "--backbone_depth", "2", "--device", "cpu"]  # the tools load no data
LOG_FILES = {"info.log", "debug.log"}
ERROR_LINE = re.compile(r"(^|\s|: )error: ")


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DATASETS_FOLDER"}
    env["OMP_NUM_THREADS"] = "1"  # two runs at a time on two cores
    env.update(extra)
    return env


def _run(argv: List[str], cwd: str, *, timeout: int = 300, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """python3 <argv...> in cwd; repository scripts are given relative to the repository root."""
    argv = list(argv)
    if argv and argv[0].endswith(".py") and not os.path.isabs(argv[0]):
        argv[0] = os.path.join(ROOT, argv[0])
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )


def snapshot(folder: str) -> Dict[str, tuple]:
    """{relative path: (is folder, size, mtime_ns)} of everything below folder."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            is_dir = os.path.isdir(path)
            out[os.path.relpath(path, folder)] = (is_dir, 0 if is_dir else st.st_size, 0 if is_dir else st.st_mtime_ns)
    return out


def copy_splits(source_root: str, dest_folder: str, splits=("test",), name: str = "synthetic") -> str:
    """Copy some splits of the synthetic data set (dest_folder/name/images/<split>); returns dest_folder."""
    for split in splits:
        shutil.copytree(
            os.path.join(source_root, name, "images", split), os.path.join(dest_folder, name, "images", split)
        )
    return dest_folder


def images_of(folder: str, name: str, split: str, part: str) -> List[str]:
    return datasets_ws.collect_jpgs(os.path.join(folder, name, "images", split, part))


def timestamp_folders(base: str, seconds: int = 900) -> None:
    """Create the output folders <base>/<time> that a run starting in the next `seconds` would choose."""
    now = datetime.now()
    for s in range(-2, seconds):
        os.makedirs(os.path.join(base, (now + timedelta(seconds=s)).strftime("%Y-%m-%d_%H-%M-%S")), exist_ok=True)


class Evil:
    """Unpickling this runs `touch marker` (what a malicious weights file would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------
# Inputs shared by the cases
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, synthetic_root):
    """Weight files (good, wrong, broken, malicious) and a few images, made once."""
    folder = str(tmp_path_factory.mktemp("robustness_inputs"))
    w = {"dir": folder, "marker": os.path.join(folder, "PWNED"), "ds": synthetic_root[0]}
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(**TINY)
    w["good"] = os.path.join(folder, "good.pth")
    checkpoints.save_checkpoint(w["good"], model=model)
    data = open(w["good"], "rb").read()
    w["truncated"] = os.path.join(folder, "truncated.pth")
    open(w["truncated"], "wb").write(data[: len(data) // 2])
    w["zero"] = os.path.join(folder, "zero.pth")
    open(w["zero"], "wb").close()
    w["other"] = os.path.join(folder, "vit_small.pth")
    checkpoints.save_checkpoint(w["other"], model=network.GeoLocalizationNet(backbone="vit_small", backbone_depth=1))
    w["other_public"] = os.path.join(folder, "vit_small_public.pth")  # the public layout: no model_settings
    torch.save(
        {
            "model_state_dict": checkpoints.public_state_dict(
                network.GeoLocalizationNet(backbone="vit_small", backbone_depth=1)
            )
        },
        w["other_public"],
    )
    backbone_state = {k: v for k, v in model.backbone.state_dict().items() if ".adapter" not in k}
    w["evil"] = os.path.join(folder, "evil.pth")
    torch.save(
        {"model_state_dict": checkpoints.public_state_dict(model), "epoch_num": 0, "x": Evil(w["marker"])}, w["evil"]
    )
    w["evil_foundation"] = os.path.join(folder, "evil_dinov2.pth")
    torch.save({**backbone_state, "x": Evil(w["marker"])}, w["evil_foundation"])
    # Weights with NaN in the local head (the case), in an adapter and in GeM's p, and finite weights
    # so large that the local head's output overflows (the features, not the file, are then non-finite).
    for name, key, value in (
        ("nan_local", "LocalAdapt.upconv2.bias", float("nan")),
        ("nan_adapter", "backbone.blocks.0.adapter1.D_fc1.weight", float("nan")),
        ("nan_gem", "aggregation.1.p", float("nan")),
        ("overflow", "LocalAdapt.upconv2.weight", 1e37),
    ):
        poisoned = network.GeoLocalizationNet(**TINY)
        poisoned.load_state_dict(model.state_dict())
        with torch.no_grad():
            dict(poisoned.named_parameters())[key].fill_(value)
        w[name] = os.path.join(folder, f"{name}.pth")
        checkpoints.save_checkpoint(w[name], model=poisoned)
    w["weights_dir"] = os.path.join(folder, "a_folder.pth")
    os.makedirs(w["weights_dir"])
    images = os.path.join(folder, "images")
    os.makedirs(images)
    w["image"] = os.path.join(images, "photo.jpg")
    Image.new("RGB", (120, 90), (200, 40, 10)).save(w["image"])
    w["text_jpg"] = os.path.join(images, "notes.jpg")
    open(w["text_jpg"], "w").write("not an image\n")
    w["zero_jpg"] = os.path.join(images, "empty.jpg")
    open(w["zero_jpg"], "wb").close()
    w["no_images"] = os.path.join(folder, "no_images")
    os.makedirs(w["no_images"])
    open(os.path.join(w["no_images"], "readme.txt"), "w").write("no pictures here\n")
    return w


# ------------------------------------------------------------------------------------------------
# The matrix
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    # argv(world, case_dir) -> [script, args...]; case_dir is the run's working folder (fresh, empty)
    argv: Callable[[dict, str], List[str]]
    expect: List[str]  # regexes that the one error line must match (what is wrong, which flag/file, what to do)
    # prepare(world, case_dir) -> a data folder made for this case (checked unchanged), or None
    prepare: Optional[Callable[[dict, str], Optional[str]]] = None
    also: List[str] = field(default_factory=list)  # regexes for the whole output (e.g. a logged reason)
    allowed: List[str] = field(default_factory=list)  # extra files the run may write (regexes on rel. paths)
    env: dict = field(default_factory=dict)
    fresh: bool = False  # run in a new interpreter rather than a fork of the pre-imported runner


def D(w, *extra):
    """eval/train flags on the shared tiny synthetic data set (random weights unless extra give some)."""
    return tiny_eval_flags((w["ds"], "synthetic"), *FAST, *extra)


def R(w, *extra):
    """reproduce.py's flags on the shared tiny synthetic data set (it has no --dataset_name or weight flags)."""
    return ["--datasets_folder", w["ds"], *TINY_FLAGS, "--resize", "112", "112", *FAST, *extra]


def Dw(w, *extra):
    """As D, but without --allow_random_weights: for the weight-file cases."""
    return [a for a in D(w, *extra) if a != "--allow_random_weights"]


def on_copy(mutate, splits=("test",)):
    """prepare(): copy splits of the synthetic set into case_dir/data, then mutate(data folder)."""

    def prepare(w, case_dir):
        data = copy_splits(w["ds"], os.path.join(case_dir, "data"), splits)
        mutate(data)
        return data

    return prepare


def _rename_to_no_utm(data):
    path = images_of(data, "synthetic", "train", "database")[3]
    os.rename(path, os.path.join(os.path.dirname(path), "no_utm_here.jpg"))


def _empty_queries(data):
    folder = os.path.join(data, "synthetic", "images", "train", "queries")
    shutil.rmtree(folder)
    os.makedirs(folder)
    open(os.path.join(folder, "IMG_0001.JPG"), "wb").write(b"upper-case suffix: not collected")


def _garbage_query(data):
    """A JPEG header followed by junk instead of the image data."""
    path = images_of(data, "synthetic", "test", "queries")[7]
    content = open(path, "rb").read()
    open(path, "wb").write(content[:600] + bytes(range(256)) * 20)


def _truncate_database_image(data):
    path = images_of(data, "synthetic", "test", "database")[20]
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 3])


def _empty_database_image(data):
    open(images_of(data, "synthetic", "test", "database")[33], "wb").close()


def _pre_create(root, save_dir):
    def prepare(w, case_dir):
        timestamp_folders(os.path.join(case_dir, root, save_dir))
        return None

    return prepare


def _file_named(name):
    """prepare(): a file where the run wants its output folder (as unwritable as a read-only folder)."""

    def prepare(w, case_dir):
        open(os.path.join(case_dir, name), "w").write("not a folder\n")
        return None

    return prepare


def _existing_folder(w, case_dir):
    os.makedirs(os.path.join(case_dir, "out"))
    open(os.path.join(case_dir, "out", "keep.txt"), "w").write("earlier results\n")
    return None


CASES = [
    # ---- train.py -----------------------------------------------------------------------------
    Case(
        "train_missing_datasets_folder",
        lambda w, d: ["train.py", *D(w, "--datasets_folder", os.path.join(d, "nope"))],
        [r"Datasets folder '.*nope' does not exist", r"set --datasets_folder"],
    ),
    Case(
        "train_datasets_folder_not_given",
        lambda w, d: ["train.py", *TINY_FLAGS, "--allow_random_weights"],
        [r"--datasets_folder is required", r"DATASETS_FOLDER"],
    ),
    Case(
        "train_queries_per_epoch_not_a_multiple",
        lambda w, d: ["train.py", *D(w, "--queries_per_epoch", "7", "--cache_refresh_rate", "3")],
        [r"--queries_per_epoch \(7\) must be a multiple of --cache_refresh_rate \(3\)"],
    ),
    Case(
        "train_sare_criterion",
        lambda w, d: ["train.py", *D(w, "--criterion", "sare_joint")],
        [r"--criterion sare_joint is not implemented", r"use --criterion triplet"],
    ),
    Case(
        "train_file_name_without_utm",
        lambda w, d: ["train.py", *D(w, "--datasets_folder", os.path.join(d, "data"))],
        [r"no_utm_here\.jpg' does not carry UTM coordinates", r"Rename the image or remove it"],
        prepare=on_copy(_rename_to_no_utm, splits=("train",)),
    ),
    Case(
        "train_queries_folder_without_jpg",
        lambda w, d: ["train.py", *D(w, "--datasets_folder", os.path.join(d, "data"))],
        [r"Folder '.*train/queries' contains no \.jpg image", r"case-sensitive"],
        prepare=on_copy(_empty_queries, splits=("train",)),
    ),
    Case(
        "train_output_folder_exists",
        lambda w, d: ["train.py", *D(w, "--save_dir", "taken")],
        [r"output folder logs/taken/.* already exists", r"choose another --save_dir"],
        prepare=_pre_create("logs", "taken"),
        fresh=True,
    ),
    Case(
        "train_no_weights",
        lambda w, d: ["train.py", *Dw(w)],
        [r"no weights given", r"--foundation_model_path", r"--allow_random_weights"],
    ),
    # ---- eval.py: flags ------------------------------------------------------------------------
    Case(
        "eval_rerank_num_zero",
        lambda w, d: ["eval.py", *D(w, "--rerank_num", "0")],
        [r"--rerank_num: must be a positive integer, got 0"],
    ),
    Case(
        "eval_resize_not_multiple_of_14",
        lambda w, d: ["eval.py", *D(w, "--resize", "100", "100")],
        [r"--resize 100 100: both sides must be positive multiples of the patch size 14"],
    ),
    Case(
        "eval_unknown_test_method",
        lambda w, d: ["eval.py", *D(w, "--test_method", "ten_crops")],
        [r"--test_method: invalid choice: 'ten_crops'", r"hard_resize"],
    ),
    Case(
        "eval_dense_feature_map_size_mismatch",
        lambda w, d: ["eval.py", *D(w, "--dense_feature_map_size", "61", "61", "128")],
        [r"--dense_feature_map_size 61 61 128 does not match --resize 112 112, which gives 29 29 128"],
    ),
    Case(
        "eval_recall_values_not_increasing",
        lambda w, d: ["eval.py", *D(w, "--recall_values", "5", "1")],
        [r"--recall_values must be increasing and distinct"],
    ),
    Case(
        "eval_pca_dim_without_folder",
        lambda w, d: ["eval.py", *D(w, "--pca_dim", "8")],
        [r"--pca_dim needs --pca_dataset_folder"],
    ),
    Case(
        "eval_query_keys_file_missing",
        lambda w, d: ["eval.py", *D(w, "--query_keys_file", os.path.join(d, "keys.txt"))],
        [r"--query_keys_file '.*keys\.txt' does not exist"],
    ),
    Case(
        "eval_output_folder_exists",
        lambda w, d: ["eval.py", *D(w, "--save_dir", "taken")],
        [r"output folder test/taken/.* already exists", r"choose another --save_dir"],
        prepare=_pre_create("test", "taken"),
    ),
    # ---- eval.py: weight files -----------------------------------------------------------------
    Case(
        "eval_registers_with_plain_checkpoint",
        lambda w, d: ["eval.py", *Dw(w, "--resume", w["good"], "--registers")],
        [r"--resume .*good\.pth was trained with another model", r"--registers True \(given\) but False in the file"],
    ),
    Case(
        "eval_checkpoint_of_another_model",
        lambda w, d: ["eval.py", *Dw(w, "--resume", w["other"])],
        [
            r"--resume .*vit_small\.pth was trained with another model: --backbone vit_tiny \(given\) but vit_small "
            r"in the file"
        ],
    ),
    Case(
        "eval_public_checkpoint_of_another_model",
        lambda w, d: ["eval.py", *Dw(w, "--resume", w["other_public"])],
        [r"--resume .*vit_small_public\.pth is not a SelaVPR checkpoint of this model \(check --backbone"],
    ),
    Case(
        "eval_truncated_checkpoint",
        lambda w, d: ["eval.py", *Dw(w, "--resume", w["truncated"])],
        [r"--resume .*truncated\.pth could not be loaded", r"truncated or not a PyTorch weights file"],
    ),
    Case(
        "eval_zero_byte_checkpoint",
        lambda w, d: ["eval.py", *Dw(w, "--resume", w["zero"])],
        [r"--resume .*zero\.pth is empty \(0 bytes\)"],
    ),
    Case(
        "eval_checkpoint_is_a_folder",
        lambda w, d: ["eval.py", *Dw(w, "--resume", w["weights_dir"])],
        [r"--resume .*a_folder\.pth is a directory", r"Give the path of a weights file"],
    ),
    Case(
        "eval_checkpoint_missing",
        lambda w, d: ["eval.py", *Dw(w, "--resume", os.path.join(d, "nope.pth"))],
        [r"--resume .*nope\.pth: no such file"],
    ),
    Case(
        "eval_crafted_pickle_resume",
        lambda w, d: ["eval.py", *Dw(w, "--resume", w["evil"])],
        [
            r"--resume .*evil\.pth refused: it would run code when unpickled \(it pickles posix\.system",
            r"Nothing in it was run",
        ],
        fresh=True,
    ),
    Case(
        "eval_crafted_pickle_foundation",
        lambda w, d: ["eval.py", *Dw(w, "--foundation_model_path", w["evil_foundation"])],
        [r"--foundation_model_path .*evil_dinov2\.pth refused: it would run code .*posix\.system"],
    ),
    Case(
        "eval_checkpoint_given_as_foundation",
        lambda w, d: ["eval.py", *Dw(w, "--foundation_model_path", w["good"])],
        [
            r"--foundation_model_path .*good\.pth does not match --backbone vit_tiny \(2 blocks\)",
            r"give it with --resume or --load_weights",
        ],
    ),
    # ---- eval.py: data -------------------------------------------------------------------------
    Case(
        "eval_no_data_set_in_folder",
        lambda w, d: ["eval.py", *D(w, "--datasets_folder", w["no_images"])],
        [r"Data set folder '.*no_images/synthetic' does not exist", r"check --dataset_name"],
    ),
    Case(
        "eval_corrupt_query_image_workers_0",
        lambda w, d: ["eval.py", *D(w, "--datasets_folder", os.path.join(d, "data"))],
        [r"Cannot read image '.*test/queries/@.*\.jpg'", r"Replace it with a valid image or delete it"],
        prepare=on_copy(_garbage_query),
    ),
    Case(
        "eval_truncated_database_image_workers_2",
        lambda w, d: [
            "eval.py",
            *D(w, "--datasets_folder", os.path.join(d, "data"), "--num_workers", "2", "--infer_batch_size", "4"),
        ],
        [
            r"Cannot read image '.*test/database/@.*\.jpg' \(OSError: image file is truncated",
            r"Replace it with a valid image",
        ],
        prepare=on_copy(_truncate_database_image),
        fresh=True,
    ),
    Case(
        "eval_zero_byte_image_workers_2",
        lambda w, d: [
            "eval.py",
            *D(w, "--datasets_folder", os.path.join(d, "data"), "--num_workers", "2", "--efficient_ram_testing"),
        ],
        [r"Cannot read image '.*test/database/@.*\.jpg'", r"empty, truncated or not an image"],
        prepare=on_copy(_empty_database_image),
    ),
    # ---- eval.py / train.py / localize.py / reproduce.py: weights with NaN or Inf, outputs blocked ------
    Case(
        "eval_nan_in_the_local_head",
        lambda w, d: ["eval.py", *Dw(w, "--resume", w["nan_local"])],
        [
            r"--resume .*nan_local\.pth holds non-finite values \(NaN or Inf\) in LocalAdapt\.upconv2\.bias \(NaN\)",
            r"Use an earlier or another checkpoint",
        ],
    ),
    Case(
        "eval_nan_in_gem_p",  # used to end in "candidate_indices contains the negative index -1"
        lambda w, d: ["eval.py", *Dw(w, "--resume", w["nan_gem"], "--efficient_ram_testing")],
        [r"--resume .*nan_gem\.pth holds non-finite values \(NaN or Inf\) in aggregation\.1\.p \(NaN\)"],
    ),
    Case(
        "eval_weights_whose_features_overflow",
        lambda w, d: ["eval.py", *Dw(w, "--resume", w["overflow"])],
        [r"non-finite \(NaN or Inf\) dense local features for \d+ image\(s\): .*/database/@.*\.jpg", r"--precision"],
    ),
    Case(
        "train_load_weights_nan_in_an_adapter",  # used to say "try a lower --lr" before any update
        lambda w, d: ["train.py", *Dw(w, "--load_weights", w["nan_adapter"])],
        [r"--load_weights .*nan_adapter\.pth holds non-finite .*backbone\.blocks\.0\.adapter1\.D_fc1\.weight \(NaN\)"],
    ),
    Case(
        "localize_nan_in_the_local_head",
        lambda w, d: [
            "localize.py",
            *TINY_FLAGS,
            "--resume",
            w["nan_local"],
            "--queries_folder",
            os.path.dirname(w["image"]),
            "--database_folder",
            os.path.join(w["ds"], "synthetic", "images", "test", "database"),
        ],
        [r"--resume .*nan_local\.pth holds non-finite values .*LocalAdapt\.upconv2\.bias \(NaN\)"],
    ),
    Case(
        "reproduce_nan_checkpoint",
        lambda w, d: [
            "reproduce.py",
            *R(w),
            "--msls_checkpoint",
            w["nan_local"],
            "--dataset_folders",
            "st_lucia=synthetic",
            "--only",
            "st_lucia",
            "--output",
            "rep",
        ],
        [r"1 evaluation\(s\) failed \(St Lucia\)"],
        also=[r"Cannot load --msls_checkpoint .*nan_local\.pth: .*holds non-finite values"],
        allowed=[r"^rep/results\.md$", r"^rep/logs/[^/]+/(info|debug)\.log$"],
    ),
    Case(
        "eval_output_folder_cannot_be_created",
        lambda w, d: ["eval.py", *D(w)],
        [
            r"cannot create the output folder .*/test/default/[\d_-]+: .*/test is a file, not a folder",
            r"--save_dir an absolute path",
        ],
        prepare=_file_named("test"),
    ),
    Case(
        "train_output_folder_cannot_be_created",
        lambda w, d: ["train.py", *D(w)],
        [r"cannot create the output folder .*/logs/default/[\d_-]+: .*/logs is a file", r"--save_dir"],
        prepare=_file_named("logs"),
    ),
    Case(
        "reproduce_output_is_a_file",
        lambda w, d: ["reproduce.py", *R(w), "--output", "rep"],
        [r"cannot create the output folder .*/rep: .*rep is a file, not a folder", r"--output"],
        prepare=_file_named("rep"),
    ),
    Case(
        "localize_queries_folder_is_a_file",
        lambda w, d: [
            "localize.py",
            *TINY_FLAGS,
            "--allow_random_weights",
            "--queries_folder",
            w["image"],
            "--database_folder",
            os.path.dirname(w["image"]),
        ],
        [r"--queries_folder .*photo\.jpg: this is a file, not a folder", r"give the folder that holds"],
    ),
    # ---- localize.py ---------------------------------------------------------------------------
    Case(
        "localize_missing_queries_folder",
        lambda w, d: [
            "localize.py",
            *TINY_FLAGS,
            "--allow_random_weights",
            "--queries_folder",
            os.path.join(d, "nope"),
            "--database_folder",
            os.path.dirname(w["image"]),
        ],
        [r"--queries_folder .*nope: no such folder"],
    ),
    Case(
        "localize_output_folder_exists",
        lambda w, d: [
            "localize.py",
            *TINY_FLAGS,
            "--allow_random_weights",
            "--queries_folder",
            os.path.dirname(w["image"]),
            "--database_folder",
            os.path.dirname(w["image"]),
            "--output_folder",
            "out",
        ],
        [r"--output_folder out already exists: choose a new folder"],
        prepare=_existing_folder,
    ),
    Case(
        "localize_load_database_not_a_database",
        lambda w, d: [
            "localize.py",
            *TINY_FLAGS,
            "--allow_random_weights",
            "--queries_folder",
            os.path.dirname(w["image"]),
            "--load_database",
            w["no_images"],
        ],
        [r"--load_database .*no_images has no manifest\.json", r"Save the database again"],
    ),
    Case(
        "localize_database_folder_without_images",
        lambda w, d: [
            "localize.py",
            *TINY_FLAGS,
            "--allow_random_weights",
            "--queries_folder",
            os.path.dirname(w["image"]),
            "--database_folder",
            w["no_images"],
        ],
        [r"--database_folder .*no_images contains no image"],
    ),
    Case(
        "localize_unknown_test_method",
        lambda w, d: [
            "localize.py",
            *TINY_FLAGS,
            "--allow_random_weights",
            "--queries_folder",
            d,
            "--database_folder",
            d,
            "--test_method",
            "ten_crops",
        ],
        [r"--test_method: invalid choice: 'ten_crops'", r"five_crops"],
    ),
    # ---- tools ---------------------------------------------------------------------------------
    Case(
        "heatmap_zero_byte_image",
        lambda w, d: ["tools/heatmap.py", w["zero_jpg"], "--output", "heat.jpg", *TOOL_FLAGS, "--allow_random_weights"],
        [r"Cannot read image '.*empty\.jpg'", r"empty, truncated or not an image"],
        fresh=True,
    ),
    Case(
        "heatmap_alpha_out_of_range",
        lambda w, d: ["tools/heatmap.py", w["image"], "--output", "heat.jpg", *TOOL_FLAGS, "--alpha", "2"],
        [r"--alpha must lie in \[0, 1\], got 2\.0"],
    ),
    Case(
        "heatmap_unknown_output_extension",
        lambda w, d: ["tools/heatmap.py", w["image"], "--output", "heat.txt", *TOOL_FLAGS, "--allow_random_weights"],
        [r"output 'heat\.txt': unknown image extension \.txt", r"use \.jpg or \.png"],
    ),
    Case(
        "draw_matches_folder_as_image",
        lambda w, d: [
            "tools/draw_matches.py",
            w["image"],
            w["no_images"],
            "--output",
            "m.jpg",
            *TOOL_FLAGS,
            "--allow_random_weights",
        ],
        [r"Image '.*no_images' is a folder, not an image file"],
    ),
    Case(
        "draw_matches_text_named_jpg",
        lambda w, d: [
            "tools/draw_matches.py",
            w["image"],
            w["text_jpg"],
            "--output",
            "m.jpg",
            *TOOL_FLAGS,
            "--allow_random_weights",
        ],
        [r"Cannot read image '.*notes\.jpg'", r"not an image"],
    ),
    Case(
        "draw_matches_negative_ransac_threshold",
        lambda w, d: [
            "tools/draw_matches.py",
            w["image"],
            w["image"],
            "--output",
            "m.jpg",
            *TOOL_FLAGS,
            "--ransac_threshold",
            "-1",
        ],
        [r"--ransac_threshold must be a positive number of pixels, got -1\.0"],
    ),
    # ---- synthetic_dataset.py ------------------------------------------------------------------
    Case(
        "synthetic_existing_without_overwrite",
        lambda w, d: ["synthetic_dataset.py", "--datasets_folder", w["ds"], "--preset", "tiny"],
        [r"synthetic already exists: pass --overwrite", r"--if_missing"],
    ),
    Case(
        "synthetic_jpeg_quality_out_of_range",
        lambda w, d: ["synthetic_dataset.py", "--datasets_folder", d, "--jpeg_quality", "500"],
        [r"--jpeg_quality must be an integer in \[10, 100\], got 500"],
    ),
    Case(
        "synthetic_name_escaping_the_folder",
        lambda w, d: ["synthetic_dataset.py", "--datasets_folder", d, "--dataset_name", "../escape"],
        [r"--dataset_name must be a plain folder name", r"'\.\./escape'"],
    ),
    # ---- reproduce.py --------------------------------------------------------------------------
    Case(
        "reproduce_bad_rerank_num",
        lambda w, d: ["reproduce.py", *R(w), "--rerank_num", "zero"],
        [r"--rerank_num must be a positive integer or 'both', got 'zero'"],
        fresh=True,
    ),
    Case(
        "reproduce_crafted_pickle_checkpoint",
        lambda w, d: [
            "reproduce.py",
            *R(w),
            "--msls_checkpoint",
            w["evil"],
            "--dataset_folders",
            "msls=synthetic",
            "--only",
            "msls",
            "--output",
            "rep",
        ],
        [r"1 evaluation\(s\) failed \(MSLS-val\)", r"results\.md"],
        also=[r"Cannot load --msls_checkpoint .*evil\.pth: .*refused: it would run code .*posix\.system"],
        # The table records the failed row and why: that is the report this tool exists to write.
        allowed=[r"^rep/results\.md$", r"^rep/logs/[^/]+/(info|debug)\.log$"],
    ),
]


# Most cases run in a fork of one process that imported the project (and torch) once: a real child
# process per case, with its own working folder, streams and exit status, running the script's
# __main__ as `python3 script.py` would, but without paying ~6 s of imports each. The cases marked
# fresh=True (one per kind of failure point) run in a new interpreter, as a user would start them.
RUNNER = r"""
import json, os, runpy, sys, time, traceback
jobs_path, results_path, root = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path[:] = [root] + [p for p in sys.path if p not in ("", ".")]
import commons, datasets_ws, local_matching, localize, mining, network, parser, predictions_io  # noqa: F401
import reproduce, synthetic_dataset, test, visualizations  # noqa: F401
base_path = list(sys.path[1:])

def child(job):
    os.chdir(job["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.environ.clear()
    os.environ.update(job["env"])
    script = job["argv"][0]
    sys.argv = list(job["argv"])
    sys.path[:] = [os.path.dirname(script)] + base_path
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

results = {}
for job in json.load(open(jobs_path)):
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.time()
    pid = os.fork()
    if pid == 0:
        child(job)
    _, status = os.waitpid(pid, 0)
    results[job["id"]] = {"code": os.waitstatus_to_exitcode(status), "seconds": time.time() - start}
with open(results_path, "w") as f:
    json.dump(results, f)
"""


def _prepare_case(case: Case, world: dict, base: str) -> dict:
    case_dir = os.path.join(base, "runs", case.id)
    os.makedirs(case_dir)
    data = case.prepare(world, case_dir) if case.prepare else None
    argv = case.argv(world, case_dir)
    if argv[0].endswith(".py") and not os.path.isabs(argv[0]):
        argv[0] = os.path.join(ROOT, argv[0])
    return {
        "case": case,
        "argv": argv,
        "case_dir": case_dir,
        "data": data,
        "data_before": snapshot(data) if data else None,
        "cwd_before": snapshot(case_dir),
    }


def _run_forked(outcomes: List[dict], base: str) -> None:
    """Run the outcomes' cases one after the other in forks of RUNNER; fills in outcome["result"]."""
    jobs = []
    for o in outcomes:
        stem = os.path.join(base, "streams", o["case"].id)
        jobs.append(
            {
                "id": o["case"].id,
                "argv": o["argv"],
                "cwd": o["case_dir"],
                "env": _env(**o["case"].env),
                "stdout": stem + ".out",
                "stderr": stem + ".err",
            }
        )
    jobs_path, results_path = os.path.join(base, "jobs.json"), os.path.join(base, "results.json")
    with open(jobs_path, "w") as f:
        json.dump(jobs, f)
    runner = subprocess.run(
        [sys.executable, "-c", RUNNER, jobs_path, results_path, ROOT],
        cwd=base,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert runner.returncode == 0, runner.stdout[-3000:] + runner.stderr[-3000:]
    codes = json.load(open(results_path))
    for o, job in zip(outcomes, jobs):
        o["result"] = subprocess.CompletedProcess(
            job["argv"], codes[job["id"]]["code"], open(job["stdout"]).read(), open(job["stderr"]).read()
        )
        o["seconds"] = codes[job["id"]]["seconds"]


def _run_fresh(outcomes: List[dict]) -> None:
    for o in outcomes:
        start = time.time()
        o["result"] = _run(o["argv"], o["case_dir"], env=_env(**o["case"].env))
        o["seconds"] = time.time() - start


@pytest.fixture(scope="module")
def matrix(world, tmp_path_factory):
    """Run every case, the forked ones and the fresh ones side by side (2 processes at a time);
    {case id: outcome}. The shared data set is snapshotted around it all."""
    base = str(tmp_path_factory.mktemp("robustness_runs"))
    os.makedirs(os.path.join(base, "streams"))
    shared_before = snapshot(world["ds"])
    outcomes = [_prepare_case(c, world, base) for c in CASES]
    use_fork = hasattr(os, "fork")
    forked = [o for o in outcomes if use_fork and not o["case"].fresh]
    fresh = [o for o in outcomes if not (use_fork and not o["case"].fresh)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        done = [pool.submit(_run_forked, forked, base)] if forked else []
        done += [
            pool.submit(_run_fresh, fresh[i :: PARALLEL - 1 if forked else PARALLEL])
            for i in range(PARALLEL - 1 if forked else PARALLEL)
        ]
        for future in done:
            future.result()
    by_id = {o["case"].id: o for o in outcomes}
    by_id["__shared__"] = (shared_before, snapshot(world["ds"]))
    return by_id


def test_the_matrix_has_at_least_20_cases_over_every_script():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    scripts = {
        c.argv(
            {
                "ds": "",
                **{
                    k: "x"
                    for k in (
                        "nan_local",
                        "nan_adapter",
                        "nan_gem",
                        "overflow",
                        "good",
                        "other",
                        "other_public",
                        "truncated",
                        "zero",
                        "weights_dir",
                        "evil",
                        "evil_foundation",
                        "image",
                        "text_jpg",
                        "zero_jpg",
                        "no_images",
                    )
                },
            },
            "d",
        )[0]
        for c in CASES
    }
    assert {
        "train.py",
        "eval.py",
        "localize.py",
        "tools/heatmap.py",
        "tools/draw_matches.py",
        "synthetic_dataset.py",
        "reproduce.py",
    } <= scripts


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(case, matrix, world):
    outcome = matrix[case.id]
    result = outcome["result"]
    output = result.stdout + result.stderr
    context = f"\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
    assert result.returncode == 2, f"exit {result.returncode}" + context
    assert "Traceback" not in output, context
    errors = [line for line in output.splitlines() if ERROR_LINE.search(line)]
    assert len(errors) == 1, f"expected one error line, got {errors}" + context
    for pattern in case.expect:
        assert re.search(pattern, errors[0]), f"{pattern!r} not in the error line: {errors[0]}"
    for pattern in case.also:
        assert re.search(pattern, output), f"{pattern!r} not in the output" + context
    assert not os.path.exists(world["marker"]), "a crafted pickle ran its code"

    # Nothing written or deleted: the case's data folder is unchanged ...
    if outcome["data"]:
        assert snapshot(outcome["data"]) == outcome["data_before"]
    # ... and in the working folder, at most the new log folder's two logs (holding the error).
    before, after = outcome["cwd_before"], snapshot(outcome["case_dir"])
    assert {k: v for k, v in after.items() if k in before} == before, "a file of the working folder changed"
    for rel, (is_dir, _, _) in after.items():
        if rel in before or is_dir:
            continue
        if any(re.search(p, rel) for p in case.allowed):
            continue
        assert os.path.basename(rel) in LOG_FILES, f"a failed run wrote {rel}"
        if os.path.basename(rel) == "info.log":
            log = open(os.path.join(outcome["case_dir"], rel)).read()
            assert errors[0].split("error: ", 1)[1] in log, "the error is not in the run's info.log"


def test_the_shared_data_set_was_not_touched(matrix):
    before, after = matrix["__shared__"]
    assert before == after


# ------------------------------------------------------------------------------------------------
# Images that are accepted, and files in data folders that are never used
# ------------------------------------------------------------------------------------------------


def _odd_but_valid_images(folder: str) -> List[str]:
    """Grayscale, CMYK and PNG-content-named-.jpg versions of three images of `folder` (in place)."""
    paths = datasets_ws.collect_jpgs(folder)[:3]
    modes = []
    for path, kind in zip(paths, ("L", "CMYK", "PNG")):
        img = Image.open(path).convert("RGB")
        if kind == "PNG":
            img.save(path, format="PNG")
        else:
            img.convert(kind).save(path, format="JPEG")
        with Image.open(path) as check:
            modes.append((check.format, check.mode))
    assert modes == [("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB")]
    return paths


def test_grayscale_cmyk_and_png_named_jpg_become_rgb(tmp_path, synthetic_root):
    data = copy_splits(synthetic_root[0], str(tmp_path / "data"))
    paths = _odd_but_valid_images(os.path.join(data, "synthetic", "images", "test", "queries"))
    for path in paths:
        image = datasets_ws.open_image(path)
        assert image.mode == "RGB" and image.size == Image.open(path).size
    ds = datasets_ws.BaseDataset(data, "synthetic", "test", resize=(112, 112))
    for path in paths:
        tensor, _ = ds[ds.images_paths.index(path)]
        assert tensor.shape == (3, 112, 112) and torch.isfinite(tensor).all()


AUDIT = """
import os, sys, runpy
data, log = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
def hook(event, args):
    # Any network use, and any file of the data folder opened that is not an image, is recorded.
    if event.startswith("socket.") or event in ("urllib.Request", "http.client.connect"):
        open_log(f"{{event}} {{args!r}}")
    elif event == "open" and isinstance(args[0], (str, bytes)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(data) and path != log and not path.endswith(".jpg"):
            open_log(f"open {{path}}")
real_open = open
def open_log(text):
    with real_open(log, "a") as f:
        f.write(text + "\\n")
sys.addaudithook(hook)
sys.argv = sys.argv[3:]
# As `python3 script.py`: the script's folder first on sys.path, not the working folder ("" for -c).
sys.path[:] = [os.path.dirname(sys.argv[0])] + [p for p in sys.path if p not in ("", ".")]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_odd_images_are_accepted_and_planted_files_never_used(tmp_path, synthetic_root):
    """eval.py, started inside a data folder holding odd-but-valid images and planted .py / .pth files
    (each would leave a marker if imported or unpickled): it succeeds, opens none of them, and uses no network."""
    data = copy_splits(synthetic_root[0], str(tmp_path / "data"))
    dataset_root = os.path.join(data, "synthetic")
    _odd_but_valid_images(os.path.join(dataset_root, "images", "test", "queries"))
    marker = str(tmp_path / "PWNED")
    payload = f"open({marker!r}, 'w').close()\n"
    planted = []
    for folder in (data, dataset_root, os.path.join(dataset_root, "images", "test", "database")):
        for name in ("faiss.py", "commons.py", "sitecustomize.py", "hubconf.py"):
            planted.append(os.path.join(folder, name))
            open(planted[-1], "w").write(payload)
        planted.append(os.path.join(folder, "dinov2_vitl14_pretrain.pth"))
        torch.save({"x": Evil(marker)}, planted[-1])
        planted.append(os.path.join(folder, "@1@2@.jpg.pth"))
        torch.save({"x": Evil(marker)}, planted[-1])
    before = snapshot(data)
    log = str(tmp_path / "audit.log")
    argv = [os.path.join(ROOT, "eval.py"), *tiny_eval_flags((data, "synthetic"), *FAST, "--save_dir", "planted")]
    result = subprocess.run(
        [sys.executable, "-c", AUDIT.format(), data, log, *argv],
        cwd=dataset_root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Recalls on < BaseDataset, synthetic - #database: 40; #queries: 15 >" in result.stdout
    assert not os.path.exists(marker)
    audit = open(log).read() if os.path.exists(log) else ""
    opened = [line for line in audit.splitlines() if line.startswith("open ")]
    assert not [line for line in opened if "/test/planted/" not in line], opened
    assert not [line for line in audit.splitlines() if not line.startswith("open ")], audit
    after = snapshot(data)
    assert {k: v for k, v in after.items() if k in before} == before
    outputs = glob.glob(os.path.join(dataset_root, "test", "planted", "*", "predictions.jsonl"))
    assert len(outputs) == 1  # the run's own outputs go to its own new folder under the working folder


# ------------------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------------------

DISK_FULL = """
import builtins, os, runpy, sys
sys.path.insert(0, {root!r})
real_open = builtins.open
opened = [0]
def full_disk_open(file, mode="r", *args, **kwargs):
    # The second checkpoint's temp file (".last_model.pth.XXXX.tmp") gets /dev/full: every write to
    # it fails with ENOSPC, exactly as on a full disk.
    if "w" in mode and isinstance(file, str) and os.path.basename(file).startswith(".last_model.pth."):
        opened[0] += 1
        if opened[0] == 2:
            return real_open("/dev/full", mode, *args, **kwargs)
    return real_open(file, mode, *args, **kwargs)
builtins.open = full_disk_open
sys.argv = ["train.py"] + {argv!r}
runpy.run_path(os.path.join({root!r}, "train.py"), run_name="__main__")
"""


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_training_resumes(synthetic_root, tmp_path):
    argv = tiny_eval_flags(
        synthetic_root, *TRAIN_FLAGS, *FAST, "--save_dir", "full", "--epochs_num", "3", "--patience", "5"
    )
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL.format(root=ROOT, argv=argv)],
        cwd=str(tmp_path),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if ERROR_LINE.search(line)]
    assert len(errors) == 1 and "the disk is full" in errors[0], errors
    assert re.search(r"while writing logs/full/.*/last_model\.pth", errors[0]), errors[0]
    folder = glob.glob(str(tmp_path / "logs" / "full" / "*"))[0]
    names = set(os.listdir(folder))  # no temp file left; best_model.pth when epoch 0 improved on 0
    assert (
        {"last_model.pth", "info.log", "debug.log"}
        <= names
        <= {"last_model.pth", "best_model.pth", "info.log", "debug.log"}
    ), names
    checkpoint = checkpoints.load_weights_file(os.path.join(folder, "last_model.pth"), what="--resume")
    assert checkpoint["epoch_num"] == 0  # epoch 0's checkpoint, intact
    # ... and the run continues from it.
    resumed, stdout = _train(
        synthetic_root,
        tmp_path,
        "resumed",
        *FAST,
        "--epochs_num",
        "2",
        "--patience",
        "5",
        "--resume",
        os.path.join(folder, "last_model.pth"),
    )
    assert "took epoch_num=0" in stdout and "training starts at epoch 1" in stdout
    assert "Start training epoch: 01" in stdout and "Start training epoch: 00" not in stdout
    assert checkpoints.load_weights_file(os.path.join(resumed, "last_model.pth"), what="--resume")["epoch_num"] == 1


SLOW_EXTRACTION = """
import os, runpy, sys, time
sys.path.insert(0, {root!r})
import dense_store
real_append = dense_store.DenseStore.append
def append(self, features):
    real_append(self, features)
    if self.on_disk:
        self._writer.flush()
        open({marker!r}, "w").close()  # part of the dense features is on disk: the test kills us now
        time.sleep(120)
dense_store.DenseStore.append = append
sys.argv = ["eval.py"] + {argv!r}
runpy.run_path(os.path.join({root!r}, "eval.py"), run_name="__main__")
"""


def test_killed_efficient_ram_run_leaves_nothing_a_later_run_trusts(synthetic_root, tmp_path):
    marker = str(tmp_path / "extracting")
    argv = tiny_eval_flags(
        synthetic_root, *FAST, "--efficient_ram_testing", "--infer_batch_size", "8", "--save_dir", "ram"
    )
    kill_once_marker_appears(
        [sys.executable, "-c", SLOW_EXTRACTION.format(root=ROOT, marker=marker, argv=argv)],
        marker,
        cwd=str(tmp_path),
        env=_env(),
        timeout=240,
        what="the extraction never reached the disk store",
    )
    (first,) = glob.glob(str(tmp_path / "test" / "ram" / "*"))
    leftovers = glob.glob(os.path.join(first, "dense_features", "*"))
    assert len(leftovers) >= 1 and all(os.path.basename(p).startswith("dense_") for p in leftovers)
    leftover_state = snapshot(first)
    while datetime.now().strftime("%S") == os.path.basename(first)[-2:]:
        time.sleep(0.1)  # the second run gets its own timestamped folder

    log = str(tmp_path / "audit.log")
    result = subprocess.run(
        [sys.executable, "-c", AUDIT.format(), str(tmp_path), log, os.path.join(ROOT, "eval.py"), *argv],
        cwd=str(tmp_path),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folders = sorted(glob.glob(str(tmp_path / "test" / "ram" / "*")))
    assert len(folders) == 2 and folders[0] == first
    second = folders[1]
    opened = [line.split(" ", 1)[1] for line in open(log).read().splitlines() if line.startswith("open ")]
    assert any(p.startswith(os.path.join(second, "dense_features")) for p in opened)  # its own new store
    assert not [p for p in opened if p.startswith(first)], opened  # never the killed run's file
    assert snapshot(first) == leftover_state
    assert not os.path.exists(os.path.join(second, "dense_features"))  # removed at the end, folder included


SLOW_SCRIPT = SLOW_EXTRACTION.replace('["eval.py"]', "[{script!r}]").replace(
    '"eval.py"), run_name', "{script!r}), run_name"
)


@pytest.mark.parametrize("script", ["eval.py", "localize.py"])
def test_sigterm_during_efficient_ram_run_removes_the_store_and_says_so(synthetic_root, tmp_path, script):
    """A cluster's time limit (SIGTERM) ends the run like Ctrl-C: quickly, one log line, no store left."""
    marker, out = str(tmp_path / "extracting"), str(tmp_path / "out")
    common = [*FAST, "--efficient_ram_testing", "--infer_batch_size", "8"]
    if script == "eval.py":
        argv = tiny_eval_flags(synthetic_root, *common, "--save_dir", "term")
    else:
        split = os.path.join(*synthetic_root, "images", "test")
        argv = [
            *TINY_FLAGS,
            "--resize",
            "112",
            "112",
            "--allow_random_weights",
            *common,
            "--output_folder",
            out,
            "--database_folder",
            os.path.join(split, "database"),
            "--queries_folder",
            os.path.join(split, "queries"),
        ]
    code, seconds = kill_once_marker_appears(
        [sys.executable, "-c", SLOW_SCRIPT.format(root=ROOT, marker=marker, argv=argv, script=script)],
        marker,
        cwd=str(tmp_path),
        env=_env(),
        timeout=240,
        what="the extraction never reached the disk store",
        sig=signal.SIGTERM,
    )
    print(f"{script}: exit {code} {seconds:.2f} s after SIGTERM")
    assert code == 143 and seconds < 10, (code, seconds)
    folder = out if script == "localize.py" else glob.glob(str(tmp_path / "test" / "term" / "*"))[0]
    assert not os.path.exists(os.path.join(folder, "dense_features"))  # the store and its folder are gone
    log = open(os.path.join(folder, "info.log")).read()
    assert log.count("Terminated (SIGTERM") == 1 and "Traceback" not in log
    assert not os.path.exists(os.path.join(folder, "predictions.jsonl"))


# ------------------------------------------------------------------------------------------------
# Safety
# ------------------------------------------------------------------------------------------------

HUB = """
import sys, torch
sys.path.insert(0, {root!r})
refused = []
for kwargs in (dict(checkpoint={evil!r}), dict(foundation_model_path={evil_foundation!r})):
    try:
        torch.hub.load({root!r}, "selavpr", source="local", backbone="vit_tiny", backbone_depth=2, **kwargs)
    except ValueError as e:
        refused.append(str(e))
print("\\n".join(refused))
sys.exit(0 if len(refused) == 2 else 3)
"""


def test_crafted_pickle_is_refused_through_torch_hub(world, tmp_path):
    code = HUB.format(root=ROOT, evil=world["evil"], evil_foundation=world["evil_foundation"])
    result = _run(["-c", code], str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert re.search(r"checkpoint .*evil\.pth refused: it would run code .*posix\.system", lines[0])
    # The hub names its own argument (foundation_model_path=...), not the scripts' --foundation_model_path.
    assert re.search(r"^foundation_model_path .*evil_dinov2\.pth refused: it would run code .*posix\.system", lines[1])
    assert not os.path.exists(world["marker"])


def _lint_module():
    spec = importlib.util.spec_from_file_location("lint_safety", os.path.join(ROOT, "tests", "lint_safety.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scan_finds_unsafe_loads():
    unsafe_loads = _lint_module().unsafe_loads
    bad = (
        "import torch, pickle, numpy as np\n"
        "torch.load('a.pth')\ntorch.load('a.pth', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n"
        "pickle.load(open('a', 'rb'))\ntorch.hub.load('repo', 'm')\n"
        "torch.hub.load_state_dict_from_url('http://x')\n"
    )
    assert len(unsafe_loads(bad, is_test=False)) == 6
    assert len(unsafe_loads(bad, is_test=True)) == 5  # a test may read its own file with weights_only=False
    assert (
        len(
            unsafe_loads(
                "torch.load('a', pickle_module=pickle, weights_only=False)\n"
                "torch.load('a', pickle_module=restricted_pickle)\n",
                is_test=False,
            )
        )
        == 2
    )
    good = (
        "import torch\ntorch.load('a.pth', map_location='cpu', weights_only=True)\n"
        "torch.hub.load('.', 'selavpr', source='local')\n"
        "torch.load('a.pth', map_location='cpu', pickle_module=restricted_pickle, weights_only=False)\n"
    )
    assert unsafe_loads(good, is_test=False) == []


def test_the_safety_lint_scans_the_repository_and_reports_findings(tmp_path):
    """tests/lint_safety.py (run by CI before the tests) passes on the repository and fails, naming the
    file and line, on a tree with an unsafe load."""
    clean = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "lint_safety.py")], capture_output=True, text=True, timeout=120
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert re.search(r"lint_safety: \d+ Python files, no unsafe load", clean.stdout)
    (tmp_path / "bad.py").write_text("import torch\nstate = torch.load('x.pth')\n")
    dirty = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "lint_safety.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dirty.returncode == 1 and "bad.py line 2: torch.load without weights_only=True" in dirty.stdout


def test_sigterm_in_process_exits_143_and_the_previous_handler_comes_back(tmp_path):
    """commons.run_main turns SIGTERM into the interruption path only while main runs."""
    import commons

    def previous(signum, frame):
        raise AssertionError("the previous handler ran during main")

    old = signal.signal(signal.SIGTERM, previous)
    cleaned = []
    try:

        def main(args):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted at once
                raise AssertionError("SIGTERM did not interrupt main")
            finally:
                cleaned.append(True)

        with pytest.raises(SystemExit) as exit_info:
            commons.run_main(main, None)
        assert exit_info.value.code == 143 and cleaned == [True]
        assert signal.getsignal(signal.SIGTERM) is previous  # no lasting change for library users
    finally:
        signal.signal(signal.SIGTERM, old)


def test_atomic_writes_honour_the_umask(tmp_path):
    """predictions.jsonl, checkpoints and results files get an ordinary file's permissions (0o666 less the
    umask), not tempfile's owner-only 0o600: colleagues on a shared server can read them."""
    import atomic_files
    import predictions_io

    for mask, expected in ((0o022, 0o644), (0o027, 0o640), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            paths = [
                str(tmp_path / f"{mask:o}_results.json"),
                str(tmp_path / f"{mask:o}_ckpt.pth"),
                str(tmp_path / f"{mask:o}_predictions.jsonl"),
            ]
            atomic_files.atomic_write_text(paths[0], "{}\n")
            checkpoints.atomic_torch_save({"x": torch.zeros(2)}, paths[1])
            predictions_io.write_predictions(paths[2], [{"query": "q.jpg"}])
        finally:
            os.umask(old)
        for path in paths:
            assert os.stat(path).st_mode & 0o777 == expected, (path, oct(os.stat(path).st_mode))


# ------------------------------------------------------------------------------------------------
# Space before work, a read-only working folder, and the disk-full message of each command
# ------------------------------------------------------------------------------------------------

# Runs a script with the file system faked: shutil.disk_usage reports FREE bytes free, and os.makedirs of
# a folder whose path starts with READ_ONLY fails as on a read-only file system.
FAKE_FS = """
import errno, os, runpy, shutil, sys
sys.path.insert(0, {root!r})
free, read_only = {free!r}, {read_only!r}
if free is not None:
    real_usage = shutil.disk_usage
    def disk_usage(path):
        usage = real_usage(path)
        return type(usage)(usage.total, usage.total - free, free)
    shutil.disk_usage = disk_usage
if read_only is not None:
    real_makedirs = os.makedirs
    def makedirs(name, *args, **kwargs):
        if str(name).startswith(read_only):
            raise OSError(errno.EROFS, "Read-only file system", read_only)
        return real_makedirs(name, *args, **kwargs)
    os.makedirs = makedirs
sys.argv = [{script!r}] + {argv!r}
runpy.run_path(os.path.join({root!r}, {script!r}), run_name="__main__")
"""


def _faked(script, argv, cwd, *, free=None, read_only=None):
    code = FAKE_FS.format(root=ROOT, script=script, argv=list(argv), free=free, read_only=read_only)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=str(cwd), env=_env(), capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if ERROR_LINE.search(line)]
    return result, output, errors


@pytest.mark.parametrize("script", ["eval.py", "train.py", "localize.py"])
def test_a_run_that_cannot_fit_on_the_disk_is_refused_before_any_work(synthetic_root, tmp_path, script):
    """eval.py --efficient_ram_testing and train.py used to find out that the disk was full when they wrote
    (train.py after a whole epoch and a validation): the estimate is compared with the free space first."""
    flags = tiny_eval_flags(synthetic_root, *FAST, "--efficient_ram_testing")
    if script == "train.py":
        flags += TRAIN_FLAGS
    if script == "localize.py":
        split = os.path.join(synthetic_root[0], synthetic_root[1], "images", "test")
        flags = [
            *TINY_FLAGS,
            "--resize",
            "112",
            "112",
            "--allow_random_weights",
            *FAST,
            "--efficient_ram_testing",
            "--database_folder",
            os.path.join(split, "database"),
            "--queries_folder",
            os.path.join(split, "queries"),
            "--output_folder",
            "out",
        ]
    result, output, errors = _faked(script, flags, tmp_path, free=2**20)  # 1 MiB free
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert len(errors) == 1, errors
    line = errors[0]
    flag = "--output_folder" if script == "localize.py" else "--save_dir an absolute path"
    expected = r"not enough free space for this run: it will write about [\d.]+ (MiB|GiB) below .* and 1 MiB is free"
    assert re.search(expected, line) and flag in line, line
    assert "dense features of" in line and ("checkpoints" in line) == (script == "train.py")
    assert "Start training epoch" not in output and "Extracting" not in output
    written = [os.path.relpath(os.path.join(r, f), tmp_path) for r, _, files in os.walk(tmp_path) for f in files]
    assert all(os.path.basename(p) in LOG_FILES for p in written), written  # only the logs (with the error)
    # With room, the same command runs (the estimate is not absurdly high).
    if script == "eval.py":
        result, output, _ = _faked(script, flags, tmp_path, free=2**40)
        assert result.returncode == 0, output[-3000:]


def test_a_read_only_working_folder_is_named_with_the_flag_that_moves_the_outputs(synthetic_root, tmp_path):
    """It used to be "error: [Errno 30] Read-only file system: 'test'"."""
    result, output, errors = _faked("eval.py", tiny_eval_flags(synthetic_root, *FAST), tmp_path, read_only="test")
    assert result.returncode == 2 and "Traceback" not in output and len(errors) == 1, output[-3000:]
    assert re.search(
        rf"cannot create the output folder {re.escape(str(tmp_path))}/test/default/[\d_-]+: .* is on a read-only "
        r"file system\. Run eval\.py from a folder you can write to .* or give --save_dir an absolute path",
        errors[0],
    ), errors[0]


EVAL_DISK_FULL = """
import builtins, os, runpy, sys
sys.path.insert(0, {root!r})
real_open = builtins.open
def full_disk_open(file, mode="r", *args, **kwargs):
    # predictions.jsonl's temp file gets /dev/full: its writes fail with ENOSPC, as on a full disk.
    if "w" in mode and isinstance(file, str) and os.path.basename(file).startswith(".predictions.jsonl."):
        return real_open("/dev/full", mode, *args, **kwargs)
    return real_open(file, mode, *args, **kwargs)
builtins.open = full_disk_open
sys.argv = ["eval.py"] + {argv!r}
runpy.run_path(os.path.join({root!r}, "eval.py"), run_name="__main__")
"""


def test_evals_disk_full_message_fits_eval(synthetic_root, tmp_path):
    """eval.py has no checkpoint to --resume from: its message says what is true of its outputs."""
    argv = tiny_eval_flags(synthetic_root, *FAST, "--save_dir", "full")
    result = subprocess.run(
        [sys.executable, "-c", EVAL_DISK_FULL.format(root=ROOT, argv=argv)],
        cwd=str(tmp_path),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if ERROR_LINE.search(line)]
    assert result.returncode == 2 and len(errors) == 1, output[-3000:]
    assert "the disk is full" in errors[0] and "predictions.jsonl" in errors[0]
    assert "--resume" not in errors[0] and "checkpoint" not in errors[0]
    assert "eval.py writes every file to a temp name and renames it" in errors[0]
