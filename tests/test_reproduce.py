"""reproduce.py: the paper's data sets evaluated with the paper's checkpoints, the table, the resume cache."""

import os
import shutil

import pytest
import torch
from conftest import TINY, TINY_FLAGS

import checkpoints
import commons
import network
import reproduce
import synthetic_dataset
import test

QUERIES = 3  # per split: the re-rank engine is the slow part on a CPU
RERANK = "2"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny synthetic sets standing in for pitts30k and St Lucia (the latter in a folder named
    differently, reached through --dataset_folders), and random checkpoints in the public layout."""
    root = tmp_path_factory.mktemp("reproduce")
    data = root / "data"
    sizes = dict(
        preset="tiny",
        train_database_num=10,
        train_queries_num=2,
        val_database_num=12,
        val_queries_num=QUERIES,
        test_database_num=12,
        test_queries_num=QUERIES,
    )
    synthetic_dataset.generate(str(data), "pitts30k", seed=0, **sizes)
    synthetic_dataset.generate(str(data), "stlucia_synth", seed=1, **sizes)
    paths = {}
    for seed, name in enumerate(("msls", "pitts30k")):
        torch.manual_seed(seed)
        path = str(root / f"SelaVPR_{name}.pth")
        checkpoints.save_checkpoint(path, model=network.GeoLocalizationNet(**TINY))
        paths[name] = path
    return {"root": root, "data": str(data), "ckpt": paths}


@pytest.fixture(autouse=True)
def _restore_logging(restore_logging):
    """main() installs its own log handlers: every test here puts pytest's back."""
    yield


def flags(world, output, *extra, msls=True, pitts=True):
    argv = [
        "--datasets_folder",
        world["data"],
        "--output",
        str(output),
        *TINY_FLAGS,
        "--resize",
        "112",
        "112",
        "--rerank_num",
        RERANK,
        "--dataset_folders",
        "st_lucia=stlucia_synth",
    ]
    if msls:
        argv += ["--msls_checkpoint", world["ckpt"]["msls"]]
    if pitts:
        argv += ["--pitts30k_checkpoint", world["ckpt"]["pitts30k"]]
    return reproduce.parse_arguments(argv + list(extra))


def read_table(output):
    """{data set title: [row cells]} from results.md (one rerank_num per run in these tests)."""
    rows = {}
    with open(os.path.join(output, reproduce.TABLE_NAME), encoding="utf-8") as f:
        lines = [line for line in f if line.startswith("| ") and not line.startswith("| Data set")]
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == len(reproduce.TABLE_HEADER), line
        rows[cells[0]] = dict(zip(reproduce.TABLE_HEADER, cells))
    return rows


def first_param(model_or_path):
    name = "backbone.patch_embed.proj.weight"
    if isinstance(model_or_path, str):
        return checkpoints.checkpoint_model_state(checkpoints.load_weights_file(model_or_path, what="test"))[name]
    return model_or_path.state_dict()[name].detach().cpu().clone()


class EvaluateSpy:
    """Wraps test.evaluate: records which weights evaluated which folder, and the recalls it returned."""

    def __init__(self):
        self.calls = []
        self.real = test.evaluate

    def __call__(self, model, dataset, **kw):
        result = self.real(model, dataset, **kw)
        self.calls.append(
            {
                "folder": dataset.dataset_name,
                "split": dataset.split,
                "weights": first_param(model),
                "queries": dataset.queries_num,
                "rerank_num": kw["rerank_num"],
                "recalls": dict(zip(kw["recall_values"], result.recalls)),
                "times": result.times,
            }
        )
        return result


def ours(recalls):
    return " / ".join(f"{recalls[n]:.1f}" for n in (1, 5, 10))


def test_evaluates_present_sets_with_the_papers_checkpoints_and_resumes(world, tmp_path, monkeypatch):
    out = tmp_path / "results"
    spy = EvaluateSpy()
    monkeypatch.setattr(test, "evaluate", spy)
    reproduce.main(flags(world, out))

    # St Lucia is evaluated with the MSLS model (test split), Pitts30k with the Pitts30k model.
    by_folder = {c["folder"]: c for c in spy.calls}
    assert sorted(by_folder) == ["pitts30k", "stlucia_synth"] and len(spy.calls) == 2
    assert torch.equal(by_folder["stlucia_synth"]["weights"], first_param(world["ckpt"]["msls"]))
    assert torch.equal(by_folder["pitts30k"]["weights"], first_param(world["ckpt"]["pitts30k"]))
    assert all(c["split"] == "test" and c["rerank_num"] == 2 and c["queries"] == QUERIES for c in spy.calls)

    table = read_table(out)
    assert list(table) == [e.title for e in reproduce.PAPER_ENTRIES]
    for title, folder, paper in (
        ("St Lucia", "stlucia_synth", (99.8, 100.0, 100.0)),
        ("Pitts30k-test", "pitts30k", (92.8, 96.8, 97.7)),
    ):
        row, recalls = table[title], by_folder[folder]["recalls"]
        assert row["Status"] == "evaluated" and row["Queries"] == str(QUERIES)
        assert row["Ours R@1/5/10"] == ours(recalls)
        assert row["Paper R@1/5/10"] == " / ".join(f"{p:.1f}" for p in paper)
        assert row["Δ R@1/5/10"] == " / ".join(
            f"{round(round(recalls[n], 1) - p, 1) + 0.0:+.1f}" for n, p in zip((1, 5, 10), paper)
        )
        assert row["Protocol"].startswith("non-paper protocol") and "rerank_num 2 (paper: 100)" in row["Protocol"]
        # The timings are the retrieval engine's stage times of that evaluation.
        times = by_folder[folder]["times"]
        assert min(times.database_extraction_s, times.query_extraction_s, times.rerank_s) > 0
        assert row["Query extraction (ms/query)"] == f"{times.query_extraction_s / QUERIES * 1000:.1f}"
        assert row["Re-rank (ms/query)"] == f"{times.rerank_s / QUERIES * 1000:.1f}"
        assert float(row["Peak RAM (GiB)"]) > 0 and row["Peak GPU (GiB)"] == "–"
    for title, name in (
        ("MSLS-val", "msls/images/val"),
        ("Nordland-test", "nordland/images/test"),
        ("Tokyo24/7", "tokyo247/images/test"),
        ("Pitts250k-test", "pitts250k/images/test"),
    ):
        assert table[title]["Status"].startswith("skipped: data set not found") and name in table[title]["Status"]
        assert table[title]["Ours R@1/5/10"] == "–"
    first_table = table

    # A second run reuses both results: no evaluation, not even a model load.
    def forbidden(*a, **k):
        raise AssertionError("a finished evaluation was redone")

    monkeypatch.setattr(test, "evaluate", forbidden)
    monkeypatch.setattr(checkpoints, "load_model_weights", forbidden)
    reproduce.main(flags(world, out))
    table = read_table(out)
    for title in ("St Lucia", "Pitts30k-test"):
        assert table[title]["Status"].startswith("reused (evaluated ")
        assert table[title]["Ours R@1/5/10"] == first_table[title]["Ours R@1/5/10"]
        assert table[title]["Re-rank (ms/query)"] == first_table[title]["Re-rank (ms/query)"]
    logs = sorted(os.listdir(out / "logs"))
    assert len(logs) == 2
    with open(out / "logs" / logs[-1] / "info.log") as f:
        assert f.read().count("Reusing the result of") == 2

    # Results are keyed by the checkpoint's contents: a touched file (same weights) keeps its results, other
    # weights in the same file invalidate only the results made with it.
    st = os.stat(world["ckpt"]["pitts30k"])
    os.utime(world["ckpt"]["pitts30k"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reproduce.main(flags(world, out))
    assert all(read_table(out)[t]["Status"].startswith("reused") for t in ("St Lucia", "Pitts30k-test"))
    monkeypatch.undo()
    spy = EvaluateSpy()
    monkeypatch.setattr(test, "evaluate", spy)
    torch.manual_seed(7)
    checkpoints.save_checkpoint(world["ckpt"]["pitts30k"], model=network.GeoLocalizationNet(**TINY))
    reproduce.main(flags(world, out))
    assert [c["folder"] for c in spy.calls] == ["pitts30k"]
    table = read_table(out)
    assert table["St Lucia"]["Status"].startswith("reused") and table["Pitts30k-test"]["Status"] == "evaluated"
    logs = sorted(os.listdir(out / "logs"))
    with open(out / "logs" / logs[-1] / "info.log") as f:
        assert "why: the checkpoint changed (other contents)" in f.read()
    torch.manual_seed(1)  # the world fixture's weights again, for the other tests
    checkpoints.save_checkpoint(world["ckpt"]["pitts30k"], model=network.GeoLocalizationNet(**TINY))


def test_a_changed_data_set_is_evaluated_again_and_the_log_says_why(world, tmp_path, monkeypatch):
    """Rows are keyed by the images, not the folder's path: added queries are never answered by the
    recalls of the old image list."""
    data = tmp_path / "data"
    shutil.copytree(os.path.join(world["data"], "pitts30k"), data / "pitts30k")
    args = dict(world, data=str(data))
    out = tmp_path / "results"
    spy = EvaluateSpy()
    monkeypatch.setattr(test, "evaluate", spy)
    reproduce.main(flags(args, out, "--only", "pitts30k", msls=False))
    assert [c["queries"] for c in spy.calls] == [QUERIES]

    queries = data / "pitts30k" / "images" / "test" / "queries"
    for i, name in enumerate(sorted(os.listdir(queries))[:2]):  # two more queries, elsewhere in the map
        fields = name.split("@")
        fields[1] = f"{float(fields[1]) + 1000 + i:.2f}"
        shutil.copy(queries / name, queries / "@".join(fields))
    reproduce.main(flags(args, out, "--only", "pitts30k", msls=False))
    assert [c["queries"] for c in spy.calls] == [QUERIES, QUERIES + 2]  # evaluated again, not reused
    assert read_table(out)["Pitts30k-test"]["Queries"] == str(QUERIES + 2)
    log_folder = sorted(os.listdir(out / "logs"))[-1]
    with open(out / "logs" / log_folder / "info.log") as f:
        log = f.read()
    assert f"why: the images changed (queries: {QUERIES} -> {QUERIES + 2} images)" in log

    # The same images in another folder are the same evaluation: reused.
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)  # copytree keeps the modification times
    reproduce.main(flags(dict(world, data=str(moved)), out, "--only", "pitts30k", msls=False))
    assert len(spy.calls) == 2 and read_table(out)["Pitts30k-test"]["Status"].startswith("reused")


def test_msls_val_protocols_and_missing_checkpoint(world, tmp_path):
    out = tmp_path / "results"
    val_queries = sorted(os.listdir(os.path.join(world["data"], "stlucia_synth", "images", "val", "queries")))
    keys = tmp_path / "msls_val_keys.txt"
    keys.write_text("\n".join(name.split("@")[7] for name in val_queries[:2]) + "\nunknown_key\n")
    # --dataset_folders given twice: the mappings add up (st_lucia=... comes from flags()).
    base = ["--dataset_folders", "msls=stlucia_synth", "--only", "msls", "pitts30k"]

    reproduce.main(flags(world, out, *base, "--msls_val_keys", str(keys), pitts=False))
    table = read_table(out)
    row = table["MSLS-val"]
    assert row["Status"] == "evaluated" and row["Queries"] == "2"
    assert "official MSLS-val: 2 queries listed in msls_val_keys.txt" in row["Protocol"]
    assert "2 queries kept, the official list has 740" in row["Protocol"]
    assert table["St Lucia"]["Status"] == "skipped: not selected by --only"
    assert table["Pitts30k-test"]["Status"] == "skipped: no --pitts30k_checkpoint given"

    # Without the key file every val query is evaluated: another protocol, another cache entry.
    reproduce.main(flags(world, out, *base, pitts=False))
    row = read_table(out)["MSLS-val"]
    assert row["Status"] == "evaluated" and row["Queries"] == str(QUERIES)
    assert f"all {QUERIES} val queries; the paper uses the official 740: give --msls_val_keys" in row["Protocol"]
    assert len(reproduce.ResultCache(str(out / reproduce.CACHE_NAME)).results) == 2


def test_unreadable_checkpoint_fails_its_rows_and_the_run(world, tmp_path):
    bad = tmp_path / "SelaVPR_msls.pth"
    bad.write_bytes(b"not a checkpoint")
    args = flags(world, tmp_path / "results", "--only", "st_lucia", msls=False)
    args.msls_checkpoint = str(bad)
    with pytest.raises(commons.UserError, match="1 evaluation"):
        reproduce.main(args)
    row = read_table(tmp_path / "results")["St Lucia"]
    assert row["Status"].startswith("failed: --msls_checkpoint") and "could not be loaded" in row["Status"]
    assert not os.path.exists(tmp_path / "results" / reproduce.CACHE_NAME)  # nothing finished, nothing cached


def test_flag_parsing():
    assert reproduce.parse_rerank_nums("both") == [100, 20] and reproduce.parse_rerank_nums("20") == [20]
    for bad in ("0", "x", "-3"):
        with pytest.raises(ValueError, match="--rerank_num"):
            reproduce.parse_rerank_nums(bad)
    assert reproduce.parse_dataset_folders(["msls=msls_vg", "tokyo247=/abs/tokyo"]) == {
        "msls": "msls_vg",
        "tokyo247": "/abs/tokyo",
    }
    for bad in (["msls"], ["kitti=x"], ["msls=a", "msls=b"], ["msls="]):
        with pytest.raises(ValueError, match="--dataset_folders"):
            reproduce.parse_dataset_folders(bad)
    for argv in (
        ["--rerank_num", "many"],
        ["--resume", "x.pth"],
        ["--query_keys_file", "k.txt"],
        ["--msls_val_keys", "/no/such/file"],
        ["--only", "kitti"],
    ):
        with pytest.raises(SystemExit):
            reproduce.parse_arguments(["--datasets_folder", "/tmp", "--device", "cpu"] + argv)


def test_protocol_text_and_row_format():
    args = reproduce.parse_arguments(["--datasets_folder", "/tmp", "--device", "cpu"])
    settings = reproduce.evaluation_settings(args)
    assert settings["recall_values"] == [1, 5, 10, 20]
    pitts, msls = reproduce.PAPER_ENTRIES[4], reproduce.PAPER_ENTRIES[0]
    assert (
        reproduce.protocol_text(entry=pitts, rerank_num=100, settings=settings, queries_num=6816, keys_file=None)
        == "paper protocol"
    )
    assert (
        reproduce.protocol_text(entry=msls, rerank_num=100, settings=settings, queries_num=740, keys_file="/x/keys.txt")
        == "paper protocol (official MSLS-val: 740 queries listed in keys.txt)"
    )
    text = reproduce.protocol_text(entry=msls, rerank_num=20, settings=settings, queries_num=11084, keys_file=None)
    assert text.startswith("non-paper protocol (all 11084 val queries") and "rerank_num 20 (paper: 100)" in text

    record = {
        "queries_num": 6816,
        "recall_values": [1, 5, 10, 20],
        "recalls": [92.84, 96.8, 97.66, 98.0],
        "recalls_first": [80.0, 90.0, 95.0, 97.0],
        "device": "NVIDIA H100",
        "timing": {"query_extraction_s_per_query": 0.0123, "rerank_s_per_query": 0.09, "total_s": 61.34},
        "peak_rss_bytes": 3 * 2**30,
        "peak_gpu_bytes": None,
    }
    row = {
        "entry": pitts,
        "status": "evaluated",
        "record": record,
        "protocol": "paper protocol",
        "checkpoint_name": "SelaVPR_pitts30k.pth",
    }
    line = reproduce.format_row(row)
    assert line == (
        "| Pitts30k-test | SelaVPR_pitts30k.pth | paper protocol | 6816 | 92.8 / 96.8 / 97.7 | "
        "92.8 / 96.8 / 97.7 | +0.0 / +0.0 / +0.0 | 80.0 / 90.0 / 95.0 | 12.3 | 90.0 | 61.3 | 3.00 | – "
        "| evaluated |"
    )
    skipped = {"entry": msls, "status": "skipped", "reason": "data set not found (a|b)", "record": None}
    assert reproduce.format_row(skipped).endswith("| skipped: data set not found (a\\|b) |")
    assert "Device: NVIDIA H100." in reproduce.format_table([row, skipped])


def test_entry_point_refuses_a_foreign_results_file_cleanly(world, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / reproduce.CACHE_NAME).write_text('{"something": 1}')
    args = reproduce.parse_arguments(["--datasets_folder", world["data"], "--output", str(out), *TINY_FLAGS])
    with pytest.raises(SystemExit) as exit_info:
        commons.run_main(reproduce.main, args)  # what `python3 reproduce.py ...` runs
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert "results.json is not a results file of this reproduce.py" in printed.out + printed.err
    assert "Traceback" not in printed.out + printed.err


def test_a_float16_store_is_in_the_key_and_the_protocol_only_when_chosen():
    """Results stored before --dense_store_dtype existed keep their keys (float32 adds nothing to them)."""
    base = reproduce.evaluation_settings(reproduce.parse_arguments(["--datasets_folder", "/tmp", "--device", "cpu"]))
    assert "dense_store_dtype" not in base
    half = reproduce.evaluation_settings(
        reproduce.parse_arguments(["--datasets_folder", "/tmp", "--device", "cpu", "--dense_store_dtype", "float16"])
    )
    assert half == dict(base, dense_store_dtype="float16")
    pitts = reproduce.PAPER_ENTRIES[4]
    text = reproduce.protocol_text(entry=pitts, rerank_num=100, settings=half, queries_num=6816, keys_file=None)
    assert text == "non-paper protocol (float16 dense features (paper: float32))"
