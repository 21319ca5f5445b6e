"""Several processes, one job: torchrun / DistributedDataParallel plumbing in one place.

`python3 train.py ...` and `python3 eval.py ...` stay single processes: no process group, and every
helper below is then the identity (the numbers are those of a plain run). Under torchrun
(RANK / WORLD_SIZE / LOCAL_RANK in the environment, WORLD_SIZE > 1):

- the process group uses NCCL when --device is cuda (each process on cuda:LOCAL_RANK), gloo on CPUs;
- extraction is sharded: rank r takes a contiguous slice of the requested images (`shard_bounds`);
  global descriptors are all-gathered, dense features are streamed to rank 0 in chunks, so rank 0
  holds the whole set in its own DenseStore (RAM, or its own disk with --efficient_ram_testing);
- training splits each global batch of --train_batch_size queries across ranks (`BatchShardSampler`);
  DDP averages gradients over ranks while the loss of a rank is its share of a sum divided by the
  GLOBAL train_batch_size * negs, so the caller multiplies its loss by world_size before backward and
  the update equals the single-process one;
- rank 0 alone logs to files, searches, re-ranks, validates and writes checkpoints; the others wait
  for it on a separate gloo group with a long timeout (`wait_for_main`, `broadcast_object(...,
  long_wait=True)`), since rank 0's work alone (re-ranking a large set) may last long.

Failures: each rank turns an exception into a logged message and a non-zero exit (commons.run_main);
torchrun then ends the other processes. A peer that dies makes gloo collectives fail at once; the
process-group timeout (SELAVPR_DIST_TIMEOUT_S, default 1800 s) bounds any remaining wait, and
SELAVPR_DIST_WAIT_S (default 86400 s) bounds the waits for rank 0's work alone.
"""
import logging
import os
from datetime import timedelta
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

import commons

DEFAULT_TIMEOUT_S = 1800.0  # collectives in which every rank works (extraction, training steps)
DEFAULT_WAIT_S = 86400.0  # waits for work that rank 0 does alone (search, re-ranking, checkpoints)
TIMEOUT_ENV, WAIT_ENV = "SELAVPR_DIST_TIMEOUT_S", "SELAVPR_DIST_WAIT_S"
# Dense features travel to rank 0 in chunks of at most this size (one image at least).
CHUNK_BYTES = 64 * 2 ** 20


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------

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
            raise ValueError(f"environment variable {name}={raw!r} is not an integer: launch the script with "
                             "torchrun (e.g. torchrun --nproc_per_node=2 train.py ...), which sets RANK, "
                             "WORLD_SIZE and LOCAL_RANK") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent torchrun environment RANK={rank}, WORLD_SIZE={world_size}, "
                         f"LOCAL_RANK={local_rank}: launch the script with torchrun")
    return None if world_size == 1 else (rank, world_size, local_rank)


def backend_for(device: str, *, nccl_available: bool) -> str:
    """Process-group backend for a --device: NCCL on GPUs (gloo when NCCL is not built in), gloo on CPUs."""
    return "nccl" if str(device).startswith("cuda") and nccl_available else "gloo"


def shard_bounds(items_num: int, world_size: int, rank: int) -> Tuple[int, int]:
    """[start, stop) of rank's contiguous share of items_num items; the first items_num % world_size
    ranks get one more (so rank 0's share is never empty while there is an item)."""
    if world_size < 1 or not 0 <= rank < world_size or items_num < 0:
        raise ValueError(f"shard_bounds: bad sizes (items {items_num}, world size {world_size}, rank {rank})")
    base, extra = divmod(items_num, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_counts(items_num: int, world_size: int) -> List[int]:
    """Number of items of every rank's share, (world_size,)."""
    return [stop - start for start, stop in (shard_bounds(items_num, world_size, r) for r in range(world_size))]


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
        raise ValueError(f"--train_batch_size {train_batch_size} is smaller than the {world_size} processes: "
                         "each process needs at least one query of every batch; raise --train_batch_size "
                         "(it is the global batch, split across processes) or launch fewer processes "
                         "(torchrun --nproc_per_node / --nnodes)")


def augmentation_seed(seed: int, rank: int, epoch_num: int, loop_num: int) -> int:
    """Seed of rank's torch generator for one training loop (ranks other than 0 draw their own
    augmentations; a function of the position in training, so a resumed run draws the same)."""
    return int(np.random.SeedSequence([seed, rank, epoch_num, loop_num]).generate_state(1, dtype=np.uint64)[0]
               % (2 ** 63))


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
    collective methods return their input (or do nothing)."""

    def __init__(self, *, rank: int = 0, world_size: int = 1, local_rank: int = 0, device: str = "cpu",
                 backend: Optional[str] = None, wait_group: Any = None) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device  # the device of this rank's model ("cuda:LOCAL_RANK" under torchrun)
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
        return (f"Context(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"device={self.device!r}, backend={self.backend!r})")

    def store_folder(self, output_folder: str) -> str:
        """Where this process keeps on-disk dense features (--efficient_ram_testing): the run's folder's
        dense_features/ on rank 0; dense_features_rank<r>/ beside it on rank r, for its share until
        it is streamed to rank 0."""
        return os.path.join(output_folder, "dense_features" if self.is_main else f"dense_features_rank{self.rank}")

    # --- small collectives ------------------------------------------------------------------------

    def broadcast_object(self, obj: Any, *, long_wait: bool = False) -> Any:
        """Rank 0's `obj` on every rank (picklable). long_wait: the other ranks may wait for rank 0's
        work alone (validation, checkpoint) longer than the process-group timeout."""
        if not self.enabled:
            return obj
        holder = [obj if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, group=self._wait_group if long_wait else None)
        return holder[0]

    def wait_for_main(self) -> None:
        """Barrier after work that rank 0 does alone (see broadcast_object's long_wait)."""
        if self.enabled:
            dist.barrier(group=self._wait_group)

    def sum_over_ranks(self, values: Sequence[float]) -> List[float]:
        """Element-wise sums of every rank's `values` (float64)."""
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
        """Rank 0's array on every rank (small arrays: mined triplets)."""
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
        """Horizontal flip of the whole global batch or none: each rank draws as RandomHorizontalFlip
        does (one torch.rand(1)), rank 0's draw decides for all."""
        flip = bool(torch.rand(1) < 0.5)
        return images.flip(-1) if self.broadcast_object(flip) else images

    def reseed_augmentations(self, *, seed: int, epoch_num: int, loop_num: int) -> None:
        """Ranks other than 0 re-seed their torch generator per loop, so their queries' augmentations
        differ from rank 0's (rank 0 keeps the single-process stream); seed -1 leaves them alone."""
        if self.enabled and self.rank > 0 and seed != -1:
            torch.manual_seed(augmentation_seed(seed, self.rank, epoch_num, loop_num))

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
            padded[:len(local)] = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32))
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
                store.append(flat[offset:offset + sizes[i]].reshape(1, *shape))
                offset += sizes[i]


def extract_sharded(ctx: Context, extract: Callable[[np.ndarray, Any], Optional[np.ndarray]],
                    indexes: Sequence[int], *, want_global: bool = True, store: Any = None,
                    new_store: Optional[Callable[[], Any]] = None) -> Optional[np.ndarray]:
    """Run an extraction over `indexes` split across ranks.

    extract(part_indexes (m,), part_store or None) -> global descriptors (m, ...) or None; it appends
    the part's dense features to part_store when one is given. Single process: extract(indexes, store).
    Distributed: rank r extracts its contiguous share; the global descriptors (when want_global) are
    all-gathered and returned on every rank, in `indexes` order; with a `store`, rank 0 appends its
    own share to it directly and then every other rank's share, streamed in rank order, so rank 0's
    `store` ends up as the single process's; other ranks extract into new_store() (a fresh DenseStore,
    in RAM or on their own disk), send it and close it. Every rank must call this with the same
    indexes and arguments.
    """
    if not ctx.enabled or len(indexes) == 0:
        return extract(indexes, store)
    indexes = np.asarray(indexes, dtype=np.int64)
    counts = shard_counts(len(indexes), ctx.world_size)
    start, stop = shard_bounds(len(indexes), ctx.world_size, ctx.rank)
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


# ------------------------------------------------------------------------------------------------
# Start and end
# ------------------------------------------------------------------------------------------------

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


def init_from_environment(*, device: str, environ: Optional[Mapping[str, str]] = None) -> Context:
    """The run's Context: single (no process group) unless launched by torchrun with several
    processes; then the process group is initialised (NCCL for --device cuda, gloo for cpu) and
    this rank's device is cuda:LOCAL_RANK (cuda) or cpu."""
    environ = os.environ if environ is None else environ
    env = torchrun_environment(environ)
    if env is None:
        return Context(device=device)
    rank, world_size, local_rank = env
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed: run one process (python3 ...) "
                         "instead of torchrun")
    timeout = _seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, environ)
    wait = _seconds_from_env(WAIT_ENV, DEFAULT_WAIT_S, environ)
    backend = backend_for(device, nccl_available=dist.is_nccl_available())
    if str(device).startswith("cuda"):
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise ValueError(f"process with LOCAL_RANK {local_rank} needs a GPU of its own, but this machine "
                             f"shows {gpus}: launch at most {gpus} processes per machine "
                             "(torchrun --nproc_per_node), or use --device cpu")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    # A gloo group of its own for the waits on rank 0's work alone: its timeout may be much longer.
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait))
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend,
                   wait_group=wait_group)


def finish(ctx: Context) -> None:
    """End of a successful run: wait for every rank (rank 0 may still be writing), then leave the
    process group. (After an error nothing is torn down here: the process exits and torchrun ends the
    others.)"""
    if ctx.enabled and dist.is_initialized():
        ctx.wait_for_main()
        dist.destroy_process_group()


def start_run(args, output_folder: str) -> Context:
    """The common start of train.py and eval.py: join torchrun's process group if launched by it (one
    process otherwise; ctx.device is this process's device), log to `output_folder` on rank 0 (the
    console only on the others), seed, and record the command line and arguments."""
    ctx = init_from_environment(device=args.device)
    if ctx.is_main:
        commons.setup_logging(output_folder)
    else:
        setup_worker_logging(ctx)
    commons.make_deterministic(args.seed)
    commons.log_run_header(args)
    logging.info(f"The outputs are being saved in {output_folder}")
    if ctx.enabled:
        logging.info(describe(ctx))
    return ctx


def setup_worker_logging(ctx: Context) -> None:
    """Ranks other than 0 write no log files; their errors go to the console, tagged with the rank."""
    commons.setup_logging(None, console="error")  # their warnings repeat rank 0's
    formatter = logging.Formatter(f"[rank {ctx.rank}] " + commons.LOG_FORMAT, "%Y-%m-%d %H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def describe(ctx: Context) -> str:
    """One log line about the job's layout."""
    if not ctx.enabled:
        return "Single process (no process group)"
    return (f"Distributed run: {ctx.world_size} processes, {ctx.backend} backend; rank 0 (on {ctx.device}) "
            "gathers the features, searches, re-ranks and writes every output")
