"""Shared plumbing: logging, seeding and random states, device choice, atomic writes, clean exits."""
import logging
import os
import random
import sys
import tempfile
import traceback
from typing import Callable, Optional

import numpy as np
import torch

LOG_FORMAT = "%(asctime)s   %(message)s"


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


def run_main(main: Callable, args) -> None:
    """Run an entry script's main: user errors become one clear message and exit code 2; unexpected
    errors are logged with their traceback (debug.log) and exit 1."""
    try:
        main(args)
    except KeyboardInterrupt:
        logging.error("Interrupted by the user.")
        sys.exit(130)
    except (ValueError, OSError) as e:  # UserError, bad files, disk full, ...
        logging.debug("".join(traceback.format_exception(e)))
        message = f"error: {e}"
        if logging.getLogger().handlers:
            logging.error(message)
        else:
            print(message, file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a bug: keep the traceback
        logging.error("Unexpected error:\n" + "".join(traceback.format_exception(e)))
        sys.exit(1)


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
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)
