"""distributed.py: sharding helpers, collectives and whole torchrun jobs (2 processes, gloo, CPU).

The process group itself is commons.start_run's (the pure parts are tested in test_commons.py).
"""

import glob
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script, tiny_eval_flags

import commons
import distributed

# Global batch 3 over 2 processes: uneven shares (2 + 1 queries), and whole-batch flips.
TRAIN_FLAGS = [
    "--cache_refresh_rate",
    "6",
    "--queries_per_epoch",
    "6",
    "--neg_samples_num",
    "12",
    "--train_batch_size",
    "3",
    "--infer_batch_size",
    "8",
    "--rerank_num",
    "10",
    "--lr",
    "1e-4",
    "--mining",
    "full",
    "--horizontal_flip",
    "--seed",
    "3",
    "--epochs_num",
    "2",
    "--patience",
    "5",
]
# The same thread count everywhere (torchrun sets 1 per process), so runs differ only by the split.
ENV = {"OMP_NUM_THREADS": "1"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script_and_args, *, cwd, env=None, timeout=300, nproc=2):
    full_env = dict(os.environ, **ENV, **(env or {}))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        *script_and_args,
    ]
    return subprocess.run(command, cwd=str(cwd), env=full_env, capture_output=True, text=True, timeout=timeout)


def _only_folder(pattern):
    folders = glob.glob(pattern)
    assert len(folders) == 1, folders
    return folders[0]


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("items_num,world_size", [(0, 2), (1, 2), (7, 2), (7, 3), (9, 3), (3, 5)])
def test_shards_cover_every_item_once_in_order(items_num, world_size):
    bounds = [distributed.shard_bounds(items_num, world_size, r) for r in range(world_size)]
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(items_num))
    counts = distributed.shard_counts(items_num, world_size)
    assert counts == [stop - start for start, stop in bounds]
    assert max(counts) - min(counts) <= 1
    if items_num:
        assert counts[0] >= 1  # rank 0 always has a share: it broadcasts the descriptors' shape


@pytest.mark.parametrize(
    "items_num,world_size,batch_size",
    [(40, 2, 8), (15, 2, 8), (41, 3, 8), (7, 4, 8), (3, 2, 8), (17, 3, 1), (0, 2, 8), (33, 4, 5), (16, 2, 16)],
)
def test_shards_are_whole_batches_but_the_last(items_num, world_size, batch_size):
    """Each rank's share starts at a batch boundary and is whole batches, but for the share holding the
    last item; the shares cover every item once, in order; fewer batches than ranks leave the last ranks
    without a share, never rank 0."""
    bounds = [distributed.shard_bounds(items_num, world_size, r, multiple=batch_size) for r in range(world_size)]
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(items_num))
    assert distributed.shard_counts(items_num, world_size, multiple=batch_size) == [b - a for a, b in bounds]
    for start, stop in bounds:
        if stop > start:
            assert start % batch_size == 0
            assert (stop - start) % batch_size == 0 or stop == items_num
    batches = [len(range(start, stop, batch_size)) for start, stop in bounds]
    assert max(batches) - min(batches) <= 1  # as even as whole batches allow
    if items_num:
        assert bounds[0][1] > 0


def test_shard_bounds_examples():
    assert [distributed.shard_bounds(40, 2, r, multiple=8) for r in range(2)] == [(0, 24), (24, 40)]
    assert [distributed.shard_bounds(41, 3, r, multiple=8) for r in range(3)] == [(0, 16), (16, 32), (32, 41)]
    assert [distributed.shard_bounds(7, 4, r, multiple=8) for r in range(4)] == [(0, 7), (7, 7), (7, 7), (7, 7)]
    assert [distributed.shard_bounds(7, 2, r, multiple=1) for r in range(2)] == [(0, 4), (4, 7)]  # the even split
    with pytest.raises(ValueError, match="multiple 0"):
        distributed.shard_bounds(7, 2, 0, multiple=0)


def test_chunk_plan_groups_consecutive_items_under_the_limit():
    sizes = [5, 5, 5, 20, 1, 1, 9]
    plan = distributed.chunk_plan(sizes, 10)
    assert plan == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7)]
    assert [i for start, stop in plan for i in range(start, stop)] == list(range(len(sizes)))
    assert distributed.chunk_plan([], 10) == []


def test_batch_shard_sampler_splits_each_global_batch():
    single = [list(range(b * 3, b * 3 + 3)) for b in range(7 // 3)]  # drop_last, no shuffling
    ranks = [list(distributed.BatchShardSampler(samples_num=7, batch_size=3, rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] == [[0, 1], [3, 4]] and ranks[1] == [[2], [5]]
    assert [a + b for a, b in zip(*ranks)] == single
    assert len(distributed.BatchShardSampler(samples_num=7, batch_size=3, rank=1, world_size=2)) == 2
    with pytest.raises(ValueError, match="--train_batch_size 2 is smaller than the 3 processes"):
        distributed.BatchShardSampler(samples_num=6, batch_size=2, rank=0, world_size=3)


def test_augmentation_seeds_differ_by_rank_and_loop_and_repeat():
    seeds = {distributed.augmentation_seed(3, r, e, l) for r in (1, 2) for e in (0, 1) for l in (0, 1)}
    assert len(seeds) == 8
    assert distributed.augmentation_seed(3, 1, 0, 0) == distributed.augmentation_seed(3, 1, 0, 0)


def test_single_process_context_changes_nothing(tiny_model):
    ctx = commons.init_from_environment(device="cpu", environ={})
    assert not ctx.enabled and ctx.is_main and ctx.device == "cpu"
    assert ctx.wrap_model(tiny_model) is tiny_model
    assert ctx.broadcast_object({"a": 1}, long_wait=True) == {"a": 1}
    assert ctx.sum_over_ranks([1.5, 2]) == [1.5, 2.0]
    seen = []
    result = distributed.extract_sharded(
        ctx, lambda idx, store: seen.append((idx, store)) or np.ones((3, 2)), range(5, 8), store="the store"
    )
    assert seen == [(range(5, 8), "the store")] and result.shape == (3, 2)  # the caller's indexes, as given
    state = np.random.get_state()
    ctx.sync_numpy_rng()
    assert np.array_equal(np.random.get_state()[1], state[1])
    triplets = np.arange(12).reshape(3, 4)
    assert ctx.broadcast_array(triplets) is triplets
    torch.manual_seed(0)
    ctx.reseed_augmentations(seed=3, epoch_num=1, loop_num=2)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())
    commons.finish(ctx)


class _DrawingDataset(torch.utils.data.Dataset):
    """Seven samples, each with a random draw (as the training set's augmentations)."""

    def __len__(self):
        return 7

    def __getitem__(self, index):
        return torch.tensor([float(index)]), torch.rand(1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_single_process_training_loader_is_the_plain_loader(num_workers):
    """train.py's loader of one process: the batches, the random draws inside them and the generator's
    state afterwards of DataLoader(batch_size, shuffle=False, drop_last=True)."""
    ctx = distributed.Context(device="cpu")
    dataset = _DrawingDataset()
    runs = []
    for make in (
        lambda: torch.utils.data.DataLoader(
            dataset, batch_size=3, shuffle=False, drop_last=True, num_workers=num_workers
        ),
        lambda: ctx.training_loader(
            dataset,
            batch_size=3,
            num_workers=num_workers,
            collate_fn=torch.utils.data.default_collate,
            pin_memory=False,
        ),
    ):
        torch.manual_seed(5)
        loader = make()
        batches = [(indexes.flatten().tolist(), draws) for indexes, draws in loader]
        runs.append((len(loader), batches, torch.rand(1)))
    (plain_len, plain, plain_next), (ours_len, ours, ours_next) = runs
    assert plain_len == ours_len == 2
    assert [b[0] for b in ours] == [b[0] for b in plain] == [[0, 1, 2], [3, 4, 5]]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, ours))
    assert torch.equal(plain_next, ours_next)


def test_single_process_flip_draws_as_torchvision():
    """flip_together of one process is torchvision's RandomHorizontalFlip() (train.py's flip of one
    process before), draw for draw."""
    import torchvision.transforms as T

    ctx = distributed.Context(device="cpu")
    images = torch.arange(2 * 3 * 2 * 5, dtype=torch.float32).reshape(2, 3, 2, 5)
    flipped = []
    for seed in range(12):
        torch.manual_seed(seed)
        expected, expected_next = T.RandomHorizontalFlip()(images), torch.rand(1)
        torch.manual_seed(seed)
        ours, ours_next = ctx.flip_together(images), torch.rand(1)
        assert torch.equal(ours, expected) and torch.equal(ours_next, expected_next), seed
        flipped.append(not torch.equal(ours, images))
    assert any(flipped) and not all(flipped)  # both outcomes were checked


def test_single_process_loss_sums_are_the_items():
    ctx = distributed.Context(device="cpu")
    g, l = torch.tensor(0.1234567, dtype=torch.float32), torch.tensor(2.5e-3, dtype=torch.float32)
    values = ctx.sum_over_ranks([g.item(), l.item(), (g + l).item()])
    assert values == [g.item(), l.item(), (g + l).item()]  # the float32 total, not a float64 sum


# ------------------------------------------------------------------------------------------------
# Collectives in a 2-process job
# ------------------------------------------------------------------------------------------------

COLLECTIVES = r"""
import itertools, os, sys, tempfile
import numpy as np, torch
sys.path.insert(0, {root!r})
from types import SimpleNamespace
import torch.distributed as dist
import commons, distributed
from dense_store import DenseStore
distributed.CHUNK_BYTES = 200  # many chunks per rank
run_folders = {run_folders!r}
args = SimpleNamespace(device="cpu", seed=0, precision="fp32")
ctx = commons.start_run(args, run_folders[int(os.environ["RANK"])])
assert ctx.enabled and ctx.world_size == 2 and ctx.backend == "gloo"
assert ctx.output_folder == run_folders[0], ctx.output_folder  # rank 0's folder, created by rank 0 only
assert os.path.isfile(os.path.join(run_folders[0], "info.log")) and not os.path.exists(run_folders[1])
rng = np.random.default_rng(0)  # the same data on both ranks
shapes = [(int(h), int(w), 4) for h, w in rng.integers(1, 6, size=(9, 2))]  # sizes differ (single_query)
features = [rng.standard_normal(s).astype(np.float32) for s in shapes]
descriptors = rng.standard_normal((9, 5, 3)).astype(np.float32)  # five-crop shaped
calls = []

def extract(part, store):
    calls.append(list(part))
    if store is not None:
        for i in part:
            store.append(features[i][None])
    return descriptors[np.asarray(part)]

def batches(parts, size):  # what extraction's DataLoader makes of each part
    return [list(part[i : i + size]) for part in parts for i in range(0, len(part), size)]

work = tempfile.mkdtemp()
# 9 in batches of 4: shares 8 + 1; [8, 2, 5] and [4] in batches of 4: one batch, rank 1's share is empty;
# batch 1 (single_query): shares as even as they go.
cases = itertools.product(([0, 1, 2, 3, 4, 5, 6, 7, 8], [8, 2, 5], [4]), (1, 2, 4), (False, True))
for indexes, batch_size, on_disk in cases:
    calls.clear()
    store = DenseStore(os.path.join(work, "r%d" % ctx.rank) if on_disk else None)
    worker_folder = os.path.join(work, "w%d" % ctx.rank) if on_disk else None
    out = distributed.extract_sharded(ctx, extract, indexes, batch_size=batch_size, store=store,
                                      new_store=lambda: DenseStore(worker_folder))
    store.finish()
    start, stop = distributed.shard_bounds(len(indexes), 2, ctx.rank, multiple=batch_size)
    assert calls == ([indexes[start:stop]] if stop > start else []), calls
    every_rank = [None, None]
    dist.all_gather_object(every_rank, batches(calls, batch_size))
    # The job's batches, in rank order, are exactly the one-process run's.
    assert every_rank[0] + every_rank[1] == batches([indexes], batch_size), (indexes, batch_size, every_rank)
    assert np.array_equal(out, descriptors[indexes]), "gathered descriptors differ"
    if ctx.is_main:
        assert len(store) == len(indexes)
        for row, i in enumerate(indexes):
            assert np.array_equal(store[row], features[i]), (indexes, row)
    else:
        assert len(store) == 0
    store.close()
    if on_disk and not ctx.is_main:
        assert not os.listdir(os.path.join(work, "w%d" % ctx.rank)), "a worker store file was left behind"
    assert distributed.extract_sharded(ctx, extract, indexes, batch_size=batch_size, want_global=False) is None

assert ctx.sum_over_ranks([ctx.rank + 1.0, 2.0]) == [3.0, 4.0]
assert ctx.broadcast_object("from %d" % ctx.rank, long_wait=True) == "from 0"
np.random.seed(ctx.rank)  # different generators; rank 0's wins
ctx.sync_numpy_rng()
value = np.random.random_sample()
assert ctx.sum_over_ranks([value])[0] == 2 * value, "NumPy generators differ after sync_numpy_rng"
torch.manual_seed(ctx.rank)
model = torch.nn.Linear(3, 2)
ctx.broadcast_module(model)
total = ctx.sum_over_ranks([float(model.weight.sum())])[0]
assert abs(total - 2 * float(model.weight.sum())) < 1e-6, "broadcast_module left different weights"
assert np.array_equal(ctx.broadcast_array(np.arange(4) * (ctx.rank + 1)), np.arange(4))
commons.finish(ctx)
print("rank", ctx.rank, "COLLECTIVES OK")
"""


def test_collectives_shard_and_gather_in_rank_order(tmp_path):
    script = tmp_path / "collectives.py"
    # Each rank names the run's folder after its own clock: they may differ, rank 0's is the run's.
    run_folders = [str(tmp_path / "logs" / f"named_by_rank_{r}") for r in range(2)]
    script.write_text(COLLECTIVES.format(root=ROOT, run_folders=run_folders))
    result = _torchrun([str(script)], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count("COLLECTIVES OK") == 2


# ------------------------------------------------------------------------------------------------
# Whole jobs: train.py and eval.py
# ------------------------------------------------------------------------------------------------


def _log_numbers(folder):
    log = open(os.path.join(folder, "info.log")).read()
    losses = [
        tuple(map(float, m))
        for m in re.findall(r"Finished epoch \d+ in .*?triplet loss = ([\d.]+), local loss = ([\d.]+)", log)
    ]
    val = re.findall(r"Reranking recalls on val set .*?>: (.*)", log)
    final = re.findall(r"Recalls on < BaseDataset.*?>: (.*)", log)
    return losses, val, final, log


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """The same training, as one process and as a 2-process torchrun job."""
    cwd = tmp_path_factory.mktemp("ddp_train")
    flags = tiny_eval_flags(synthetic_root, *TRAIN_FLAGS)
    one = run_script(["train.py", *flags, "--save_dir", "one"], cwd=str(cwd), env=ENV, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = _torchrun([os.path.join(ROOT, "train.py"), *flags, "--save_dir", "two"], cwd=cwd, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    return cwd, _only_folder(str(cwd / "logs" / "one" / "*")), _only_folder(str(cwd / "logs" / "two" / "*")), two


def test_two_process_training_equals_one_process(trained):
    cwd, one, two, job = trained
    one_losses, one_val, one_final, one_log = _log_numbers(one)
    two_losses, two_val, two_final, two_log = _log_numbers(two)
    assert "Distributed run" not in one_log and "Distributed run: 2 processes, gloo backend" in two_log
    assert len(one_losses) == len(two_losses) == 2 and len(one_val) == 2
    assert np.allclose(one_losses, two_losses, atol=2e-4), (one_losses, two_losses)
    assert one_val == two_val and one_final == two_final and len(two_final) == 1
    assert "[rank 1]" not in job.stdout  # the other rank writes nothing, unless it fails
    ckpt_one = torch.load(os.path.join(one, "last_model.pth"), weights_only=False)
    ckpt_two = torch.load(os.path.join(two, "last_model.pth"), weights_only=False)
    assert list(ckpt_two["model_state_dict"]) == list(ckpt_one["model_state_dict"])
    assert all(k.startswith("module.") and not k.startswith("module.module.") for k in ckpt_two["model_state_dict"])
    for key, value in ckpt_one["model_state_dict"].items():
        assert torch.allclose(value, ckpt_two["model_state_dict"][key], atol=1e-5), key
    # Adam's steps hardly depend on the gradients' scale, its moments do: they check the x world_size.
    moments_one, moments_two = ckpt_one["optimizer_state_dict"]["state"], ckpt_two["optimizer_state_dict"]["state"]
    assert moments_one and moments_one.keys() == moments_two.keys()
    for i in moments_one:
        assert torch.allclose(moments_one[i]["exp_avg"], moments_two[i]["exp_avg"], rtol=1e-3, atol=1e-7), i
        assert torch.allclose(moments_one[i]["exp_avg_sq"], moments_two[i]["exp_avg_sq"], rtol=1e-3, atol=1e-12), i
    assert ckpt_one["epoch_num"] == ckpt_two["epoch_num"] == 1
    assert (ckpt_one["training_flags"]["processes"], ckpt_two["training_flags"]["processes"]) == (1, 2)
    assert np.array_equal(ckpt_one["recalls"], ckpt_two["recalls"])
    assert torch.equal(ckpt_one["mining_state"]["negatives"], ckpt_two["mining_state"]["negatives"])


def test_two_process_eval_equals_one_process_and_loads_the_ddp_checkpoint(trained, synthetic_root):
    cwd, _, two, _ = trained
    _, _, train_final, _ = _log_numbers(two)
    best = os.path.join(two, "best_model.pth")
    flags = [*tiny_eval_flags(synthetic_root, "--rerank_num", "10", "--infer_batch_size", "8", "--load_weights", best)]
    flags.remove("--allow_random_weights")
    one = run_script(["eval.py", *flags, "--save_dir", "eval_one"], cwd=str(cwd), env=ENV)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    job = _torchrun(
        [os.path.join(ROOT, "eval.py"), *flags, "--save_dir", "eval_two", "--efficient_ram_testing"],
        cwd=cwd,
        timeout=300,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    folders = {name: _only_folder(str(cwd / "test" / name / "*")) for name in ("eval_one", "eval_two")}
    outputs = {}
    for name, folder in folders.items():
        _, _, final, log = _log_numbers(folder)
        first = re.findall(r"First ranking recalls: (.*)", log)
        with open(os.path.join(folder, "predictions.jsonl")) as f:
            outputs[name] = (final, first, [json.loads(line) for line in f])
    assert outputs["eval_one"] == outputs["eval_two"]
    assert len(outputs["eval_one"][2]) == 15 and len(outputs["eval_one"][0]) == 1
    assert outputs["eval_one"][0] == train_final  # the checkpoint of the 2-process run, in one process
    assert not os.path.exists(os.path.join(folders["eval_two"], "dense_features"))  # removed at the end


# ------------------------------------------------------------------------------------------------
# Failures end the whole job
# ------------------------------------------------------------------------------------------------

FAILING = r"""
import os, runpy, signal, sys, time
sys.path.insert(0, {root!r})
import loss, retrieval

def failing_now():
    with open({marker!r}, "w") as f:
        f.write(repr(time.time()))

if os.environ["RANK"] == "1":
    if {mode!r} == "raise":  # a bad batch on one rank, while rank 0 waits in the step's collectives
        def broken(*args, **kwargs):
            failing_now()
            raise ValueError("injected failure on rank 1")
        loss.triplet_losses = broken
    else:  # killed without a word, in the middle of the mining extraction
        def killed(*args, **kwargs):
            failing_now()
            os.kill(os.getpid(), signal.SIGKILL)
        retrieval.extract_features = killed
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path(os.path.join({root!r}, "train.py"), run_name="__main__")
"""


@pytest.mark.parametrize("mode", ["raise", "sigkill"])
def test_one_failing_rank_ends_the_whole_job(synthetic_root, tmp_path, mode):
    script = tmp_path / "failing.py"
    marker = tmp_path / "failed_at"
    script.write_text(FAILING.format(root=ROOT, mode=mode, marker=str(marker)))
    flags = tiny_eval_flags(synthetic_root, *TRAIN_FLAGS, "--save_dir", "fail")
    result = _torchrun([str(script), *flags], cwd=tmp_path, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert marker.exists(), output[-3000:]
    elapsed = time.time() - float(marker.read_text())  # from the failure to the end of the whole job
    assert elapsed < 60, elapsed
    if mode == "raise":
        assert "[rank 1]" in output and "error: injected failure on rank 1" in output
        assert "ValueError: injected failure on rank 1" in result.stderr  # torchrun's failure summary
    else:
        assert re.search(r"rank\s*: 1 .*\n.*exitcode\s*: -9", output), output[-3000:]
    log = open(os.path.join(_only_folder(str(tmp_path / "logs" / "fail" / "*")), "info.log")).read()
    assert "Start training epoch: 00" in log and "Reranking recalls" not in log
