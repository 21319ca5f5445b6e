"""reproduce.py: the paper's data sets evaluated with the paper's checkpoints, the table, the resume cache."""

import os
import shutil

import pytest
import torch
from conftest import TINY, TINY_FLAGS

import checkpoints
import commons
import datasets_ws
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
    """MSLS-val uses the built-in 740 keys by default (here a folder without them: the row fails and says
    how to evaluate every query); --msls_all_queries and another key list are other protocols, shown
    without a difference to the paper's numbers."""
    out = tmp_path / "results"
    val_queries = sorted(os.listdir(os.path.join(world["data"], "stlucia_synth", "images", "val", "queries")))
    keys = tmp_path / "msls_val_keys.txt"
    keys.write_text("\n".join(name.split("@")[7] for name in val_queries[:2]) + "\nunknown_key\n")
    # --dataset_folders given twice: the mappings add up (st_lucia=... comes from flags()).
    base = ["--dataset_folders", "msls=stlucia_synth", "--only", "msls", "pitts30k"]

    with pytest.raises(commons.UserError, match="1 evaluation"):
        reproduce.main(flags(world, out, *base, pitts=False))
    row = read_table(out)["MSLS-val"]
    assert row["Status"].startswith("failed: None of the 3 queries has a key listed in --query_keys_file")
    assert "'msls_val_740' (740 keys)" in row["Status"] and "--msls_all_queries evaluates every query" in row["Status"]

    reproduce.main(flags(world, out, *base, "--msls_val_keys", str(keys), pitts=False))
    table = read_table(out)
    row = table["MSLS-val"]
    assert row["Status"] == "evaluated" and row["Queries"] == "2"
    assert (
        "2 queries listed in msls_val_keys.txt (2 of its 3 keys found); the paper: the 740 queries of msls_val_740"
        in (row["Protocol"])
    )
    assert row["Δ R@1/5/10"] == "–" and row["Ours R@1/5/10"] != "–"  # other queries: no Δ to the paper
    assert table["St Lucia"]["Status"] == "skipped: not selected by --only"
    assert table["Pitts30k-test"]["Status"] == "skipped: no --pitts30k_checkpoint given"

    # Every val query: another protocol, another cache entry.
    reproduce.main(flags(world, out, *base, "--msls_all_queries", pitts=False))
    row = read_table(out)["MSLS-val"]
    assert row["Status"] == "evaluated" and row["Queries"] == str(QUERIES)
    assert (
        f"all {QUERIES} val queries (--msls_all_queries); the paper: the 740 queries of msls_val_740" in row["Protocol"]
    )
    assert row["Δ R@1/5/10"] == "–"
    assert len(reproduce.ResultCache(str(out / reproduce.CACHE_NAME)).results) == 2
    with pytest.raises(SystemExit):  # one or the other
        reproduce.parse_arguments(["--datasets_folder", "/tmp", "--msls_all_queries", "--msls_val_keys", str(keys)])


def test_msls_val_evaluates_exactly_the_built_in_keys_without_any_flag(world, tmp_path, monkeypatch):
    """A data set laid out like MSLS-val (query names carry the keys in field 7) with the 740 keys of the
    paper's list and a few more queries: exactly those 740 are evaluated, and the row says it is the
    official protocol."""
    import datasets_ws

    keys = datasets_ws.read_query_keys("msls_val_740")
    source = os.path.join(world["data"], "pitts30k", "images", "val")
    target = tmp_path / "data" / "msls" / "images" / "val"
    shutil.copytree(os.path.join(source, "database"), target / "database")
    os.makedirs(target / "queries")
    query = sorted(os.listdir(os.path.join(source, "queries")))[0]
    fields = query.split("@")
    for i, key in enumerate(keys + ["extraQuery000000000000a", "extraQuery000000000000b"]):
        fields[7], fields[2] = key, f"{float(query.split('@')[2]) + i % 5:.2f}"
        os.link(os.path.join(source, "queries", query), target / "queries" / "@".join(fields))
    spy = EvaluateSpy()
    monkeypatch.setattr(test, "evaluate", spy)
    seen = []
    real = spy.real
    spy.real = lambda model, dataset, **kw: seen.append(list(dataset.queries_paths)) or real(model, dataset, **kw)
    out = tmp_path / "results"
    reproduce.main(flags(dict(world, data=str(tmp_path / "data")), out, "--only", "msls", pitts=False))
    (paths,) = seen
    assert sorted(os.path.basename(p).split("@")[7] for p in paths) == sorted(keys)
    row = read_table(out)["MSLS-val"]
    assert row["Status"] == "evaluated" and row["Queries"] == "740"
    assert "official MSLS-val: all 740 keys of msls_val_740 found" in row["Protocol"]
    assert row["Δ R@1/5/10"] != "–"  # the paper's queries: the difference is shown


def _nordland(root, frames):
    """A Nordland folder named as the benchmark downloader names it: frame i at UTM north i * 25/10.5 m
    (rounded to 0.1 m), east 0, the frame number in field 7; the same frames as database and queries."""
    from PIL import Image

    for part, seed in (("database", 0), ("queries", 1)):
        folder = os.path.join(root, "nordland", "images", "test", part)
        os.makedirs(folder)
        for i in range(frames):
            north = f"{i * 25 / 10.5:.1f}"
            Image.new("RGB", (32, 24), ((i * 37 + seed * 90) % 256, i * 11 % 256, 90)).save(
                os.path.join(folder, f"@0@{north}@@@@@{i}@@@@@@@@.jpg")
            )


def test_nordland_is_named_by_its_counts_and_the_papers_gets_its_2_frame_positives(world, tmp_path, monkeypatch):
    """Which Nordland was given is told by its image counts (the paper's 3450 + 3450, the downloader's
    27592 + 27592: small counts stand in for them here). The paper's gets positives within +-2 frames (a
    radius of 2.5 frame steps, measured from the names); the others keep 25 m, are named, and get no
    difference to the paper's 85.2."""
    data = tmp_path / "data"
    _nordland(str(data), 12)
    spy = EvaluateSpy()
    monkeypatch.setattr(test, "evaluate", spy)
    positives = []
    real = spy.real

    def frame(path):
        return int(os.path.basename(path).split("@")[7])

    def record_positives(model, dataset, **kw):  # {query frame: its positives' frames}
        db_frames = [frame(p) for p in dataset.database_paths]
        positives.append(
            {frame(q): sorted(db_frames[i] for i in p) for q, p in zip(dataset.queries_paths, dataset.get_positives())}
        )
        return real(model, dataset, **kw)

    spy.real = record_positives
    args = dict(world, data=str(data))

    monkeypatch.setattr(reproduce, "NORDLAND_PAPER_COUNTS", (12, 12))
    reproduce.main(flags(args, tmp_path / "paper", "--only", "nordland", pitts=False))
    assert positives[-1] == {i: [j for j in range(12) if abs(i - j) <= 2] for i in range(12)}
    row = read_table(tmp_path / "paper")["Nordland-test"]
    assert "Nordland-test, 12 + 12 images, positives within +-2 frames (6 m at 2.40 m per frame)" in row["Protocol"]
    assert row["Δ R@1/5/10"] != "–" and "positives within 25 m" not in row["Protocol"]

    monkeypatch.setattr(reproduce, "NORDLAND_PAPER_COUNTS", (3450, 3450))
    monkeypatch.setattr(reproduce, "NORDLAND_DOWNLOADER_COUNTS", (12, 12))
    reproduce.main(flags(args, tmp_path / "downloader", "--only", "nordland", pitts=False))
    assert positives[-1] == {i: [j for j in range(12) if abs(i - j) <= 10] for i in range(12)}  # 25 m, 2.38 m a frame
    row = read_table(tmp_path / "downloader")["Nordland-test"]
    assert row["Protocol"].startswith(
        "non-paper protocol (the benchmark downloader's Nordland (12 + 12 images, positives within 25 m, about "
        "+-10 frames); the paper's Nordland-test: 3450 + 3450 images, positives within +-2 frames"
    )
    assert row["Δ R@1/5/10"] == "–" and row["Ours R@1/5/10"] != "–"

    # A result stored by an older reproduce.py (no protocol check) is not reused with its old label.
    cache = reproduce.ResultCache(str(tmp_path / "downloader" / reproduce.CACHE_NAME))
    (key,) = cache.results
    cache.put(key, {k: v for k, v in cache.results[key].items() if k != "comparable"})
    reproduce.main(flags(args, tmp_path / "downloader", "--only", "nordland", pitts=False))
    assert read_table(tmp_path / "downloader")["Nordland-test"]["Status"] == "evaluated"

    monkeypatch.setattr(reproduce, "NORDLAND_DOWNLOADER_COUNTS", (27592, 27592))
    reproduce.main(flags(args, tmp_path / "other", "--only", "nordland", pitts=False))
    row = read_table(tmp_path / "other")["Nordland-test"]
    assert "an unrecognised Nordland variant (12 + 12 images, positives within 25 m)" in row["Protocol"]
    assert row["Δ R@1/5/10"] == "–"


def test_frame_spacing_of_the_downloaders_names():
    import numpy as np

    north = np.array([round(i * 25 / 10.5, 1) for i in range(3450)])
    utms = np.stack([np.zeros_like(north), north], axis=1)
    spacing = reproduce.frame_spacing(utms)
    assert 2.3 <= spacing <= 2.4
    radius = 2.5 * spacing  # +-2 frames: every pair 2 frames apart within, none 3 apart
    assert (north[2:] - north[:-2]).max() <= radius < (north[3:] - north[:-3]).min()
    assert reproduce.frame_spacing(utms[:, ::-1]) is None  # not along a line of constant east
    scattered = np.random.default_rng(0).uniform(0, 1000, size=(50, 2))
    assert reproduce.frame_spacing(scattered) is None


def test_the_model_settings_a_checkpoint_records_are_used(world, tmp_path, monkeypatch):
    """A checkpoint written by train.py records its model (here vit_tiny, 2 blocks, trained at 112 x 112):
    reproduce.py rebuilds it without the flags, as eval.py does; a contradicting flag fails the row, naming
    both."""
    torch.manual_seed(4)
    path = str(tmp_path / "trained_tiny.pth")
    checkpoints.save_checkpoint(path, model=network.GeoLocalizationNet(**TINY), resize=(112, 112))
    spy = EvaluateSpy()
    monkeypatch.setattr(test, "evaluate", spy)
    argv = ["--datasets_folder", world["data"], "--device", "cpu", "--num_workers", "0", "--rerank_num", RERANK]
    out = tmp_path / "results"
    reproduce.main(
        reproduce.parse_arguments([*argv, "--output", str(out), "--pitts30k_checkpoint", path, "--only", "pitts30k"])
    )
    assert [c["folder"] for c in spy.calls] == ["pitts30k"]
    assert torch.equal(spy.calls[0]["weights"], first_param(path))
    row = read_table(out)["Pitts30k-test"]
    assert row["Status"] == "evaluated" and "model vit_tiny depth 2 (paper: vit_large)" in row["Protocol"]
    assert "resize 112x112 (paper: 224x224)" in row["Protocol"]
    with open(os.path.join(out, "logs", sorted(os.listdir(out / "logs"))[-1], "info.log")) as f:
        assert "Model settings taken from --pitts30k_checkpoint" in f.read()

    out = tmp_path / "conflict"
    with pytest.raises(commons.UserError, match="1 evaluation"):
        reproduce.main(
            reproduce.parse_arguments(
                [
                    *argv,
                    "--output",
                    str(out),
                    "--pitts30k_checkpoint",
                    path,
                    "--only",
                    "pitts30k",
                    "--backbone",
                    "vit_small",
                ]
            )
        )
    assert "--backbone vit_small (given) but vit_tiny in the file" in read_table(out)["Pitts30k-test"]["Status"]


def test_stale_temp_files_of_a_killed_run_are_removed_from_the_output(world, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    stale = out / ".results.json.0123456789ab.tmp"
    stale.write_text("{half")
    os.utime(stale, (1, 1))
    reproduce.main(flags(world, out, "--only", "nordland"))  # nothing to evaluate: the start is what counts
    assert not stale.exists() and (out / reproduce.TABLE_NAME).exists()


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
    settings = reproduce.model_settings(args)
    assert settings["recall_values"] == [1, 5, 10, 20]
    pitts, msls = reproduce.PAPER_ENTRIES[4], reproduce.PAPER_ENTRIES[0]
    assert reproduce.protocol_text(rerank_num=100, settings=settings) == "paper protocol"
    official = reproduce.msls_protocol(
        datasets_ws.QueryKeys("k.txt", "msls_val_740", 740, 740, 740, 11084, ()), queries_num=740
    )
    assert (
        reproduce.protocol_text(rerank_num=100, settings=settings, data=official)
        == "paper protocol (official MSLS-val: all 740 keys of msls_val_740 found)"
    )
    partial = reproduce.msls_protocol(
        datasets_ws.QueryKeys("k.txt", "msls_val_740", 740, 700, 700, 11084, ()), queries_num=700
    )
    assert not partial.comparable
    assert reproduce.protocol_text(rerank_num=100, settings=settings, data=partial) == (
        "non-paper protocol (PARTIAL MSLS-val: only 700 of the 740 keys of msls_val_740 have a query image here)"
    )
    every = reproduce.msls_protocol(None, queries_num=11084)
    text = reproduce.protocol_text(rerank_num=20, settings=settings, data=every)
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
    # The same numbers on other data (e.g. the downloader's Nordland): no difference to the paper's.
    assert reproduce.format_row(dict(row, comparable=False)).split(" | ")[6] == "–"
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
