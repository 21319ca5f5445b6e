"""Atomic file writes with ordinary permissions: the project's one way to write an output file.

Torch-free (the picture tools and the synthetic data set use it too). A file is written under a hidden
temp name beside its destination, flushed to disk, then renamed over it: a crash or a kill at any moment
leaves either the old file or the new one, never half a file, and a failure leaves no temp file behind.
New files get the permissions of any ordinary new file (0o666 less the umask), so colleagues on a
shared server can read outputs as usual (tempfile.mkstemp would make them owner-only).
"""

import errno
import os
import secrets
from typing import Callable, Tuple

import leftovers


def current_umask() -> int:
    """The process's umask (read by setting it and putting it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_folder_mode() -> int:
    """Permissions os.makedirs would give a new folder: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def create_unique_file(folder: str, *, prefix: str, suffix: str) -> Tuple[int, str]:
    """A new, uniquely named file in `folder`, open for writing: (file descriptor, path).

    Created with O_EXCL and mode 0o666, which the umask filters as for any ordinary new file.
    """
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"could not create a new temporary file in {folder}")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(temp_path) for a temp file beside `path` (its folder is created if missing), then
    rename it over `path`. A full disk is reported naming `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = create_unique_file(folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    # Registered, so that a run stopped at once (a second Ctrl-C during the cleanup) still removes it.
    leftovers.register(tmp)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        leftovers.forget(tmp)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        leftovers.forget(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not e.filename:
            # Name the file in the message (a write() on an open file does not).
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from e
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
