"""Bringing each candidate's dense features to the engine's device with at most one host copy.

A candidate is copied on the host only where it has to be:
- a disk store (dense_store.DenseStore on disk): one positional read, straight into a staging buffer;
- a store in RAM: on the CPU none (the engine reads the stored array itself, which it never writes);
  for a GPU one copy into a staging buffer (the read), from which the transfer runs;
- any other store (a numpy array or memmap, a torch tensor): none where its item already is float32
  on the right device (writable, for numpy), else one copy into a staging buffer (with the float32
  conversion the public release does).
Staging buffers are reused: on a CUDA device they are page-locked (so the host-to-device copy runs
asynchronously, non_blocking) and a buffer is refilled only after the CUDA event recorded behind its
copy says the copy is done; there are at most `buffers` of them (a few chunks) and reader threads fill
the next ones while the device works. On the CPU the same code runs with plain buffers and no events:
a buffer is the candidate's tensor itself, refilled once the caller says (release) that the engine is
done with that candidate, and the reads run in the calling thread.
"""

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


def _new_event(device: torch.device):
    """An event to record behind a copy to `device`: a CUDA event, or None where copies are
    synchronous (a test replaces this to run the device path with fake events)."""
    return torch.cuda.Event() if device.type == "cuda" else None


def _record(event, device: torch.device) -> None:
    """Record `event` on the stream that runs copies to `device` (the current stream of that device)."""
    event.record(torch.cuda.current_stream(device))


class _Slot:
    """A staging buffer: host float32 storage (page-locked for CUDA), and what guards its reuse: the
    event behind its last transfer (a device) or the candidate whose tensor it is (the CPU)."""

    def __init__(self, numel: int, pin: bool):
        self.host = torch.empty(numel, dtype=torch.float32, pin_memory=pin)
        self.event = None
        self.owner: Optional[int] = None
        self.pin = pin

    def view(self, shape: Tuple[int, int]) -> torch.Tensor:
        numel = shape[0] * shape[1]
        if self.host.numel() < numel:  # a larger candidate than before: a larger buffer
            self.host = torch.empty(numel, dtype=torch.float32, pin_memory=self.pin)
        return self.host[:numel].view(shape)

    def reusable(self) -> bool:
        return self.owner is None and (self.event is None or self.event.query())


class CandidateStager:
    """Iterate over the candidates `indices` of `store` as float32 (L, C) tensors on `device`, in order
    (see the module doc). Use as a context manager (close() stops the reader threads); call
    release(k) once the engine's result for the k-th candidate is in.

    buffers: at most this many staging buffers on a device (ignored on the CPU, where the engine's
    chunks in flight bound them); readers: threads that fill buffers ahead (0: in the calling thread).
    Errors name the candidate: ValueError for an index the store does not hold."""

    def __init__(self, store: Any, indices: Sequence[int], device: torch.device, *, buffers: int, readers: int):
        self.store = store
        self.indices = [int(i) for i in indices]
        self.device = torch.device(device)
        self.on_cpu = self.device.type == "cpu"
        self.buffers = max(2, int(buffers))
        self.pin = self.device.type == "cuda"
        self.slots: List[_Slot] = []
        self.free: Deque[_Slot] = deque()
        self.by_owner: Dict[int, _Slot] = {}
        self.pool = ThreadPoolExecutor(max_workers=readers) if readers > 0 and not self.on_cpu else None

    def __enter__(self) -> "CandidateStager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)  # nothing may still write into a buffer
            self.pool = None

    def release(self, k: int) -> None:
        """The engine is done with candidate k: on the CPU its buffer (if it had one) may be refilled."""
        slot = self.by_owner.pop(k, None)
        if slot is not None:
            slot.owner = None

    # --------------------------------------------------------------------------------------------
    def __iter__(self):
        pending: Deque = deque()  # scheduled, not yet delivered: (k, shape, slot, future | tensor)
        ahead = 0
        for k in range(len(self.indices)):
            while ahead < len(self.indices) and (
                ahead == k or (self.pool is not None and len(pending) < self.buffers - 1 and self._room())
            ):
                pending.append(self._schedule(ahead))
                ahead += 1
            yield self._deliver(*pending.popleft())

    def _room(self) -> bool:
        """Is a buffer available without waiting?"""
        return len(self.slots) < self.buffers or any(s.reusable() for s in self.free)

    def _acquire(self) -> _Slot:
        """A buffer that may be (re)filled now: a reusable one, a new one (on the CPU always allowed: the
        caller's release() bounds how many are in use), or the oldest one once its copy is done."""
        for slot in self.free:
            if slot.reusable():
                self.free.remove(slot)
                return slot
        if self.on_cpu or len(self.slots) < self.buffers:
            slot = _Slot(0, self.pin)
            self.slots.append(slot)
            return slot
        slot = self.free.popleft()  # every buffer is in flight: wait for the oldest copy
        slot.event.synchronize()
        return slot

    def _schedule(self, k: int):
        """Find candidate k's features; start the one host copy into a buffer if one is needed."""
        shape, fill, ready = self._source(k)
        if ready is not None:
            return k, shape, None, ready
        slot = self._acquire()
        out = slot.view(shape)
        if self.pool is not None:
            return k, shape, slot, self.pool.submit(fill, out)
        fill(out)
        return k, shape, slot, None

    def _deliver(self, k: int, shape, slot: Optional[_Slot], work) -> torch.Tensor:
        if slot is None:
            return work
        if isinstance(work, Future):
            work.result()  # the read's error, if any, surfaces here, in order
        host = slot.view(shape)
        if self.on_cpu:
            slot.owner = k
            self.by_owner[k] = slot
            self.free.append(slot)
            return host
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        event = _new_event(self.device)
        out.copy_(host, non_blocking=event is not None)
        if event is not None:
            _record(event, self.device)
        slot.event = event
        self.free.append(slot)
        return out

    def _source(self, k: int):
        """(shape (L, C), a function that copies candidate k's features into a host buffer view, or
        the finished tensor when no copy is needed)."""
        index, store = self.indices[k], self.store
        name = f"database_store[{index}]"
        try:
            if hasattr(store, "read_into") and hasattr(store, "feature_shape"):
                stored = tuple(store.feature_shape(index))
                shape = _matrix_shape(stored, name)
                if not (self.on_cpu and not getattr(store, "on_disk", True)):
                    return shape, lambda out: store.read_into(index, out.numpy().reshape(stored)), None
            item = store[index]  # in RAM on the CPU: the stored array itself, used in place below
        except (IndexError, KeyError) as err:
            raise ValueError(
                f"candidate_indices[{k}] = {index} is not in the database store ({err}); check the retrieval step."
            ) from err
        if isinstance(item, torch.Tensor):
            shape = _matrix_shape(tuple(item.shape), name)
            t = item.detach().reshape(shape)
            if t.device == self.device:
                return shape, None, t.float().contiguous()
            if t.device.type == "cpu" and not self.on_cpu:
                if self.pin and t.is_pinned() and t.dtype == torch.float32 and t.is_contiguous():
                    return shape, None, t.to(self.device, non_blocking=True)  # page-locked already
                return shape, lambda out: out.copy_(t), None
            return shape, None, t.to(self.device).float().contiguous()
        array = item if isinstance(item, np.ndarray) else np.asarray(item)
        shape = _matrix_shape(array.shape, name)
        if self.on_cpu and array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable:
            return shape, None, torch.from_numpy(array).view(shape)
        # float32 conversion as the public release's torch.Tensor(array); read-only arrays (memory maps)
        # are copied too: torch does not take non-writable memory.
        return shape, lambda out: np.copyto(out.numpy(), array.reshape(shape), casting="unsafe"), None


def _matrix_shape(shape: Tuple[int, ...], name: str) -> Tuple[int, int]:
    """(L, C) of (L, C) or (h, w, C) features, with the error the engine gives for anything else."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        shape = (shape[0] * shape[1], shape[2])
    if len(shape) != 2:
        raise ValueError(
            f"{name}: dense local features must be (L, C) or (h, w, C), got shape {shape}; pass one image's features."
        )
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name}: dense local features are empty (shape {shape}); check the feature extraction.")
    return shape
