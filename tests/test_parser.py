"""Flags, defaults (the public release's names, types and defaults) and parse-time validation."""

import os

import pytest
from conftest import ROOT, run_script

import parser as selavpr_parser

# name -> the public release's default; None where the public default is None.
PUBLIC_DEFAULTS = {
    "train_batch_size": 4,
    "infer_batch_size": 16,
    "criterion": "triplet",
    "margin": 0.1,
    "epochs_num": 50,
    "patience": 3,
    "lr": 1e-5,
    "optim": "adam",
    "cache_refresh_rate": 1000,
    "queries_per_epoch": 5000,
    "negs_num_per_query": 2,
    "neg_samples_num": 1000,
    "mining": "partial",
    "l2": "before_pool",
    "pca_dim": None,
    "registers": False,
    "seed": 0,
    "foundation_model_path": None,
    "resume": None,
    "num_workers": 8,
    "resize": [224, 224],
    "dense_feature_map_size": [61, 61, 128],
    "test_method": "hard_resize",
    "majority_weight": 0.01,
    "efficient_ram_testing": False,
    "val_positive_dist_threshold": 25,
    "train_positives_dist_threshold": 10,
    "recall_values": [1, 5, 10, 20],
    "rerank_num": 100,
    "brightness": None,
    "contrast": None,
    "saturation": None,
    "hue": None,
    "rand_perspective": None,
    "horizontal_flip": False,
    "random_resized_crop": None,
    "random_rotation": None,
    "datasets_folder": "/d",
    "dataset_name": "pitts30k",
    "pca_dataset_folder": None,
    "save_dir": "default",
}


def parse(*flags, env_folder=True):
    argv = (["--datasets_folder", "/d"] if env_folder else []) + list(flags)
    return selavpr_parser.parse_arguments(argv)


def test_every_public_flag_has_its_public_default():
    args = parse()
    for name, default in PUBLIC_DEFAULTS.items():
        assert getattr(args, name) == default, name
    assert args.device in ("cuda", "cpu")


def test_help_lists_every_public_flag_with_its_default():
    # What `train.py --help` and `eval.py --help` print: both parse with parse_arguments() (checked below).
    text = " ".join(selavpr_parser.build_parser().format_help().split())
    for name, default in PUBLIC_DEFAULTS.items():
        assert f"--{name}" in text, name
        if name in ("datasets_folder", "dense_feature_map_size"):
            continue  # documented as "$DATASETS_FOLDER" / "computed from --resize (61 61 128 at 224x224)"
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        if isinstance(default, bool):
            continue  # store_true flags
        assert (
            f"(default: {shown if not isinstance(default, list) else default})" in text or f"default: {shown}" in text
        ), (name, shown)
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


@pytest.mark.parametrize(
    "flags, message",
    [
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
        (["--local_loss_weight", "-0.5"], "--local_loss_weight must be >= 0"),
        (["--local_loss_weight", "nan"], "--local_loss_weight must be >= 0"),
        (["--rerank_features", "dense"], "invalid choice"),
        (["--precision", "fp16"], "invalid choice"),
        (["--deterministic", "--seed", "-1"], "--deterministic needs a seeded run"),
    ],
)
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


def test_precision_values_and_deterministic_training(monkeypatch, capsys):
    import localize
    import reproduce

    assert [parse("--device", "cpu", "--precision", p).precision for p in ("fp32", "tf32", "bf16")] == [
        "fp32",
        "tf32",
        "bf16",
    ]
    assert parse("--device", "cpu").precision == "fp32" and not parse("--device", "cpu").deterministic
    folder = os.path.dirname(os.path.abspath(__file__))
    assert (
        localize.parse_localize_arguments(
            ["--queries_folder", folder, "--database_folder", folder, "--device", "cpu", "--precision", "tf32"]
        ).precision
        == "tf32"
    )
    assert reproduce.parse_arguments(["--datasets_folder", "/d", "--device", "cpu", "--precision", "tf32"]).precision
    assert parse("--device", "cpu", "--deterministic", "--train_backbone").deterministic  # on the CPU: fine
    # On a GPU, the positional table's bicubic backward (trained with --train_backbone) has no
    # deterministic CUDA kernel.
    monkeypatch.setattr(selavpr_parser.torch.cuda, "is_available", lambda: True)
    assert parse("--device", "cuda", "--deterministic").deterministic
    with pytest.raises(SystemExit):
        parse("--device", "cuda", "--deterministic", "--train_backbone")
    assert "no deterministic CUDA implementation" in capsys.readouterr().err


def _project_checkpoint(path, *, resize=(112, 112), depth=2, registers=False):
    import torch

    import checkpoints
    import network

    torch.manual_seed(0)
    model = network.GeoLocalizationNet(backbone="vit_tiny", backbone_depth=depth, registers=registers)
    checkpoints.save_checkpoint(str(path), model=model, resize=resize)
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
    for flags, expected in (
        (["--backbone", "vit_small"], "--backbone vit_small (given) but vit_tiny in the file"),
        (["--backbone_depth", "4"], "--backbone_depth 4 (given) but 2 in the file"),
        (["--registers"], "--registers True (given) but False in the file"),
    ):
        with pytest.raises(SystemExit):
            parse("--resume", path, *flags)
        assert expected in capsys.readouterr().err


def test_public_files_and_no_checkpoint_keep_the_papers_model(tmp_path):
    import numpy as np
    import torch

    public = tmp_path / "SelaVPR_msls.pth"  # the public layout: no model_settings entry
    torch.save({"model_state_dict": {"module.aggregation.1.p": torch.ones(1)}, "best_r5": np.float64(1.0)}, public)
    for args in (parse("--resume", str(public)), parse()):
        assert (args.backbone, args.backbone_depth, args.registers, args.resize) == (
            "vit_large",
            None,
            False,
            [224, 224],
        )
        assert args.model_settings_note is None
    # A missing file is left to the weight loading, which reports it in full.
    assert parse("--resume", str(tmp_path / "nope.pth")).backbone == "vit_large"


def test_localize_and_eval_rebuild_the_model_from_the_checkpoint_alone(synthetic_root, tmp_path):
    folder, name = synthetic_root
    path = _project_checkpoint(tmp_path / "best_model.pth")
    common = ["--device", "cpu", "--num_workers", "0", "--resume", path, "--rerank_num", "5"]
    test_folder = os.path.join(folder, name, "images", "test")
    result = run_script(
        [
            "localize.py",
            "--database_folder",
            os.path.join(test_folder, "database"),
            "--queries_folder",
            os.path.join(test_folder, "queries"),
            "--output_folder",
            str(tmp_path / "loc"),
            *common,
        ],
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Model settings taken from --resume" in result.stdout and "--resize 112 112" in result.stdout
    result = run_script(["eval.py", "--datasets_folder", folder, "--dataset_name", name, *common], cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Recalls on < BaseDataset" in result.stdout


# ---------------------------------------------------------------------------------------------------
# Each command's own parser, made of shared groups
# ---------------------------------------------------------------------------------------------------

# The flags of each group, written out here (not read from parser.py) so that a flag moved, lost or
# added shows up as a failure.
GROUP_FLAGS = {
    "weights": {"--foundation_model_path", "--resume", "--load_weights", "--allow_random_weights"},
    "model": {"--backbone", "--backbone_depth", "--registers", "--resize", "--dense_feature_map_size"},
    "runtime": {"--device", "--seed"},
    "extraction": {"--infer_batch_size", "--num_workers", "--precision"},
    "evaluation": {
        "--test_method",
        "--majority_weight",
        "--efficient_ram_testing",
        "--dense_store_dtype",
        "--val_positive_dist_threshold",
        "--recall_values",
    },
    "rerank": {"--rerank_num"},
    "rerank_features": {"--rerank_features"},
    "outputs": {"--save_dir", "--num_preds_to_save", "--save_only_wrong_preds"},
    "descriptors": {"--l2", "--pca_dim", "--pca_dataset_folder"},
    "datasets_folder": {"--datasets_folder"},
    "dataset": {"--dataset_name", "--query_keys_file"},
    "training": {
        "--train_batch_size",
        "--criterion",
        "--margin",
        "--epochs_num",
        "--patience",
        "--lr",
        "--optim",
        "--cache_refresh_rate",
        "--queries_per_epoch",
        "--negs_num_per_query",
        "--neg_samples_num",
        "--mining",
        "--train_positives_dist_threshold",
        "--train_backbone",
        "--local_loss_weight",
        "--deterministic",
    },
    "augmentation": {
        "--brightness",
        "--contrast",
        "--saturation",
        "--hue",
        "--rand_perspective",
        "--horizontal_flip",
        "--random_resized_crop",
        "--random_rotation",
    },
    "continue": {"--continue_run"},
}
OURS = {
    "--backbone",
    "--backbone_depth",
    "--load_weights",
    "--allow_random_weights",
    "--precision",
    "--num_preds_to_save",
    "--save_only_wrong_preds",
    "--query_keys_file",
    "--train_backbone",
    "--local_loss_weight",
    "--rerank_features",
    "--deterministic",
    "--continue_run",
    "--dense_store_dtype",
}


def _flags_of(*groups):
    return set().union(*(GROUP_FLAGS[g] for g in groups))


def _load_tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _command_parsers():
    import localize
    import reproduce

    return {
        "train": (selavpr_parser.build_parser(), _flags_of(*GROUP_FLAGS) - GROUP_FLAGS["continue"]),
        "eval": (selavpr_parser.build_eval_parser(), _flags_of(*GROUP_FLAGS)),
        "localize": (
            localize.build_localize_parser(),
            _flags_of("weights", "model", "runtime", "extraction", "evaluation", "rerank", "outputs")
            | {"--database_folder", "--queries_folder", "--output_folder", "--save_database", "--load_database"},
        ),
        "reproduce": (
            reproduce.build_parser(),
            _flags_of("model", "runtime", "extraction", "evaluation", "datasets_folder")
            | {
                "--msls_checkpoint",
                "--pitts30k_checkpoint",
                "--msls_val_keys",
                "--msls_all_queries",
                "--output",
                "--dataset_folders",
                "--only",
                "--rerank_num",
            },
        ),
        "draw_matches": (
            _load_tool("draw_matches").build_argument_parser(),
            _flags_of("weights", "model", "runtime")
            | {"--output", "--features", "--no_ransac", "--ransac_threshold", "--max_lines", "--display_height"},
        ),
        "heatmap": (
            _load_tool("heatmap").build_argument_parser(),
            _flags_of("weights", "model", "runtime") | {"--output", "--alpha"},
        ),
    }


def _long_flags_in_help(p):
    import re

    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", p.format_help()))


@pytest.mark.parametrize("command", ["train", "eval", "localize", "reproduce", "draw_matches", "heatmap"])
def test_each_command_has_exactly_the_flags_of_its_groups(command):
    p, expected = _command_parsers()[command]
    # Every option the parser accepts, and every flag its --help shows, is one of its groups' or its own.
    accepted = {s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    assert accepted == expected
    assert _long_flags_in_help(p) - {"--help"} == expected
    assert p.conflict_handler == "error"  # no flag silently redefines another


def test_public_flag_list_is_the_seed_releases():
    # The public release's flags (its parser, as listed in the behaviour spec) are ours minus our additions.
    public = set("--" + name for name in PUBLIC_DEFAULTS) | {"--device"}
    assert _flags_of(*GROUP_FLAGS) - OURS == public


def test_train_and_eval_accept_every_public_flag_given_at_once(tmp_path):
    folder = tmp_path / "pca"
    argv = [
        "--train_batch_size",
        "8",
        "--infer_batch_size",
        "4",
        "--criterion",
        "triplet",
        "--margin",
        "0.2",
        "--epochs_num",
        "3",
        "--patience",
        "2",
        "--lr",
        "1e-4",
        "--optim",
        "sgd",
        "--cache_refresh_rate",
        "10",
        "--queries_per_epoch",
        "20",
        "--negs_num_per_query",
        "3",
        "--neg_samples_num",
        "50",
        "--mining",
        "full",
        "--l2",
        "none",
        "--pca_dim",
        "8",
        "--registers",
        "--seed",
        "-1",
        "--foundation_model_path",
        "f.pth",
        "--resume",
        "r.pth",
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--resize",
        "112",
        "112",
        "--dense_feature_map_size",
        "29",
        "29",
        "128",
        "--test_method",
        "maj_voting",
        "--majority_weight",
        "0.5",
        "--efficient_ram_testing",
        "--val_positive_dist_threshold",
        "30",
        "--train_positives_dist_threshold",
        "5",
        "--recall_values",
        "1",
        "5",
        "--rerank_num",
        "20",
        "--brightness",
        "0.1",
        "--contrast",
        "0.2",
        "--saturation",
        "0.3",
        "--hue",
        "0.1",
        "--rand_perspective",
        "0.4",
        "--horizontal_flip",
        "--random_resized_crop",
        "0.5",
        "--random_rotation",
        "10",
        "--datasets_folder",
        "/d",
        "--dataset_name",
        "msls",
        "--pca_dataset_folder",
        str(folder),
        "--save_dir",
        "x",
    ]
    assert set(a for a in argv if a.startswith("--")) == set("--" + n for n in PUBLIC_DEFAULTS) | {"--device"}
    args = selavpr_parser.parse_arguments(argv)
    assert (
        args.train_batch_size,
        args.optim,
        args.pca_dim,
        args.resize,
        args.recall_values,
        args.rerank_num,
        args.random_rotation,
        args.dataset_name,
        args.seed,
    ) == (8, "sgd", 8, [112, 112], [1, 5], 20, 10.0, "msls", -1)
    # Both scripts parse with exactly this parser (eval.py's adds --continue_run), with their disk-full note.
    for script, parse in (("train.py", "parse_arguments"), ("eval.py", "parse_eval_arguments")):
        with open(os.path.join(ROOT, script)) as f:
            assert (
                f.read()
                .rstrip()
                .endswith(f"commons.run_main(main, parser.{parse}(), torchrun=True, disk_full_note=DISK_FULL_NOTE)")
            ), script
    assert vars(selavpr_parser.parse_eval_arguments(argv)) == dict(vars(args), continue_run=None)


@pytest.mark.parametrize(
    "flags",
    [
        ["--lr", "1e-4"],
        ["--pca_dim", "8"],
        ["--datasets_folder", "/d"],
        ["--dataset_name", "x"],
        ["--train_backbone"],
        ["--query_keys_file", "k"],
    ],
)
def test_localize_has_no_training_pca_or_data_set_flags(flags, tmp_path, capsys):
    import localize

    with pytest.raises(SystemExit) as exc:
        localize.parse_localize_arguments(
            [
                "--database_folder",
                str(tmp_path),
                "--queries_folder",
                str(tmp_path),
                "--output_folder",
                str(tmp_path / "out"),
                "--device",
                "cpu",
                *flags,
            ]
        )
    assert exc.value.code == 2 and f"unrecognized arguments: {flags[0]}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--resume", "x.pth"],
        ["--load_weights", "x.pth"],
        ["--foundation_model_path", "d.pth"],
        ["--query_keys_file", "k.txt"],
        ["--pca_dim", "8"],
        ["--num_preds_to_save", "2"],
        ["--lr", "1e-4"],
        ["--dataset_name", "msls"],
    ],
)
def test_reproduce_has_no_flags_it_does_not_use(flags, capsys):
    import reproduce

    with pytest.raises(SystemExit) as exc:
        reproduce.parse_arguments(["--datasets_folder", "/d", "--device", "cpu", *flags])
    assert exc.value.code == 2 and f"unrecognized arguments: {flags[0]}" in capsys.readouterr().err


def test_reproduce_help_says_where_the_papers_checkpoints_go():
    import reproduce

    text = " ".join(reproduce.build_parser().format_help().split())  # what `reproduce.py --help` prints
    assert "with the paper's checkpoints, given with --msls_checkpoint and --pitts30k_checkpoint" in text
    assert "--msls_val_keys" in text and "--resume" not in text


def test_reproduce_rerank_num_is_its_own_flag():
    import reproduce

    base = ["--datasets_folder", "/d", "--device", "cpu"]
    assert reproduce.parse_arguments(base + ["--rerank_num", "both"]).rerank_num == [100, 20]
    assert reproduce.parse_arguments(base + ["--rerank_num", "20"]).rerank_num == [20]
    assert reproduce.parse_arguments(base).rerank_num == [100]
    # Defined once, in reproduce.py's own group: the shared single-integer --rerank_num is not there.
    p = reproduce.build_parser()
    assert selavpr_parser.RERANK not in p.groups
    assert [a.option_strings for a in p._actions].count(["--rerank_num"]) == 1


def test_reproduce_bad_values_keep_their_messages(capsys):
    import reproduce

    for flags, message in (
        (["--rerank_num", "many"], "--rerank_num must be a positive integer or 'both', got 'many'"),
        (["--dataset_folders", "kitti=x"], "unknown data set 'kitti'"),
        (["--msls_val_keys", "/no/such/file"], "--msls_val_keys /no/such/file: no such file"),
    ):
        with pytest.raises(SystemExit):
            reproduce.parse_arguments(["--datasets_folder", "/d", "--device", "cpu", *flags])
        assert message in capsys.readouterr().err


def test_checks_run_only_for_the_groups_a_command_has(monkeypatch):
    # A parser of the model group alone: no data set is required, no training check runs, the dense
    # size is still filled in from --resize.
    monkeypatch.delenv("DATASETS_FOLDER", raising=False)
    p = selavpr_parser.CommandParser("x", [selavpr_parser.MODEL, selavpr_parser.RUNTIME])
    args = p.parse(["--resize", "112", "112", "--device", "cpu"])
    assert vars(args) == {
        "backbone": "vit_large",
        "backbone_depth": None,
        "registers": False,
        "resize": [112, 112],
        "dense_feature_map_size": [29, 29, 128],
        "device": "cpu",
        "seed": 0,
    }
    # A group without the groups whose flags it reads is a programming error, found when the parser is built.
    for groups in ([selavpr_parser.WEIGHTS], [selavpr_parser.DATASET], [selavpr_parser.DESCRIPTORS]):
        with pytest.raises(ValueError, match="without"):
            selavpr_parser.CommandParser("x", groups)


def test_model_settings_from_a_checkpoint_for_localize_and_the_tools(tmp_path):
    import localize

    path = _project_checkpoint(tmp_path / "c.pth", depth=3)
    args = localize.parse_localize_arguments(
        [
            "--database_folder",
            str(tmp_path),
            "--queries_folder",
            str(tmp_path),
            "--output_folder",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--load_weights",
            path,
        ]
    )
    assert (args.backbone, args.backbone_depth, args.resize, args.dense_feature_map_size) == (
        "vit_tiny",
        3,
        [112, 112],
        [29, 29, 128],
    )
    heatmap = _load_tool("heatmap")
    args = heatmap.parse_args(["a.jpg", "--output", "b.jpg", "--device", "cpu", "--resume", path])
    assert (args.backbone, args.backbone_depth, args.resize) == ("vit_tiny", 3, [112, 112])
    assert "Model settings taken from --resume" in args.model_settings_note
    # Groups listed in any order: the checkpoint's settings are still read before the model's checks run
    # (--resize 112 112 from the file gives 29 29 128), and --help shows the groups in one order.
    p = selavpr_parser.CommandParser("x", [selavpr_parser.RUNTIME, selavpr_parser.MODEL, selavpr_parser.WEIGHTS])
    args = p.parse(["--resume", path, "--dense_feature_map_size", "29", "29", "128", "--device", "cpu"])
    assert args.resize == [112, 112] and args.backbone_depth == 3
    assert [g.title for g in p._action_groups][2:] == ["weights", "model", "runtime"]


# The command-line modules whose arguments must not change once parsed.
COMMAND_FILES = [
    "parser.py",
    "train.py",
    "eval.py",
    "localize.py",
    "reproduce.py",
    "tools/draw_matches.py",
    "tools/heatmap.py",
]


@pytest.mark.parametrize("name", COMMAND_FILES)
def test_args_is_never_edited_after_parsing(name):
    import ast

    with open(os.path.join(ROOT, name)) as f:
        tree = ast.parse(f.read())
    edits = []
    for node in ast.walk(tree):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AugAssign, ast.AnnAssign))
            else []
        )
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "args":
                edits.append(f"line {node.lineno}: args.{target.attr} = ...")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "args"
        ):
            # setattr/delattr edit; getattr with a default guards against a flag the command may lack
            # (a command's flags are known from its groups).
            if node.func.id in ("setattr", "delattr") or (node.func.id == "getattr" and len(node.args) == 3):
                edits.append(f"line {node.lineno}: {node.func.id}(args, ...)")
    assert edits == []
