"""The runtime of the entry scripts, in one place: logging, seeding and random states, the version
check, the start and end of a run (torchrun's process group or a single process: start_run, finish)
and the exit codes and error reporting (run_main).

The collectives and sharding of a torchrun job are distributed.py's (the `Context` that start_run
returns); atomic file writes are atomic_files.py's, checkpoint writing checkpoints.py's.
"""

import contextlib
import errno
import glob
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

import distributed
import leftovers
import numerics
from dense_store import DenseStore, remove_empty_folder

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


def setup_worker_logging(rank: int, *, console: str = "error") -> None:
    """Ranks other than 0 write no log files; their errors go to the console, tagged with the rank
    (their warnings repeat rank 0's, except while joining the job: console="warning" then)."""
    setup_logging(None, console=console)
    formatter = logging.Formatter(f"[rank {rank}] " + LOG_FORMAT, "%Y-%m-%d %H:%M:%S")
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
# any remaining wait and the wait for the others to join, and SELAVPR_DIST_WAIT_S (default 86400 s)
# bounds the other ranks' waits for rank 0's work alone.

DEFAULT_TIMEOUT_S = 1800.0  # collectives in which every rank works (extraction, training steps)
DEFAULT_WAIT_S = 86400.0  # waits for work that rank 0 does alone (search, re-ranking, checkpoints)
TIMEOUT_ENV, WAIT_ENV = "SELAVPR_DIST_TIMEOUT_S", "SELAVPR_DIST_WAIT_S"
#: Seconds between the lines that say what a process still waits for while joining a torchrun job.
JOIN_REPORT_EVERY_S = 30.0
#: How much longer than the timeout the main thread waits for the rendezvous (its C++ retries may).
JOIN_GRACE_S = 30.0
#: The variables that make a script join a torchrun job; unset, the script runs as one process.
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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


def launched_by_torchrun(environ: Mapping[str, str]) -> bool:
    """Whether torchrun's agent started this process (it sets TORCHELASTIC_RUN_ID), rather than its
    variables being left in the environment (a scheduler's script, a copied shell)."""
    return bool(environ.get("TORCHELASTIC_RUN_ID"))


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


@dataclass(frozen=True)
class JobPlace:
    """Where this process joins a torchrun job: its rank, the job's size, the rendezvous address
    (MASTER_ADDR:MASTER_PORT), the wait allowed for the others (seconds) and whether torchrun itself
    started this process."""

    rank: int
    world_size: int
    address: str
    timeout_s: float
    by_torchrun: bool

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}, rendezvous at {self.address}"

    def advice(self) -> str:
        if not self.by_torchrun:
            return (
                f"{', '.join(TORCHRUN_VARIABLES[:3])} are set, but torchrun did not start this process (a "
                "scheduler's script, a copied shell?): to run one process, unset "
                + " ".join(TORCHRUN_VARIABLES)
                + "; to run a job, start every process with torchrun."
            )
        return (
            "Check that every machine runs the same torchrun command (--nnodes, --nproc_per_node, "
            "--rdzv_endpoint or --master_addr/--master_port) and can reach that address."
        )

    def never_joined(self, waited_s: float, error: Optional[BaseException] = None) -> str:
        detail = f" ({_first_line(error)})" if error is not None else ""
        return (
            f"the other processes of the torchrun job never joined: this process ({self.describe()}) "
            f"waited {waited_s:.0f} s for them, the limit {TIMEOUT_ENV}={self.timeout_s:g} sets{detail}. "
            + self.advice()
        )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")


#: The helper thread of join_process_group while it is blocked (see exit_process).
_blocked_join: Optional[threading.Thread] = None


def join_process_group(join: Callable[[], Any], *, place: JobPlace, poll_s: float = 0.5) -> Any:
    """join() (the blocking rendezvous of a torchrun job), run in a helper thread while this thread
    waits for it, so that Ctrl-C, SIGTERM and SIGHUP stop the process at any moment of the wait: a
    Python signal handler runs only between bytecodes of the main thread, never while it is blocked in
    C++ (up to the whole timeout). Says what it waits for at once (rank 0, or any process that
    torchrun did not start: its variables left in a shell) and every JOIN_REPORT_EVERY_S; after the
    timeout (plus a grace for the C++ retries) raises a UserError naming the real cause, the others
    never joined. Errors of join() become a UserError naming the address.

    A helper thread still blocked when the process ends is a daemon and is left behind (run_main's
    exit_process then ends the process with os._exit after the cleanup).
    """
    global _blocked_join
    outcome: dict = {}
    done = threading.Event()

    def run() -> None:
        # The threads that the process group starts (gloo's loops) inherit this thread's signal mask:
        # blocked, they never take a stop signal, which then reaches the main thread, whose handler acts.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            outcome["value"] = join()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e
        finally:
            done.set()

    # Said before the thread starts: where the wait holds the interpreter's lock (torch < 2.1, see
    # init_from_environment), this thread does not run again until the wait ends.
    if place.by_torchrun and place.rank == 0:
        logging.info(
            f"Joining the torchrun job ({place.describe()}): waiting up to {place.timeout_s:g} s for the "
            f"other processes ({TIMEOUT_ENV})"
        )
    elif not place.by_torchrun:  # a warning: on every rank's console
        logging.warning(
            f"Joining a torchrun job ({place.describe()}): waiting up to {place.timeout_s:g} s for the other "
            f"processes ({TIMEOUT_ENV}). " + place.advice()
        )
    start = time.monotonic()
    thread = threading.Thread(target=run, name="torchrun-rendezvous", daemon=True)
    _blocked_join = thread
    thread.start()
    next_report = start + JOIN_REPORT_EVERY_S
    deadline = start + place.timeout_s + max(JOIN_GRACE_S, 0.5 * place.timeout_s)
    try:
        while not done.wait(poll_s):
            now = time.monotonic()
            if now >= deadline:
                raise UserError(place.never_joined(now - start))
            if now >= next_report:
                logging.warning(
                    f"Still waiting for the other processes of the torchrun job after {now - start:.0f} s "
                    f"({place.describe()}); the wait ends after {place.timeout_s:g} s ({TIMEOUT_ENV}). "
                    + place.advice()
                )
                next_report += JOIN_REPORT_EVERY_S
    except KeyboardInterrupt:
        logging.error(
            f"Stopped while waiting for the other processes of the torchrun job ({place.describe()}) "
            f"after {time.monotonic() - start:.0f} s: they had not joined."
        )
        raise
    _blocked_join = None
    if "error" in outcome:
        error = outcome["error"]
        if not isinstance(error, RuntimeError):  # e.g. a ValueError of a bad setting: as it is
            raise error
        if _timed_out(error):
            raise UserError(place.never_joined(time.monotonic() - start, error)) from None
        raise UserError(
            f"could not join the torchrun job ({place.describe()}): {_first_line(error)}. {place.advice()}"
        ) from None
    return outcome["value"]


def process_device(device: str, env: Optional[Tuple[int, int, int]]) -> str:
    """The device this process will compute on, known before the process group exists: --device, or
    under torchrun (env: torchrun_environment's (rank, world_size, local_rank)) with --device cuda, the
    GPU cuda:LOCAL_RANK that init_from_environment gives it."""
    if env is not None and str(device).startswith("cuda"):
        return f"cuda:{env[2]}"
    return device


def init_from_environment(*, device: str, environ: Optional[Mapping[str, str]] = None) -> distributed.Context:
    """The run's distributed.Context: single (no process group) unless launched by torchrun with several
    processes; then the process group is joined (join_process_group: NCCL for --device cuda, gloo for
    cpu) and this rank's device is cuda:LOCAL_RANK (cuda) or cpu."""
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
    on_gpu = str(device).startswith("cuda")
    if on_gpu:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise ValueError(
                f"process with LOCAL_RANK {local_rank} needs a GPU of its own, but this machine "
                f"shows {gpus}: launch at most {gpus} processes per machine "
                "(torchrun --nproc_per_node), or use --device cpu"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"

    def join():
        if on_gpu:
            torch.cuda.set_device(local_rank)  # the current GPU is per thread
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        # A gloo group of its own for the waits on rank 0's work alone: there the other ranks may wait
        # much longer than the process-group timeout. Rank 0 only ever arrives last in this group's
        # collectives (the others wait for it), so its own wait there stays the short one: a rank that
        # stopped answering meanwhile is found after SELAVPR_DIST_TIMEOUT_S, not 24 h.
        return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout if rank == 0 else wait))

    place = JobPlace(
        rank=rank,
        world_size=world_size,
        address=f"{environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', '?')}",
        timeout_s=timeout,
        by_torchrun=launched_by_torchrun(environ),
    )
    if _release(torch.__version__) < (2, 1):
        # torch 2.0 creates the rendezvous store without releasing the interpreter's lock (fixed in 2.1,
        # pytorch#100555): no Python code, no signal handler runs until the wait ends. The stop signals
        # then take their default action meanwhile: the process ends at once (nothing to clean up yet).
        with _default_stop_signals():
            wait_group = join_process_group(join, place=place)
    else:
        wait_group = join_process_group(join, place=place)
    return distributed.Context(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend, wait_group=wait_group
    )


@contextlib.contextmanager
def _default_stop_signals():
    """The stop signals' default action (end the process) inside the block, where they were handled;
    an ignored one (nohup) stays ignored. Main thread only; elsewhere nothing changes."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) not in (signal.SIG_IGN, signal.SIG_DFL):
                previous[signum] = signal.signal(signum, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@dataclass(frozen=True)
class Peer:
    """A process of a torchrun job as it described itself at the start: rank, owner (process id, boot
    and host ids) and torchrun's error file for it (TORCHELASTIC_ERROR_FILE), if any."""

    rank: int
    owner: leftovers.Owner
    error_file: Optional[str]


class _Run:
    """The run of this process, from start_run to finish: what the end of a failed run needs to name
    the cause (the other ranks, the waits) and to find the other ranks' stores."""

    def __init__(self, ctx: distributed.Context, peers: Sequence[Peer], *, timeout_s: float, wait_s: float) -> None:
        self.ctx, self.peers = ctx, tuple(peers)
        self.timeout_s, self.wait_s = timeout_s, wait_s
        # The other ranks' process states when the first stop signal came (see _Stopper): by the time
        # the cleanup reports, healthy ranks stopped by the same launcher may have ended too.
        self.states_at_stop: Optional[Dict[int, Optional[str]]] = None


_current_run: Optional[_Run] = None


def _gather_peers(ctx: distributed.Context) -> Tuple[Peer, ...]:
    if not ctx.enabled:
        return ()
    me = leftovers.this_process()
    described = ctx.gather_objects((me.pid, me.boot, me.host, os.environ.get("TORCHELASTIC_ERROR_FILE")))
    return tuple(
        Peer(rank=r, owner=leftovers.Owner(pid=int(pid), boot=boot, host=host), error_file=error_file)
        for r, (pid, boot, host, error_file) in enumerate(described)
    )


def finish(ctx: distributed.Context) -> None:
    """End of a successful run: wait for every rank (rank 0 may still be writing), then leave the
    process group. (After an error nothing is torn down here: the process exits and torchrun ends the
    others.)"""
    global _current_run
    if ctx.enabled and dist.is_initialized():
        ctx.wait_for_main()
        dist.destroy_process_group()
    _current_run = None


def start_run(
    args, output_folder: str, *, note: Optional[str] = None, moved_by: str = DEFAULT_MOVED_BY
) -> distributed.Context:
    """The common start of train.py, eval.py and localize.py: set --precision's float32 arithmetic
    (numerics.set_precision; a GPU that cannot run it is refused before any folder exists); log to
    `output_folder` on rank 0 (which creates it; the console only on the others) and record the command
    line, arguments, `note` (log_run_header) and the precision; say if the output root holds a killed
    run's dense features (report_dead_stores); join torchrun's process group if launched by it (one
    process otherwise; ctx.device is this process's device; the wait for the others is logged); seed.
    moved_by: what to do when the folder cannot be created (make_output_folder).

    Rank 0 creates its folder before joining, so that a job whose other processes never come leaves
    a log saying so. ctx.output_folder is rank 0's `output_folder` on every rank (each rank names its
    folder after its own clock, which may have ticked on); single process: `output_folder` as given.
    """
    global _current_run
    env = torchrun_environment(os.environ)
    rank = 0 if env is None else env[0]
    precision = numerics.set_precision(args.precision, device=process_device(args.device, env))
    if rank == 0:
        setup_logging(output_folder, moved_by=moved_by)
    else:
        setup_worker_logging(rank, console="warning")  # what it waits for while joining
    log_run_header(args, note=note)
    precision.log()
    if rank == 0:
        report_dead_stores(output_folder)
    ctx = init_from_environment(device=args.device)
    if not ctx.is_main:
        setup_worker_logging(ctx.rank)
    ctx.output_folder = ctx.broadcast_object(output_folder)  # after rank 0 created it
    _current_run = _Run(
        ctx,
        _gather_peers(ctx),
        timeout_s=_seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, os.environ),
        wait_s=_seconds_from_env(WAIT_ENV, DEFAULT_WAIT_S, os.environ),
    )
    make_deterministic(args.seed)
    logging.info(f"The outputs are being saved in {ctx.output_folder}")
    if ctx.enabled:
        logging.info(describe(ctx))
    return ctx


def describe(ctx: distributed.Context) -> str:
    """One log line about the job's layout."""
    if not ctx.enabled:
        return "Single process (no process group)"
    return (
        f"Distributed run: {ctx.world_size} processes, {ctx.backend} backend, {torch.get_num_threads()} CPU "
        f"thread(s) per process; rank 0 (on {ctx.device}) gathers the features, searches, re-ranks and "
        "writes every output"
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
# Leftovers: the stores of killed runs, the other ranks' stores
# ------------------------------------------------------------------------------------------------


def report_dead_stores(output_folder: str) -> List[leftovers.DeadStore]:
    """Warn about the dense feature stores (--efficient_ram_testing) that killed runs (SIGKILL, a crash,
    a reboot: their process is gone) left in the run folders beside `output_folder` (e.g. test/<save_dir>/*/
    for eval.py), with their size and the command that removes them. Nothing reads them; stores of live
    runs, of other machines and of earlier versions (no owner in their names) are not reported."""
    root = os.path.dirname(os.path.abspath(output_folder))
    dead = leftovers.find_dead_stores(os.path.join(root, "*", "dense_features*"), prefix=DenseStore.FILE_PREFIX)
    for store in dead:
        try:
            everything = {os.path.join(store.folder, name) for name in os.listdir(store.folder)}
        except OSError:
            continue
        command = (
            f"rm -r {shlex.quote(store.folder)}"
            if everything == set(store.files)
            else "rm " + " ".join(shlex.quote(p) for p in store.files)
        )
        logging.warning(
            f"{store.folder} holds {leftovers.human_size(store.nbytes)} of dense features left by a run that "
            f"was killed (process {', '.join(map(str, store.pids))} is gone); nothing reads them. Remove "
            f"them with: {command}"
        )
    return dead


def _sweep_peer_stores(run: _Run, *, wait_s: float = 3.0) -> Tuple[List[str], List[str]]:
    """Rank 0 of a failed job: the other ranks' stores in its run folder (dense_features_rank<r>/).
    Files whose process is gone are removed (with their folder once empty); files of live processes
    (stopping on their own) get `wait_s` to disappear. Returns (removed, left) paths."""
    removed, waiting = [], []
    folders = sorted(glob.glob(os.path.join(run.ctx.output_folder, "dense_features_rank*")))
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, DenseStore.FILE_PREFIX + "*"))):
            owner = leftovers.owner_of(path, prefix=DenseStore.FILE_PREFIX)
            if owner is not None and owner.alive() is False:
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:
                    waiting.append(path)
            else:
                waiting.append(path)
    deadline = time.monotonic() + wait_s
    while waiting and time.monotonic() < deadline:
        time.sleep(0.1)
        waiting = [p for p in waiting if os.path.exists(p)]
    for folder in folders:
        remove_empty_folder(folder)
    return removed, waiting


def _clean_up(run: Optional[_Run]) -> str:
    """After a failure: remove what this process registered and did not remove (leftovers), and on rank
    0 of a job the stores that other ranks left in its run folder. Returns the end of the end-of-run
    line: what became of the temporary files and of the finished outputs."""
    left = leftovers.remove_registered()
    removed: List[str] = []
    if run is not None and run.ctx.enabled and run.ctx.is_main and run.ctx.output_folder:
        removed, still = _sweep_peer_stores(run)
        left += still
    if left:
        sizes = sum(os.path.getsize(p) for p in left if os.path.isfile(p))
        return (
            f"finished outputs were kept, but these temporary files remain ({leftovers.human_size(sizes)}; "
            f"remove them once their processes have ended): rm -r {' '.join(shlex.quote(p) for p in left)}"
        )
    extra = f" (also the {len(removed)} dense feature file(s) other ranks left in the run folder)" if removed else ""
    return f"temporary files were removed{extra} and finished outputs were kept."


# ------------------------------------------------------------------------------------------------
# The other ranks of a failed job
# ------------------------------------------------------------------------------------------------


def _peer_states(run: _Run) -> Dict[int, Optional[str]]:
    """leftovers.process_state of every other rank on this machine (this boot), by rank."""
    here = leftovers.this_process()
    return {
        p.rank: leftovers.process_state(p.owner.pid)
        for p in run.peers
        if p.rank != run.ctx.rank and p.owner.host == here.host and p.owner.boot == here.boot
    }


#: Beside torchrun's error file of a process: written when it stops because of a signal or of another
#: rank, so that rank 0 does not take its end for a kill (peer_problems).
STOP_NOTE = "selavpr_stopped"


def _leave_stop_note(reason: str) -> None:
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return
    try:
        os.makedirs(os.path.dirname(error_file), exist_ok=True)
        with open(os.path.join(os.path.dirname(error_file), STOP_NOTE), "w") as f:
            f.write(reason)
    except OSError:  # a note for the others' logs: never worth an error of its own
        pass


def _stopped_on_its_own(peer: Peer) -> bool:
    return bool(peer.error_file) and os.path.isfile(os.path.join(os.path.dirname(peer.error_file), STOP_NOTE))


def _error_file_message(path: Optional[str]) -> Optional[str]:
    """The first line of the error torchrun's error file `path` records (written by that process's
    run_main), or None."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            message = json.load(f).get("message")
        if isinstance(message, dict):
            message = message.get("message")
    except (OSError, ValueError, AttributeError):
        return None
    return (str(message).strip().splitlines() or [None])[0] if message else None


def peer_problems(run: _Run, states: Mapping[int, Optional[str]]) -> List[Tuple[str, str]]:
    """(who, what) for every other rank that failed, is gone, stopped or stuck, e.g. ("rank 1 (process
    4242)", "failed: ValueError: ..."); "who what" reads as a sentence. A rank that ended after a signal
    or because of another rank (its STOP_NOTE) is no cause. Ranks on other machines are named only when
    their error file is readable here."""
    problems = []
    for peer in run.peers:
        if peer.rank == run.ctx.rank:
            continue
        who = f"rank {peer.rank} (process {peer.owner.pid})"
        message = _error_file_message(peer.error_file) if peer.owner.on_this_machine() else None
        state = states.get(peer.rank, "R")  # another machine: nothing to check here
        if message:
            problems.append((who, f"failed: {message}"))
        elif peer.rank in states and state in (None, "Z") and not _stopped_on_its_own(peer):
            problems.append(
                (who, "ended without an error message (killed: kill -9, the out-of-memory killer, or a crash)")
            )
        elif state in ("T", "t"):
            problems.append(
                (who, f"is stopped (SIGSTOP, Ctrl-Z or a debugger; `kill -CONT {peer.owner.pid}` resumes it)")
            )
        elif state == "D":
            problems.append((who, "is stuck in a disk or file-system operation"))
    return problems


def _sentences(problems: List[Tuple[str, str]]) -> str:
    return "; ".join(f"{who} {what}" for who, what in problems)


def _timed_out(e: BaseException) -> bool:
    """A rendezvous or collective that gave up waiting (gloo: "Timed out waiting 1800000ms for recv ...",
    then "Application timeout caused pair closure" for the next ones; the store: "Timed out after 1801
    seconds waiting for clients", "Socket Timeout" on torch 2.0)."""
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def _timeout_line(e: BaseException, run: _Run, problems: List[Tuple[str, str]]) -> str:
    waited = re.search(r"(\d+)\s*ms", str(e))
    seconds = int(waited.group(1)) / 1000 if waited else None
    if seconds == run.timeout_s:
        limit = f"{seconds:g} s, the limit {TIMEOUT_ENV} sets"
    elif seconds == run.wait_s:
        limit = f"{seconds:g} s, the limit {WAIT_ENV} sets"
    else:
        limit = (
            f"{TIMEOUT_ENV}={run.timeout_s:g} s (collectives of every rank) or {WAIT_ENV}={run.wait_s:g} s "
            "(waits for rank 0's work alone)"
        )
    if problems:
        cause = "; ".join(f"{who} stopped answering: it {what}" for who, what in problems)
    elif run.ctx.world_size == 2:
        cause = f"rank {1 - run.ctx.rank} stopped answering"
    else:
        cause = "another rank stopped answering (its own output says which)"
    return f"error: {cause}; rank {run.ctx.rank} waited {limit}; stopping."


# ------------------------------------------------------------------------------------------------
# Exit codes and error reporting
# ------------------------------------------------------------------------------------------------


class UserError(ValueError):
    """A problem with the user's input (flag, file, data): printed as one message, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's time limit, `kill PID`) or SIGHUP (the terminal or ssh connection closed)
    received while an entry script runs.

    A KeyboardInterrupt, so that it takes Ctrl-C's clean path everywhere: every `finally` and
    `except BaseException` cleanup runs (temp files, on-disk feature stores), DataLoader workers stop
    quietly, and run_main ends the run with one log line.
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = int(signum)


#: Exit status after SIGTERM: 128 + 15, what a shell reports for a process ended by SIGTERM.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM

#: The signals that stop a run cleanly (SIGHUP where the system has it).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

_STOP_TEXT = {
    "SIGTERM": "Terminated (SIGTERM received, e.g. a time limit or `kill`)",
    "SIGHUP": "Terminated (SIGHUP received: the terminal or ssh connection was closed)",
}


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


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


class _Stopper:
    """The handler of SIGINT, SIGTERM and SIGHUP while an entry script's main runs.

    The first signal raises (KeyboardInterrupt for SIGINT, Terminated for the others), so that every
    cleanup runs as the exception unwinds. A second one during that cleanup (a Ctrl-C on `timeout ...
    torchrun` delivers two or three within milliseconds; an impatient user presses twice) must not
    abort the cleanup half way: it stops the process at once instead, after removing every temp path
    still registered (leftovers), with one log line. In a forked child (a DataLoader worker, which
    inherits the handler) every signal just raises, as before: the worker stops quietly and never
    touches its parent's files.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.first: Optional[int] = None

    def __call__(self, signum, frame) -> None:
        if os.getpid() == self.pid and self.first is not None:
            _stop_at_once(self.first, signum)
        if os.getpid() == self.pid:
            self.first = signum
            run = _current_run
            if run is not None and run.ctx.enabled:
                run.states_at_stop = _peer_states(run)
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _ignore_stop_signals() -> None:
    """From here on the run ends on its own within moments: further signals would only cut it short."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _stop_at_once(first: int, second: int) -> None:
    _ignore_stop_signals()
    _leave_stop_note(_signal_name(second))
    left = leftovers.remove_registered()
    files = (
        "temporary files were removed and finished outputs were kept."
        if not left
        else f"finished outputs were kept; these temporary files could not be removed: {' '.join(left)}"
    )
    logging.error(
        f"{_signal_name(second)} received again while stopping after {_signal_name(first)}: stopped at once; {files}"
    )
    exit_process(128 + first, at_once=True)


def exit_process(code: int, *, at_once: bool = False) -> None:
    """End the process with `code`: sys.exit, or os._exit after flushing the logs when at_once, when a
    rendezvous thread is still blocked in C++ (it would keep the interpreter's shutdown waiting), or
    when a process group is still joined after a failure (torch's teardown of a group whose peers
    failed or timed out may hang or abort the process: SIGABRT was seen with gloo)."""
    stuck = _blocked_join is not None and _blocked_join.is_alive()
    joined = dist.is_available() and dist.is_initialized()
    if at_once or stuck or joined:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed terminal (SIGHUP)
                pass
        os._exit(code)
    sys.exit(code)


def refuse_torchrun(environ: Mapping[str, str], *, command: str) -> None:
    """Commands that run as one process (localize.py, reproduce.py, the tools): under torchrun (or its
    variables, WORLD_SIZE > 1) every process would run the whole command and collide on the same
    outputs. Exit 2 with one line (from the first process of each machine) instead."""
    try:
        env = torchrun_environment(environ)
    except ValueError:  # malformed variables: this command does not use them
        return
    if env is None:
        return
    rank, world_size, local_rank = env
    message = (
        f"{command} runs as one process and does not support torchrun (WORLD_SIZE={world_size} is set): run "
        f"it with python3 {command} ...; only train.py and eval.py run under torchrun."
        + ("" if launched_by_torchrun(environ) else " Unset " + " ".join(TORCHRUN_VARIABLES) + " (left in this shell).")
    )
    if local_rank == 0:
        print(f"error: {message}", file=sys.stderr)
    _report_to_launcher(UserError(message))
    sys.exit(2)


def run_main(main: Callable, args, *, torchrun: bool = False, disk_full_note: str = DEFAULT_DISK_FULL_NOTE) -> None:
    """Run an entry script's main: user errors become one clear message and exit code 2; unexpected
    errors are logged with their traceback (debug.log) and exit 1. Too old a torch / numpy / Python is
    refused first, in one line naming the minimum; so is a torchrun launch of a command that does not
    support it (torchrun=False: refuse_torchrun).

    Ctrl-C (exit 130), SIGTERM (exit 143) and SIGHUP (exit 129) unwind through the scripts' cleanups and
    end with one log line; a second signal during that cleanup stops the process at once, after
    removing the temp files still registered (_Stopper). The handlers are installed for the duration of
    main only (from the main thread; elsewhere signals cannot be handled), not for a signal that was
    ignored (`nohup` ignores SIGHUP, a shell's background job SIGINT), and the previous ones are put
    back afterwards. Under torchrun the launcher's SIGTERM to the workers (after a peer failed) takes
    the same path, and the end-of-run line names the rank that failed and why (its error file) or that
    it was killed; a worker stuck inside a collective gets the launcher's SIGKILL after its grace
    period as before. disk_full_note: see user_message.
    """
    global _current_run
    problem = unsupported_versions()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if not torchrun:
        refuse_torchrun(os.environ, command=os.path.basename(sys.argv[0] or "this command"))
    previous = {}
    if threading.current_thread() is threading.main_thread():
        stopper = _Stopper()
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                previous[signum] = signal.signal(signum, stopper)
    try:
        _run_main(main, args, disk_full_note=disk_full_note)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _current_run = None


def _run_main(main: Callable, args, *, disk_full_note: str) -> None:
    try:
        main(args)
    except KeyboardInterrupt as e:  # Ctrl-C, or Terminated (SIGTERM, SIGHUP)
        _ignore_stop_signals()
        _end_stopped(e.signum if isinstance(e, Terminated) else signal.SIGINT)
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
        _clean_up(None)
        exit_process(2)
    except Exception as e:  # a bug: keep the traceback
        run = _current_run
        if run is not None and run.ctx.enabled and (_timed_out(e) or _lost_peer(e)):
            _ignore_stop_signals()
            _leave_stop_note("another rank")
            problems = peer_problems(run, _peer_states(run))
            logging.debug("".join(traceback.format_exception(e)))
            if _timed_out(e):
                logging.error(_timeout_line(e, run, problems))
            elif problems:
                logging.error(f"error: {_sentences(problems)}; stopping too ({_first_line(e)})")
            else:
                logging.error(
                    "error: another process of this torchrun job failed or was killed (its own message, "
                    f"tagged with its rank, is in the job's output); stopping too. ({_first_line(e)})"
                )
            files = _clean_up(run)
            if not files.startswith("temporary"):
                logging.error(files)
            exit_process(1)
        if _lost_peer(e):  # torchrun: the cause is another process's failure, reported by that one
            _leave_stop_note("another rank")
            logging.debug("".join(traceback.format_exception(e)))
            logging.error(
                "error: another process of this torchrun job failed or was killed (its own message, "
                f"tagged with its rank, is in the job's output); stopping too. ({_first_line(e)})"
            )
            exit_process(1)
        logging.error("Unexpected error:\n" + "".join(traceback.format_exception(e)))
        _report_to_launcher(e)
        _clean_up(None)
        exit_process(1)


def _end_stopped(signum: int) -> None:
    """The end of a run stopped by a signal: one line saying why (another rank's failure when torchrun
    stopped this process because of it) and what became of the temporary files."""
    _leave_stop_note(_signal_name(signum))
    run = _current_run
    problems: List[Tuple[str, str]] = []
    if run is not None and run.ctx.enabled:
        states = run.states_at_stop if run.states_at_stop is not None else _peer_states(run)
        problems = peer_problems(run, states)
    files = _clean_up(run)
    if problems:
        logging.error(
            f"error: {_sentences(problems)}. torchrun stopped this process "
            f"({_signal_name(signum)}) because of it: "
            f"{files}"
        )
    elif signum == signal.SIGINT:
        logging.error("Interrupted by the user." + ("" if files.startswith("temporary") else f" {files}"))
    else:
        logging.error(f"{_STOP_TEXT.get(_signal_name(signum), _signal_name(signum) + ' received')}: stopped; {files}")
    exit_process(128 + signum)


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
