"""Several processes, one job: the collectives and the sharding of torchrun / DistributedDataParallel.

The process group itself is joined by commons.start_run (from torchrun's RANK / WORLD_SIZE /
LOCAL_RANK, WORLD_SIZE > 1), which hands the scripts a `Context`. `python3 train.py ...` and
`python3 eval.py ...` stay single processes: no process group, and every `Context` method is then the
identity (the numbers are those of a plain run, bit for bit). Several processes:

- extraction is sharded: rank r takes a contiguous slice of the requested images, whole extraction
  batches (`shard_bounds`), so that each batch is one of a single process's;
  global descriptors are all-gathered, dense features are streamed to rank 0 in chunks, so rank 0
  holds the whole set in its own DenseStore (RAM, or its own disk with --efficient_ram_testing)
  (`extract_sharded`);
- training splits each global batch of --train_batch_size queries across ranks (`BatchShardSampler`,
  `Context.training_loader`); DDP averages gradients over ranks while the loss of a rank is its share
  of a sum divided by the GLOBAL train_batch_size * negs, so the caller multiplies its loss by
  world_size before backward and the update equals the single-process one; mined triplets and
  whole-batch flips are rank 0's, augmentations are drawn per rank (`reseed_augmentations`);
- rank 0 alone searches, re-ranks, validates and writes checkpoints; the others wait for it on a
  separate gloo group with a long timeout (`wait_for_main`, `broadcast_object(..., long_wait=True)`),
  since rank 0's work alone (re-ranking a large set) may last long.

This module holds no logging set-up, seeding or error handling (commons does): a rank's exception
ends that process (commons.run_main), and a peer's death makes the collectives here fail.
"""

import os
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

# Dense features travel to rank 0 in chunks of at most this size (one image at least).
CHUNK_BYTES = 64 * 2**20


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------


def shard_bounds(items_num: int, world_size: int, rank: int, *, multiple: int = 1) -> Tuple[int, int]:
    """[start, stop) of rank's contiguous share of items_num items, made of whole blocks of `multiple`
    items (the last block of all may be shorter): the blocks are spread as evenly as possible, the
    first (blocks % world_size) ranks getting one more, so rank 0's share is never empty while there is
    an item (ranks after the last block get none).

    Extraction passes its batch size as `multiple`: every share then starts at a batch boundary and its
    batches are exactly those of a one-process run (cuBLAS and cuDNN choose their kernels by batch
    size, so a batch of other images or of another size could round differently)."""
    if world_size < 1 or not 0 <= rank < world_size or items_num < 0 or multiple < 1:
        raise ValueError(
            f"shard_bounds: bad sizes (items {items_num}, world size {world_size}, rank {rank}, multiple {multiple})"
        )
    blocks = -(-items_num // multiple)
    base, extra = divmod(blocks, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)
    return min(first * multiple, items_num), min(last * multiple, items_num)


def shard_counts(items_num: int, world_size: int, *, multiple: int = 1) -> List[int]:
    """Number of items of every rank's share (shard_bounds), (world_size,)."""
    return [
        stop - start
        for start, stop in (shard_bounds(items_num, world_size, r, multiple=multiple) for r in range(world_size))
    ]


def chunk_plan(sizes: Sequence[int], max_elements: int) -> List[Tuple[int, int]]:
    """Consecutive [start, stop) groups of items whose sizes (in elements) sum to at most max_elements,
    one item at least per group. Sender and receiver compute the same plan from the same sizes."""
    groups, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > max_elements:
            groups.append((start, i))
            start, total = i, 0
        total += int(size)
    if start < len(sizes):
        groups.append((start, len(sizes)))
    return groups


def check_train_batch_size(train_batch_size: int, world_size: int) -> None:
    """Every rank needs at least one query of each global batch."""
    if train_batch_size < world_size:
        raise ValueError(
            f"--train_batch_size {train_batch_size} is smaller than the {world_size} processes: "
            "each process needs at least one query of every batch; raise --train_batch_size "
            "(it is the global batch, split across processes) or launch fewer processes "
            "(torchrun --nproc_per_node / --nnodes)"
        )


def augmentation_seed(seed: int, rank: int, epoch_num: int, loop_num: int) -> int:
    """Seed of rank's torch generator for one training loop (ranks other than 0 draw their own
    augmentations; a function of the position in training, so a resumed run draws the same)."""
    return int(
        np.random.SeedSequence([seed, rank, epoch_num, loop_num]).generate_state(1, dtype=np.uint64)[0] % (2**63)
    )


class BatchShardSampler(Sampler):
    """Batches of one rank: for each global batch b of batch_size consecutive samples (drop_last, no
    shuffling, as the single-process loader), the rank's contiguous share of it (shard_bounds)."""

    def __init__(self, *, samples_num: int, batch_size: int, rank: int, world_size: int) -> None:
        check_train_batch_size(batch_size, world_size)
        self.samples_num, self.batch_size = int(samples_num), int(batch_size)
        self.start, self.stop = shard_bounds(self.batch_size, world_size, rank)

    def __iter__(self):
        for b in range(len(self)):
            yield list(range(b * self.batch_size + self.start, b * self.batch_size + self.stop))

    def __len__(self) -> int:
        return self.samples_num // self.batch_size


# ------------------------------------------------------------------------------------------------
# The context of a run
# ------------------------------------------------------------------------------------------------


class Context:
    """Where this process stands in the job. Single process: rank 0 of 1, `enabled` False, and the
    collective methods return their input (or do nothing).

    output_folder: the run's output folder, rank 0's on every rank (commons.start_run sets it), or None.
    """

    def __init__(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        device: str = "cpu",
        backend: Optional[str] = None,
        wait_group: Any = None,
        output_folder: Optional[str] = None,
    ) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device  # the device of this rank's model ("cuda:LOCAL_RANK" under torchrun)
        self.output_folder = output_folder
        self.backend = backend
        self._wait_group = wait_group
        # NCCL moves only GPU tensors; gloo works on CPU tensors.
        self.comm_device = torch.device(device) if backend == "nccl" else torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return (
            f"Context(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
            f"device={self.device!r}, backend={self.backend!r})"
        )

    def store_folder(self) -> str:
        """Where this process keeps on-disk dense features (--efficient_ram_testing): dense_features/ of
        the run's output folder on rank 0; dense_features_rank<r>/ beside it on rank r, for its share
        until it is streamed to rank 0."""
        if self.output_folder is None:
            raise ValueError("Context.store_folder: the context has no output folder (commons.start_run sets it)")
        name = "dense_features" if self.is_main else f"dense_features_rank{self.rank}"
        return os.path.join(self.output_folder, name)

    # --- small collectives ------------------------------------------------------------------------

    def broadcast_object(self, obj: Any, *, long_wait: bool = False) -> Any:
        """Rank 0's `obj` on every rank (picklable). long_wait: the other ranks may wait for rank 0's
        work alone (validation, checkpoint) longer than the process-group timeout."""
        if not self.enabled:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, group=self._wait_group if long_wait else None)
        return holder[0]

    def gather_objects(self, obj: Any) -> List[Any]:
        """Every rank's `obj` (picklable, small), in rank order, on every rank; over the gloo wait group,
        so that no GPU is involved. Single process: [obj]."""
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._wait_group)
        return out

    def wait_for_main(self) -> None:
        """Barrier after work that rank 0 does alone (see broadcast_object's long_wait)."""
        if self.enabled:
            dist.barrier(group=self._wait_group)

    def sum_over_ranks(self, values: Sequence[float]) -> List[float]:
        """Element-wise sums of every rank's `values` (float64). Single process: [float(v) for v in values]."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    def sync_numpy_rng(self) -> None:
        """Give every rank rank 0's global NumPy generator state: mining then draws the same on all."""
        if self.enabled:
            np.random.set_state(self.broadcast_object(np.random.get_state()))

    def broadcast_array(self, array: np.ndarray) -> np.ndarray:
        """Rank 0's array on every rank (small arrays: mined triplets). Single process: np.asarray(array)
        (the same object for an array)."""
        return np.asarray(self.broadcast_object(np.asarray(array) if self.is_main else None))

    def broadcast_module(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers, in place, on every rank (e.g. after rank 0 loaded a file
        that the others cannot read)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if self.backend == "nccl" or tensor.device.type == "cpu":
                    dist.broadcast(tensor, src=0)
                else:
                    buffer = tensor.cpu()
                    dist.broadcast(buffer, src=0)
                    tensor.copy_(buffer)

    def flip_together(self, images: torch.Tensor) -> torch.Tensor:
        """Horizontal flip of the whole global batch or none: each rank draws as torchvision's
        RandomHorizontalFlip() does (one torch.rand(1) < 0.5, then flip(-1)), rank 0's draw decides for
        all. Single process: exactly RandomHorizontalFlip()(images)."""
        flip = bool(torch.rand(1) < 0.5)
        return images.flip(-1) if self.broadcast_object(flip) else images

    def reseed_augmentations(self, *, seed: int, epoch_num: int, loop_num: int) -> None:
        """Ranks other than 0 re-seed their torch generator per loop, so their queries' augmentations
        differ from rank 0's (rank 0 keeps the single-process stream); seed -1 leaves them alone."""
        if self.enabled and self.rank > 0 and seed != -1:
            torch.manual_seed(augmentation_seed(seed, self.rank, epoch_num, loop_num))

    # --- training ---------------------------------------------------------------------------------

    def training_loader(
        self, dataset: Dataset, *, batch_size: int, num_workers: int, collate_fn: Callable, pin_memory: bool
    ) -> DataLoader:
        """This rank's share of every global batch of `batch_size` consecutive samples (drop_last, no
        shuffling; `BatchShardSampler`). Single process: the batches of DataLoader(dataset, batch_size,
        shuffle=False, drop_last=True), drawing the same random numbers."""
        sampler = BatchShardSampler(
            samples_num=len(dataset), batch_size=batch_size, rank=self.rank, world_size=self.world_size
        )
        return DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory
        )

    # --- models -----------------------------------------------------------------------------------

    def wrap_model(self, model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module:
        """DistributedDataParallel over the model's trainable parameters (frozen ones are not synced);
        the model itself when single."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if str(self.device).startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)

    # --- sharded extraction -----------------------------------------------------------------------

    def gather_rows(self, local: Optional[np.ndarray], counts: Sequence[int]) -> np.ndarray:
        """All-gather rows: rank r contributes `local` (counts[r], ...) (None when counts[r] is 0);
        returns every rank's rows in rank order (sum(counts), ...) float32 on every rank."""
        if not self.enabled:
            return np.asarray(local, dtype=np.float32)
        tail = self.broadcast_object(None if local is None else tuple(local.shape[1:]))
        longest = max(counts)
        padded = torch.zeros((longest, *tail), dtype=torch.float32)
        if local is not None and len(local):
            padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32))
        padded = padded.to(self.comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, counts)])

    def send_store_to_main(self, store: Any) -> None:
        """Stream a finished DenseStore's (h, w, C) features to rank 0 (see receive_store)."""
        shapes = torch.as_tensor(np.asarray(store.shapes, dtype=np.int64).reshape(-1, 3))
        dist.send(shapes.to(self.comm_device), dst=0)
        sizes = shapes.prod(dim=1).tolist()
        for start, stop in chunk_plan(sizes, CHUNK_BYTES // 4):
            flat = np.concatenate([np.asarray(store[i], dtype=np.float32).ravel() for i in range(start, stop)])
            dist.send(torch.from_numpy(flat).to(self.comm_device), dst=0)

    def receive_store(self, store: Any, *, src: int, images_num: int) -> None:
        """Append rank src's streamed dense features (images_num images) to rank 0's `store`."""
        shapes = torch.empty((images_num, 3), dtype=torch.int64, device=self.comm_device)
        dist.recv(shapes, src=src)
        shapes = shapes.cpu()
        sizes = shapes.prod(dim=1).tolist()
        for start, stop in chunk_plan(sizes, CHUNK_BYTES // 4):
            flat = torch.empty(sum(sizes[start:stop]), dtype=torch.float32, device=self.comm_device)
            dist.recv(flat, src=src)
            flat = flat.cpu().numpy()
            offset = 0
            for i in range(start, stop):
                shape = tuple(shapes[i].tolist())
                store.append(flat[offset : offset + sizes[i]].reshape(1, *shape))
                offset += sizes[i]


def extract_sharded(
    ctx: Context,
    extract: Callable[[np.ndarray, Any], Optional[np.ndarray]],
    indexes: Sequence[int],
    *,
    batch_size: int = 1,
    want_global: bool = True,
    store: Any = None,
    new_store: Optional[Callable[[], Any]] = None,
) -> Optional[np.ndarray]:
    """Run an extraction over `indexes` split across ranks.

    extract(part_indexes (m,), part_store or None) -> global descriptors (m, ...) or None; it appends
    the part's dense features to part_store when one is given. Single process: extract(indexes, store).
    Distributed: rank r extracts its contiguous share, whole batches of `batch_size` (the batches
    `extract` forms) but for the last one (shard_bounds), so that every batch is one of the single
    process's; the global descriptors (when want_global) are
    all-gathered and returned on every rank, in `indexes` order; with a `store`, rank 0 appends its
    own share to it directly and then every other rank's share, streamed in rank order, so rank 0's
    `store` ends up as the single process's; other ranks extract into new_store() (a fresh DenseStore,
    in RAM or on their own disk), send it and close it. Every rank must call this with the same
    indexes and arguments.
    """
    if not ctx.enabled or len(indexes) == 0:
        return extract(indexes, store)
    indexes = np.asarray(indexes, dtype=np.int64)
    counts = shard_counts(len(indexes), ctx.world_size, multiple=batch_size)
    start, stop = shard_bounds(len(indexes), ctx.world_size, ctx.rank, multiple=batch_size)
    part_store = None
    if store is not None:
        if ctx.is_main:
            part_store = store
        else:
            if new_store is None:
                raise ValueError("extract_sharded: a store needs new_store for the ranks other than 0")
            part_store = new_store()
    try:
        local = extract(indexes[start:stop], part_store) if stop > start else None
        if store is not None:
            if ctx.is_main:
                for src in range(1, ctx.world_size):
                    if counts[src]:
                        ctx.receive_store(store, src=src, images_num=counts[src])
            elif stop > start:
                part_store.finish()
                ctx.send_store_to_main(part_store)
    finally:
        if part_store is not None and part_store is not store:
            part_store.close()
    return ctx.gather_rows(local, counts) if want_global else None
