"""The fast exact engine behind local_matching: the same decisions as the plain computation
(one float32 matmul of the whole candidate, then max both ways, ties included) without ever
building S for all candidates (K x Lc x Lq floats, 5.5 GB at K = 100).

On the CPU, candidates go through, in row tiles (peak memory: one tile per worker):
1. the bfloat16 screen (screening.py), where the CPU has bf16 matrix hardware: most decisions are
   proven by an error bound on the screen; what is not proven is recomputed exactly;
2. otherwise, the exact float32 tiled arg-maxes (exact.nn_tiled_exact).
Both give the same numbers, but which one is faster depends on the features: where many rows are
near-ties (e.g. the near-duplicate features of an untrained model) the screen proves few decisions
and its recomputations cost more than the float32 product it saves. So with fast_path=None on a
CPU with bf16 hardware, the first candidates of each shape alternate between the two paths, timed,
and the faster one then serves the rest of the process (_PathRace); the choice is logged.
The exact float32 products on parts of S (exact.py) equal the whole product bit for bit on the
CPU's BLAS; that is checked at run time on the real shapes, once per process, device and shape
(self_check.tile_self_check). Where it fails, and elsewhere (queries or candidates with fewer than
MIN_TILED_SIDE positions, non-finite or huge values) the plain computation (reference.py) runs, in
chunks of candidates, so peak memory never depends on K either. Chunks of candidates run on worker
threads (_CpuWorkers).

On a GPU (any device but the CPU; or gpu_engine=True, which the tests use on the CPU), whole groups
of candidates go through device_engine.py instead: a split-bfloat16 tensor-core screen with float32 output,
proven decisions, fixed-shape exact recomputations; it runs where its own self-check (the same
function, gpu_engine=True) and the screen's soundness probe pass on the device, else the plain path.
engine_paths() tells which path served each shape.
"""

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Deque, Iterable, List, Optional, Tuple

import torch

from . import device_engine
from .exact import BLOCK, nn_tiled_exact, pad_rows
from .reference import mutual_rows, nearest_neighbours
from .screening import (
    ScreenQuery,
    bf16_available,
    fp32_screen_is_sound,
    native_bf16_fp32_matmul,
    nn_screened,
    screen_unavailable,
)
from .self_check import PATH_GPU_SCREENED, PATH_PLAIN, PATH_SCREENED, PATH_TILED, note_path, tile_self_check

# Queries and candidates with fewer positions use the plain path: the whole product then has fewer
# than 64 rows or columns, so tiling has little memory or work to save.
MIN_TILED_SIDE = 64
# Inputs with entries above this magnitude (or non-finite) use the plain path: below it no product
# or sum of the screen can overflow, so the error analysis holds.
MAX_SAFE_ABS = 2.0**40
# Candidates screened together on the CPU (one job of a worker thread): small enough for the tiles
# to stay in cache and to share the work evenly between the workers.
CPU_BATCH = 4


def is_safe(t: torch.Tensor) -> bool:
    """Finite and small enough that neither the screen nor the reference can overflow (amax
    propagates NaN, and NaN <= x is False)."""
    return float(t.abs().amax()) <= MAX_SAFE_ABS


def _query_is_safe(query: torch.Tensor) -> bool:
    """is_safe for the GPU engine's query: one host synchronisation per query."""
    return device_engine._flag(query.abs().amax() <= MAX_SAFE_ABS)


class _PathRace:
    """Which CPU path (the bfloat16 screen or the plain float32 tiles) is faster for one candidate
    shape in this process, decided by timing: until each path has served RACE_CANDIDATES timed
    candidates, chunks alternate between them (the workers run side by side, so both are timed
    under the same load; each path's first chunk, which pays its one-time checks, is not counted);
    then the one with the lower time per candidate serves every later chunk. Both paths return the
    same numbers, so the choice changes the speed only. Thread-safe."""

    RACE_CANDIDATES = 32

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.issued = {True: 0, False: 0}
        self.warm = {True: False, False: False}
        self.seconds = {True: 0.0, False: 0.0}
        self.candidates = {True: 0, False: 0}
        self.winner: Optional[bool] = None
        self.how = ""

    def pick(self, candidates: int) -> bool:
        """True: screen the next chunk of this many candidates."""
        with self.lock:
            if self.winner is not None:
                return self.winner
            screen = self.issued[True] <= self.issued[False]
            self.issued[screen] += candidates
            return screen

    def withdraw(self, screen: bool) -> None:
        """That path cannot serve this shape (its tile self-check failed): the other one wins."""
        with self.lock:
            if self.winner is None:
                self.winner = not screen
                self.how = "tile self-check passed; the other path's tile self-check failed"

    def record(self, screen: bool, seconds: float, candidates: int) -> bool:
        """Add a timed chunk; True the moment the decision is made (self.winner, self.how)."""
        with self.lock:
            if self.winner is not None:
                return False
            if not self.warm[screen]:
                self.warm[screen] = True
                return False
            self.seconds[screen] += seconds
            self.candidates[screen] += candidates
            if min(self.candidates.values()) < self.RACE_CANDIDATES:
                return False
            per = {path: self.seconds[path] / self.candidates[path] for path in (True, False)}
            self.how = (
                f"tile self-check passed; chosen by timing {self.candidates[True] + self.candidates[False]} "
                f"candidates: {PATH_SCREENED} {per[True] * 1e3:.1f} ms, {PATH_TILED} {per[False] * 1e3:.1f} ms "
                f"per candidate"
            )
            self.winner = per[True] < per[False]
            return True


_RACES: dict = {}  # (device, Lc, Lq, C, row_tile) -> _PathRace
_RACES_LOCK = threading.Lock()


def _race(key: tuple) -> _PathRace:
    with _RACES_LOCK:
        return _RACES.setdefault(key, _PathRace())


class QueryPlan:
    """Everything derived from the query once and reused for all its candidates: q (Lq, C), the
    screen's query side (None without the screen), qp (Lqp, C) = q padded (repeats of the last row)
    to a multiple of BLOCK for the float32 tiles, and `race`: whether the two paths are timed
    against each other (fast_path=None with the screen available) or the screen is used whenever
    it exists (fast_path=True)."""

    def __init__(self, q: torch.Tensor, use_screen: bool, race: bool = False):
        self.q = q
        self.lq, self.c = q.shape
        self.screen = ScreenQuery(q) if use_screen else None
        self.qp = pad_rows(q, BLOCK)
        self.race = race and use_screen

    def tiles_are_exact(self, candidate_positions: int, *, row_tile: int, screen: bool) -> bool:
        """The (cached) tile self-check for candidates of that many positions against this query, on the
        path given (the screen's column-block width, or BLOCK for the float32 tiles)."""
        exact, _ = tile_self_check(
            candidate_positions=candidate_positions,
            query_positions=self.lq,
            channels=self.c,
            device=self.q.device,
            row_tile=row_tile,
            screen=screen,
        )
        return exact


@torch.no_grad()
def _nn_tiled(
    xs: List[torch.Tensor], plan: QueryPlan, row_tile: int, *, screen: bool, how: str = "tile self-check passed"
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Candidates of one shape on the CPU: [(nn12 (Lc,), mutual (Lc,) bool)], exact. screen: through
    the bfloat16 screen (plan.screen), else the float32 tiles; `how` is logged with the path."""
    lc, c = xs[0].shape
    if screen:
        out = nn_screened(xs, plan.screen, row_tile)
        if out is not None:
            note_path(xs[0].device, lc, plan.lq, c, f"{PATH_SCREENED} ({how})")
            return out
        note_path(
            xs[0].device,
            lc,
            plan.lq,
            c,
            f"{PATH_TILED} (tile self-check passed; the bfloat16 kernel failed its soundness check)",
        )
    else:
        note_path(xs[0].device, lc, plan.lq, c, f"{PATH_TILED} ({how})")
    res = []
    for x in xs:
        # The screen's padding when its kernel failed: the tile self-check ran with its width.
        qp = plan.screen.qp if screen else plan.qp
        nn12, nn21 = nn_tiled_exact(pad_rows(x, BLOCK), qp, row_tile)
        nn12, nn21 = nn12[:lc], nn21[: plan.lq]
        res.append((nn12, mutual_rows(nn12, nn21)))
    return res


def _tiles(
    query: torch.Tensor, plan: QueryPlan, group: List[torch.Tensor], row_tile: int
) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """A group of candidates of one shape through the screen or the float32 tiles (raced when the
    plan says so), or None when the tile self-check for that path fails on this shape."""
    lc = group[0].shape[0]
    race = _race((str(query.device), lc, plan.lq, plan.c, row_tile)) if plan.race else None
    screen = plan.screen is not None and (race is None or race.pick(len(group)))
    if not plan.tiles_are_exact(lc, row_tile=row_tile, screen=screen):
        if race is not None:  # that path is out of the race for this shape: the other one serves
            race.withdraw(screen)
        return None
    if race is None:
        return _nn_tiled(group, plan, row_tile, screen=screen)
    if race.winner is not None:
        return _nn_tiled(group, plan, row_tile, screen=screen, how=race.how)
    start = time.perf_counter()
    out = _nn_tiled(group, plan, row_tile, screen=screen, how="tile self-check passed; timing both paths")
    race.record(screen, time.perf_counter() - start, len(group))
    if race.winner is not None:  # decided by this chunk or by one that finished beside it
        winner = PATH_SCREENED if race.winner else PATH_TILED
        note_path(query.device, lc, plan.lq, plan.c, f"{winner} ({race.how})")
    return out


def _process_chunk(
    query: torch.Tensor, plan: Optional[QueryPlan], chunk: List[torch.Tensor], row_tile: int
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(nn12, mutual) for a chunk of candidates, in order. Consecutive candidates of one shape and
    one path are processed together: the tiled engine screens them as one batch, the plain path
    multiplies them in one batched matmul like the public release."""
    paths = [plan is not None and x.shape[0] >= MIN_TILED_SIDE and is_safe(x) for x in chunk]
    out: List[Tuple[torch.Tensor, torch.Tensor]] = []
    start = 0
    while start < len(chunk):
        end = start + 1
        while end < len(chunk) and chunk[end].shape == chunk[start].shape and paths[end] == paths[start]:
            end += 1
        group = chunk[start:end]
        lc = group[0].shape[0]
        if paths[start]:
            found = _tiles(query, plan, group, row_tile)
            if found is not None:
                out.extend(found)
                start = end
                continue
            reason = "tile self-check failed"
        elif plan is None:
            reason = f"query with fewer than {MIN_TILED_SIDE} positions or non-finite / huge values"
        else:
            reason = f"candidate with fewer than {MIN_TILED_SIDE} positions or non-finite / huge values"
        note_path(query.device, lc, query.shape[0], query.shape[1], f"{PATH_PLAIN} ({reason})")
        nn12, nn21 = nearest_neighbours(torch.stack(group), query)
        out.extend(zip(nn12.unbind(0), mutual_rows(nn12, nn21).unbind(0)))
        start = end
    return out


class _CpuWorkers:
    """Worker threads for the CPU engine, one per intra-op thread of the caller, each running its
    chunks with ONE intra-op thread (torch ops release the GIL, so the workers run in parallel).

    Why: the engine issues many mid-sized torch calls; with an OpenMP team per call, a busy
    machine (or a shared one) makes each call wait at its barrier for a descheduled thread, which
    can make it ~10x slower. Independent single-threaded workers never wait on each
    other. torch.set_num_threads(1) in a worker sets that thread's OpenMP / MKL thread count (a
    per-thread setting) and torch's default for threads started later; all workers set it before
    any of them computes, and the default is put back to the caller's count when they are done,
    so nothing changes for the caller."""

    def __init__(self, workers: int):
        self.workers = workers
        self.restore = torch.get_num_threads()
        self.pool: Optional[ThreadPoolExecutor] = None

    def __enter__(self) -> ThreadPoolExecutor:
        self.pool = ThreadPoolExecutor(max_workers=self.workers)
        ready = threading.Barrier(self.workers)

        def single_threaded():
            torch.set_num_threads(1)
            ready.wait()  # every worker is up (and configured) before any work starts

        for future in [self.pool.submit(single_threaded) for _ in range(self.workers)]:
            future.result()
        return self.pool

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)
        torch.set_num_threads(self.restore)


def _chunks(query: torch.Tensor, candidates: Iterable[torch.Tensor], size: int) -> Iterable[List[torch.Tensor]]:
    """Candidates in lists of at most `size`, their channels checked against the query's."""
    chunk: List[torch.Tensor] = []
    for x in candidates:
        if x.shape[1] != query.shape[1]:
            raise ValueError(
                f"candidate dense features have {x.shape[1]} channels but the query has "
                f"{query.shape[1]}; both must come from the same model."
            )
        chunk.append(x)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def matches(
    query: torch.Tensor,
    candidates: Iterable[torch.Tensor],
    *,
    chunk_size: int,
    row_tile: int,
    fast_path: Optional[bool],
    workers: bool = True,
    gpu_engine: Optional[bool] = None,
) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield (nn12 (Lc,), mutual (Lc,) bool) for each candidate (L, C) float32 tensor, on the query's
    device, in order. Candidates arrive as an iterable and are taken `chunk_size` at a time, so
    that at most a few chunks (and their similarity matrices on the plain path) are held at once.
    workers=False runs in the calling thread (single pairs: not worth starting threads).
    gpu_engine: None = the GPU engine on any device but the CPU; True / False forces it on / off
    (True on the CPU runs the GPU engine's arithmetic there: the tests)."""
    device = query.device
    if device.type != "cpu" if gpu_engine is None else gpu_engine:
        yield from _matches_gpu(query, candidates, chunk_size=chunk_size, row_tile=row_tile, fast_path=fast_path)
        return

    def make_plan() -> Optional[QueryPlan]:
        if device.type == "cpu" and query.shape[0] >= MIN_TILED_SIDE and is_safe(query):
            use_screen = bf16_available(device) if fast_path is None else bool(fast_path)
            plan = QueryPlan(query, use_screen, race=fast_path is None)
            if plan.race:
                # Both paths' self-checks (one for each column-block width; cached) for candidates of the
                # query's shape, the usual case, here, before any candidate is in flight: run from the
                # workers, the second would overlap the first path's work (the checks are the largest
                # allocations of a re-ranking: 0.17 GiB each at ViT-L's 3721 x 3721).
                for screen in (True, False):
                    plan.tiles_are_exact(plan.lq, row_tile=row_tile, screen=screen)
            return plan
        return None

    job_size = min(chunk_size, CPU_BATCH) if device.type == "cpu" else chunk_size
    n_workers = torch.get_num_threads() if device.type == "cpu" and workers else 1
    if n_workers <= 1:
        plan = make_plan()
        for chunk in _chunks(query, candidates, job_size):
            yield from _process_chunk(query, plan, chunk, row_tile)
        return
    with _CpuWorkers(n_workers) as pool:
        plan = pool.submit(make_plan).result()  # single-threaded too
        in_flight: Deque = deque()
        for chunk in _chunks(query, candidates, job_size):
            in_flight.append(pool.submit(_process_chunk, query, plan, chunk, row_tile))
            if len(in_flight) > n_workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


# ------------------------------------------------------------------------------------------------
# The GPU engine's dispatch (device_engine.py does the work)
# ------------------------------------------------------------------------------------------------
def _gpu_plan(query: torch.Tensor, fast_path: Optional[bool]) -> Tuple[Optional[device_engine.GpuQueryPlan], str]:
    """The GPU engine's plan for this query, or None and why the plain path serves it."""
    device = query.device
    precision = torch.get_float32_matmul_precision()
    if query.shape[0] < MIN_TILED_SIDE:
        return None, f"query with fewer than {MIN_TILED_SIDE} positions"
    if fast_path is False:
        return None, "bfloat16 screen switched off (fast_path=False)"
    if precision != "highest":
        return None, (
            f"float32 matmul precision '{precision}': TF32 products, the screen's bound is for IEEE float32 ones"
        )
    unavailable = screen_unavailable(device) if fast_path is None and device.type != "cpu" else None
    if unavailable:
        return None, unavailable
    if not _query_is_safe(query):
        return None, "query with non-finite or huge values"
    return device_engine.GpuQueryPlan(query), ""


def _process_group_gpu(
    query: torch.Tensor,
    plan: Optional[device_engine.GpuQueryPlan],
    reason: str,
    group: List[torch.Tensor],
    row_tile: int,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(nn12, mutual) of a group of candidates of one shape: the screened GPU engine where its
    self-check and the screen's soundness probe passed for this device and shape, else the plain
    path (the whole float32 product of the group, as the reference)."""
    device = query.device
    lc, c = group[0].shape
    xs = torch.stack(group)
    if plan is None:
        why = reason
    elif lc < MIN_TILED_SIDE:
        why = f"candidate with fewer than {MIN_TILED_SIDE} positions"
    else:
        exact_tiles, _ = tile_self_check(
            candidate_positions=lc,
            query_positions=plan.lq,
            channels=c,
            device=device,
            row_tile=row_tile,
            gpu_engine=True,
            batch=len(group),
        )
        lcp = -(-lc // BLOCK) * BLOCK
        if not exact_tiles:
            why = "tile self-check failed"
        elif not fp32_screen_is_sound(len(group) * lcp, plan.inner, plan.lqp, device):
            why = "the bfloat16 screen failed its soundness check on this device"
        else:
            result = device_engine.nn_screened_gpu(xs, plan, row_tile, MAX_SAFE_ABS)
            if result is not None:
                product = "bf16 matmul, float32 output" if native_bf16_fp32_matmul(device) else "float32 emulation"
                note_path(device, lc, plan.lq, c, f"{PATH_GPU_SCREENED} (tile self-check passed; screen: {product})")
                return device_engine.split(result)
            why = "candidate with non-finite or huge values"
    note_path(device, lc, query.shape[0], c, f"{PATH_PLAIN} ({why})")
    nn12, nn21 = nearest_neighbours(xs, query)
    return list(zip(nn12.unbind(0), mutual_rows(nn12, nn21).unbind(0)))


def _matches_gpu(
    query: torch.Tensor,
    candidates: Iterable[torch.Tensor],
    *,
    chunk_size: int,
    row_tile: int,
    fast_path: Optional[bool],
) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    """matches() on the GPU engine, in the calling thread: chunks of chunk_size candidates, each cut
    into groups of consecutive candidates of one shape."""
    plan, reason = _gpu_plan(query, fast_path)
    for chunk in _chunks(query, candidates, chunk_size):
        start = 0
        while start < len(chunk):
            end = start + 1
            while end < len(chunk) and chunk[end].shape == chunk[start].shape:
                end += 1
            yield from _process_group_gpu(query, plan, reason, chunk[start:end], row_tile)
            start = end


def check_sizes(chunk_size: int, row_tile: int) -> None:
    """chunk_size >= 1 and row_tile a positive multiple of BLOCK (tiles hold whole row groups)."""
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 (candidates per chunk), got {chunk_size}.")
    if int(row_tile) < BLOCK or int(row_tile) % BLOCK:
        raise ValueError(f"row_tile must be a positive multiple of {BLOCK}, got {row_tile}.")
