"""demo.py's pieces that need no training: what each variant trains, the parameter counts, the recalls it
reads from eval.py's output, its table, and its message when the foundation file is missing."""

import argparse

import pytest

import demo

EVAL_OUTPUT = (
    "2026-12-05 23:58:40   First ranking recalls: R@1: 28.0, R@5: 47.3, R@10: 62.7, R@20: 74.7\n"
    "2026-12-05 23:58:40   Recalls on < BaseDataset, synthetic - #database: 300; #queries: 150 >: "
    "R@1: 24.0, R@5: 57.3, R@10: 66.0, R@20: 74.7\n"
)


def test_recalls_are_read_before_and_after_re_ranking():
    assert demo.recalls_of(EVAL_OUTPUT) == (
        "R@1: 28.0, R@5: 47.3, R@10: 62.7, R@20: 74.7",
        "R@1: 24.0, R@5: 57.3, R@10: 66.0, R@20: 74.7",
    )
    assert demo.recalls_of("no recalls here") == ("?", "?")


def test_the_paper_recipe_trains_a_small_share_and_full_fine_tuning_everything():
    adapted, total = demo.parameter_counts(train_backbone=False)
    everything, total_again = demo.parameter_counts(train_backbone=True)
    assert total == total_again == everything
    assert 0 < adapted < total / 2  # adapters, LocalAdapt and GeM's p: the foundation stays frozen


def test_variants_train_from_the_foundation_or_from_random_weights():
    _, selavpr = demo.VARIANTS["selavpr"]
    assert "--train_backbone" not in selavpr and "--foundation_model_path" in selavpr
    _, full = demo.VARIANTS["full_finetune"]
    assert "--train_backbone" in full and "--foundation_model_path" in full
    _, scratch = demo.VARIANTS["from_scratch"]
    assert "--allow_random_weights" in scratch and "--foundation_model_path" not in scratch
    # The old demo's learning rate: given after TRAIN_FLAGS, the parser keeps the later value.
    import parser as selavpr_parser

    args = selavpr_parser.parse_arguments(["--datasets_folder", "x", *demo.MODEL_FLAGS, *demo.TRAIN_FLAGS, *scratch])
    assert args.lr == 1e-4 and args.train_backbone
    args = selavpr_parser.parse_arguments(["--datasets_folder", "x", *demo.MODEL_FLAGS, *demo.TRAIN_FLAGS, *selavpr])
    assert args.lr == float(demo.TRAIN_FLAGS[demo.TRAIN_FLAGS.index("--lr") + 1]) and not args.train_backbone


def test_table_shows_both_rankings_of_each_model():
    rows = [
        dict(name="frozen", trained="0", dense="patch tokens", **dict(zip(("global", "reranked"), ("?", "?")))),
        dict(
            name="adapted",
            trained="10 of 100 (10%)",
            dense="LocalAdapt",
            **dict(zip(("global", "reranked"), demo.recalls_of(EVAL_OUTPUT))),
        ),
    ]
    lines = demo.table(rows).splitlines()
    assert (
        lines[-1]
        == "| adapted | 10 of 100 (10%) | 28.0 / 47.3 / 62.7 / 74.7 | 24.0 / 57.3 / 66.0 / 74.7 | LocalAdapt |"
    )
    assert lines[-2] == "| frozen | 0 | ? | ? | patch tokens |"


def test_a_missing_foundation_file_is_named_with_what_to_do(tmp_path, capsys):
    args = argparse.Namespace(
        datasets_folder=str(tmp_path / "datasets"),
        dataset_name="synthetic",
        foundation_model_path=str(tmp_path / "missing.pth"),
        variant="selavpr",
    )
    # ensure_dataset would generate the data set first: make it a no-op, the check comes before any run.
    with pytest.MonkeyPatch.context() as m:
        m.setattr(demo.synthetic_dataset, "ensure_dataset", lambda folder, name: folder)
        m.setattr(demo, "run", lambda *a, **k: pytest.fail("no step may run"))
        with pytest.raises(SystemExit) as exit_info:
            demo.main(args)
    assert "missing.pth is missing" in str(exit_info.value) and "tools/pretrain_foundation.py" in str(exit_info.value)
