"""localize.py: folder-vs-folder localisation, saved databases with their checks."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import ROOT, TINY, TINY_FLAGS, run_script
from PIL import Image

import commons
import datasets_ws
import local_matching
import localize
import network
import retrieval
import synthetic_dataset
import test
from dense_store import DenseStore

FLAGS = TINY_FLAGS + ["--resize", "112", "112", "--allow_random_weights"]
SCRIPT = os.path.join(ROOT, "localize.py")
TILE_HEIGHT, SPACING = 160, 6  # localize.save_pictures' rows without ground truth: border 0, 6 px gaps


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The tiny synthetic set (UTM names), generated once for this file: its test split's folders."""
    folder = tmp_path_factory.mktemp("datasets")
    synthetic_dataset.generate(str(folder), "synthetic", synthetic_dataset.SyntheticOptions(seed=0, preset="tiny"))
    split = os.path.join(folder, "synthetic", "images", "test")
    return datasets_ws.collect_jpgs(os.path.join(split, "database")), datasets_ws.collect_jpgs(
        os.path.join(split, "queries")
    )


@pytest.fixture(scope="module")
def plain_folders(synthetic, tmp_path_factory):
    """Database (20 images, in sub-folders, one PNG, one .JPEG) and queries (4) under names without UTM,
    plus a hidden image and a text file that must be ignored."""
    root = tmp_path_factory.mktemp("plain")
    db_paths, q_paths = synthetic
    db, q = root / "db", root / "q"
    for i, src in enumerate(db_paths[:20]):
        sub = db / ("street_b" if i % 2 else "street_a")
        sub.mkdir(parents=True, exist_ok=True)
        if i == 3:
            Image.open(src).save(sub / f"img_{i:02d}.png")
        else:
            shutil.copy(src, sub / f"img_{i:02d}{'.JPEG' if i == 4 else '.jpg'}")
    q.mkdir()
    for i, src in enumerate(q_paths[:4]):
        shutil.copy(src, q / f"photo {i}.jpg")
    shutil.copy(db_paths[0], db / ".hidden.jpg")
    (db / "notes.txt").write_text("not an image")
    return str(db), str(q)


def _records(folder):
    with open(os.path.join(folder, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def fresh_run(plain_folders, tmp_path_factory):
    """One CLI run on the plain folders that also saves the database."""
    work = tmp_path_factory.mktemp("run")
    db, q = plain_folders
    out, saved = str(work / "out"), str(work / "database")
    result = run_script(
        [
            SCRIPT,
            "--database_folder",
            db,
            "--queries_folder",
            q,
            *FLAGS,
            "--rerank_num",
            "4",
            "--num_preds_to_save",
            "2",
            "--output_folder",
            out,
            "--save_database",
            saved,
        ],
        cwd=str(work),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out, saved, work


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------


def test_collect_images_is_recursive_sorted_and_skips_hidden_and_other_files(plain_folders, tmp_path):
    db, q = plain_folders
    paths = localize.collect_images(db)
    assert len(paths) == 20 and paths == sorted(paths)
    assert {os.path.splitext(p)[1] for p in paths} == {".jpg", ".png", ".JPEG"}
    assert not any(os.path.basename(p).startswith(".") or p.endswith(".txt") for p in paths)
    assert paths[0].startswith(os.path.join(db, "street_a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--queries_folder .* contains no image"):
        localize.collect_images(str(tmp_path / "empty"), flag="--queries_folder")
    with pytest.raises(FileNotFoundError, match="--database_folder .*no such folder"):
        localize.collect_images(str(tmp_path / "missing"))


TINY_SETTINGS = dict(
    backbone="vit_tiny",
    registers=False,
    depth=2,
    embed_dim=4,
    resize=[28, 28],
    precision="fp32",
    database_method="hard_resize",
    weights_sha256="0" * 64,
)


def _tiny_database(folder, n=3, dim=4):
    """A retrieval.Database of n small files in `folder` (their bytes are never decoded) with random
    features (extracted with TINY_SETTINGS, say)."""
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    paths = []
    for i in range(n):
        paths.append(os.path.join(folder, f"{i}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(b"x" * (i + 1))
    store = DenseStore(None)
    store.append(rng.random((n, 2, 2, 8), dtype=np.float32))
    store.finish()
    return retrieval.Database(global_descriptors=rng.random((n, dim), dtype=np.float32), dense=store, paths=paths)


def _save(database, target):
    database.save(str(target), root=os.path.dirname(database.paths[0]), settings=TINY_SETTINGS)


def _load(target, *, settings=TINY_SETTINGS, database_folder=None):
    """Retrieval.load_database as localize.py calls it, copied into RAM before the engine closes its files."""
    with retrieval.Retrieval(None, batch_size=1, num_workers=0, device="cpu") as engine:
        loaded = engine.load_database(
            str(target), settings=settings, list_images=localize.find_images, database_folder=database_folder
        )
        dense = DenseStore(None)
        for i in range(len(loaded)):
            dense.append(np.array(loaded.dense[i])[None])
        return retrieval.Database(
            global_descriptors=np.array(loaded.global_descriptors), dense=dense.finish(), paths=loaded.paths
        )


def test_interrupted_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    database = _tiny_database(str(tmp_path / "images"))
    target = tmp_path / "saved" / "db"

    def crash(self, folder):
        os.makedirs(folder)
        open(os.path.join(folder, DenseStore.FEATURES_FILE), "wb").close()
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the dense features

    monkeypatch.setattr(DenseStore, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(database, str(target))
    assert os.listdir(tmp_path / "saved") == []  # neither the target nor the temp folder
    monkeypatch.undo()
    _save(database, str(target))
    loaded = _load(target)
    assert np.array_equal(loaded.global_descriptors, database.global_descriptors)
    assert loaded.paths == database.paths and all(np.array_equal(loaded.dense[i], database.dense[i]) for i in range(3))
    with pytest.raises(FileExistsError, match="already exists"):
        _save(database, str(target))
    os.remove(target / retrieval.MANIFEST_FILE)  # what an unfinished save would look like
    with pytest.raises(ValueError, match="has no manifest.json"):
        _load(target)


def test_load_database_refuses_other_settings_and_damaged_files(tmp_path):
    database = _tiny_database(str(tmp_path / "images"))
    _save(database, str(tmp_path / "db"))
    other = dict(TINY_SETTINGS, weights_sha256="1" * 64, precision="bf16")
    with pytest.raises(
        ValueError, match="another model or other flags: precision: 'fp32' saved, 'bf16' now; the model weights differ"
    ):
        _load(tmp_path / "db", settings=other)
    moved = tmp_path / "moved"  # the images may move: --database_folder points at the new place
    shutil.copytree(tmp_path / "images", moved)
    loaded = _load(tmp_path / "db", database_folder=str(moved))
    assert loaded.paths == [os.path.join(moved, f"{i}.jpg") for i in range(3)]
    (moved / "1.jpg").write_bytes(b"changed")
    with pytest.raises(ValueError, match=r"changed since --load_database .*: 1 modified \(1.jpg\)"):
        _load(tmp_path / "db", database_folder=str(moved))
    with open(tmp_path / "db" / retrieval.GLOBAL_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="changed size since it was saved"):
        _load(tmp_path / "db")


def test_a_float16_database_loads_only_with_its_flag(tmp_path):
    """A database saved from a --dense_store_dtype float16 store keeps float16 files and is refused under
    float32 (and the other way round); databases saved before the flag existed are float32."""
    database = _tiny_database(str(tmp_path / "images"))
    half = DenseStore(None, dtype="float16")
    for i in range(len(database)):
        half.append(np.array(database.dense[i])[None])
    database16 = retrieval.Database(
        global_descriptors=database.global_descriptors, dense=half.finish(), paths=database.paths
    )
    settings16 = dict(TINY_SETTINGS, dense_store_dtype="float16")
    database16.save(str(tmp_path / "db16"), root=str(tmp_path / "images"), settings=settings16)
    manifest = retrieval.read_manifest(str(tmp_path / "db16"))
    assert manifest["dense_dtype"] == "float16" and "dense/dense_features.f16" in manifest["files"]
    loaded = _load(tmp_path / "db16", settings=settings16)
    assert all(np.array_equal(loaded.dense[i], half[i]) for i in range(len(database)))
    float32 = dict(TINY_SETTINGS, dense_store_dtype="float32")
    with pytest.raises(ValueError, match="dense_store_dtype: 'float16' saved, 'float32' now"):
        _load(tmp_path / "db16", settings=float32)
    _save(database, tmp_path / "db_before_the_flag")  # TINY_SETTINGS: no dense_store_dtype entry
    assert _load(tmp_path / "db_before_the_flag", settings=float32).paths == database.paths
    with pytest.raises(ValueError, match="dense_store_dtype: 'float32' saved, 'float16' now"):
        _load(tmp_path / "db_before_the_flag", settings=settings16)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def test_cli_writes_ranked_matches_and_pictures_for_every_query(fresh_run, plain_folders):
    out, saved, _ = fresh_run
    db, q = plain_folders
    db_paths, q_paths = localize.collect_images(db), localize.collect_images(q)
    records = _records(out)
    assert [r["query"] for r in records] == q_paths and [r["query_index"] for r in records] == list(range(4))
    for r in records:
        first, reranked = r["first_stage"], r["reranked"]
        assert len(first) == len(reranked) == 4 and "positives" not in r
        assert all(c["path"] == db_paths[c["index"]] for c in first + reranked)
        distances = [c["l2_distance"] for c in first]
        assert distances == sorted(distances) and all(d >= 0 for d in distances)
        # The re-ranked list is the engine's order of the first-stage candidates by their scores.
        score_of = {c["index"]: c["mutual_nn"] for c in reranked}
        scores = np.array([score_of[c["index"]] for c in first], dtype=np.float32)
        order = local_matching.rerank(scores)
        assert [c["index"] for c in reranked] == [first[i]["index"] for i in order]
        assert all(s == int(s) and s >= 1 for s in scores)
    log = open(os.path.join(out, "info.log")).read()
    assert "< Localize - #database: 20; #queries: 4 >" in log and "no recalls" in log
    pictures = sorted(os.listdir(os.path.join(out, "preds")))
    assert pictures == [f"{i:06d}.jpg" for i in range(4)]
    for r, name in zip(records, pictures):
        with Image.open(os.path.join(out, "preds", name)) as row:
            shown = [r["query"]] + [c["path"] for c in r["reranked"][:2]]
            widths = []
            for p in shown:
                with Image.open(p) as img:
                    widths.append(round(img.width * TILE_HEIGHT / img.height))
            assert row.size == (sum(widths) + SPACING * 2, TILE_HEIGHT)


def test_reusing_a_saved_database_gives_identical_predictions(fresh_run, plain_folders, restore_logging):
    out, saved, work = fresh_run
    manifest = json.load(open(os.path.join(saved, retrieval.MANIFEST_FILE)))
    assert len(manifest["images"]) == 20 and manifest["settings"]["resize"] == [112, 112]
    assert manifest["global_shape"] == [20, 192] and manifest["dense_shape_first"] == [29, 29, 128]
    out2 = str(work / "out_reused")
    # In-process main (the CLI path itself is covered by fresh_run): no new interpreter, no torch import.
    localize.main(
        localize.parse_localize_arguments(
            [
                "--load_database",
                saved,
                "--queries_folder",
                plain_folders[1],
                *FLAGS,
                "--rerank_num",
                "4",
                "--output_folder",
                out2,
            ]
        )
    )
    log = open(os.path.join(out2, "info.log")).read()
    assert "no database extraction" in log
    assert _records(out2) == _records(out)


def test_a_database_saved_with_other_settings_is_refused(fresh_run, plain_folders, restore_logging, capsys):
    _, saved, work = fresh_run
    args = localize.parse_localize_arguments(
        [
            "--load_database",
            saved,
            "--queries_folder",
            plain_folders[1],
            *TINY_FLAGS,
            "--resize",
            "140",
            "140",
            "--allow_random_weights",
            "--output_folder",
            str(work / "out_refused"),
        ]
    )
    with pytest.raises(SystemExit) as exit_info:
        commons.run_main(localize.main, args)  # what `python3 localize.py ...` does
    assert exit_info.value.code == 2
    printed = capsys.readouterr().out
    assert "error: --load_database" in printed and "resize: [112, 112] saved, [140, 140] now" in printed
    assert "the model weights differ" not in printed  # a resize does not change the weights
    assert "Traceback" not in printed
    assert not os.path.exists(os.path.join(work, "out_refused", "predictions.jsonl"))


@pytest.mark.parametrize("method", ["hard_resize", "maj_voting"])
def test_utm_names_give_recalls_equal_to_evaluate(synthetic, tmp_path, restore_logging, method):
    """With UTM file names, localize.main and test.evaluate agree on rankings and recalls (one engine), also
    for a five-crop test method (merged candidate lists, which carry no L2 distance)."""
    db_src, q_src = synthetic
    split = tmp_path / "small" / "images" / "test"
    for kind, sources in (("database", db_src[:12]), ("queries", q_src[:3])):
        (split / kind).mkdir(parents=True)
        for src in sources:
            shutil.copy(src, split / kind)
    out = str(tmp_path / "out")
    args = localize.parse_localize_arguments(
        [
            "--database_folder",
            str(split / "database"),
            "--queries_folder",
            str(split / "queries"),
            *FLAGS,
            "--rerank_num",
            "4",
            "--recall_values",
            "1",
            "2",
            "--output_folder",
            out,
            "--test_method",
            method,
            "--majority_weight",
            "0.3",
        ]
    )
    localize.main(args)
    log = open(os.path.join(out, "info.log")).read()
    records = _records(out)

    commons.make_deterministic(0)  # the model main built: same seed, same constructor
    model = network.GeoLocalizationNet(**TINY).eval()
    ds = datasets_ws.BaseDataset(str(tmp_path), "small", "test", resize=(112, 112), test_method=method)
    expected = test.evaluate(
        model, ds, test.EvalSettings(test_method=method, rerank_num=4, recall_values=[1, 2], majority_weight=0.3)
    )
    assert f"First ranking recalls: {test.recalls_to_str(expected.recalls_first, [1, 2])}" in log
    assert f"Recalls after re-ranking: {test.recalls_to_str(expected.recalls, [1, 2])}" in log
    for q, r in enumerate(records):
        assert r["query"] == ds.queries_paths[q]
        assert r["positives"] == sorted(int(p) for p in expected.positives[q])
        assert [c["index"] for c in r["first_stage"]] == expected.first_predictions[q].tolist()
        if method == "maj_voting":
            assert expected.first_distances is None
            assert all("l2_distance" not in c for c in r["first_stage"] + r["reranked"])
        else:  # l2_distance is the distance itself, not faiss's square of it.
            assert np.allclose([c["l2_distance"] for c in r["first_stage"]], np.sqrt(expected.first_distances[q]))
            assert any(d > 1e-3 and not np.isclose(d**2, d) for d in (c["l2_distance"] for c in r["first_stage"]))
        assert [c["index"] for c in r["reranked"]] == expected.predictions[q].tolist()
        assert [c["mutual_nn"] for c in r["reranked"]] == expected.scores[q].tolist()
        assert all(c["correct"] == (c["index"] in r["positives"]) for c in r["reranked"])


# ------------------------------------------------------------------------------------------------
# Own outputs, changed folders, outputs checked up front (issue: no silent wrong answer)
# ------------------------------------------------------------------------------------------------


def test_a_runs_own_pictures_never_become_the_next_runs_queries(plain_folders, tmp_path, monkeypatch, restore_logging):
    db, q_src = plain_folders
    q = tmp_path / "queries"
    shutil.copytree(q_src, q)
    common = ["--database_folder", db, *FLAGS, "--rerank_num", "2", "--num_preds_to_save", "1"]
    # 1. --output_folder under the queries folder.
    localize.main(
        localize.parse_localize_arguments(["--queries_folder", str(q), *common, "--output_folder", str(q / "run1")])
    )
    assert len(os.listdir(q / "run1" / "preds")) == 4
    # 2. Run from inside the queries folder (default output folder localize/<save_dir>/<time> there).
    monkeypatch.chdir(q)
    localize.main(localize.parse_localize_arguments(["--queries_folder", ".", *common, "--save_dir", "second"]))
    (second,) = [os.path.join("localize", "second", d) for d in os.listdir(q / "localize" / "second")]
    log = open(os.path.join(second, "info.log")).read()
    assert "#queries: 4 >" in log  # not 8: run1's pictures are not queries
    assert "skipped 4 images inside output folders of earlier runs (run1)" in log
    assert len(_records(second)) == 4 and len(os.listdir(os.path.join(second, "preds"))) == 4
    log = open(q / "run1" / "info.log").read()
    assert f"the output folder {q / 'run1'} is inside --queries_folder" in log
    # 3. A third run still sees 4 queries, with two earlier output folders below the queries folder.
    localize.main(
        localize.parse_localize_arguments(
            ["--queries_folder", ".", *common, "--save_dir", "third", "--num_preds_to_save", "0"]
        )
    )
    (third,) = [os.path.join("localize", "third", d) for d in os.listdir(q / "localize" / "third")]
    assert len(_records(third)) == 4


def test_queries_inside_the_database_folder_are_warned_about(plain_folders, tmp_path, restore_logging):
    db, _ = plain_folders
    out = tmp_path / "out"
    localize.main(
        localize.parse_localize_arguments(
            [
                "--database_folder",
                db,
                "--queries_folder",
                os.path.join(db, "street_a"),
                *FLAGS,
                "--rerank_num",
                "2",
                "--output_folder",
                str(out),
            ]
        )
    )
    log = open(out / "info.log").read()
    assert (
        f"--queries_folder {os.path.join(db, 'street_a')} is inside --database_folder {db}: every query is "
        "also a database image, and will be its own best match" in log
    )


def test_load_database_notices_a_changed_folder_without_database_folder(tmp_path):
    images = tmp_path / "images"
    database = _tiny_database(str(images))
    _save(database, str(tmp_path / "db"))
    assert _load(tmp_path / "db").paths == database.paths
    os.remove(images / "0.jpg")
    (images / "new.jpg").write_bytes(b"a new photo")
    with pytest.raises(
        ValueError,
        match=r"the image folder .*images changed since --load_database .*: "
        r"1 added \(new.jpg\); 1 deleted \(0.jpg\)\. .*save the database again",
    ):
        _load(tmp_path / "db")
    # A folder that is gone cannot be checked: the saved list is used, with a warning.
    shutil.rmtree(images)
    assert _load(tmp_path / "db").paths == database.paths


def test_outputs_are_checked_before_any_work(plain_folders, tmp_path, monkeypatch, capsys, restore_logging):
    db, q = plain_folders
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    base = ["--database_folder", db, "--queries_folder", q, *FLAGS]
    for extra, message in (
        (["--save_database", str(blocker / "db")], f"--save_database {blocker / 'db'}: {blocker} is a file"),
        (["--output_folder", str(blocker / "out")], f"--output_folder {blocker / 'out'}: "),
        (
            ["--save_database", str(tmp_path / "db"), "--output_folder", str(tmp_path / "db" / "o")],
            "is (inside) --save_database",
        ),
    ):
        with pytest.raises(SystemExit):
            localize.parse_localize_arguments(base + extra)
        assert message in capsys.readouterr().err

    def no_model(args):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(network, "build_model", no_model)
    out = tmp_path / "out"
    # No UTM coordinates in the names: --save_only_wrong_preds is refused before the extraction.
    args = localize.parse_localize_arguments(
        base + ["--num_preds_to_save", "2", "--save_only_wrong_preds", "--output_folder", str(out)]
    )
    with pytest.raises(ValueError, match="--save_only_wrong_preds needs ground truth"):
        localize.main(args)
    assert not out.exists()  # the corrected command may use the same --output_folder
    # A typo in --load_database (a folder that holds no saved database): same, no folder left behind.
    args = localize.parse_localize_arguments(
        ["--load_database", q, "--queries_folder", q, *FLAGS, "--output_folder", str(out)]
    )
    with pytest.raises(ValueError, match="has no manifest.json"):
        localize.main(args)
    assert not out.exists()


def test_tilde_in_path_flags_is_expanded(plain_folders, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    db, _ = plain_folders
    args = localize.parse_localize_arguments(
        [
            "--database_folder",
            db,
            "--queries_folder=~/photos",
            *FLAGS,
            "--output_folder=~/out",
            "--save_database=~/db",
            "--resume=~/ckpt.pth",
        ]
    )
    assert args.queries_folder == str(home / "photos") and args.output_folder == str(home / "out")
    assert args.save_database == str(home / "db") and args.resume == str(home / "ckpt.pth")
    import reproduce

    args = reproduce.parse_arguments(
        ["--datasets_folder=~/data", "--device", "cpu", "--output=~/results", "--dataset_folders", "msls=~/msls_vg"]
    )
    assert args.output == str(home / "results") and args.dataset_folders == {"msls": str(home / "msls_vg")}
    assert args.datasets_folder == str(home / "data")


@pytest.mark.parametrize("on_disk", [False, True])
def test_saved_database_honours_the_umask(tmp_path, on_disk):
    database = _tiny_database(str(tmp_path / "images"))
    if on_disk:  # the dense features come from an on-disk store (hard-linked into the saved database)
        store = DenseStore(str(tmp_path / "store"))
        store.append(np.stack([database.dense[i] for i in range(len(database.dense))]))
        database.dense = store.finish()
    old = os.umask(0o027)
    try:
        _save(database, str(tmp_path / "db"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "db").st_mode & 0o777 == 0o750
    for root, _dirs, files in os.walk(tmp_path / "db"):
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o640, name
    database.close()
