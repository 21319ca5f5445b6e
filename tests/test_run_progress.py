"""run_progress.py and eval.py --continue_run: a killed evaluation continues to the outputs of an
uninterrupted one, redoing at most one chunk; a run with other weights or flags is refused."""

import glob
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, kill_once_marker_appears, tiny_eval_flags

import checkpoints
import commons
import network
import run_progress
from dense_store import DenseStore

# Extraction batches of 8 and chunks of 8 images (40 database images: 5 chunks; 15 queries: 2), 4 queries
# per re-ranking record (15 queries: 4 records).
FLAGS = ["--rerank_num", "10", "--infer_batch_size", "8"]
ENV = {"OMP_NUM_THREADS": "1"}  # every run of this file with the same threads: the same features

# Runs eval.py with small chunks, and (KILL_WHERE set) stops forever once the KILL_NTH-th call of
# DenseStore.append (a batch of extracted features: before its chunk is recorded) or of
# retrieval.rerank_predictions (a chunk of queries: before it is recorded) has returned, after writing
# the file KILL_MARKER: the test then kills the process there.
RUNNER = """
import os, runpy, signal, sys, time
sys.path.insert(0, {root!r})
if hasattr(signal, "SIGHUP"):  # a test runner started with nohup passes SIGHUP on ignored: the tests send it
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
import dense_store, retrieval, run_progress
run_progress.EXTRACTION_CHUNK_IMAGES = 8
run_progress.RERANK_CHUNK_QUERIES = 4
where = os.environ.get("KILL_WHERE")
calls = [0]

def stop_at_the_nth_call(function):
    def wrapper(*args, **kwargs):
        out = function(*args, **kwargs)
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_NTH"]):
            open(os.environ["KILL_MARKER"], "w").close()
            time.sleep(600)
        return out
    return wrapper

if where == "append":
    dense_store.DenseStore.append = stop_at_the_nth_call(dense_store.DenseStore.append)
elif where == "rerank":
    retrieval.rerank_predictions = stop_at_the_nth_call(retrieval.rerank_predictions)
sys.argv = ["eval.py"] + sys.argv[1:]
runpy.run_path(os.path.join({root!r}, "eval.py"), run_name="__main__")
"""


def _runner(tmp_path):
    path = tmp_path / "runner.py"
    if not path.exists():
        path.write_text(RUNNER.format(root=ROOT))
    return str(path)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "DATASETS_FOLDER"}
    env.update(ENV, **extra)
    return env


def _run(tmp_path, argv):
    result = subprocess.run(
        [sys.executable, _runner(tmp_path), *argv],
        cwd=str(tmp_path),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result


def _kill(tmp_path, argv, *, where, nth, sig=signal.SIGKILL):
    """Stop the run at call `nth` of `where` with `sig`: SIGKILL (nothing of the run's own runs after it),
    or SIGTERM / SIGHUP, which the run handles by unwinding through its cleanups (commons.run_main): that
    cleanup removes the temp files it registered and must keep what --continue_run needs."""
    marker = tmp_path / f"stopped_{where}_{nth}"
    if marker.exists():
        marker.unlink()
    returncode, _ = kill_once_marker_appears(
        [sys.executable, _runner(tmp_path), *argv],
        str(marker),
        cwd=str(tmp_path),
        env=_env(KILL_WHERE=where, KILL_NTH=str(nth), KILL_MARKER=str(marker)),
        timeout=240,
        what=f"the run never reached call {nth} of {where}",
        sig=sig,
    )
    # SIGKILL: -9; a handled SIGTERM or SIGHUP exits 128 + its number after the cleanup (not killed by it)
    assert returncode == (-sig if sig == signal.SIGKILL else 128 + sig), returncode


def _outputs(folder):
    """(predictions.jsonl's bytes, the last re-ranked and first-stage recall lines of info.log)."""
    with open(os.path.join(folder, "predictions.jsonl"), "rb") as f:
        predictions = f.read()
    log = open(os.path.join(folder, "info.log")).read()
    return predictions, re.findall(r"Recalls on .*", log)[-1], re.findall(r"First ranking recalls: .*", log)[-1]


@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory):
    """An uninterrupted run's outputs."""
    tmp_path = tmp_path_factory.mktemp("reference")
    result = _run(tmp_path, tiny_eval_flags(synthetic_root, *FLAGS, "--save_dir", "ref"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (folder,) = glob.glob(str(tmp_path / "test" / "ref" / "*"))
    return _outputs(folder)


@pytest.mark.parametrize("efficient", [True, False], ids=["efficient_ram_testing", "ram"])
def test_a_run_killed_three_times_continues_to_the_uninterrupted_outputs(
    synthetic_root, tmp_path, reference, efficient
):
    """Killed during the database extraction, then (continued) during the query extraction, then
    (continued) during the re-ranking: the last continuation writes byte-identical predictions and
    the same recalls as an uninterrupted run, and redoes at most one chunk of what was recorded.
    Each variant meets SIGTERM, SIGHUP and SIGKILL once: the cleanup of a handled stop signal removes
    temp files but keeps the progress, and a later run does not report that progress as a killed
    run's store that nothing reads."""
    argv = tiny_eval_flags(synthetic_root, *FLAGS, *(["--efficient_ram_testing"] if efficient else []))
    hup = getattr(signal, "SIGHUP", signal.SIGTERM)
    signals = [signal.SIGTERM, hup, signal.SIGKILL] if efficient else [signal.SIGKILL, signal.SIGTERM, hup]
    _kill(tmp_path, [*argv, "--save_dir", "k"], where="append", nth=2, sig=signals[0])  # database images 9-16
    (folder,) = glob.glob(str(tmp_path / "test" / "k" / "*"))
    if efficient:  # 16 images written, the first 8 recorded
        record = json.load(open(os.path.join(folder, "dense_features", "database.progress.json")))
        assert record["images"] == 8 and not record["complete"]
    resume = [*argv, "--continue_run", folder]
    # Continued: with the disk store, the 32 database images left are 4 batches, then the queries' first;
    # in RAM, the whole database again (5 batches), then the queries' first.
    _kill(tmp_path, resume, where="append", nth=5 if efficient else 6, sig=signals[1])
    # queries 1-4 recorded, 5-8 re-ranked, not recorded
    _kill(tmp_path, resume, where="rerank", nth=2, sig=signals[2])
    kept = sorted(os.listdir(os.path.join(folder, "progress")))
    assert "reranked.json" in kept and "search.npz" in kept
    if efficient:
        stage_files = sorted(os.listdir(os.path.join(folder, "dense_features")))
        assert "database.dense" in stage_files and "queries.dense" in stage_files
    assert commons.report_dead_stores(str(tmp_path / "test" / "k" / "a_later_run")) == []
    if efficient:  # a continuation refused half way (other first-stage candidates) removes nothing
        search = os.path.join(folder, "progress", "search.npz")
        saved = open(search, "rb").read()
        with np.load(search) as arrays:
            tampered = {name: arrays[name] for name in arrays.files}
        tampered["predictions"] = tampered["predictions"][:, ::-1].copy()
        with open(search, "wb") as f:
            np.savez(f, **tampered)
        before = {name: os.path.getsize(os.path.join(folder, "dense_features", name)) for name in stage_files}
        refused = _run(tmp_path, resume)
        assert refused.returncode == 2 and "the first-stage candidates of this run differ" in refused.stdout
        assert os.path.exists(os.path.join(folder, run_progress.RUN_FILE))
        after = {name: os.path.getsize(os.path.join(folder, "dense_features", name)) for name in stage_files}
        assert after == before and "reranked.json" in os.listdir(os.path.join(folder, "progress"))
        with open(search, "wb") as f:
            f.write(saved)
    result = _run(tmp_path, resume)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _outputs(folder) == reference

    log = open(os.path.join(folder, "info.log")).read()
    assert log.count("Continuing the interrupted run in") == (4 if efficient else 3)  # + the refused one
    # The hint is logged by the runs that could log (SIGTERM, SIGHUP), not by the one killed with SIGKILL.
    assert log.count("This run can be continued where it stopped: run the same command with --continue_run") == 2
    assert "Re-ranking: 4 of 15 queries were re-ranked before the interruption" in log
    if efficient:
        assert "database features: 8 of 40 images of this process's share were extracted before" in log
        assert "database features: all 40 were extracted before the interruption" in log
    else:
        assert "images of this process's share were extracted before" not in log  # nothing kept in RAM
    # A successful run removes its progress; run.json says it finished and cannot be continued again.
    assert sorted(os.listdir(folder)) == ["debug.log", "info.log", "predictions.jsonl", "run.json"]
    assert json.load(open(os.path.join(folder, run_progress.RUN_FILE)))["finished"] is True
    again = _run(tmp_path, resume)
    assert again.returncode == 2 and "that run finished" in again.stdout


def test_a_run_with_another_flag_or_checkpoint_is_refused(synthetic_root, tmp_path, reference):
    torch.manual_seed(0)
    checkpoints.save_checkpoint(str(tmp_path / "a.pth"), model=network.GeoLocalizationNet(**TINY))
    torch.manual_seed(1)
    checkpoints.save_checkpoint(str(tmp_path / "b.pth"), model=network.GeoLocalizationNet(**TINY))
    argv = tiny_eval_flags(synthetic_root, *FLAGS, "--efficient_ram_testing")
    argv.remove("--allow_random_weights")
    _kill(tmp_path, [*argv, "--resume", str(tmp_path / "a.pth"), "--save_dir", "k"], where="append", nth=1)
    (folder,) = glob.glob(str(tmp_path / "test" / "k" / "*"))
    before = sorted(os.listdir(os.path.join(folder, "dense_features")))

    other_checkpoint = _run(tmp_path, [*argv, "--resume", str(tmp_path / "b.pth"), "--continue_run", folder])
    assert other_checkpoint.returncode == 2
    assert "was started with other weights, images or flags: the model weights differ" in other_checkpoint.stdout
    other_flag = _run(
        tmp_path, [*argv, "--resume", str(tmp_path / "a.pth"), "--rerank_num", "5", "--continue_run", folder]
    )
    assert other_flag.returncode == 2
    assert "was started with other weights, images or flags: rerank_num: 10 saved, 5 now" in other_flag.stdout
    assert "Traceback" not in other_checkpoint.stdout + other_flag.stdout
    assert sorted(os.listdir(os.path.join(folder, "dense_features"))) == before  # refusals touch nothing
    not_a_run = _run(tmp_path, [*argv, "--continue_run", str(tmp_path)])
    assert not_a_run.returncode == 2 and "has no run.json" in not_a_run.stderr

    same = _run(tmp_path, [*argv, "--resume", str(tmp_path / "a.pth"), "--continue_run", folder])
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    assert "database features: 0 of 40" not in same.stdout  # the first batch was never recorded


# ------------------------------------------------------------------------------------------------
# The records themselves
# ------------------------------------------------------------------------------------------------


def _stage(folder, *, indexes=range(6)):
    return run_progress.StageFiles(str(folder), "database", indexes=list(indexes), chunk_images=2, dense=True)


def _extract_all(files, part, features, *, stop_after=None):
    """files.run_share over `part` with fake features (one (1, 1, 3) map and a 4-d row per image);
    stop_after: raise KeyboardInterrupt once that many images went through (after their batch)."""

    def extract(rest, on_batch):
        for start in range(0, len(rest), 2):
            batch = rest[start : start + 2]
            files.store.append(features[batch])
            if stop_after is not None and batch[-1] + 1 > stop_after:
                raise KeyboardInterrupt
            on_batch(features[batch].reshape(len(batch), -1)[:, :4], len(batch))

    return files.run_share(part, extract)


def test_stage_files_take_up_exactly_what_was_recorded(tmp_path):
    features = np.arange(6 * 3, dtype=np.float32).reshape(6, 1, 1, 3) + 1
    part = list(range(6))
    files = _stage(tmp_path)
    assert files.open() is False
    with pytest.raises(KeyboardInterrupt):
        _extract_all(files, part, features, stop_after=3)  # images 0-1 recorded, 2-3 written only
    files.close()
    assert os.path.getsize(files.paths["dense"]) == 4 * 3 * 4

    again = _stage(tmp_path)
    assert again.open() is False and again.images == 2
    assert os.path.getsize(again.paths["dense"]) == 2 * 3 * 4  # the unrecorded batch was cut off
    rows = _extract_all(again, part, features)
    again.complete(rows)
    assert again.store.finish() is again.store
    assert all(np.array_equal(again.store[i], features[i]) for i in range(6))
    assert np.array_equal(rows, features.reshape(6, 3))  # the recorded rows and the new ones, in order
    again.close()

    done = _stage(tmp_path)
    assert done.open() is True and done.images == 6 and np.concatenate(done.rows).shape == (6, 3)
    done.close()
    # Another image list (or chunk size) is another run's record.
    with pytest.raises(ValueError, match="records another image list or chunk size"):
        _stage(tmp_path, indexes=range(7)).open()
    # A file shorter than its record was damaged after the run: refused, never extended with zeros.
    with open(done.paths["dense"], "ab") as f:
        f.truncate(5 * 3 * 4)
    with pytest.raises(ValueError, match="has 60 bytes, but its record says .* needs 72"):
        _stage(tmp_path).open()


def test_stage_files_refuse_another_share(tmp_path):
    files = _stage(tmp_path)
    files.open()
    features = np.ones((6, 1, 1, 3), dtype=np.float32)
    with pytest.raises(KeyboardInterrupt):
        _extract_all(files, [0, 1, 2], features, stop_after=2)
    files.close()
    other = _stage(tmp_path)
    other.open()
    with pytest.raises(ValueError, match="another share of the images"):
        _extract_all(other, [3, 4, 5], features)


def test_ranking_files_continue_the_reranking_and_check_the_search(tmp_path):
    first = np.arange(10 * 3, dtype=np.int64).reshape(10, 3)
    distances = np.linspace(0, 1, 30, dtype=np.float32).reshape(10, 3)
    calls = []

    def rerank_part(a, b):
        calls.append((a, b))
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return first[a:b][:, ::-1], np.full((b - a, 3), a, dtype=np.float32)

    files = run_progress.RankingFiles(str(tmp_path), chunk_queries=4)
    files.check_or_save_search(distances, first)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        files.rerank(first, rerank_part)
    assert files.finished() is None
    interrupt, calls[:] = False, []
    again = run_progress.RankingFiles(str(tmp_path), chunk_queries=4)
    again.check_or_save_search(distances, first)  # the same candidates: accepted
    predictions, scores = again.rerank(first, rerank_part)
    assert calls == [(4, 8), (8, 10)]  # the first chunk was recorded
    assert np.array_equal(predictions, first[:, ::-1]) and scores[:, 0].tolist() == [0] * 4 + [4] * 4 + [8] * 2
    saved = again.finished()
    assert np.array_equal(saved[1], first) and np.array_equal(saved[2], predictions)
    with pytest.raises(ValueError, match="first-stage candidates of this run differ"):
        again.check_or_save_search(distances + 1e-7, first)


def test_dense_store_continued_cuts_what_follows_the_recorded_features(tmp_path):
    path = str(tmp_path / "x.f32")
    with open(path, "wb") as f:
        f.write(np.arange(10, dtype=np.float32).tobytes())
    store = DenseStore.continued(path, [(1, 1, 2), (1, 1, 2)])  # 4 values recorded, 6 more written
    store.append(np.full((1, 1, 1, 2), 7, dtype=np.float32))
    store.sync()
    store.finish()
    assert os.path.getsize(path) == 6 * 4 and store[2].tolist() == [[[7.0, 7.0]]]
    assert store[1].tolist() == [[[2.0, 3.0]]]
    store.close()
    assert os.path.exists(path)  # a run's progress: removed by the run, not by the store


def test_a_run_still_going_cannot_be_continued_beside_it(tmp_path):
    """Two processes continuing one run would mix their writes: the run's lock (held until the process
    ends, or is killed) refuses the second."""
    if sys.platform == "win32":
        pytest.skip("no fcntl locks on Windows: nothing is locked there")
    run_progress.lock_run_folder(str(tmp_path))
    try:
        with pytest.raises(ValueError, match="that run is still going"):
            run_progress.lock_run_folder(str(tmp_path))  # another open file: as another process would
    finally:
        run_progress._LOCKS.pop().close()
    run_progress.lock_run_folder(str(tmp_path))  # released: free again
    run_progress._LOCKS.pop().close()


def test_a_stage_of_global_descriptors_alone_continues(tmp_path):
    """The five-crop methods' crop stage has global descriptors (5 per query) and no dense features."""
    rows = np.arange(6 * 5 * 2, dtype=np.float32).reshape(6, 5, 2)

    def run(files, stop_after=None):
        def extract(rest, on_batch):
            for start in range(0, len(rest), 2):
                batch = rest[start : start + 2]
                if stop_after is not None and batch[-1] + 1 > stop_after:
                    raise KeyboardInterrupt
                on_batch(rows[batch], len(batch))

        return files.run_share(list(range(6)), extract)

    def stage():
        return run_progress.StageFiles(str(tmp_path), "query_crops", indexes=range(6), chunk_images=2, dense=False)

    files = stage()
    files.open()
    with pytest.raises(KeyboardInterrupt):
        run(files, stop_after=3)
    again = stage()
    assert again.open() is False and again.images == 2 and again.store is None
    assert np.array_equal(run(again), rows)
    again.complete(rows)
    done = stage()
    assert done.open() is True and np.array_equal(np.concatenate(done.rows), rows)
