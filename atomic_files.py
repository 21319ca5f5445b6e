"""Atomic file writes with ordinary permissions: the project's one way to write an output file.

Torch-free (the picture tools and the synthetic data set use it too). A file is written under a hidden
temp name beside its destination, flushed to disk, then renamed over it, and the folder is synced so that
the rename itself survives a power loss: a crash or a kill at any moment leaves either the old file or
the new one, never half a file, and a failure leaves no temp file behind. Only SIGKILL or a power loss
can leave a temp file; a later run that writes the same files removes those (remove_stale_temp_files).
New files get the permissions of any ordinary new file (0o666 less the umask), so colleagues on a
shared server can read outputs as usual (tempfile.mkstemp would make them owner-only).
"""

import errno
import os
import re
import secrets
import time
from typing import Callable, List, Sequence, Tuple

import leftovers

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale temp files are then left alone
    fcntl = None

#: A temp file younger than this is never taken for stale, even unlocked: its writer may be between
#: creating it and locking it.
STALE_AFTER_S = 60.0


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


def sync_folder(folder: str) -> None:
    """fsync a folder, so that the renames and new names in it are on disk (a rename is a change of the
    folder, not of the file). Where folders cannot be opened (Windows) or synced (some network file
    systems answer EINVAL), nothing more can be done and nothing is raised."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _lock(fd: int, *, blocking: bool) -> bool:
    """An exclusive advisory lock on an open file (held until it is closed or its process dies): how a
    temp file being written is told from one left by a killed writer. False when it is held elsewhere."""
    if fcntl is None:
        return blocking
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EINVAL, errno.ENOTSUP):  # a file system without locks
            return blocking
        raise
    return True


def temp_name_pattern(name: str) -> "re.Pattern":
    """The names atomic_write gives the temp files of `name`: `.<name>.<12 hex digits>.tmp`."""
    return re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(temp_path) for a temp file beside `path` (its folder is created if missing), then
    rename it over `path` and sync the folder. A full disk is reported naming `path`.

    The temp file stays locked (flock) until it is renamed or removed, so that a later run tells it from
    a temp file whose writer was killed (remove_stale_temp_files)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = create_unique_file(folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    # Registered, so that a run stopped at once (a second Ctrl-C during the cleanup) still removes it.
    leftovers.register(tmp)
    try:
        _lock(fd, blocking=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        leftovers.forget(tmp)
        sync_folder(folder)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        leftovers.forget(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not e.filename:
            # Name the file in the message (a write() on an open file does not).
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from e
        raise
    finally:
        os.close(fd)  # releases the lock, after the rename


def remove_stale_temp_files(folder: str, names: Sequence[str], *, stale_after_s: float = STALE_AFTER_S) -> List[str]:
    """Remove the temp files that atomic_write left in `folder` for the files `names` when its process was
    killed (SIGKILL, power loss) while writing: those that no live writer holds locked and that are older
    than `stale_after_s`. Returns the removed paths. A missing folder has none; without file locks
    (Windows) nothing is removed, since a writer at work could not be told from a dead one."""
    if fcntl is None or not os.path.isdir(folder):
        return []
    patterns = [temp_name_pattern(name) for name in names]
    removed = []
    now = time.time()
    for entry in sorted(os.listdir(folder)):
        if not any(p.fullmatch(entry) for p in patterns):
            continue
        path = os.path.join(folder, entry)
        try:
            # Opened for writing: on NFS, flock is emulated by a POSIX write lock, which needs it.
            fd = os.open(path, os.O_RDWR)
        except (FileNotFoundError, PermissionError):  # renamed or removed by its writer meanwhile; not ours
            continue
        try:
            if now - os.fstat(fd).st_mtime < stale_after_s or not _lock(fd, blocking=False):
                continue
            # Still the same file under that name (not renamed away while we looked), and ours now.
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                os.remove(path)
                removed.append(path)
        finally:
            os.close(fd)
    if removed:
        sync_folder(folder)
    return removed


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
