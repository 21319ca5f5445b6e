"""eval.py end to end (subprocesses) and test.evaluate on the synthetic set."""

import glob
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY, run_script, tiny_eval_flags

import datasets_ws
import network
import test


def _output_folder(cwd, save_dir):
    folders = glob.glob(os.path.join(cwd, "test", save_dir, "*"))
    assert len(folders) == 1, folders
    return folders[0]


def _read_predictions(folder):
    with open(os.path.join(folder, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_eval_cli_normal_and_efficient_ram_give_identical_results(synthetic_root, tmp_path):
    outputs = {}
    for mode, extra in (("normal", []), ("efficient", ["--efficient_ram_testing"])):
        result = run_script(
            [
                "eval.py",
                *tiny_eval_flags(
                    synthetic_root, "--save_dir", mode, "--num_preds_to_save", "3", "--save_only_wrong_preds"
                ),
                *extra,
            ],
            cwd=str(tmp_path),
        )
        assert result.returncode == 0, result.stdout + result.stderr
        folder = _output_folder(str(tmp_path), mode)
        log = open(os.path.join(folder, "info.log")).read()
        assert "< BaseDataset, synthetic - #database: 40; #queries: 15 >" in log
        assert "First ranking recalls: R@1: " in log and "Recalls on < BaseDataset, synthetic" in log
        assert "RANDOM WEIGHTS" in log and os.path.exists(os.path.join(folder, "debug.log"))
        recalls_line = [l for l in log.splitlines() if "Recalls on <" in l][0]
        outputs[mode] = (recalls_line.split(">: ")[1], _read_predictions(folder))
        pictures = glob.glob(os.path.join(folder, "preds", "*.jpg"))
        records = outputs[mode][1]
        wrong = [r for r in records if not r["reranked"][0]["correct"]]
        assert len(pictures) == len(wrong)
        if mode == "efficient":  # the on-disk store is removed at the end, its folder included
            assert not os.path.exists(os.path.join(folder, "dense_features"))
    assert outputs["normal"][0] == outputs["efficient"][0]
    assert outputs["normal"][1] == outputs["efficient"][1]
    records = outputs["normal"][1]
    assert len(records) == 15
    for r in records:  # --rerank_num 100 > 40 database images: the whole database is re-ranked
        assert len(r["reranked"]) == 40 and len(r["first_stage"]) == 40
        scores = [c["mutual_nn"] for c in r["reranked"]]
        assert scores == sorted(scores, reverse=True)
        assert all(c["correct"] == (c["index"] in r["positives"]) for c in r["reranked"])


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return network.GeoLocalizationNet(**TINY).eval()


@pytest.mark.parametrize(
    "method", ["hard_resize", "single_query", "central_crop", "five_crops", "nearest_crop", "maj_voting"]
)
def test_every_test_method_runs_end_to_end(synthetic_root, tiny_net, method):
    folder, name = synthetic_root
    ds = datasets_ws.BaseDataset(folder, name, "test", resize=(112, 112), test_method=method)
    result = test.evaluate(tiny_net, ds, test_method=method, rerank_num=10, recall_values=[1, 5, 10])
    assert result.predictions.shape == (ds.queries_num, 10)
    for q in range(ds.queries_num):  # re-ranking permutes the first-stage candidates
        assert sorted(result.predictions[q]) == sorted(result.first_predictions[q])
        assert len(set(result.predictions[q])) == 10
    assert np.all(np.diff(result.scores, axis=1) <= 0)
    assert 0 <= result.recalls[0] <= result.recalls[-1] <= 100


def test_pca_runs_end_to_end(synthetic_root, tmp_path):
    folder, name = synthetic_root
    result = run_script(
        [
            "eval.py",
            *tiny_eval_flags(
                synthetic_root,
                "--save_dir",
                "pca",
                "--pca_dim",
                "16",
                "--pca_dataset_folder",
                f"{name}/images/train/database",
            ),
        ],
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Recalls on <" in result.stdout


def test_rerank_num_larger_than_database_warns(synthetic_root, tiny_net, caplog):
    folder, name = synthetic_root
    ds = datasets_ws.BaseDataset(folder, name, "val", resize=(112, 112))
    result = test.evaluate(tiny_net, ds, rerank_num=100, recall_values=[1, 5, 10, 20, 50])
    assert "larger than the database" in caplog.text and "capped" in caplog.text
    assert result.predictions.shape == (ds.queries_num, ds.database_num)
    assert result.recalls[-1] == 100.0  # the whole database is in every list


def test_rerank_features_patch_counts_mutual_neighbours_of_the_patch_tokens(synthetic_root, tmp_path, tiny_model):
    import checkpoints
    from local_matching import mutual_nn_pairs

    path = str(tmp_path / "tiny.pth")
    checkpoints.save_checkpoint(path, model=tiny_model)
    records = {}
    for features in ("local", "patch"):
        result = run_script(
            [
                "eval.py",
                *tiny_eval_flags(synthetic_root, "--resume", path, "--rerank_num", "5", "--save_dir", features),
                "--rerank_features",
                features,
            ],
            cwd=str(tmp_path),
        )
        assert result.returncode == 0, result.stdout + result.stderr
        records[features] = _read_predictions(_output_folder(str(tmp_path), features))
    # The same global descriptors retrieve the same candidates; only the re-ranking features differ.
    assert [r["first_stage"] for r in records["local"]] == [r["first_stage"] for r in records["patch"]]
    folder, name = synthetic_root
    ds = datasets_ws.BaseDataset(folder, name, "test", resize=[112, 112])
    with torch.inference_mode():
        tokens = {}
        for i in range(ds.database_num + ds.queries_num):
            grid = tiny_model.patch_tokens(ds.load(i, "hard_resize").unsqueeze(0))[0]  # (8, 8, 192)
            tokens[i] = torch.nn.functional.normalize(grid, dim=-1)
    patch_scores, local_scores = [], []
    for q, (rp, rl) in enumerate(zip(records["patch"], records["local"])):
        query = tokens[ds.database_num + q]
        for cand in rp["reranked"]:
            expected = len(mutual_nn_pairs(query, tokens[cand["index"]])[0])
            assert cand["mutual_nn"] == expected
        patch_scores += [c["mutual_nn"] for c in rp["reranked"]]
        local_scores += [c["mutual_nn"] for c in rl["reranked"]]
    assert max(patch_scores) <= 64 < max(local_scores)  # 8x8 patch grids, 29x29 local maps at 112x112
