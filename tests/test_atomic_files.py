"""atomic_files.py: the rename is synced to disk with its folder, and the temp files of writers that were
killed are removed by the next run while a writer at work keeps its own."""

import os
import stat
import time

import pytest

import atomic_files


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    """A rename is a change of the folder: without an fsync of the folder a power loss can lose it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_files.atomic_write_text(str(tmp_path / "out.json"), "{}\n")
    assert events == [("fsync", "file"), ("rename", "out.json"), ("fsync", "folder")]
    assert (tmp_path / "out.json").read_text() == "{}\n"


def _old_temp(folder, name, *, age_s=3600):
    path = folder / f".{name}.{'a1b2c3d4e5f6'}.tmp"
    path.write_bytes(b"half a checkpoint")
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


@pytest.mark.skipif(os.name == "nt", reason="no file locks on this platform")
def test_stale_temp_files_are_removed_but_a_writer_at_work_keeps_its_own(tmp_path):
    stale = _old_temp(tmp_path, "last_model.pth")
    other_name = _old_temp(tmp_path, "notes.txt")  # not a file this run writes
    young = tmp_path / ".best_model.pth.0123456789ab.tmp"  # its writer may not have locked it yet
    young.write_bytes(b"x")
    busy = _old_temp(tmp_path, "best_model.pth", age_s=7200)
    fd = os.open(busy, os.O_RDWR)  # a live writer: holds its lock (another open file description)
    try:
        assert atomic_files._lock(fd, blocking=False)
        removed = atomic_files.remove_stale_temp_files(str(tmp_path), ("last_model.pth", "best_model.pth"))
    finally:
        os.close(fd)
    assert removed == [str(stale)]
    assert not stale.exists() and other_name.exists() and young.exists() and busy.exists()
    # The writer gone (its lock released), its old temp file is stale too.
    assert atomic_files.remove_stale_temp_files(str(tmp_path), ("best_model.pth",)) == [str(busy)]
    assert atomic_files.remove_stale_temp_files(str(tmp_path / "missing"), ("x",)) == []


def test_a_write_holds_its_lock_until_the_rename(tmp_path):
    """While write() runs, a cleaner cannot take the temp file for a dead writer's."""
    seen = []

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("data")
        old = time.time() - 3600
        os.utime(tmp, (old, old))  # as old as a stale one: only the lock protects it
        seen.append(atomic_files.remove_stale_temp_files(str(tmp_path), ("out.txt",)))

    atomic_files.atomic_write(str(tmp_path / "out.txt"), write)
    assert seen == [[]] and (tmp_path / "out.txt").read_text() == "data"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]
