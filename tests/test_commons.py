"""commons.py, the runtime: the start of a run (process group from torchrun's environment, output folder).

The exit codes and error reporting are tested in test_robustness.py, the version check in
test_versions.py, the start of a 2-process job in test_distributed.py (its collectives test).
"""

import os
from types import SimpleNamespace

import pytest

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
    ctx = commons.start_run(SimpleNamespace(device="cpu", seed=-1), folder)
    assert ctx.output_folder == folder
    assert not ctx.enabled and ctx.is_main and ctx.device == "cpu"
    assert commons.is_run_folder(folder)
    assert f"The outputs are being saved in {folder}" in open(os.path.join(folder, "info.log")).read()
    commons.finish(ctx)
    with pytest.raises(commons.UserError, match="already exists"):
        commons.start_run(SimpleNamespace(device="cpu", seed=-1), folder)  # two runs never share one
