"""What makes two runs comparable: fingerprints of weights, image lists and result-changing settings.

Three places ask "is this the same weights, the same images, the same flags?" and answer with this
module: a saved database (retrieval.Database: refused when the model or the images changed since it
was saved), reproduce.py's results cache (an evaluation is reused only under the same key) and
eval.py --continue_run (an interrupted run is continued only with what it started with).

An identity is a plain JSON-able dict; `differences(saved, now)` says in words what changed between two.
Its entries, each optional:
    weights_sha256  the model's state dict (weights_sha256: bit-identical weights, wherever they came from)
    checkpoint      a weight file's contents (file_fingerprint: the same file copied or touched keeps it)
    images          an image list (ImageList.fingerprint: names relative to a root, sizes, mtimes)
    settings        a dict of result-changing settings, compared entry by entry
and any other entry, compared as a whole.
"""

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (every key, dtype, shape and the raw bytes, in key order).

    Equal fingerprints mean bit-identical weights, whatever file they came from or device they are on.
    """
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 included)
    return h.hexdigest()


def file_fingerprint(path: str) -> dict:
    """SHA-256 of a file's contents, and its size: another file gets another fingerprint, the same one
    copied, moved or touched keeps it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "size": os.path.getsize(path)}


def content_sha256(path: str) -> str:
    """SHA-256 of a small file's contents (a key list)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass(frozen=True)
class ImageList:
    """Image files as a run read them: names relative to a root (in the run's order), sizes and
    modification times. A name carries what the run reads from it besides the pixels (the UTM
    coordinates of the benchmark layout), a size or modification time that changed means the pixels
    may have."""

    names: Tuple[str, ...]
    sizes: Tuple[int, ...]
    mtimes_ns: Tuple[int, ...]

    @classmethod
    def of(cls, paths: Sequence[str], root: str) -> "ImageList":
        """The files `paths` (one stat each), named relative to `root`."""
        stats = [os.stat(p) for p in paths]
        return cls(
            names=tuple(os.path.relpath(p, root) for p in paths),
            sizes=tuple(st.st_size for st in stats),
            mtimes_ns=tuple(st.st_mtime_ns for st in stats),
        )

    # --- the full list (a saved database's manifest: it names what was added or deleted) ---------

    def record(self) -> Dict[str, list]:
        """The list as a saved database's manifest keeps it (version 1 entries)."""
        return {"images": list(self.names), "image_sizes": list(self.sizes), "image_mtimes_ns": list(self.mtimes_ns)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "ImageList":
        """The inverse of record() (sizes and modification times may be missing in a hand-made one)."""
        names = tuple(record["images"])
        sizes = tuple(record.get("image_sizes") or [None] * len(names))
        mtimes = tuple(record.get("image_mtimes_ns") or [None] * len(names))
        return cls(names=names, sizes=sizes, mtimes_ns=mtimes)

    def changes_since(self, saved: "ImageList", *, check_mtimes: bool = True) -> List[str]:
        """What differs between the `saved` list and this one (now): added, deleted and modified images
        (another size, or with check_mtimes another modification time where saved knows it), each with
        a few example names; [] when nothing changed. check_mtimes is off for a moved copy of the
        images (cp without -p gives new modification times without any change)."""
        now = {name: (size, mtime) for name, size, mtime in zip(self.names, self.sizes, self.mtimes_ns)}
        before = {name: (size, mtime) for name, size, mtime in zip(saved.names, saved.sizes, saved.mtimes_ns)}
        added = [name for name in self.names if name not in before]
        deleted = [name for name in saved.names if name not in now]
        modified = [
            name
            for name in saved.names
            if name in now
            and (
                now[name][0] != before[name][0]
                or (check_mtimes and before[name][1] is not None and now[name][1] != before[name][1])
            )
        ]
        changes = [
            f"{len(names)} {what} ({_some(names)})"
            for what, names in (("added", added), ("deleted", deleted), ("modified", modified))
            if names
        ]
        if not changes and list(self.names) != list(saved.names):
            changes.append("the images are listed in another order")
        return changes

    # --- the compact fingerprint (a results cache, a run record: the counts say what changed) ----

    def counts(self) -> Dict[str, int]:
        """Images per top-level sub-folder of the root ("." for files directly in it)."""
        counts: Dict[str, int] = {}
        for name in self.names:
            top = name.split(os.sep)[0] if os.sep in name else "."
            counts[top] = counts.get(top, 0) + 1
        return counts

    def fingerprint(self) -> Dict[str, Any]:
        """{"sha256": over every image's name, size and modification time in order, "counts": counts()}."""
        h = hashlib.sha256()
        for name, size, mtime in zip(self.names, self.sizes, self.mtimes_ns):
            h.update(f"{name}\0{size}\0{mtime}\n".encode())
        return {"sha256": h.hexdigest(), "counts": self.counts()}


def _some(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


# ------------------------------------------------------------------------------------------------
# Differences in words
# ------------------------------------------------------------------------------------------------

# Entries whose difference has a phrase of its own (the others: "name: old saved, new now").
_CHANGED = {
    "checkpoint": "the checkpoint changed (other contents)",
    "query_keys_sha256": "the query key file changed (other contents)",
}


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> List[str]:
    """Every entry of the identity `now` that differs in `saved`, in words, in `now`'s order; [] when
    they agree. `settings` dicts are compared entry by entry."""
    out: List[str] = []
    for key, value in now.items():
        old = saved.get(key)
        if old == value:
            continue
        if key == "settings" and isinstance(old, Mapping) and isinstance(value, Mapping):
            out += differences(old, value)
        elif key == "weights_sha256":
            out.append(f"the model weights differ (fingerprint {str(old)[:12]}… saved, {str(value)[:12]}… now)")
        elif key == "images":
            out.append(_images_changed(old, value))
        elif key in _CHANGED:
            out.append(_CHANGED[key])
        else:
            out.append(f"{key}: {old!r} saved, {value!r} now")
    return out


def _images_changed(old: Any, now: Mapping[str, Any]) -> str:
    before = old.get("counts") if isinstance(old, Mapping) else None
    counts = now.get("counts") or {}
    if before is None:
        return "the images changed (the earlier record has no image list: an older file)"
    if before == counts:
        return "the images changed (same numbers; names, sizes or modification times differ)"
    changed = ", ".join(
        f"{name}: {before.get(name, 0)} -> {counts.get(name, 0)} images"
        for name in sorted(set(before) | set(counts))
        if before.get(name) != counts.get(name)
    )
    return f"the images changed ({changed})"
