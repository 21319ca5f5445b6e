"""Dense local features of a list of images, kept in RAM or in one raw float32 file on disk.

`--efficient_ram_testing` is this choice and nothing else: both stores return the same arrays, so the
results are the same; on disk, RAM holds only the features in use.
"""

import os
import shutil
from typing import List, Optional

import numpy as np

import atomic_files
import leftovers

# Positional reads into a caller's buffer (Linux, macOS 11+); elsewhere os.pread and one more copy.
_PREADV = hasattr(os, "preadv")


class DenseStore:
    """Dense local features of a list of images, in RAM or in one raw float32 file on disk.

    append((B, h, w, C) array) in image order; store[i] -> (h, w, C) float32 array. Sizes may differ
    between images (single_query). On disk (`folder` given), features are appended to a fresh temp file
    and read back with positional reads (os.pread): unlike a memory map, whose touched pages stay counted
    in the process's resident memory, RAM then holds only the features in use, whatever the data set size.
    """

    # The two files of a saved store (a saved retrieval database keeps its dense features so).
    FEATURES_FILE = "dense_features.f32"
    SHAPES_FILE = "dense_shapes.npy"
    # A temp store's file: FILE_PREFIX + owner tag + "_" + random hex + ".f32".
    FILE_PREFIX = "dense_"

    def __init__(self, folder: Optional[str] = None) -> None:
        self.folder = folder
        self.shapes: List[tuple] = []
        self.offsets: List[int] = []  # in float32 elements
        self._arrays: List[np.ndarray] = []
        self._size = 0
        self._writer = None
        self._fd: Optional[int] = None
        self._owns_file = folder is not None
        self.path: Optional[str] = None
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            # The store belongs to this run alone (a fresh temp file, removed by close()): an interrupted
            # run leaves nothing that a later run could mistake for complete features. The name records
            # the owning process (leftovers.owner_tag), so that a store whose process was killed can be
            # found and reported (find_dead_stores); the registry removes it even when this process is
            # stopped at once (a second Ctrl-C during the cleanup).
            fd, self.path = atomic_files.create_unique_file(
                folder, prefix=f"{self.FILE_PREFIX}{leftovers.owner_tag()}_", suffix=".f32"
            )
            leftovers.register(self.path)
            self._writer = os.fdopen(fd, "wb")

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def append(self, features: np.ndarray) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)
        for f in features:
            self.shapes.append(f.shape)
            self.offsets.append(self._size)
            self._size += f.size
            if self._writer is not None:
                self._writer.write(f.tobytes())
            else:
                self._arrays.append(f)

    def finish(self) -> "DenseStore":
        """Close the writing side; from now on reads come from the file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        """Image i's features (h, w, C) float32: the stored array itself in RAM (no copy), a fresh array
        read from the file on disk."""
        i = int(i)
        if not self.on_disk:
            return self._arrays[i]
        out = np.empty(self.feature_shape(i), dtype=np.float32)
        self.read_into(i, out)
        return out

    def feature_shape(self, i: int) -> tuple:
        """The shape of image i's features, without reading them."""
        return tuple(self.shapes[int(i)])

    def read_into(self, i: int, out: np.ndarray) -> None:
        """Copy image i's features into `out`, a writable C-contiguous float32 array of its shape: the one
        copy a reader needs (the re-rank engine's staging buffers, which may be page-locked). On disk the
        positional read writes straight into `out` (os.preadv; where the platform lacks it, os.pread and
        a second copy)."""
        i = int(i)
        shape = self.feature_shape(i)
        if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(
                f"DenseStore.read_into: image {i} needs a writable C-contiguous float32 array of shape "
                f"{shape}, got {out.dtype} {out.shape}"
            )
        if not self.on_disk:
            np.copyto(out, self._arrays[i])
            return
        if self._fd is None:
            raise RuntimeError("DenseStore: call finish() before reading an on-disk store")
        target = memoryview(out).cast("B")
        offset, done = self.offsets[i] * 4, 0
        while done < len(target):  # a positional read may return fewer bytes than asked; it continues
            if _PREADV:
                got = os.preadv(self._fd, [target[done:]], offset + done)
            else:
                data = os.pread(self._fd, len(target) - done, offset + done)
                got = len(data)
                target[done : done + got] = data
            if got == 0:
                raise ValueError(
                    f"dense features file {self.path} is shorter than expected (image {i}): it was "
                    "truncated; extract the features again"
                )
            done += got

    def nbytes(self) -> int:
        return self._size * 4

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._arrays = []
        if self._owns_file and self.path:
            if os.path.exists(self.path):
                os.remove(self.path)
            leftovers.forget(self.path)

    def save(self, folder: str) -> None:
        """Write the features into `folder`: FEATURES_FILE holds every image's (h, w, C) float32 values
        in image order (raw, native byte order), SHAPES_FILE the (N, 3) int64 shapes.

        Each file goes to a temp name and is renamed into place. An on-disk store's file is hard-linked
        when the file system allows it (no copy of what may be many GB), else copied. Publishing the
        folder as a whole atomically is the caller's job (retrieval.Database.save builds it in a temp
        folder). The store must be finish()ed first.
        """
        if self._writer is not None:
            raise ValueError("DenseStore.save: call finish() before saving (the store is still being written)")
        if any(len(s) != 3 for s in self.shapes):
            raise ValueError("DenseStore.save: only (h, w, C) features can be saved")
        os.makedirs(folder, exist_ok=True)

        def write_features(tmp: str) -> None:
            if self.on_disk:
                os.remove(tmp)
                try:
                    os.link(self.path, tmp)
                    # A link shares the store file's inode, whose mode was set when the store was
                    # created: give it the permissions a new file would get now.
                    os.chmod(tmp, 0o666 & ~atomic_files.current_umask())
                except OSError:  # another file system, or links not supported
                    shutil.copyfile(self.path, tmp)
                return
            with open(tmp, "wb") as f:
                for i in range(len(self)):
                    f.write(np.ascontiguousarray(self[i], dtype=np.float32).tobytes())

        def write_shapes(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(self.shapes, dtype=np.int64).reshape(-1, 3))

        for name, write in ((self.FEATURES_FILE, write_features), (self.SHAPES_FILE, write_shapes)):
            atomic_files.atomic_write(os.path.join(folder, name), write)

    @classmethod
    def load(cls, folder: str) -> "DenseStore":
        """A read-only on-disk store over the files that save() wrote in `folder`; close() leaves the
        files alone."""
        features_path = os.path.join(folder, cls.FEATURES_FILE)
        shapes_path = os.path.join(folder, cls.SHAPES_FILE)
        for path in (features_path, shapes_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"dense features file {path} is missing: the saved database is incomplete; save it again"
                )
        shapes = np.load(shapes_path, allow_pickle=False)
        if shapes.ndim != 2 or shapes.shape[1] != 3 or (shapes.size and shapes.min() < 1):
            raise ValueError(
                f"{shapes_path} does not hold (N, 3) positive shapes: the saved database is damaged; save it again"
            )
        sizes = shapes.prod(axis=1).astype(np.int64)
        total = int(sizes.sum())
        if os.path.getsize(features_path) != total * 4:
            raise ValueError(
                f"{features_path} has {os.path.getsize(features_path)} bytes, the shapes in "
                f"{shapes_path} need {total * 4}: the saved database is truncated or damaged; "
                "save it again"
            )
        store = cls(None)
        store.path, store._owns_file = features_path, False
        store.shapes = [tuple(int(v) for v in s) for s in shapes]
        store.offsets = [int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]])] if len(sizes) else []
        store._size = total
        store._fd = os.open(features_path, os.O_RDONLY)
        return store


def estimated_bytes(images_num: int, feature_shape, *, element_size: int = 4) -> int:
    """Bytes that the dense features of `images_num` images of shape (h, w, C) take in a store with
    `element_size` bytes per value (4: float32, this store's): for the free-space check before a run."""
    return int(images_num) * int(np.prod([int(v) for v in feature_shape])) * int(element_size)


def remove_empty_folder(folder: str) -> None:
    """Remove `folder` if it exists and is empty (a store's folder once its files are gone)."""
    try:
        os.rmdir(folder)
    except OSError:  # not empty (something else lives there), or already gone
        pass
