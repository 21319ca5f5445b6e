"""commons.py, the runtime: the start of a run (process group from torchrun's environment, output folder).

The exit codes and error reporting are tested in test_robustness.py, the version check in
test_versions.py, the start of a 2-process job in test_distributed.py (its collectives test).
"""

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoints
import commons


def test_torchrun_environment_and_backend():
    assert commons.torchrun_environment({}) is None
    assert commons.torchrun_environment({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    assert commons.torchrun_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="RANK=None is not an integer.*torchrun"):
        commons.torchrun_environment({"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="inconsistent torchrun environment"):
        commons.torchrun_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert commons.backend_for("cuda", nccl_available=True) == "nccl"
    assert commons.backend_for("cuda:1", nccl_available=False) == "gloo"
    assert commons.backend_for("cpu", nccl_available=True) == "gloo"


def test_bad_timeout_environment_variable_is_named():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", commons.TIMEOUT_ENV: "soon"}
    with pytest.raises(ValueError, match="SELAVPR_DIST_TIMEOUT_S='soon' must be a positive number"):
        commons.init_from_environment(device="cpu", environ=env)


def test_single_process_start_run_gives_the_output_folder(tmp_path, monkeypatch, restore_logging):
    """One process: no process group, the folder is created with its log files and is ctx.output_folder
    exactly as given (relative paths included)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    folder = os.path.join("logs", "run", "2026-01-01_00-00-00")
    ctx = commons.start_run(SimpleNamespace(device="cpu", seed=-1, precision="fp32"), folder)
    assert ctx.output_folder == folder
    assert not ctx.enabled and ctx.is_main and ctx.device == "cpu"
    assert commons.is_run_folder(folder)
    assert f"The outputs are being saved in {folder}" in open(os.path.join(folder, "info.log")).read()
    commons.finish(ctx)
    with pytest.raises(commons.UserError, match="already exists"):
        commons.start_run(SimpleNamespace(device="cpu", seed=-1, precision="fp32"), folder)  # never shared


# ------------------------------------------------------------------------------------------------
# Random states in checkpoints: resuming on another number of GPUs, or on the CPU
# ------------------------------------------------------------------------------------------------


class FakeCuda:
    """torch.cuda's random-state functions on a machine with `gpus` GPUs (no GPU needed): each GPU's state
    is a distinct byte tensor; `restored` records set_rng_state's calls. `touchable` False: any CUDA
    random-state call (or asking for the current GPU) fails the test, as a CPU run must make none."""

    def __init__(self, monkeypatch, gpus, *, touchable=True):
        self.states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(gpus)}
        self.restored = []
        self.touchable = touchable
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        for name in ("current_device", "get_rng_state", "set_rng_state"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        for name in ("get_rng_state_all", "set_rng_state_all", "manual_seed", "seed", "initial_seed"):
            monkeypatch.setattr(torch.cuda, name, self.forbidden)  # every GPU's state: never needed

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a CUDA random-state function of all GPUs was called")

    def _index(self, device):
        if not self.touchable:
            raise AssertionError("CUDA state touched by a CPU run")
        index = device if isinstance(device, int) else torch.device(device).index
        if index is None or index not in self.states:
            raise IndexError(f"no GPU {device}")  # as torch: an index past the GPUs it sees
        return index

    def current_device(self):
        return self._index(0)

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, new_state, device="cuda"):
        index = self._index(device)
        self.restored.append((index, int(new_state[0])))
        self.states[index] = new_state.clone()


def _saved(states, tmp_path, tiny_model):
    """`states` after a round trip through a checkpoint file (both loaders: weights_only and restricted)."""
    path = str(tmp_path / "ckpt.pth")
    checkpoints.save_checkpoint(path, model=tiny_model, epoch_num=0, extra={"rng_states": states})
    restricted = checkpoints.load_weights_file(path, what="--resume", restricted=True)["rng_states"]
    loaded = checkpoints.load_weights_file(path, what="--resume")["rng_states"]
    assert restricted.keys() == loaded.keys() == states.keys()
    return loaded


def _legacy_states(gpus):
    """rng_states as earlier versions wrote them: "cuda" holds every visible GPU's state."""
    states = commons.get_rng_states(device="cpu")
    states["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(gpus)]
    return states


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_a_checkpoint_from_8_gpus_resumes_on_1_gpu_and_on_the_cpu(monkeypatch, tmp_path, tiny_model):
    # Written by rank 0 of an 8-GPU job (on cuda:0), and by an earlier version (all 8 GPUs' states).
    FakeCuda(monkeypatch, 8)
    new = _saved(commons.get_rng_states(device="cuda:0"), tmp_path, tiny_model)
    assert new["cuda_devices"] == [0] and "cuda" not in new
    legacy = _legacy_states(8)
    expected = _draws()
    for states in (new, legacy):
        one_gpu = FakeCuda(monkeypatch, 1)
        message = commons.set_rng_states(states, device="cuda")
        assert one_gpu.restored == [(0, 0)]
        assert "CUDA random state of GPU 0" in message
        assert _draws() == expected  # the CPU generators are restored too
        cpu = FakeCuda(monkeypatch, 1, touchable=False)
        message = commons.set_rng_states(states, device="cpu")
        assert cpu.restored == [] and _draws() == expected
    assert message.startswith("Python, NumPy and torch CPU random states")
    assert (
        "not restored: the CUDA random state of GPUs 0, 1, 2, 3, 4, 5, 6, 7, unused by this run on the CPU" in message
    )


def test_a_checkpoint_from_1_gpu_resumes_on_8_gpus(monkeypatch, tmp_path, tiny_model):
    FakeCuda(monkeypatch, 1)
    states = _saved(commons.get_rng_states(device="cuda"), tmp_path, tiny_model)
    eight = FakeCuda(monkeypatch, 8)
    assert "CUDA random state of GPU 0" in commons.set_rng_states(states, device="cuda")  # one process: GPU 0
    assert eight.restored == [(0, 0)]
    # A torchrun rank on another GPU: the checkpoint has no state for it; it keeps its seeded one.
    message = commons.set_rng_states(states, device="cuda:3")
    assert eight.restored == [(0, 0)]
    assert (
        "GPU 3 keeps its seeded state" in message
        and "not restored: the CUDA random state of GPU 0, unused by this run on GPU 3" in message
    )
    # An earlier version's checkpoint of one GPU, likewise.
    assert "GPU 3 keeps its seeded state" in commons.set_rng_states(_legacy_states(1), device="cuda:3")
    assert eight.restored == [(0, 0)]


def test_a_cpu_run_on_a_gpu_machine_never_touches_cuda_state(monkeypatch, tmp_path, tiny_model):
    FakeCuda(monkeypatch, 8, touchable=False)
    states = _saved(commons.get_rng_states(device="cpu"), tmp_path, tiny_model)  # the first save
    assert not {"cuda", "cuda_devices", "cuda_states"} & states.keys()
    assert commons.set_rng_states(states, device="cpu") == "Python, NumPy and torch CPU random states"
    # That CPU checkpoint resumed on a GPU: the GPU keeps its seeded state.
    gpu = FakeCuda(monkeypatch, 8)
    message = commons.set_rng_states(states, device="cuda")
    assert gpu.restored == [] and "GPU 0 keeps its seeded state" in message
