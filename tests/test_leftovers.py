"""leftovers.py: the registry of temp paths, owner tags in file names, dead stores."""

import os
import subprocess
import sys

import pytest

import leftovers
from dense_store import DenseStore


def _dead_pid():
    """The id of a process that has ended (and was collected)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_registry_removes_what_is_left_idempotently(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    kept, temp, tree = folder / "kept.f32", folder / "temp.f32", tmp_path / ".db.tmp-x"
    for path in (kept, temp):
        path.write_bytes(b"1234")
    tree.mkdir()
    (tree / "inner.npy").write_bytes(b"x")
    leftovers.register(str(folder), kind=leftovers.EMPTY_FOLDER)  # registered first, removed last
    for path in (kept, temp):
        leftovers.register(str(path))
    leftovers.register(str(tree), kind=leftovers.TREE)
    leftovers.forget(str(kept))  # e.g. a store kept on purpose for a continued run
    assert str(temp) in leftovers.registered() and str(kept) not in leftovers.registered()
    remaining = leftovers.remove_registered()
    assert remaining == [str(folder)]  # not empty: kept.f32 is still in it
    assert kept.exists() and not temp.exists() and not tree.exists()
    assert leftovers.remove_registered() == [str(folder)]  # again: nothing new, no error
    kept.unlink()
    assert leftovers.remove_registered() == [] and not folder.exists()
    assert leftovers.registered() == []
    with pytest.raises(ValueError, match="unknown kind"):
        leftovers.register(str(folder), kind="folder")


def test_a_forked_child_never_removes_its_parents_files(tmp_path):
    path = tmp_path / "parent.f32"
    path.write_bytes(b"1")
    leftovers.register(str(path))
    try:
        pid = os.fork()
        if pid == 0:  # the child: a DataLoader worker would inherit the registry so
            os._exit(0 if leftovers.remove_registered() == [] and leftovers.registered() == [] else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0 and path.exists()
    finally:
        leftovers.forget(str(path))


def test_store_file_names_record_their_owner(tmp_path):
    store = DenseStore(str(tmp_path / "dense_features"))
    try:
        owner = leftovers.owner_of(store.path, prefix=DenseStore.FILE_PREFIX)
        assert owner == leftovers.this_process() and owner.alive() is True
        assert store.path in leftovers.registered()
    finally:
        store.close()
    assert store.path not in leftovers.registered() and not os.path.exists(store.path)
    assert leftovers.owner_of("dense_3f2a9c81d0e4.f32", prefix="dense_") is None  # earlier versions' names
    me = leftovers.this_process()
    assert leftovers.Owner(pid=_dead_pid(), boot=me.boot, host=me.host).alive() is False
    assert (
        leftovers.Owner(pid=os.getpid(), boot="ffffffff" if me.boot != "ffffffff" else "0" * 8, host=me.host).alive()
        is False
    )
    other_host = "0" * 8 if me.host != "0" * 8 else "1" * 8
    assert leftovers.Owner(pid=os.getpid(), boot=me.boot, host=other_host).alive() is None
    assert leftovers.process_state(os.getpid()) in ("R", "S", "?")
    assert leftovers.process_state(_dead_pid()) is None


def test_find_dead_stores_reports_only_files_of_ended_processes(tmp_path):
    me = leftovers.this_process()
    dead = leftovers.Owner(pid=_dead_pid(), boot=me.boot, host=me.host)
    killed = tmp_path / "2026-01-01_00-00-00" / "dense_features"
    live = tmp_path / "2026-01-01_00-00-01" / "dense_features"
    old = tmp_path / "2026-01-01_00-00-02" / "dense_features"
    for folder in (killed, live, old):
        folder.mkdir(parents=True)
    (killed / f"dense_{dead.tag}_0a0b0c0d0e0f.f32").write_bytes(b"\0" * 3000)
    (killed / f"dense_{dead.tag}_1a0b0c0d0e0f.f32").write_bytes(b"\0" * 1000)
    (live / f"dense_{me.tag}_0a0b0c0d0e0f.f32").write_bytes(b"\0" * 10)
    (old / "dense_0a0b0c0d0e0f.f32").write_bytes(b"\0" * 10)
    found = leftovers.find_dead_stores(str(tmp_path / "*" / "dense_features*"), prefix="dense_")
    assert [(d.folder, d.nbytes, d.pids, len(d.files)) for d in found] == [(str(killed), 4000, (dead.pid,), 2)]
    assert leftovers.human_size(4000) == "3.9 kB" and leftovers.human_size(65 * 2**20) == "65.0 MB"
