"""An evaluation that survives a kill: an eval.py run's record and progress on disk (--continue_run).

Every eval.py run keeps, in its output folder:

    run.json                  what the run is (identity.py: the weights' fingerprint, the image list,
                              every result-changing flag) and its chunk sizes; written atomically at
                              the start, marked finished at the very end
    progress/                 rank 0's first-stage candidates (search.npz, once the search is done) and
                              the queries re-ranked so far (reranked.*), recorded every Chunks.queries
    dense_features/           with --efficient_ram_testing: each extraction stage's files (StageFiles)
    dense_features_rank<r>/   the same for rank r of a torchrun job (its share of each stage)

`eval.py <the same flags> --continue_run FOLDER` checks that the weights, images and result-changing
flags are the same (a difference is an error that names it) and goes on from there:
- extraction with --efficient_ram_testing: a finished stage is not redone; an unfinished one goes on
  from its last record (each process records its share every Chunks.images images), so at most one
  chunk per stage and process is extracted again. Without it the dense features lived in RAM and are
  gone: the extraction is redone from the start.
- the first-stage search runs again and must give exactly the candidates that the interrupted run
  saved (checked: the features are then the same as that run's), or the run is refused;
- re-ranking: the queries recorded (every Chunks.queries) are not redone: at most one chunk is;
- a run whose re-ranking had finished does no extraction at all: it writes its outputs.

The order of writes makes a kill at any moment safe: data is appended and fsynced first, then the
record that says it is there is replaced atomically (temp file, fsync, rename). A record therefore
never claims data that is not on disk, and what was written after the last record (the chunk in
progress at the kill) is cut off when the run continues. A file shorter than its record, or a record
of other images or chunk sizes, is refused with the reason. A successful run removes everything but
run.json; an interrupted or killed one, or one that failed otherwise (a full disk, out of memory), keeps
it for --continue_run. A new run that failed on bad input (a ValueError: an unreadable image, non-finite
features) keeps its logs alone: the fix changes its images, weights or flags, which no continuation
accepts, so nothing it recorded could be used.
"""

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import atomic_files
import identity
from dense_store import DenseStore, remove_empty_folder

RUN_FILE = "run.json"
RUN_FORMAT = "selavpr-eval-run"
RUN_VERSION = 1
PROGRESS_FOLDER = "progress"

#: Default chunk sizes: what a continued run may have to redo, per stage and process. Each record costs
#: an fsync and a small file; 512 images of ViT-L features are 1 GB, a few seconds of a GPU's work.
EXTRACTION_CHUNK_IMAGES = 512
RERANK_CHUNK_QUERIES = 128

#: The extraction stages of an evaluation (the five-crop test methods extract the queries twice: their
#: crops' global descriptors, then the dense features of their hard_resize version).
STAGES = ("database", "queries", "query_crops")


@dataclass(frozen=True)
class Chunks:
    """images: extraction progress is recorded after every `images` images of a process's share (a
    multiple of the batch size, so that a continued extraction forms the same batches); queries:
    re-ranking progress after every `queries` queries."""

    images: int
    queries: int

    @classmethod
    def for_batch_size(cls, batch_size: int) -> "Chunks":
        batches = max(1, -(-EXTRACTION_CHUNK_IMAGES // batch_size))
        return cls(images=batches * batch_size, queries=RERANK_CHUNK_QUERIES)


def _write_json(path: str, content: Dict[str, Any]) -> None:
    atomic_files.atomic_write_text(path, json.dumps(content, indent=1, sort_keys=True) + "\n")


def _read_json(path: str, *, what: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path} cannot be read ({e}): start a new run without --continue_run") from None
    if not isinstance(content, dict):
        raise ValueError(f"{what} {path} is not a record of this project: start a new run without --continue_run")
    return content


def _append(path: str, data: bytes) -> None:
    """Append `data` to `path` and make it durable before any record mentions it."""
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _cut(path: str, nbytes: int, *, what: str) -> None:
    """Cut `path` to its first `nbytes` (what its record vouches for); it must hold at least those."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    if size < nbytes:
        raise ValueError(
            f"--continue_run: {path} has {size} bytes, but its record says {what} needs {nbytes}: the "
            "folder was changed or damaged after the run stopped; start a new run without --continue_run"
        )
    with open(path, "ab") as f:
        f.truncate(nbytes)


def indexes_sha256(indexes: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(indexes, dtype=np.int64).tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# The run record
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunProgress:
    """Where an eval.py run keeps its progress: its output folder, and the chunk sizes it records by."""

    folder: str
    chunks: Chunks

    @property
    def ranking_folder(self) -> str:
        return os.path.join(self.folder, PROGRESS_FOLDER)


def read_run_record(folder: str) -> Dict[str, Any]:
    """run.json of the run in `folder`, checked for format and version."""
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"--continue_run {folder} has no {RUN_FILE}: it is not the folder of an eval.py run, or that run "
            "was stopped before it began its work (nothing to continue); start a new run without --continue_run"
        )
    record = _read_json(path, what="--continue_run")
    if record.get("format") != RUN_FORMAT or record.get("version") != RUN_VERSION:
        raise ValueError(
            f"--continue_run {path} is format {record.get('format')!r} version {record.get('version')!r}; this "
            f"code continues {RUN_FORMAT!r} version {RUN_VERSION}: start a new run without --continue_run"
        )
    chunks = record.get("chunks")
    if not (
        isinstance(chunks, dict)
        and set(chunks) == {"images", "queries"}
        and all(isinstance(v, int) and v > 0 for v in chunks.values())
    ):
        raise ValueError(f"--continue_run {path} has no valid chunk sizes: start a new run without --continue_run")
    return record


_LOCKS: List[Any] = []  # the run folders' lock files this process holds, open until it exits


def lock_run_folder(folder: str) -> None:
    """Hold an exclusive lock on `folder`'s run (RUN_FILE's lock file) until this process ends (a kill
    releases it): a second process continuing the same run while it is still going would mix their
    writes. Raises ValueError when another process holds it. Where the platform has no fcntl (Windows),
    nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return
    f = open(os.path.join(folder, RUN_FILE + ".lock"), "a")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(
            f"--continue_run {folder}: that run is still going (another process holds its lock): wait for it to "
            "end, or stop it, before continuing it"
        ) from None
    _LOCKS.append(f)


def continuation_problem(record: Dict[str, Any], run_identity: Dict[str, Any], folder: str) -> Optional[str]:
    """Why the run recorded in `record` cannot be continued by one with `run_identity`, or None."""
    if record.get("finished"):
        return (
            f"--continue_run {folder}: that run finished (its outputs are there): there is nothing to continue; "
            "start a new run without --continue_run"
        )
    differences = identity.differences(record.get("identity") or {}, run_identity)
    if differences:
        return (
            f"--continue_run {folder} was started with other weights, images or flags: {'; '.join(differences)}. "
            "Continue it with the same ones (its command line is at the top of its info.log), or start a new "
            "run without --continue_run"
        )
    return None


def start(folder: str, *, run_identity: Dict[str, Any], chunks: Chunks, continuing: bool, ctx: Any) -> RunProgress:
    """The progress of the run in `folder`, on every process of the job (ctx: its distributed.Context).

    A new run: rank 0 writes run.json (run_identity and chunks). continuing (--continue_run): rank 0
    checks run.json against run_identity and takes its chunk sizes; a run that cannot be continued is
    a ValueError on every process, naming the differences.
    """
    problem, chunk_sizes = None, None
    if ctx.is_main:
        try:
            lock_run_folder(folder)
            if continuing:
                record = read_run_record(folder)
                problem = continuation_problem(record, run_identity, folder)
                chunk_sizes = record.get("chunks")
            else:
                chunk_sizes = asdict(chunks)
                _write_json(
                    os.path.join(folder, RUN_FILE),
                    {
                        "format": RUN_FORMAT,
                        "version": RUN_VERSION,
                        "started": datetime.now().isoformat(timespec="seconds"),
                        "identity": run_identity,
                        "chunks": chunk_sizes,
                        "finished": False,
                    },
                )
        except ValueError as e:
            problem = str(e)
    problem, chunk_sizes = ctx.broadcast_object((problem, chunk_sizes))
    if problem:
        raise ValueError(problem)
    return RunProgress(folder=folder, chunks=Chunks(**chunk_sizes))


def finish(progress: RunProgress) -> None:
    """The end of a successful run (rank 0, after its outputs): run.json says finished, and the
    re-ranking progress and the lock file go (the engine has removed the stage files when it closed)."""
    path = os.path.join(progress.folder, RUN_FILE)
    record = read_run_record(progress.folder)
    record.update(finished=True, finished_at=datetime.now().isoformat(timespec="seconds"))
    _write_json(path, record)
    shutil.rmtree(progress.ranking_folder, ignore_errors=True)
    lock = os.path.join(progress.folder, RUN_FILE + ".lock")
    if os.path.exists(lock):
        os.remove(lock)


def discard(progress: RunProgress) -> None:
    """Remove everything a run recorded (rank 0, after a failure that no continuation could get past):
    the stage files of every process, the ranking progress, run.json and its lock file; the logs stay."""
    for stage_folder in glob.glob(os.path.join(progress.folder, "dense_features*")):
        remove_stage_files(stage_folder)
        remove_empty_folder(stage_folder)
    shutil.rmtree(progress.ranking_folder, ignore_errors=True)
    for name in (RUN_FILE, RUN_FILE + ".lock"):
        path = os.path.join(progress.folder, name)
        if os.path.exists(path):
            os.remove(path)


def still_to_write(writes: Sequence[Any], folder: str) -> List[Any]:
    """The planned writes (commons.PlannedWrite) of a run continued in `folder`, less what its stopped run
    already wrote there: the stage files in its dense_features*/ folders count against the dense store's
    write (the one whose text starts with "dense features")."""
    kept = 0
    for stage_folder in glob.glob(os.path.join(folder, "dense_features*")):
        for name in os.listdir(stage_folder):
            kept += os.path.getsize(os.path.join(stage_folder, name))
    out = []
    for write in writes:
        if kept and write.what.startswith("dense features"):
            write, kept = dataclasses.replace(write, nbytes=max(0, write.nbytes - kept)), 0
        out.append(write)
    return out


def continue_hint(folder: str) -> str:
    """The log line of a run that stopped before its end."""
    kept = 0
    for root, _, files in os.walk(folder):
        kept += sum(os.path.getsize(os.path.join(root, f)) for f in files if not f.endswith(".log"))
    return (
        f"This run can be continued where it stopped: run the same command with --continue_run {folder} "
        f"(its progress is kept there: {kept / 2**30:.2f} GiB; delete the folder if you will not continue it)"
    )


# ------------------------------------------------------------------------------------------------
# Extraction stages
# ------------------------------------------------------------------------------------------------

STAGE_FILES = {
    "dense": ".dense",  # DenseStore's raw features, of its dtype
    "shapes": ".shapes.i64",  # their (h, w, C) shapes, 3 int64 per image
    "global": ".global.f32",  # global descriptors, rows of global_tail float32
    "record": ".progress.json",
}


def remove_stage_files(folder: Optional[str]) -> None:
    """Remove the files of every stage in `folder` (a successful run's end)."""
    if folder is None:
        return
    for stage in STAGES:
        for suffix in STAGE_FILES.values():
            path = os.path.join(folder, stage + suffix)
            if os.path.exists(path):
                os.remove(path)


class StageFiles:
    """One extraction stage of one process, in files of `folder` that survive a kill (STAGE_FILES).

    open() takes up what an interrupted run recorded (or starts empty); run_share() extracts the rest
    of this process's share, recording every chunk_images images; complete() records the whole stage
    (rank 0, once the other processes' shares are in its store). `store` is the stage's DenseStore
    (dense features wanted), `images` the number of images recorded.
    """

    def __init__(
        self,
        folder: str,
        stage: str,
        *,
        indexes: Sequence[int],
        chunk_images: int,
        dense: bool,
        dtype: str = "float32",
    ) -> None:
        self.folder, self.stage = folder, stage
        self.paths = {name: os.path.join(folder, stage + suffix) for name, suffix in STAGE_FILES.items()}
        self.stage_sha = indexes_sha256(indexes)
        self.chunk_images = int(chunk_images)
        self.dense = dense
        self.dtype = dtype
        self.store: Optional[DenseStore] = None
        self.rows: List[np.ndarray] = []  # global descriptors recorded, in order
        self.images = 0
        self.is_complete = False
        self.share_sha: Optional[str] = None
        self.global_tail: Optional[List[int]] = None

    def open(self) -> bool:
        """Take up the recorded progress: files cut to what their record vouches for; returns whether the
        stage was complete."""
        os.makedirs(self.folder, exist_ok=True)
        record = None
        if os.path.exists(self.paths["record"]):
            record = _read_json(self.paths["record"], what="--continue_run")
            expected = {
                "stage_sha256": self.stage_sha,
                "chunk_images": self.chunk_images,
                "dense": self.dense,
                "dtype": self.dtype,
            }
            if any(record.get(k) != v for k, v in expected.items()):
                raise ValueError(
                    f"--continue_run: {self.paths['record']} records another image list or chunk size than this "
                    "run's: the folder was changed after the run stopped; start a new run without --continue_run"
                )
            self.images = int(record["images"])
            self.is_complete = bool(record["complete"])
            self.share_sha = record.get("share_sha256")
            self.global_tail = record.get("global_tail")
        if self.dense:  # a stage of global descriptors alone (the five crops) has no dense files
            _cut(self.paths["shapes"], self.images * 3 * 8, what=f"{self.images} images")
            shapes = np.fromfile(self.paths["shapes"], dtype=np.int64).reshape(-1, 3)
            needed = int(shapes.prod(axis=1).sum()) * np.dtype(self.dtype).itemsize
            _cut(self.paths["dense"], needed, what=f"the dense features of {self.images} images")
            self.store = DenseStore.continued(self.paths["dense"], shapes.tolist(), dtype=self.dtype)
        tail = self.global_tail or []
        row = int(np.prod(tail)) * 4 if tail else 0
        _cut(self.paths["global"], self.images * row, what=f"the global descriptors of {self.images} images")
        if tail and self.images:
            self.rows = [np.fromfile(self.paths["global"], dtype=np.float32).reshape(self.images, *tail)]
        return self.is_complete

    def run_share(
        self,
        part: Sequence[int],
        extract: Callable[[Sequence[int], Callable[[Optional[np.ndarray], int], None]], Any],
    ) -> Optional[np.ndarray]:
        """Extract this process's share `part` (its dense features go to `store`), going on after the
        images recorded: extract(rest_of_part, on_batch) runs the extraction and calls on_batch(global
        descriptors of the batch or None, images in the batch) after each batch. Returns the share's
        global descriptors (recorded and new), or None when none are wanted."""
        share_sha = indexes_sha256(part)
        if self.share_sha is not None and self.share_sha != share_sha:
            raise ValueError(
                f"--continue_run: {self.paths['record']} records another share of the images than this "
                "process's (another number of processes?); continue with the number of processes the run "
                "started with, or start a new run without --continue_run"
            )
        self.share_sha = share_sha
        done = self.images
        if done:
            logging.info(
                f"{self.stage} features: {done} of {len(part)} images of this process's share were extracted "
                "before the interruption: going on from there"
            )
        pending: List[np.ndarray] = []
        counted = [done]

        def on_batch(rows: Optional[np.ndarray], n: int) -> None:
            if rows is not None:
                pending.append(rows)
            counted[0] += n
            if counted[0] - self.images >= self.chunk_images:
                self._record(pending, counted[0])
                pending.clear()

        if done < len(part):
            extract(list(part)[done:], on_batch)
        self._record(pending, counted[0])
        return np.concatenate(self.rows) if self.rows else None

    def complete(self, all_rows: Optional[np.ndarray]) -> None:
        """Record the whole stage (rank 0): the other processes' shares, appended to `store` after this
        process's own, and `all_rows`, the global descriptors of every image of the stage."""
        total = len(self.store) if self.store is not None else len(all_rows)
        new_rows = [] if all_rows is None else [all_rows[self.images :]]
        self._record(new_rows, total, complete=True)

    def _record(self, rows: List[np.ndarray], images: int, *, complete: bool = False) -> None:
        """Make the features of images [self.images, images) durable, then say so in the record."""
        if self.store is not None:
            if len(self.store) != images:
                raise RuntimeError(f"stage {self.stage}: {len(self.store)} dense maps for {images} images")
            self.store.sync()
            shapes = np.asarray(self.store.shapes[self.images : images], dtype=np.int64).reshape(-1, 3)
            _append(self.paths["shapes"], shapes.tobytes())
        if rows:
            block = np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)
            if self.global_tail is None:
                self.global_tail = list(block.shape[1:])
            _append(self.paths["global"], block.tobytes())
            self.rows.append(block)
        self.images, self.is_complete = images, complete
        _write_json(
            self.paths["record"],
            {
                "stage": self.stage,
                "stage_sha256": self.stage_sha,
                "share_sha256": self.share_sha,
                "chunk_images": self.chunk_images,
                "dense": self.dense,
                "dtype": self.dtype,
                "images": images,
                "global_tail": self.global_tail,
                "complete": complete,
            },
        )

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


# ------------------------------------------------------------------------------------------------
# Search and re-ranking (rank 0)
# ------------------------------------------------------------------------------------------------

SEARCH_FILE = "search.npz"
RERANK_RECORD = "reranked.json"
RERANK_PREDICTIONS = "reranked_predictions.i64"
RERANK_SCORES = "reranked_scores.f32"


class RankingFiles:
    """The first-stage candidates and the re-ranked queries of a run, in `folder` (progress/)."""

    def __init__(self, folder: str, *, chunk_queries: int) -> None:
        self.folder = folder
        self.chunk_queries = int(chunk_queries)
        self.path = {
            name: os.path.join(folder, name) for name in (SEARCH_FILE, RERANK_RECORD, RERANK_PREDICTIONS, RERANK_SCORES)
        }

    def _saved_search(self) -> Optional[Tuple[Optional[np.ndarray], np.ndarray]]:
        if not os.path.exists(self.path[SEARCH_FILE]):
            return None
        with np.load(self.path[SEARCH_FILE], allow_pickle=False) as saved:
            distances = saved["distances"] if "distances" in saved.files else None
            return distances, saved["predictions"]

    def finished(self) -> Optional[Tuple[Optional[np.ndarray], np.ndarray, np.ndarray, np.ndarray]]:
        """(first_distances, first_predictions, predictions, scores) when the re-ranking had finished."""
        search = self._saved_search()
        if search is None or not os.path.exists(self.path[RERANK_RECORD]):
            return None
        record = _read_json(self.path[RERANK_RECORD], what="--continue_run")
        q_num, k = search[1].shape
        if record.get("done") != q_num or record.get("k") != k:
            return None
        _cut(self.path[RERANK_PREDICTIONS], q_num * k * 8, what=f"{q_num} re-ranked queries")
        _cut(self.path[RERANK_SCORES], q_num * k * 4, what=f"{q_num} re-ranked queries")
        predictions, scores = self._read_reranked(q_num, k)
        return search[0], search[1], predictions, scores

    def check_or_save_search(self, distances: Optional[np.ndarray], predictions: np.ndarray) -> None:
        """Save the first-stage candidates; when an interrupted run saved them, they must be the same."""
        saved = self._saved_search()
        if saved is None:
            os.makedirs(self.folder, exist_ok=True)

            def write(tmp: str) -> None:
                arrays = {"predictions": predictions}
                if distances is not None:
                    arrays["distances"] = distances
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)

            atomic_files.atomic_write(self.path[SEARCH_FILE], write)
            return
        same = np.array_equal(saved[1], predictions) and (
            (saved[0] is None and distances is None)
            or (saved[0] is not None and distances is not None and np.array_equal(saved[0], distances))
        )
        if not same:
            raise ValueError(
                f"--continue_run: the first-stage candidates of this run differ from those the interrupted run "
                f"saved in {self.path[SEARCH_FILE]}: the features are not the same as that run's (another "
                "device, thread count or library version?). Continue where the run started, or start a new run "
                "without --continue_run"
            )

    def _read_reranked(self, q_num: int, k: int) -> Tuple[np.ndarray, np.ndarray]:
        predictions = np.fromfile(self.path[RERANK_PREDICTIONS], dtype=np.int64, count=q_num * k)
        scores = np.fromfile(self.path[RERANK_SCORES], dtype=np.float32, count=q_num * k)
        return predictions.reshape(q_num, k), scores.reshape(q_num, k)

    def rerank(
        self, first: np.ndarray, rerank_part: Callable[[int, int], Tuple[np.ndarray, np.ndarray]]
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Re-ranked predictions and scores (Q, k) of the candidates `first` (Q, k), going on after the
        queries recorded: rerank_part(a, b) re-ranks queries [a, b); recorded every chunk_queries."""
        q_num, k = first.shape
        done = 0
        if os.path.exists(self.path[RERANK_RECORD]):
            record = _read_json(self.path[RERANK_RECORD], what="--continue_run")
            if (record.get("queries"), record.get("k")) != (q_num, k):
                raise ValueError(
                    f"--continue_run: {self.path[RERANK_RECORD]} records {record.get('queries')} queries of "
                    f"{record.get('k')} candidates, this run has {q_num} of {k}: start a new run without "
                    "--continue_run"
                )
            done = int(record["done"])
        _cut(self.path[RERANK_PREDICTIONS], done * k * 8, what=f"{done} re-ranked queries")
        _cut(self.path[RERANK_SCORES], done * k * 4, what=f"{done} re-ranked queries")
        predictions, scores = self._read_reranked(done, k)
        parts = [(predictions, scores)]
        if done:
            logging.info(f"Re-ranking: {done} of {q_num} queries were re-ranked before the interruption: going on")
        for a in range(done, q_num, self.chunk_queries):
            b = min(a + self.chunk_queries, q_num)
            p, s = rerank_part(a, b)
            _append(self.path[RERANK_PREDICTIONS], np.ascontiguousarray(p, dtype=np.int64).tobytes())
            _append(self.path[RERANK_SCORES], np.ascontiguousarray(s, dtype=np.float32).tobytes())
            _write_json(self.path[RERANK_RECORD], {"queries": q_num, "k": k, "done": b})
            parts.append((p, s))
        return np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts])
