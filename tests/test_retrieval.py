"""retrieval.py: extraction, the first stage (exact L2, crop merging), the engine (stores, timings,
saved databases)."""

import os

import numpy as np
import pytest
import torch
from conftest import TINY

import datasets_ws
import network
import retrieval


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return network.GeoLocalizationNet(**TINY).eval()


# ------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------


class Poisoned(torch.nn.Module):
    """Wraps a model: the features of the images whose first pixel value is in `bad` become NaN / Inf
    (finite weights that overflow for some images, e.g. a diverged run or bf16's range)."""

    def __init__(self, model, *, local=False):
        super().__init__()
        self.model, self.local = model, local

    def _poison(self, images, features):
        rows = images.flatten(1)[:, 0] > 1.5  # the bright images of the fixture below
        features = features.clone()
        features[rows] = float("nan") if self.local else float("inf")
        return features

    def forward(self, images):
        local, glob = self.model(images)
        return (self._poison(images, local), glob) if self.local else (local, self._poison(images, glob))

    def global_descriptors(self, images):
        return self._poison(images, self.model.global_descriptors(images))


class Images:
    """Six images of which #2 and #4 are bright (first pixel 2.0): dataset.load(i, method) for extraction."""

    images_paths = [f"/data/img{i}.jpg" for i in range(6)]

    def load(self, index, method):
        image = torch.zeros(3, 56, 56)
        image[0, 0, 0] = 2.0 if index in (2, 4) else 0.0
        return image

    def __len__(self):
        return len(self.images_paths)


@pytest.mark.parametrize("local", [False, True], ids=["global", "local"])
@pytest.mark.parametrize("method", ["hard_resize", "five_crops"])
def test_non_finite_features_are_refused_naming_the_images(tiny_net, local, method):
    """NaN descriptors used to reach faiss (no candidate, -1) and NaN dense features gave every candidate the
    same score; now the batch is refused, naming its images."""
    if local and method == "five_crops":
        pytest.skip("the crop methods extract global descriptors only")
    store = retrieval.DenseStore() if local else None
    loaded = Images()
    if method == "five_crops":
        loaded.load = lambda index, m: (
            torch.stack([Images.load(loaded, index, m)] * 5) if m == "five_crops" else Images.load(loaded, index, m)
        )
    what = "dense local features" if local else "global descriptors"
    expected = rf"non-finite \(NaN or Inf\) {what} for 2 image\(s\): /data/img2\.jpg, /data/img4\.jpg\."
    with pytest.raises(ValueError, match=expected):
        retrieval.extract_features(
            Poisoned(tiny_net, local=local),
            loaded,
            range(6),
            extraction=retrieval.Extraction(batch_size=8, num_workers=0, device="cpu"),
            method=method,
            local_store=store,
        )
    # The unpoisoned model passes.
    assert retrieval.extract_features(
        tiny_net,
        loaded,
        range(6),
        extraction=retrieval.Extraction(batch_size=4, num_workers=0, device="cpu"),
        method="hard_resize",
    ).shape == (6, tiny_net.backbone.embed_dim)


def test_single_query_reranks_with_features_at_the_query_size(synthetic_root, tiny_net, tmp_path):
    """A query of another aspect ratio keeps its own grid: mutual NN between grids of different sizes."""
    folder, name = synthetic_root
    ds = datasets_ws.BaseDataset(folder, name, "test", resize=(112, 112), test_method="single_query")
    img = ds.load(ds.database_num, "single_query")
    assert img.shape[-2] == 112 or img.shape[-1] == 112
    store = retrieval.DenseStore()
    retrieval.extract_features(
        tiny_net,
        ds,
        [ds.database_num],
        extraction=retrieval.Extraction(batch_size=4, num_workers=0, device="cpu"),
        method="single_query",
        local_store=store,
    )
    h, w = img.shape[-2] // 14, img.shape[-1] // 14
    assert store[0].shape == (4 * h - 3, 4 * w - 3, 128)


def test_bf16_extraction_is_close_to_fp32(synthetic_root, tiny_net):
    folder, name = synthetic_root
    ds = datasets_ws.BaseDataset(folder, name, "test", resize=(112, 112))
    outs = {}
    for precision in ("fp32", "bf16"):
        store = retrieval.DenseStore()
        glob = retrieval.extract_features(
            tiny_net,
            ds,
            range(4),
            extraction=retrieval.Extraction(batch_size=4, num_workers=0, device="cpu", precision=precision),
            method="hard_resize",
            local_store=store,
        )
        outs[precision] = (glob, np.stack([store[i] for i in range(4)]))
        assert glob.dtype == np.float32 and store[0].dtype == np.float32
    (g32, l32), (g16, l16) = outs["fp32"], outs["bf16"]
    assert not np.array_equal(g32, g16)  # bf16 really ran
    assert np.abs(g32 - g16).max() < 0.05 and np.abs(l32 - l16).max() < 0.1


# ------------------------------------------------------------------------------------------------
# First stage
# ------------------------------------------------------------------------------------------------


def test_merge_crop_candidates_keeps_nearest_occurrence_once():
    distances = np.array([[0.5, 0.9], [0.1, 0.7], [0.3, 0.4], [0.2, 0.95], [0.6, 0.8]])
    predictions = np.array([[1, 2], [3, 1], [2, 4], [1, 3], [5, 6]])
    merged = retrieval.merge_crop_candidates(distances, predictions, 4)
    assert merged.tolist() == [3, 1, 2, 4]


def test_majority_voting_lowers_recurring_candidates():
    predictions = np.array([[1, 2], [1, 3], [4, 1], [5, 6], [7, 8]])
    distances = np.ones((5, 2))
    out = retrieval.majority_voting(distances, predictions, 0.3)
    # candidate 1: top-1 window twice (0.3*2/1); top-5 and top-10 windows (all columns) three times
    # (0.3*3/5 and 0.3*3/10)
    lowered = 0.3 * 2 / 1 + 0.3 * 3 / 5 + 0.3 * 3 / 10
    assert np.isclose(out[0, 0], 1 - lowered) and np.isclose(out[1, 0], 1 - lowered)
    assert np.isclose(out[2, 1], 1 - 0.3 * 3 / 5 - 0.3 * 3 / 10)  # not in a top-1 window
    assert np.isclose(out[3, 0], 1.0) and np.array_equal(distances, np.ones((5, 2)))


def test_l2_search_is_exact():
    rng = np.random.default_rng(1)
    db, q = rng.random((50, 8), dtype=np.float32), rng.random((4, 8), dtype=np.float32)
    distances, predictions = retrieval.l2_search(db, q, 5)
    brute = ((q[:, None] - db[None]) ** 2).sum(-1)
    assert np.array_equal(predictions, np.argsort(brute, axis=1)[:, :5])
    assert np.allclose(distances, np.sort(brute, axis=1)[:, :5], atol=1e-5)


def test_candidates_num_is_the_one_clamp(caplog):
    assert retrieval.candidates_num(10, 50) == 10 and "larger than the database" not in caplog.text
    assert retrieval.candidates_num(100, 12) == 12
    assert "--rerank_num 100 is larger than the database (12 images)" in caplog.text


def test_search_of_each_query_method_against_brute_force():
    rng = np.random.default_rng(3)
    db, crops = rng.random((30, 6), dtype=np.float32), rng.random((4, 5, 6), dtype=np.float32)
    brute = lambda q: ((q[:, None] - db[None]) ** 2).sum(-1)  # noqa: E731
    distances, predictions = retrieval.search(db, crops[:, 0], 5, method="hard_resize")
    assert np.array_equal(predictions, np.argsort(brute(crops[:, 0]), axis=1)[:, :5]) and distances.shape == (4, 5)
    _, predictions = retrieval.search(db, crops, 5, method="five_crops")
    assert np.array_equal(predictions, np.argsort(brute(crops.mean(axis=1)), axis=1)[:, :5])
    distances, predictions = retrieval.search(db, crops, 5, method="nearest_crop")
    assert distances is None and predictions.shape == (4, 5)
    for q in range(4):  # each merged list: the database images by their nearest crop, each once
        nearest = brute(crops[q]).min(axis=0)
        assert predictions[q].tolist() == np.argsort(nearest)[:5].tolist()


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------


def _engine(model, **kwargs):
    return retrieval.Retrieval(model, batch_size=8, num_workers=0, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def test_split(synthetic_root):
    folder, name = synthetic_root
    return datasets_ws.BaseDataset(folder, name, "test", resize=(112, 112))


def test_ram_and_disk_stores_give_the_same_ranking_and_the_disk_files_go(test_split, tiny_net, tmp_path):
    ds, rankings = test_split, {}
    for where, folder in (("ram", None), ("disk", str(tmp_path / "run" / "dense_features"))):
        with _engine(tiny_net, store_folder=folder) as engine:
            database = engine.build_database(ds, range(ds.database_num))
            queries = engine.extract_queries(
                ds, range(ds.database_num, ds.database_num + ds.queries_num), method="hard_resize"
            )
            if folder is not None:  # the two stores' files, in the folder given
                assert database.dense.on_disk and len(os.listdir(folder)) == 2
            rankings[where] = engine.rank(database, queries, rerank_num=5)
        times = engine.times
        assert min(times.database_extraction_s, times.query_extraction_s, times.search_s, times.rerank_s) > 0
    assert not os.path.exists(tmp_path / "run" / "dense_features")  # created by the engine, removed by it
    for name in ("first_predictions", "first_distances", "predictions", "scores"):
        assert np.array_equal(getattr(rankings["ram"], name), getattr(rankings["disk"], name)), name
    ranking = rankings["ram"]
    assert ranking.predictions.shape == (ds.queries_num, 5)
    assert all(sorted(p) == sorted(f) for p, f in zip(ranking.predictions, ranking.first_predictions))


@pytest.mark.parametrize("method", ["hard_resize", "single_query", "five_crops", "maj_voting"])
def test_shards_are_cut_at_the_batches_extraction_forms(test_split, tiny_net, monkeypatch, method):
    """Under torchrun each rank's share starts at a batch boundary of the batches extract_features forms:
    --infer_batch_size images, one for single_query (the five-crop methods: batches of queries)."""
    import distributed

    ds, sharded, loaders = test_split, [], []
    real_sharded, real_loader = distributed.extract_sharded, retrieval.DataLoader

    def recording_sharded(ctx, extract, indexes, **kwargs):
        sharded.append(kwargs["batch_size"])
        return real_sharded(ctx, extract, indexes, **kwargs)

    def recording_loader(*args, **kwargs):
        loaders.append(kwargs["batch_size"])
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(distributed, "extract_sharded", recording_sharded)
    monkeypatch.setattr(retrieval, "DataLoader", recording_loader)
    with _engine(tiny_net) as engine:
        engine.build_database(ds, range(3))
        engine.extract_queries(ds, [ds.database_num, ds.database_num + 1], method=method)
    expected = 1 if method == "single_query" else 8
    assert sharded == loaders and sharded[0] == 8 and set(sharded[1:]) == {expected}


def test_mining_shards_are_cut_at_its_extraction_batches(monkeypatch):
    import distributed
    import train

    calls = []
    monkeypatch.setattr(distributed, "extract_sharded", lambda ctx, extract, indexes, **kwargs: calls.append(kwargs))
    descriptors_fn = train.mining_descriptors(
        distributed.Context(device="cpu"), None, None, batch_size=8, num_workers=0, precision="fp32"
    )
    descriptors_fn([3, 1, 2])
    assert calls == [{"batch_size": 8}]


def test_a_failing_rank_still_removes_the_store_files(test_split, tiny_net, tmp_path, monkeypatch):
    ds, folder = test_split, tmp_path / "dense_features"

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C during the re-ranking

    monkeypatch.setattr(retrieval, "rerank_predictions", broken)
    with pytest.raises(KeyboardInterrupt):
        with _engine(tiny_net, store_folder=str(folder)) as engine:
            database = engine.build_database(ds, range(4))
            queries = engine.extract_queries(ds, [ds.database_num], method="hard_resize")
            engine.rank(database, queries, rerank_num=2)
    assert not folder.exists()


def test_a_saved_database_ranks_as_the_one_it_was_saved_from(test_split, tiny_net, tmp_path):
    ds = test_split
    q_indexes = range(ds.database_num, ds.database_num + ds.queries_num)
    with _engine(tiny_net) as engine:
        database = engine.build_database(ds, range(ds.database_num), paths=ds.database_paths)
        settings = retrieval.descriptor_identity(
            tiny_net, backbone="vit_tiny", registers=False, resize=ds.resize, precision="fp32"
        )
        root = os.path.commonpath(ds.database_paths)  # the split's database folder
        database.save(str(tmp_path / "db"), root=root, settings=settings, info={"note": "test"})
        queries = engine.extract_queries(ds, q_indexes, method="hard_resize")
        direct = engine.rank(database, queries, rerank_num=5)
        loaded = engine.load_database(str(tmp_path / "db"), settings=settings, list_images=datasets_ws.collect_jpgs)
        again = engine.rank(loaded, queries, rerank_num=5)
    assert retrieval.read_manifest(str(tmp_path / "db"))["info"] == {"note": "test"}
    assert loaded.paths == ds.database_paths and np.array_equal(loaded.global_descriptors, database.global_descriptors)
    assert np.array_equal(direct.predictions, again.predictions) and np.array_equal(direct.scores, again.scores)
    assert sorted(os.listdir(tmp_path / "db")) == ["dense", "global_descriptors.npy", "manifest.json"]  # kept
    with pytest.raises(ValueError, match="images but descriptors"):
        retrieval.Database.load(str(tmp_path / "db"), paths=ds.database_paths[:-1])


def test_a_saved_database_is_synced_before_and_after_its_rename(tmp_path, monkeypatch):
    """The folder is renamed into place only with its files on disk, and its parent is synced after the
    rename, so that a power loss cannot leave a published database with missing data."""
    import stat

    database = retrieval.Database(global_descriptors=np.ones((2, 4), dtype=np.float32), dense=retrieval.DenseStore())
    database.dense.append(np.ones((2, 3, 3, 8), dtype=np.float32))
    database.dense.finish()
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(st.st_mode) else "file"))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    database.save(str(tmp_path / "db"), root=str(tmp_path), settings={})
    assert events[-3:] == [("fsync", "folder"), ("rename", "db"), ("fsync", "folder")]
    assert events.count(("fsync", "file")) >= 4  # global descriptors, dense features and shapes, manifest


def test_a_float16_store_reranks_the_rounded_features_in_float32(test_split, tiny_net, tmp_path):
    """--dense_store_dtype float16: the engine re-ranks exactly as the float32 definition does on the
    features rounded to float16 (converted back to float32 when read), and the store takes half the bytes."""
    import local_matching

    ds = test_split
    q_indexes = range(ds.database_num, ds.database_num + ds.queries_num)
    results = {}
    for dtype in ("float32", "float16"):
        with retrieval.Retrieval(
            tiny_net, batch_size=8, num_workers=0, device="cpu", store_folder=str(tmp_path / dtype), store_dtype=dtype
        ) as engine:
            database = engine.build_database(ds, range(ds.database_num))
            queries = engine.extract_queries(ds, q_indexes, method="hard_resize")
            ranking = engine.rank(database, queries, rerank_num=6)
            rounded = torch.stack([torch.from_numpy(np.array(database.dense[i])) for i in range(ds.database_num)])
            query_maps = [torch.from_numpy(np.array(queries.dense[q])) for q in range(len(queries))]
            results[dtype] = (ranking, rounded, query_maps, database.dense.nbytes())
    full, half = results["float32"], results["float16"]
    assert half[3] * 2 == full[3]
    assert torch.equal(half[1], full[1].half().float())  # what the float16 store returns: the rounded values
    ranking, rounded, query_maps = half[:3]
    for q, query in enumerate(query_maps):
        candidates = rounded[ranking.first_predictions[q]].flatten(1, 2)
        expected = local_matching.reference_scores(query.flatten(0, 1), candidates).numpy()
        order = local_matching.rerank(expected)
        assert np.array_equal(ranking.predictions[q], ranking.first_predictions[q][order])
        assert np.array_equal(ranking.scores[q], expected[order])
    assert np.array_equal(half[0].first_predictions, full[0].first_predictions)  # the global search is unchanged


def test_freed_memory_is_released_between_search_and_reranking(test_split, tiny_net, monkeypatch):
    """The extraction's freed heap pages go back to the OS before the re-ranking allocates (glibc's
    malloc_trim): called once per rank, after the search and before the first re-rank product."""
    events = []
    monkeypatch.setattr(retrieval, "release_freed_memory", lambda: events.append("release"))
    real_search, real_rerank = retrieval.search, retrieval.rerank_predictions
    monkeypatch.setattr(retrieval, "search", lambda *a, **k: events.append("search") or real_search(*a, **k))
    monkeypatch.setattr(
        retrieval, "rerank_predictions", lambda *a, **k: events.append("rerank") or real_rerank(*a, **k)
    )
    ds = test_split
    with _engine(tiny_net) as engine:
        database = engine.build_database(ds, range(ds.database_num))
        queries = engine.extract_queries(ds, range(ds.database_num, ds.database_num + 2), method="hard_resize")
        engine.rank(database, queries, rerank_num=3)
    assert events == ["search", "release", "rerank"]


def test_releasing_freed_memory_is_safe_to_call_anywhere():
    import torch

    kept = [torch.ones(1000) for _ in range(100)]
    del kept[::2]
    retrieval.release_freed_memory()  # a no-op off glibc; never touches memory in use
    assert all(float(t.sum()) == 1000.0 for t in kept)
