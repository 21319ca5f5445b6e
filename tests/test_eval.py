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
        # localize.py's schema: absolute paths, and each re-ranked entry's first-stage L2 distance.
        assert os.path.isabs(r["query"]) and os.path.isfile(r["query"])
        assert all(os.path.isabs(c["path"]) and os.path.isfile(c["path"]) for c in r["first_stage"] + r["reranked"])
        distance = {c["index"]: c["l2_distance"] for c in r["first_stage"]}
        assert all(c["l2_distance"] == distance[c["index"]] for c in r["reranked"])


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
    result = test.evaluate(tiny_net, ds, test.EvalSettings(test_method=method, rerank_num=10, recall_values=[1, 5, 10]))
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
    result = test.evaluate(tiny_net, ds, test.EvalSettings(rerank_num=100, recall_values=[1, 5, 10, 20, 50]))
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


def test_a_first_stage_capped_by_rerank_num_says_so(synthetic_root, tiny_net, caplog):
    """--rerank_num 1 gives R@1 = R@5 = R@10 = R@20 (the public code counts only the candidates searched):
    the line says it is capped and at which N, instead of looking like a broken search."""
    import logging

    folder, name = synthetic_root
    ds = datasets_ws.BaseDataset(folder, name, "test", resize=(112, 112))
    with caplog.at_level(logging.INFO):
        result = test.evaluate(tiny_net, ds, test.EvalSettings(rerank_num=1, recall_values=[1, 5, 10, 20]))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("First ranking recalls")]
    assert line == (
        f"First ranking recalls: {test.recalls_to_str(result.recalls_first, [1, 5, 10, 20])} (capped at N = 1: "
        "each query has only 1 candidate (--rerank_num, or the database size), so R@5, R@10, R@20 equal R@1)"
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        test.evaluate(tiny_net, ds, test.EvalSettings(rerank_num=20, recall_values=[1, 5, 10, 20]))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("First ranking recalls")]
    assert "capped" not in line


def _msls_like_test_split(synthetic_root, root, keys, extra):
    """A data set laid out like MSLS-val in the test split: the synthetic test database, and one synthetic
    query linked under a name per key (field 7), near the database."""
    folder, name = synthetic_root
    source = os.path.join(folder, name, "images", "test")
    target = os.path.join(root, "msls_like", "images", "test")
    os.makedirs(os.path.join(target, "queries"))
    import shutil

    shutil.copytree(os.path.join(source, "database"), os.path.join(target, "database"))
    query = sorted(glob.glob(os.path.join(source, "queries", "*.jpg")))[0]
    fields = os.path.basename(query).split("@")
    for i, key in enumerate(list(keys) + list(extra)):
        fields[7] = key
        fields[2] = f"{float(fields[2]) + (i % 5):.2f}"
        os.link(query, os.path.join(target, "queries", "@".join(fields)))
    return root


def test_eval_takes_the_built_in_msls_val_list_by_name(synthetic_root, tmp_path):
    keys = datasets_ws.read_query_keys("msls_val_740")
    data = _msls_like_test_split(synthetic_root, str(tmp_path / "data"), keys, ["notAKey_0000000000000a"])
    flags = tiny_eval_flags((data, "msls_like"), "--save_dir", "keys", "--rerank_num", "2", "--recall_values", "1")
    result = run_script(["eval.py", *flags, "--query_keys_file", "msls_val_740"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = open(os.path.join(_output_folder(str(tmp_path), "keys"), "info.log")).read()
    assert "official MSLS-val protocol (all 740 keys of msls_val_740 found; kept 740 of 741 queries)" in log
    assert "#queries: 740 >" in log
    records = _read_predictions(_output_folder(str(tmp_path), "keys"))
    assert {os.path.basename(r["query"]).split("@")[7] for r in records} == set(keys)
