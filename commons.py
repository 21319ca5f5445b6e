"""The runtime of the entry scripts, in one place: logging, seeding and random states, the version
check, the start and end of a run (torchrun's process group or a single process: start_run, finish)
and the exit codes and error reporting (run_main).

The collectives and sharding of a torchrun job are distributed.py's (the `Context` that start_run
returns); atomic file writes are atomic_files.py's, checkpoint writing checkpoints.py's.
"""

import errno
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

import distributed
import numerics

# ------------------------------------------------------------------------------------------------
# Versions
# ------------------------------------------------------------------------------------------------

# The oldest releases the project is tested with (CI's floors environment, requirements-floors.txt).
MIN_VERSIONS = {"Python": (3, 10), "torch": (2, 0), "torchvision": (0, 15), "numpy": (1, 24)}


def _release(version: str) -> tuple:
    """(2, 0, 1) from "2.0.1+cu117" (the leading numbers of a version string)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    return tuple(parts)


def _torchvision_version() -> str:
    """torchvision's version without importing it where it is not imported yet (its import alone takes
    about 170 MB of resident memory, which evaluation does not need): from the installed package's
    metadata, else from the module."""
    module = sys.modules.get("torchvision")
    if module is not None:
        return module.__version__
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("torchvision")
    except (ImportError, PackageNotFoundError):
        import torchvision

        return torchvision.__version__


def unsupported_versions() -> Optional[str]:
    """One line naming each installed package older than MIN_VERSIONS and its minimum, or None."""
    found = {
        "Python": ".".join(map(str, sys.version_info[:3])),
        "torch": torch.__version__,
        "torchvision": _torchvision_version(),
        "numpy": np.__version__,
    }
    old = [
        f"{name} >= {'.'.join(map(str, MIN_VERSIONS[name]))} (this is {found[name]})"
        for name in MIN_VERSIONS
        if _release(str(found[name])) < MIN_VERSIONS[name]
    ]
    if not old:
        return None
    return f"SelaVPR needs {', '.join(old)}: upgrade, e.g. pip install -r requirements.txt."


# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------

LOG_FORMAT = "%(asctime)s   %(message)s"

#: The files setup_logging puts into every new output folder.
LOG_FILES = ("info.log", "debug.log")


def is_run_folder(folder: str) -> bool:
    """Whether `folder` is an output folder of a run of these scripts (it holds both log files):
    localize.py never reads images below one, so that a run's own pictures (preds/*.jpg) never become
    the next run's queries or database images."""
    return all(os.path.isfile(os.path.join(folder, name)) for name in LOG_FILES)


#: What to do when an output folder cannot be created, for a command that does not say.
DEFAULT_MOVED_BY = "Run the command from a folder you can write to."


def make_output_folder(folder: str, *, moved_by: str = DEFAULT_MOVED_BY, exist_ok: bool = False) -> None:
    """os.makedirs(folder), with one clear message when it cannot be created (a read-only file system, no
    permission, a file in the way): the folder, the reason and `moved_by`, the flag or way that puts the
    outputs elsewhere. FileExistsError (exist_ok False) is left to the caller."""
    try:
        os.makedirs(folder, exist_ok=exist_ok)
    except FileExistsError as e:
        if not (exist_ok and os.path.exists(folder) and not os.path.isdir(folder)):
            raise
        raise UserError(
            f"cannot create the output folder {os.path.abspath(folder)}: {os.path.abspath(folder)} is a file, "
            f"not a folder. {moved_by}"
        ) from e
    except OSError as e:
        parent = os.path.abspath(folder)
        while parent != os.path.dirname(parent) and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        reasons = {
            errno.EROFS: f"{parent} is on a read-only file system",
            errno.EACCES: f"no permission to write in {parent}",
            errno.EPERM: f"no permission to write in {parent}",
            errno.ENOTDIR: f"{parent} is a file, not a folder",
            errno.ENOSPC: "the disk is full",
        }
        reason = reasons.get(e.errno, e.strerror or str(e))
        raise UserError(f"cannot create the output folder {os.path.abspath(folder)}: {reason}. {moved_by}") from None


def setup_logging(output_folder: Optional[str], *, console: str = "info", moved_by: str = DEFAULT_MOVED_BY) -> None:
    """Log to output_folder/info.log (INFO), output_folder/debug.log (DEBUG) and the console.

    The folder must not exist yet (two runs never mix their logs); it is created here (moved_by: see
    make_output_folder). The two log files also mark it as a run's output folder (is_run_folder).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    formatter = logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S")
    if output_folder is not None:
        if os.path.exists(output_folder):
            raise UserError(
                f"output folder {output_folder} already exists: choose another --save_dir "
                "or remove it; refusing to mix two runs' logs."
            )
        make_output_folder(output_folder, moved_by=moved_by)
        for name, level in zip(LOG_FILES, (logging.INFO, logging.DEBUG)):
            handler = logging.FileHandler(os.path.join(output_folder, name))
            handler.setLevel(level)
            handler.setFormatter(formatter)
            root.addHandler(handler)
    stream = logging.StreamHandler(sys.stdout)
    stream.setLevel(getattr(logging, console.upper()))
    stream.setFormatter(formatter)
    root.addHandler(stream)


def discard_output_folder(output_folder: str) -> bool:
    """Undo setup_logging for a run that stopped before producing anything: close its log files and
    remove `output_folder` if it holds nothing but them, so that the corrected command
    can use the same folder again. Returns whether it was removed; console logging stays."""
    folder = os.path.abspath(output_folder)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and os.path.dirname(handler.baseFilename) == folder:
            root.removeHandler(handler)
            handler.close()
    try:
        contents = set(os.listdir(folder))
    except OSError:
        return False
    if not contents <= set(LOG_FILES):
        return False
    for name in contents:
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)
    return True


def log_run_header(args, *, note: Optional[str] = None) -> None:
    """Record the command line, every argument (debug.log keeps them with the run) and `note` (e.g.
    where the model settings came from: args.model_settings_note of the commands with weight flags)."""
    logging.info(f"Command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    logging.info(f"Arguments: {args}")
    if note:
        logging.info(note)


def setup_worker_logging(ctx: distributed.Context) -> None:
    """Ranks other than 0 write no log files; their errors go to the console, tagged with the rank."""
    setup_logging(None, console="error")  # their warnings repeat rank 0's
    formatter = logging.Formatter(f"[rank {ctx.rank}] " + LOG_FORMAT, "%Y-%m-%d %H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


# ------------------------------------------------------------------------------------------------
# Seeding and random states
# ------------------------------------------------------------------------------------------------


def make_deterministic(seed: int = 0) -> None:
    """Seed Python's random, NumPy and torch, and make cuDNN deterministic; seed -1 does nothing."""
    if seed == -1:
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def get_rng_states(*, device: str) -> dict:
    """Random states of Python, NumPy and torch as tensors and plain types (loadable with weights_only),
    plus the CUDA state of the GPU this process computes on when `device` is one ("cuda" is the current
    GPU). A CPU run touches no CUDA state, also on a machine with GPUs."""
    np_state = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    gpu = _gpu_index(device)
    if gpu is not None:
        # By device index. (Checkpoints of earlier versions hold "cuda": the states of every visible GPU.)
        states["cuda_devices"] = [gpu]
        states["cuda_states"] = [torch.cuda.get_rng_state(gpu)]
    return states


def set_rng_states(states: dict, *, device: str) -> str:
    """Restore get_rng_states' `states` in a run on `device`; returns what was restored, for the log.

    The CUDA state restored is the one saved for this process's GPU (same index), when the file has it:
    a checkpoint of a run on more GPUs (or of an earlier version, which saved every visible GPU's)
    resumes on fewer, one of a run on fewer GPUs on more, one of a CPU run on a GPU (its GPU keeps its
    seeded state), and a CPU run never touches CUDA state.
    """
    random.setstate(_as_tuple(states["python"]))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda_states" in states:
        saved = dict(zip((int(i) for i in states["cuda_devices"]), states["cuda_states"]))
    else:  # earlier versions: one state per visible GPU, in index order
        saved = dict(enumerate(states.get("cuda", [])))
    restored = "Python, NumPy and torch CPU random states"
    gpu = _gpu_index(device)
    if gpu is not None and gpu in saved:
        torch.cuda.set_rng_state(saved[gpu], gpu)
        restored += f", CUDA random state of GPU {gpu}"
    elif gpu is not None:
        restored += f" (GPU {gpu} keeps its seeded state: the checkpoint has no CUDA random state for it)"
    skipped = sorted(set(saved) - {gpu})
    if skipped:
        gpus = ("GPU " if len(skipped) == 1 else "GPUs ") + ", ".join(map(str, skipped))
        where = f"GPU {gpu}" if gpu is not None else "the CPU"
        restored += f" (not restored: the CUDA random state of {gpus}, unused by this run on {where})"
    return restored


def _gpu_index(device: str) -> Optional[int]:
    """Index of the GPU a --device / ctx.device names ("cuda": the current one), None for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------------------
# The start and end of a run: one process, or one rank of a torchrun job
# ------------------------------------------------------------------------------------------------
#
# `python3 train.py ...` is one process without a process group. Under torchrun (RANK / WORLD_SIZE /
# LOCAL_RANK in the environment, WORLD_SIZE > 1) each process joins the job's group: NCCL when --device
# is cuda (each process on cuda:LOCAL_RANK), gloo on CPUs; rank 0 alone writes log files. A rank that
# fails exits with its message (run_main) and torchrun ends the others; a dead peer makes gloo
# collectives fail at once, the process-group timeout (SELAVPR_DIST_TIMEOUT_S, default 1800 s) bounds
# any remaining wait, and SELAVPR_DIST_WAIT_S (default 86400 s) bounds the waits for rank 0's work alone.

DEFAULT_TIMEOUT_S = 1800.0  # collectives in which every rank works (extraction, training steps)
DEFAULT_WAIT_S = 86400.0  # waits for work that rank 0 does alone (search, re-ranking, checkpoints)
TIMEOUT_ENV, WAIT_ENV = "SELAVPR_DIST_TIMEOUT_S", "SELAVPR_DIST_WAIT_S"


def torchrun_environment(environ: Mapping[str, str]) -> Optional[Tuple[int, int, int]]:
    """(rank, world_size, local_rank) when launched by torchrun with more than one process, else None.

    A single process (no WORLD_SIZE, or WORLD_SIZE 1) runs without a process group.
    """
    if "WORLD_SIZE" not in environ:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = environ.get(name)
        try:
            values[name] = int(raw)
        except (TypeError, ValueError):
            raise ValueError(
                f"environment variable {name}={raw!r} is not an integer: launch the script with "
                "torchrun (e.g. torchrun --nproc_per_node=2 train.py ...), which sets RANK, "
                "WORLD_SIZE and LOCAL_RANK"
            ) from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"inconsistent torchrun environment RANK={rank}, WORLD_SIZE={world_size}, "
            f"LOCAL_RANK={local_rank}: launch the script with torchrun"
        )
    return None if world_size == 1 else (rank, world_size, local_rank)


def backend_for(device: str, *, nccl_available: bool) -> str:
    """Process-group backend for a --device: NCCL on GPUs (gloo when NCCL is not built in), gloo on CPUs."""
    return "nccl" if str(device).startswith("cuda") and nccl_available else "gloo"


def _seconds_from_env(name: str, default: float, environ: Mapping[str, str]) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"environment variable {name}={raw!r} must be a positive number of seconds")
    return value


def init_from_environment(*, device: str, environ: Optional[Mapping[str, str]] = None) -> distributed.Context:
    """The run's distributed.Context: single (no process group) unless launched by torchrun with several
    processes; then the process group is initialised (NCCL for --device cuda, gloo for cpu) and
    this rank's device is cuda:LOCAL_RANK (cuda) or cpu."""
    environ = os.environ if environ is None else environ
    env = torchrun_environment(environ)
    if env is None:
        return distributed.Context(device=device)
    rank, world_size, local_rank = env
    if not dist.is_available():
        raise ValueError(
            "this PyTorch build has no torch.distributed: run one process (python3 ...) instead of torchrun"
        )
    timeout = _seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, environ)
    wait = _seconds_from_env(WAIT_ENV, DEFAULT_WAIT_S, environ)
    backend = backend_for(device, nccl_available=dist.is_nccl_available())
    if str(device).startswith("cuda"):
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise ValueError(
                f"process with LOCAL_RANK {local_rank} needs a GPU of its own, but this machine "
                f"shows {gpus}: launch at most {gpus} processes per machine "
                "(torchrun --nproc_per_node), or use --device cpu"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
    # A gloo group of its own for the waits on rank 0's work alone: its timeout may be much longer.
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait))
    return distributed.Context(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend, wait_group=wait_group
    )


def finish(ctx: distributed.Context) -> None:
    """End of a successful run: wait for every rank (rank 0 may still be writing), then leave the
    process group. (After an error nothing is torn down here: the process exits and torchrun ends the
    others.)"""
    if ctx.enabled and dist.is_initialized():
        ctx.wait_for_main()
        dist.destroy_process_group()


def start_run(
    args, output_folder: str, *, note: Optional[str] = None, moved_by: str = DEFAULT_MOVED_BY
) -> distributed.Context:
    """The common start of train.py and eval.py: join torchrun's process group if launched by it (one
    process otherwise; ctx.device is this process's device), set --precision's float32 arithmetic
    (numerics.set_precision), log to `output_folder` on rank 0 (which creates it; the console only on
    the others), seed, and record the command line, arguments, `note` (log_run_header) and the precision.
    moved_by: what to do when the folder cannot be created (make_output_folder).

    ctx.output_folder is rank 0's `output_folder` on every rank (each rank names its folder after its
    own clock, which may have ticked on); single process: `output_folder` as given.
    """
    ctx = init_from_environment(device=args.device)
    # Checked (a GPU without bf16 is refused) and set before the output folder exists; logged below.
    precision = numerics.set_precision(args.precision, device=ctx.device)
    if ctx.is_main:
        setup_logging(output_folder, moved_by=moved_by)
    else:
        setup_worker_logging(ctx)
    ctx.output_folder = ctx.broadcast_object(output_folder)  # after rank 0 created it
    make_deterministic(args.seed)
    log_run_header(args, note=note)
    precision.log()
    logging.info(f"The outputs are being saved in {ctx.output_folder}")
    if ctx.enabled:
        logging.info(describe(ctx))
    return ctx


def describe(ctx: distributed.Context) -> str:
    """One log line about the job's layout."""
    if not ctx.enabled:
        return "Single process (no process group)"
    return (
        f"Distributed run: {ctx.world_size} processes, {ctx.backend} backend; rank 0 (on {ctx.device}) "
        "gathers the features, searches, re-ranks and writes every output"
    )


# ------------------------------------------------------------------------------------------------
# Space before work
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedWrite:
    """About `nbytes` bytes that a run will write below `folder` (which may not exist yet), described by
    `what` (e.g. "dense features of 55 images (--efficient_ram_testing)")."""

    folder: str
    nbytes: int
    what: str


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _existing_ancestor(folder: str) -> str:
    path = os.path.abspath(folder)
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return path


def check_free_space(writes, *, moved_by: str) -> None:
    """Refuse a run, before any work, whose planned writes (PlannedWrite) do not fit the free space of the
    file systems they go to (shutil.disk_usage; writes to one file system add up): one line with what
    it will write, what is free, and `moved_by` (the flag that puts the outputs elsewhere)."""
    groups: dict = {}
    for write in writes:
        anchor = _existing_ancestor(write.folder)
        groups.setdefault(os.stat(anchor).st_dev, (anchor, []))[1].append(write)
    for anchor, planned in groups.values():
        need = sum(w.nbytes for w in planned)
        free = shutil.disk_usage(anchor).free
        if need > free:
            parts = "; ".join(f"{w.what}: {format_bytes(w.nbytes)}" for w in planned)
            raise UserError(
                f"not enough free space for this run: it will write about {format_bytes(need)} below {anchor} "
                f"({parts}) and {format_bytes(free)} is free there. Free some space, or {moved_by}"
            )


# ------------------------------------------------------------------------------------------------
# Exit codes and error reporting
# ------------------------------------------------------------------------------------------------


class UserError(ValueError):
    """A problem with the user's input (flag, file, data): printed as one message, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's time limit, `kill PID`) received while an entry script runs.

    A KeyboardInterrupt, so that it takes Ctrl-C's clean path everywhere: every `finally` and
    `except BaseException` cleanup runs (temp files, on-disk feature stores), DataLoader workers stop
    quietly, and run_main ends the run with one log line.
    """


#: Exit status after SIGTERM: 128 + 15, what a shell reports for a process ended by SIGTERM.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


#: What a command's outputs look like after a full disk, for a command that does not say.
DEFAULT_DISK_FULL_NOTE = "Files are written to a temp name and renamed, so no output is left half-written."


def user_message(e: BaseException, *, disk_full_note: str = DEFAULT_DISK_FULL_NOTE) -> str:
    """The one-line text shown for a user error (ValueError / OSError).

    A full disk gets a message that says so, with the command's own `disk_full_note` (what is left and
    what to do: train.py has a checkpoint to resume from, eval.py has none). An error raised inside a
    DataLoader worker process comes back in the main process re-raised with the worker's whole traceback
    as its text: keep only the original message (which names the file), so that num_workers > 0 reads
    like num_workers 0.
    """
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" while writing {e.filename}" if e.filename else ""
        return f"the disk is full (no space left on device{where}): free some space and run again. {disk_full_note}"
    text = str(e)
    marker = "Traceback (most recent call last):"
    if "DataLoader worker" in text and marker in text:
        # After the last traceback header: indented frame lines, then "ExceptionType: message".
        tail = text.rsplit(marker, 1)[1].splitlines()
        last = next((i for i, line in enumerate(tail) if line and not line[0].isspace()), None)
        if last is not None:
            original = "\n".join(tail[last:]).strip()
            name, sep, rest = original.partition(": ")
            text = rest if sep and re.fullmatch(r"[\w.]+", name) else original
    return text


def _raise_terminated(signum, frame) -> None:
    # A second SIGTERM while the first one's cleanup runs ends the process at once (the default action).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def run_main(main: Callable, args, *, disk_full_note: str = DEFAULT_DISK_FULL_NOTE) -> None:
    """Run an entry script's main: user errors become one clear message and exit code 2; unexpected
    errors are logged with their traceback (debug.log) and exit 1. Too old a torch / numpy / Python is
    refused first, in one line naming the minimum.

    Ctrl-C (exit 130) and SIGTERM (exit 143) both unwind through the scripts' cleanups and end with one
    log line. The SIGTERM handler is installed for the duration of main only (from the main thread;
    elsewhere signals cannot be handled) and the previous one is put back afterwards. Under torchrun
    the launcher's SIGTERM to the workers (after a peer failed) takes the same path, so each worker
    still exits promptly with a non-zero status; a worker stuck inside a collective gets the launcher's
    SIGKILL after its grace period as before. disk_full_note: see user_message.
    """
    problem = unsupported_versions()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _run_main(main, args, disk_full_note=disk_full_note)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_main(main: Callable, args, *, disk_full_note: str) -> None:
    try:
        main(args)
    except Terminated:
        logging.error(
            "Terminated (SIGTERM received, e.g. a time limit or `kill`): stopped; temporary files "
            "were removed and finished outputs were kept."
        )
        sys.exit(SIGTERM_EXIT_CODE)
    except KeyboardInterrupt:
        logging.error("Interrupted by the user.")
        sys.exit(130)
    except (ValueError, OSError) as e:  # UserError, bad files, disk full, ...
        message = f"error: {user_message(e, disk_full_note=disk_full_note)}"
        # Checked first: logging.debug() on a logger without handlers (e.g. setup_logging refused the
        # output folder) would install a stderr handler and print the traceback there.
        if logging.getLogger().handlers:
            logging.debug("".join(traceback.format_exception(e)))
            logging.error(message)
        else:
            print(message, file=sys.stderr)
        _report_to_launcher(e)
        sys.exit(2)
    except Exception as e:  # a bug: keep the traceback
        if _lost_peer(e):  # torchrun: the cause is another process's failure, reported by that one
            logging.debug("".join(traceback.format_exception(e)))
            logging.error(
                "error: another process of this torchrun job failed or was killed (its own message, "
                f"tagged with its rank, is in the job's output); stopping too. ({(str(e).splitlines() or [''])[0]})"
            )
            sys.exit(1)
        logging.error("Unexpected error:\n" + "".join(traceback.format_exception(e)))
        _report_to_launcher(e)
        sys.exit(1)


def _lost_peer(e: BaseException) -> bool:
    """A torch.distributed error raised because another process of the job died."""
    dist_error = getattr(torch.distributed, "DistError", None)
    text = str(e)
    return (dist_error is not None and isinstance(e, dist_error)) or "closed by peer" in text or "reset by peer" in text


def _report_to_launcher(e: BaseException) -> None:
    """Under torchrun, also write the error into this worker's error file: torchrun's failure summary
    then shows it beside the failed rank. Nothing happens for a plain `python3 script.py`."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    except Exception:  # reporting must never hide the error itself
        pass
