"""What a run must not leave behind: the temp files it is writing, and the stores of runs that died.

Torch-free, below every other module (dense_store and atomic_files use it).

- A registry of the temp paths this process is writing (a dense feature store, a file being written
  atomically, a database folder being built): `register` when created, `forget` when renamed into
  place, removed normally, or kept on purpose (a store that a later run will continue from).
  `remove_registered` removes what is left. It is idempotent and may run again at any moment, also
  while another call is half way (a second Ctrl-C during the first one's cleanup): each path is tried
  once per call, and a path that is already gone is fine.
- Owner tags in the names of dense feature files (`owner_tag`: process id, boot id and host), so that
  a store whose process is gone can be told from one that is still being written (`find_dead_stores`),
  and `process_state` for what a process of this machine is doing (running, stopped, gone).
"""

import glob
import hashlib
import os
import re
import shutil
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

# ------------------------------------------------------------------------------------------------
# The registry of temp paths
# ------------------------------------------------------------------------------------------------

FILE, TREE, EMPTY_FOLDER = "file", "tree", "empty folder"

# path -> (kind, id of the process that registered it). A forked child (a DataLoader worker) inherits a
# copy of the registry: it must never remove its parent's files, hence the process id.
_registered: Dict[str, Tuple[str, int]] = {}


def register(path: str, *, kind: str = FILE) -> None:
    """Remove `path` if this process ends before forget(path): a FILE, a TREE (a folder and everything
    in it) or an EMPTY_FOLDER (removed only if nothing else was put in it)."""
    if kind not in (FILE, TREE, EMPTY_FOLDER):
        raise ValueError(f"leftovers.register: unknown kind {kind!r}")
    _registered[os.path.abspath(path)] = (kind, os.getpid())


def forget(path: str) -> None:
    """`path` was renamed into place, removed, or is to be kept: remove_registered leaves it alone."""
    _registered.pop(os.path.abspath(path), None)


def registered() -> List[str]:
    """The paths this process would remove, in registration order."""
    pid = os.getpid()
    return [path for path, (_, owner) in list(_registered.items()) if owner == pid]


def remove_registered() -> List[str]:
    """Remove every path this process registered and has not forgotten: files and trees first, then
    the empty folders (newest first, so that a folder's subfolders go before it). Returns the paths
    that are still there afterwards (a folder someone else wrote into, or one that could not be
    removed). Never raises for a path that is already gone."""
    pid = os.getpid()
    entries = [(path, kind) for path, (kind, owner) in list(_registered.items()) if owner == pid]
    remaining = []
    for path, kind in [e for e in entries if e[1] != EMPTY_FOLDER] + [
        e for e in reversed(entries) if e[1] == EMPTY_FOLDER
    ]:
        try:
            if kind == FILE:
                os.remove(path)
            elif kind == TREE:
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            if os.path.lexists(path):
                remaining.append(path)
                continue
        _registered.pop(path, None)
    return remaining


# ------------------------------------------------------------------------------------------------
# Who wrote a file: owner tags
# ------------------------------------------------------------------------------------------------


def _boot_id() -> str:
    """The first 8 hex digits of this boot's id (Linux), or 8 zeros: a process id is only unique
    within one boot of one machine."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            digits = re.sub(r"[^0-9a-f]", "", f.read().lower())
    except OSError:
        digits = ""
    return (digits + "0" * 8)[:8]


def _host_id() -> str:
    """8 hex digits of a hash of the host name (host names may hold characters a file name should not)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Owner:
    """The process that wrote a file: its id, its machine's boot id and host id (8 hex digits each)."""

    pid: int
    boot: str
    host: str

    @property
    def tag(self) -> str:
        return f"{self.pid}_{self.boot}_{self.host}"

    def on_this_machine(self) -> bool:
        return self.host == _host_id()

    def alive(self) -> Optional[bool]:
        """Whether the process still runs: None when it ran on another machine (nothing to check)."""
        if not self.on_this_machine():
            return None
        if self.boot != _boot_id():
            return False  # the machine was restarted since
        return process_state(self.pid) not in (None, "Z")


def this_process() -> Owner:
    return Owner(pid=os.getpid(), boot=_boot_id(), host=_host_id())


def owner_tag() -> str:
    """This process's tag, for the names of the files it owns: "<pid>_<boot id>_<host id>"."""
    return this_process().tag


_TAGGED = re.compile(r"(\d+)_([0-9a-f]{8})_([0-9a-f]{8})_")


def owner_of(name: str, *, prefix: str) -> Optional[Owner]:
    """The owner recorded in a file name `prefix` + owner_tag() + "_..." (None for other names, e.g.
    the untagged names of earlier versions)."""
    base = os.path.basename(name)
    if not base.startswith(prefix):
        return None
    match = _TAGGED.match(base, len(prefix))
    if match is None:
        return None
    return Owner(pid=int(match.group(1)), boot=match.group(2), host=match.group(3))


def process_state(pid: int) -> Optional[str]:
    """A process of this machine: None when there is none with this id, else the one-letter state of
    /proc/<pid>/stat ("R" running, "S" sleeping, "D" waiting for the disk, "T" stopped, "t" held by a
    debugger, "Z" ended but not yet collected by its parent), or "?" where /proc is not available."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]  # the name in brackets may hold spaces
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        pass
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return None
    return "?"


# ------------------------------------------------------------------------------------------------
# Stores that a dead run left
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadStore:
    """Dense feature files in `folder` whose process is gone (killed with SIGKILL, a crash, a reboot)."""

    folder: str
    files: Tuple[str, ...]
    nbytes: int
    pids: Tuple[int, ...]


def find_dead_stores(pattern: str, *, prefix: str) -> List[DeadStore]:
    """The folders matching the glob `pattern` that hold files named prefix + owner tag + ... whose
    process is gone, with their total size. Files of another machine (their process cannot be checked)
    and untagged files are not reported."""
    found: Dict[str, List[Tuple[str, int, int]]] = {}
    for folder in sorted(glob.glob(pattern)):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            owner = owner_of(name, prefix=prefix)
            if owner is None or owner.alive() is not False:
                continue
            path = os.path.join(folder, name)
            try:
                size = os.path.getsize(path)
            except OSError:  # removed meanwhile
                continue
            found.setdefault(folder, []).append((path, size, owner.pid))
    return [
        DeadStore(
            folder=folder,
            files=tuple(p for p, _, _ in entries),
            nbytes=sum(s for _, s, _ in entries),
            pids=tuple(sorted({pid for _, _, pid in entries})),
        )
        for folder, entries in found.items()
    ]


def human_size(nbytes: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
