"""Shared fixtures: a seeded tiny ViT and helpers; the repository root on sys.path."""

import logging
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import network

# Tiny configuration used across the suite: vit_tiny width (192), 2 blocks.
TINY = dict(backbone="vit_tiny", backbone_depth=2)
TINY_FLAGS = ["--backbone", "vit_tiny", "--backbone_depth", "2", "--device", "cpu", "--num_workers", "0"]


def read_manifest(name):
    """{key: shape list} from tests/manifests/<name>.txt (copies of the shared key layouts)."""
    out = {}
    with open(os.path.join(ROOT, "tests", "manifests", name + ".txt")) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, _dtype = line.rstrip("\n").split("\t")
            out[key] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return out


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(**TINY)
    model.eval()
    return model


@pytest.fixture
def restore_logging():
    """The scripts' main() installs its own log handlers on the root logger; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def kill_once_marker_appears(command, marker, *, cwd, env=None, timeout=300, what="the marker", sig=None):
    """Start `command`, wait until it creates the file `marker`, then send it `sig` (SIGKILL by default:
    fault tests). Returns (exit status, seconds from the signal to the exit)."""
    import signal
    import time

    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not os.path.exists(marker) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert os.path.exists(marker), what
        sent = time.time()
        proc.send_signal(signal.SIGKILL if sig is None else sig)
        proc.wait(30)
        return proc.returncode, time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()


def run_script(args, *, cwd=None, env=None, timeout=600):
    """Run a repository script as a subprocess; returns CompletedProcess with text output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    args = list(args)
    if args and args[0].endswith(".py") and not os.path.isabs(args[0]):
        args[0] = os.path.join(ROOT, args[0])  # repository scripts, whatever the working directory
    return subprocess.run(
        [sys.executable] + args, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """The tiny built-in synthetic data set, generated once per session: (datasets_folder, name)."""
    import synthetic_dataset

    folder = tmp_path_factory.mktemp("datasets")
    synthetic_dataset.generate(str(folder), "synthetic", synthetic_dataset.SyntheticOptions(seed=0, preset="tiny"))
    return str(folder), "synthetic"


def tiny_eval_flags(synthetic_root, *extra):
    folder, name = synthetic_root
    return [
        "--datasets_folder",
        folder,
        "--dataset_name",
        name,
        *TINY_FLAGS,
        "--resize",
        "112",
        "112",
        "--allow_random_weights",
        *extra,
    ]
