"""Shared plumbing: logging, seeding and random states, device choice, atomic writes, clean exits."""
import errno
import logging
import os
import random
import re
import sys
import tempfile
import traceback
from typing import Callable, Optional

import numpy as np
import torch

LOG_FORMAT = "%(asctime)s   %(message)s"


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


def unsupported_versions() -> Optional[str]:
    """One line naming each installed package older than MIN_VERSIONS and its minimum, or None."""
    import torchvision
    found = {"Python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__,
             "torchvision": torchvision.__version__, "numpy": np.__version__}
    old = [f"{name} >= {'.'.join(map(str, MIN_VERSIONS[name]))} (this is {found[name]})"
           for name in MIN_VERSIONS if _release(str(found[name])) < MIN_VERSIONS[name]]
    if not old:
        return None
    return f"SelaVPR needs {', '.join(old)}: upgrade, e.g. pip install -r requirements.txt."


class UserError(ValueError):
    """A problem with the user's input (flag, file, data): printed as one message, no traceback."""


def setup_logging(output_folder: Optional[str], *, console: str = "info") -> None:
    """Log to output_folder/info.log (INFO), output_folder/debug.log (DEBUG) and the console.

    The folder must not exist yet (two runs never mix their logs); it is created here.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    formatter = logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S")
    if output_folder is not None:
        if os.path.exists(output_folder):
            raise UserError(f"output folder {output_folder} already exists: choose another --save_dir "
                            "or remove it; refusing to mix two runs' logs.")
        os.makedirs(output_folder)
        for name, level in (("info.log", logging.INFO), ("debug.log", logging.DEBUG)):
            handler = logging.FileHandler(os.path.join(output_folder, name))
            handler.setLevel(level)
            handler.setFormatter(formatter)
            root.addHandler(handler)
    stream = logging.StreamHandler(sys.stdout)
    stream.setLevel(getattr(logging, console.upper()))
    stream.setFormatter(formatter)
    root.addHandler(stream)


def log_run_header(args) -> None:
    """Record the command line and every argument (debug.log keeps them with the run)."""
    logging.info(f"Command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    logging.info(f"Arguments: {args}")


def user_message(e: BaseException) -> str:
    """The one-line text shown for a user error (ValueError / OSError).

    A full disk gets a message that says so. An error raised inside a DataLoader worker process comes
    back in the main process re-raised with the worker's whole traceback as its text: keep only the
    original message (which names the file), so that num_workers > 0 reads like num_workers 0.
    """
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" while writing {e.filename}" if e.filename else ""
        return (f"the disk is full (no space left on device{where}): free some space and run again. Files are "
                "written to a temp name and renamed, so the earlier outputs (e.g. the last checkpoint, to "
                "--resume from) are intact.")
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


def run_main(main: Callable, args) -> None:
    """Run an entry script's main: user errors become one clear message and exit code 2; unexpected
    errors are logged with their traceback (debug.log) and exit 1. Too old a torch / numpy / Python is
    refused first, in one line naming the minimum."""
    problem = unsupported_versions()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        main(args)
    except KeyboardInterrupt:
        logging.error("Interrupted by the user.")
        sys.exit(130)
    except (ValueError, OSError) as e:  # UserError, bad files, disk full, ...
        message = f"error: {user_message(e)}"
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
            logging.error("error: another process of this torchrun job failed or was killed (its own message, "
                          f"tagged with its rank, is in the job's output); stopping too. ({(str(e).splitlines() or [''])[0]})")
            sys.exit(1)
        logging.error("Unexpected error:\n" + "".join(traceback.format_exception(e)))
        _report_to_launcher(e)
        sys.exit(1)


def _lost_peer(e: BaseException) -> bool:
    """A torch.distributed error raised because another process of the job died."""
    dist_error = getattr(torch.distributed, "DistError", None)
    text = str(e)
    return ((dist_error is not None and isinstance(e, dist_error)) or "closed by peer" in text
            or "reset by peer" in text)


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


def get_rng_states() -> dict:
    """Random states of Python, NumPy and torch as tensors and plain types (loadable with weights_only)."""
    np_state = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(_as_tuple(states["python"]))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(temp_path) for a temp file beside `path`, then rename it over `path`.

    A crash or a kill at any moment leaves either the old file or the new one, never half a file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not e.filename:
            # Name the file in the message (a write() on an open file does not).
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from e
        raise


def atomic_torch_save(obj, path: str) -> None:
    def write(tmp):
        # Through a Python file object: a full disk then raises OSError(ENOSPC), which run_main reports
        # as such; torch.save(obj, <path>) writes in C++ and fails with a cryptic RuntimeError instead.
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                # torch's zip writer, closing after a failed write, may replace the OSError with its own.
                cause = e.__context__
                while cause is not None and not isinstance(cause, OSError):
                    cause = cause.__context__
                if cause is None:
                    raise
                raise cause from None
    atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)
