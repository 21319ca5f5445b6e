"""Flags, defaults (SPEC section 9) and parse-time validation."""
import pytest

import parser as selavpr_parser
from conftest import run_script

# name -> public default (SPEC section 9); None where the public default is None.
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
