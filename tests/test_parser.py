"""Flags, defaults (the public release's names, types and defaults) and parse-time validation."""
import os

import pytest

import parser as selavpr_parser
from conftest import run_script

# name -> the public release's default; None where the public default is None.
PUBLIC_DEFAULTS = {
    "train_batch_size": 4, "infer_batch_size": 16, "criterion": "triplet", "margin": 0.1, "epochs_num": 50,
    "patience": 3, "lr": 1e-5, "optim": "adam", "cache_refresh_rate": 1000, "queries_per_epoch": 5000,
    "negs_num_per_query": 2, "neg_samples_num": 1000, "mining": "partial", "l2": "before_pool", "pca_dim": None,
    "registers": False, "seed": 0, "foundation_model_path": None, "resume": None, "num_workers": 8,
    "resize": [224, 224], "dense_feature_map_size": [61, 61, 128], "test_method": "hard_resize",
    "majority_weight": 0.01, "efficient_ram_testing": False, "val_positive_dist_threshold": 25,
    "train_positives_dist_threshold": 10, "recall_values": [1, 5, 10, 20], "rerank_num": 100,
    "brightness": None, "contrast": None, "saturation": None, "hue": None, "rand_perspective": None,
    "horizontal_flip": False, "random_resized_crop": None, "random_rotation": None, "datasets_folder": "/d",
    "dataset_name": "pitts30k", "pca_dataset_folder": None, "save_dir": "default",
}


def parse(*flags, env_folder=True):
    argv = (["--datasets_folder", "/d"] if env_folder else []) + list(flags)
    return selavpr_parser.parse_arguments(argv)


def test_every_public_flag_has_its_public_default():
    args = parse()
    for name, default in PUBLIC_DEFAULTS.items():
        assert getattr(args, name) == default, name
    assert args.device in ("cuda", "cpu")


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_help_lists_every_public_flag_with_its_default(script):
    result = run_script([script, "--help"], timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for name, default in PUBLIC_DEFAULTS.items():
        assert f"--{name}" in text, name
        if name in ("datasets_folder", "dense_feature_map_size"):
            continue  # documented as "$DATASETS_FOLDER" / "computed from --resize (61 61 128 at 224x224)"
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        if isinstance(default, bool):
            continue  # store_true flags
        assert f"(default: {shown if not isinstance(default, list) else default})" in text or \
            f"default: {shown}" in text, (name, shown)
    assert "61 61 128" in text and "DATASETS_FOLDER" in text


def test_datasets_folder_falls_back_to_environment(monkeypatch):
    monkeypatch.setenv("DATASETS_FOLDER", "/from/env")
    assert parse(env_folder=False).datasets_folder == "/from/env"
    monkeypatch.delenv("DATASETS_FOLDER")
    with pytest.raises(SystemExit):
        parse(env_folder=False)


def test_dense_size_follows_resize():
    assert parse("--resize", "280", "224").dense_feature_map_size == [77, 61, 128]
    assert parse("--resize", "322", "322", "--dense_feature_map_size", "89", "89", "128").resize == [322, 322]


@pytest.mark.parametrize("flags, message", [
    (["--resize", "225", "224"], "multiples of the patch size 14"),
    (["--dense_feature_map_size", "16", "16", "1024"], "does not match --resize"),
    (["--queries_per_epoch", "1500"], "multiple of --cache_refresh_rate"),
    (["--pca_dim", "256"], "--pca_dim needs --pca_dataset_folder"),
    (["--criterion", "sare_ind"], "not implemented"),
    (["--rerank_num", "0"], "positive integer"),
    (["--test_method", "bogus"], "invalid choice"),
    (["--recall_values", "5", "1"], "increasing"),
    (["--resume", "a", "--load_weights", "b"], "not both"),
    (["--save_only_wrong_preds"], "--num_preds_to_save"),
])
def test_bad_flag_combinations_fail_at_parse_time(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_requested_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(selavpr_parser.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        parse("--device", "cuda")
    assert "no CUDA device" in capsys.readouterr().err


def _project_checkpoint(path, *, resize=(112, 112), depth=2, registers=False):
    import torch
    import network
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(backbone="vit_tiny", backbone_depth=depth, registers=registers)
    network.save_checkpoint(str(path), model=model, resize=resize)
    return str(path)


def test_model_settings_come_from_a_project_checkpoint(tmp_path):
    path = _project_checkpoint(tmp_path / "c.pth", depth=3)
    for flag in ("--resume", "--load_weights"):
        args = parse(flag, path)
        assert (args.backbone, args.backbone_depth, args.registers, args.resize) == ("vit_tiny", 3, False, [112, 112])
        assert args.dense_feature_map_size == [29, 29, 128]
        assert "Model settings taken from " + flag in args.model_settings_note


def test_given_model_flags_win_and_conflicts_name_both_values(tmp_path, capsys):
    path = _project_checkpoint(tmp_path / "c.pth")
    args = parse("--resume", path, "--resize", "140", "126", "--backbone", "vit_tiny")
    assert args.resize == [140, 126] and args.backbone_depth == 2 and args.dense_feature_map_size == [37, 33, 128]
    for flags, expected in ((["--backbone", "vit_small"], "--backbone vit_small (given) but vit_tiny in the file"),
                            (["--backbone_depth", "4"], "--backbone_depth 4 (given) but 2 in the file"),
                            (["--registers"], "--registers True (given) but False in the file")):
        with pytest.raises(SystemExit):
            parse("--resume", path, *flags)
        assert expected in capsys.readouterr().err


def test_public_files_and_no_checkpoint_keep_the_papers_model(tmp_path):
    import numpy as np
    import torch
    public = tmp_path / "SelaVPR_msls.pth"  # the public layout: no model_settings entry
    torch.save({"model_state_dict": {"module.aggregation.1.p": torch.ones(1)}, "best_r5": np.float64(1.0)}, public)
    for args in (parse("--resume", str(public)), parse()):
        assert (args.backbone, args.backbone_depth, args.registers, args.resize) == ("vit_large", None, False,
                                                                                      [224, 224])
        assert args.model_settings_note is None
    # A missing file is left to the weight loading, which reports it in full.
    assert parse("--resume", str(tmp_path / "nope.pth")).backbone == "vit_large"


def test_localize_and_eval_rebuild_the_model_from_the_checkpoint_alone(synthetic_root, tmp_path):
    folder, name = synthetic_root
    path = _project_checkpoint(tmp_path / "best_model.pth")
    common = ["--device", "cpu", "--num_workers", "0", "--resume", path, "--rerank_num", "5"]
    test_folder = os.path.join(folder, name, "images", "test")
    result = run_script(["localize.py", "--database_folder", os.path.join(test_folder, "database"),
                         "--queries_folder", os.path.join(test_folder, "queries"),
                         "--output_folder", str(tmp_path / "loc"), *common], cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Model settings taken from --resume" in result.stdout and "--resize 112 112" in result.stdout
    result = run_script(["eval.py", "--datasets_folder", folder, "--dataset_name", name, *common],
                        cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Recalls on < BaseDataset" in result.stdout
