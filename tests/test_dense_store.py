"""dense_store.py: dense features in RAM or on disk, ragged shapes, saving and loading."""

import os

import numpy as np
import pytest

from dense_store import DenseStore, remove_empty_folder


def _ragged_store(folder):
    """A finished store of three images of two sizes, (5, 4, 3) twice then (7, 2, 3), and the arrays
    appended: a (2, 5, 4, 3), b (1, 7, 2, 3)."""
    rng = np.random.default_rng(0)
    store = DenseStore(folder)
    a, b = rng.random((2, 5, 4, 3), dtype=np.float32), rng.random((1, 7, 2, 3), dtype=np.float32)
    store.append(a)
    store.append(b)
    return store.finish(), a, b


@pytest.mark.parametrize("on_disk", [False, True])
def test_dense_store_round_trip_with_ragged_shapes(tmp_path, on_disk):
    store, a, b = _ragged_store(str(tmp_path / "store") if on_disk else None)
    assert len(store) == 3 and store.nbytes() == (a.size + b.size) * 4
    assert np.array_equal(store[0], a[0]) and np.array_equal(store[1], a[1]) and np.array_equal(store[2], b[0])
    if on_disk:
        assert store.on_disk and os.path.getsize(store.path) == store.nbytes()
    store.close()
    if on_disk:
        assert not list((tmp_path / "store").iterdir())


@pytest.mark.parametrize("on_disk", [False, True])
def test_dense_store_save_and_load_round_trip(tmp_path, on_disk):
    store, a, b = _ragged_store(str(tmp_path / "live") if on_disk else None)
    store.save(str(tmp_path / "saved"))
    store.close()  # the saved copy must outlive the live store (hard link or copy)
    loaded = DenseStore.load(str(tmp_path / "saved"))
    assert len(loaded) == 3 and loaded.nbytes() == (a.size + b.size) * 4
    assert np.array_equal(loaded[0], a[0]) and np.array_equal(loaded[1], a[1]) and np.array_equal(loaded[2], b[0])
    assert loaded.on_disk and loaded.path == str(tmp_path / "saved" / DenseStore.FEATURES_FILE)
    loaded.close()
    assert sorted(os.listdir(tmp_path / "saved")) == [DenseStore.FEATURES_FILE, DenseStore.SHAPES_FILE]
    with open(tmp_path / "saved" / DenseStore.FEATURES_FILE, "r+b") as f:
        f.truncate(8)
    with pytest.raises(ValueError, match="truncated"):
        DenseStore.load(str(tmp_path / "saved"))


def test_dense_store_refuses_to_save_before_finish(tmp_path):
    store = DenseStore(str(tmp_path / "live"))
    store.append(np.zeros((1, 2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="finish"):
        store.save(str(tmp_path / "saved"))
    store.close()


def test_remove_empty_folder_keeps_a_folder_with_other_files(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    remove_empty_folder(str(tmp_path / "full"))
    remove_empty_folder(str(tmp_path / "empty"))
    remove_empty_folder(str(tmp_path / "missing"))  # nothing to do, no error
    assert sorted(os.listdir(tmp_path)) == ["full"]


@pytest.mark.parametrize("on_disk", [False, True])
def test_read_into_fills_a_callers_buffer(tmp_path, on_disk, monkeypatch):
    store, a, b = _ragged_store(str(tmp_path / "store") if on_disk else None)
    assert store.feature_shape(2) == (7, 2, 3)
    out = np.full((7, 2, 3), -1.0, dtype=np.float32)
    if on_disk and hasattr(os, "preadv"):  # positional reads may return part of what was asked
        real = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [memoryview(bufs[0])[:10]], off))
    store.read_into(2, out)
    assert np.array_equal(out, b[0])
    with pytest.raises(ValueError, match="writable C-contiguous float32 array of shape"):
        store.read_into(2, np.zeros((7, 2, 3), dtype=np.float64))
    with pytest.raises(ValueError, match=r"shape \(5, 4, 3\)"):
        store.read_into(0, out)
    store.close()


def test_read_into_says_when_the_file_was_truncated(tmp_path):
    store, a, b = _ragged_store(str(tmp_path / "store"))
    os.truncate(store.path, 4 * a.size + 8)
    with pytest.raises(ValueError, match="truncated"):
        store.read_into(2, np.empty((7, 2, 3), dtype=np.float32))
    store.close()
