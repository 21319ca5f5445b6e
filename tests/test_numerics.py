"""numerics.py: what --precision sets (TF32 switches, bf16 on GPUs without it) in every command, the
re-ranking's IEEE float32 under tf32, and train.py's --deterministic.

No GPU is needed: the torch.cuda functions the checks call are replaced by fakes, and the switches are
torch's process-wide flags, which exist (and are read back) on any machine.
"""

import contextlib
import glob
import importlib.util
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_FLAGS

import commons
import distributed
import numerics
import parser as selavpr_parser


class Stop(Exception):
    """Raised by a patched step right after a command's start: the test then reads what the start did."""


def _stop(*args, **kwargs):
    raise Stop()


@pytest.fixture
def switches():
    """torch's TF32 switches as torch itself starts them on a GPU machine (cuDNN TF32 on), matmul TF32 on
    too so that fp32 must turn both off; put back afterwards."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32 = saved[1]
    torch.backends.cudnn.allow_tf32 = saved[2]


def _ieee():
    return (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    ) == (False, False, "highest")


def fake_gpu(monkeypatch, *, name="NVIDIA H100 80GB HBM3", capability=(9, 0), bf16=True):
    """torch.cuda as on a machine with one GPU `name` (nothing else of CUDA is touched by the checks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.version, "hip", None)


# ------------------------------------------------------------------------------------------------
# --precision
# ------------------------------------------------------------------------------------------------


def test_fp32_and_bf16_turn_tf32_off_and_tf32_turns_it_on_for_a_gpu(switches, monkeypatch):
    setup = numerics.set_precision("fp32", device="cpu")
    assert _ieee() and setup.warnings == ()
    assert setup.line.startswith("Precision fp32: IEEE float32 everywhere")
    assert "torch.backends.cudnn.allow_tf32=False" in setup.line  # read back, not assumed
    torch.backends.cudnn.allow_tf32 = True
    assert "TF32 off" in numerics.set_precision("bf16", device="cpu").line and _ieee()
    # On the CPU tf32 computes as fp32 (and never reaches oneDNN's matmul precision).
    line = numerics.set_precision("tf32", device="cpu").line
    assert _ieee() and "this cpu run computes in IEEE float32, as fp32" in line
    fake_gpu(monkeypatch)
    setup = numerics.set_precision("tf32", device="cuda")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and setup.warnings == ()
    assert "torch.backends.cuda.matmul.allow_tf32=True, torch.backends.cudnn.allow_tf32=True" in setup.line
    numerics.set_precision("fp32", device="cuda")
    assert _ieee()
    with pytest.raises(ValueError, match="--precision must be one of fp32, tf32, bf16, got 'fp16'"):
        numerics.set_precision("fp16", device="cpu")


def test_bf16_on_a_gpu_without_it_is_refused_in_one_line_naming_the_gpu(switches, monkeypatch):
    fake_gpu(monkeypatch, name="Tesla V100-SXM2-16GB", capability=(7, 0), bf16=False)  # torch 2.0 on a V100
    with pytest.raises(ValueError) as e:
        numerics.set_precision("bf16", device="cuda")
    assert str(e.value) == (
        "--precision bf16: the GPU Tesla V100-SXM2-16GB (compute capability 7.0) has no bfloat16 support in "
        f"torch {torch.__version__}, and autocast would fail: use --precision fp32"
    )
    # Newer torch emulates bf16 there: it runs, with a warning that fp32 is faster.
    fake_gpu(monkeypatch, name="Tesla T4", capability=(7, 5), bf16=True)
    (warning,) = numerics.set_precision("bf16", device="cuda").warnings
    assert "the GPU Tesla T4 (compute capability 7.5) has no bfloat16 arithmetic; torch emulates it" in warning
    (warning,) = numerics.set_precision("tf32", device="cuda").warnings
    assert "Tesla T4 (compute capability 7.5) has no TF32" in warning and "computes as fp32" in warning
    fake_gpu(monkeypatch, name="NVIDIA A100-SXM4-40GB", capability=(8, 0), bf16=True)
    assert numerics.set_precision("bf16", device="cuda").warnings == ()
    # The CPU is never asked about (bf16 autocast works on every CPU torch supports).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _stop)
    assert numerics.set_precision("bf16", device="cpu").warnings == ()


def test_the_cublas_tf32_override_is_named(switches, monkeypatch):
    fake_gpu(monkeypatch)
    env = {numerics.TF32_OVERRIDE_ENV: "1"}
    (warning,) = numerics.set_precision("fp32", device="cuda", environ=env).warnings
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1" in warning and "unset it" in warning
    assert numerics.set_precision("tf32", device="cuda", environ=env).warnings == ()
    assert numerics.set_precision("fp32", device="cpu", environ=env).warnings == ()


def test_a_gpu_without_bf16_is_refused_before_the_output_folder_exists(
    switches, monkeypatch, tmp_path, restore_logging
):
    fake_gpu(monkeypatch, name="Tesla V100-SXM2-16GB", capability=(7, 0), bf16=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    folder = str(tmp_path / "logs" / "run")
    with pytest.raises(ValueError, match="Tesla V100-SXM2-16GB"):
        commons.start_run(SimpleNamespace(device="cuda", seed=-1, precision="bf16"), folder)
    assert not os.path.exists(folder)


def test_ieee_float32_turns_tf32_off_only_within(switches):
    with numerics.ieee_float32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with pytest.raises(KeyError), numerics.ieee_float32():
        raise KeyError("x")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    numerics.set_tf32(False)
    with numerics.ieee_float32():  # nothing to change: nothing touched
        assert _ieee()
    assert _ieee()


def test_the_reranking_runs_in_ieee_float32_under_tf32(switches, monkeypatch):
    import retrieval
    from dense_store import DenseStore

    seen = []

    def rerank(first, *args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return first, np.zeros(first.shape, dtype=np.float32)

    monkeypatch.setattr(retrieval, "rerank_predictions", rerank)
    rng = np.random.default_rng(0)
    database = retrieval.Database(rng.random((6, 4), dtype=np.float32), DenseStore(None))
    queries = retrieval.Queries(rng.random((2, 4), dtype=np.float32), DenseStore(None), "hard_resize")
    engine = retrieval.Retrieval(torch.nn.Identity(), batch_size=1, num_workers=0, device="cpu")
    ranking = engine.rank(database, queries, rerank_num=3)
    assert seen == [(False, False)] and ranking.predictions.shape == (2, 3)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # tf32 again after it


def test_model_forwards_take_every_precision(tiny_model):
    import loss

    images = torch.randn(2, 3, 56, 56)
    plain = tiny_model(images)
    for precision in ("fp32", "tf32"):  # tf32 is the process-wide switch: the call is the plain one
        assert all(
            torch.equal(a, b) for a, b in zip(loss.forward_features(tiny_model, images, precision=precision), plain)
        )
    local, glob_ = loss.forward_features(tiny_model, images, precision="bf16")
    assert local.dtype == glob_.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Every command sets the switches at its start and logs them
# ------------------------------------------------------------------------------------------------


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start_train_or_eval(script, extra, monkeypatch, tmp_path):
    import network

    module = __import__(script)
    if script == "train":
        monkeypatch.setattr(module, "build_datasets", _stop)
    else:
        monkeypatch.setattr(network, "build_model", _stop)
    parse = selavpr_parser.parse_arguments if script == "train" else selavpr_parser.parse_eval_arguments
    args = parse(["--datasets_folder", str(tmp_path), *TINY_FLAGS, *extra])
    with pytest.raises(Stop):
        module.main(args)
    (log,) = glob.glob(str(tmp_path / ("logs" if script == "train" else "test") / "default" / "*" / "info.log"))
    return open(log).read()


def _start_localize(extra, monkeypatch, tmp_path):
    import localize

    monkeypatch.setattr(localize, "warn_about_overlaps", _stop)  # the first step after the log header
    args = localize.parse_localize_arguments(
        ["--queries_folder", str(tmp_path), "--database_folder", str(tmp_path), "--allow_random_weights"]
        + ["--output_folder", str(tmp_path / "out"), *TINY_FLAGS, *extra]
    )
    with pytest.raises(Stop):
        localize.main(args)
    return open(tmp_path / "out" / "info.log").read()


def _start_reproduce(extra, monkeypatch, tmp_path):
    import reproduce

    monkeypatch.setattr(reproduce, "ResultCache", _stop)  # the first step after the log header
    args = reproduce.parse_arguments(
        ["--datasets_folder", str(tmp_path), "--output", str(tmp_path / "results"), *TINY_FLAGS, *extra]
    )
    with pytest.raises(Stop):
        reproduce.main(args)
    (log,) = glob.glob(str(tmp_path / "results" / "**" / "info.log"), recursive=True)
    return open(log).read()


def _start_tool(name, extra, monkeypatch, tmp_path, caplog):
    import datasets_ws

    tool = _load_tool(name)
    monkeypatch.setattr(datasets_ws, "open_image", _stop)  # the first step after the start
    images = ["a.jpg", "b.jpg"] if name == "draw_matches" else ["a.jpg"]
    flags = ["--no_ransac"] if name == "draw_matches" else []
    tiny = ["--backbone", "vit_tiny", "--backbone_depth", "2", "--device", "cpu", "--allow_random_weights"]
    args = tool.parse_args([*images, "--output", str(tmp_path / "out.jpg"), *flags, *tiny])
    with caplog.at_level(logging.INFO), pytest.raises(Stop):
        tool.main(args)
    return caplog.text


COMMANDS = ["train", "eval", "localize", "reproduce", "draw_matches", "heatmap"]


def _start(command, extra, monkeypatch, tmp_path, caplog):
    if command in ("train", "eval"):
        return _start_train_or_eval(command, extra, monkeypatch, tmp_path)
    if command == "localize":
        return _start_localize(extra, monkeypatch, tmp_path)
    if command == "reproduce":
        return _start_reproduce(extra, monkeypatch, tmp_path)
    return _start_tool(command, [], monkeypatch, tmp_path, caplog)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_starts_in_ieee_float32_and_logs_it(
    command, switches, monkeypatch, tmp_path, caplog, restore_logging
):
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    log = _start(command, [], monkeypatch, tmp_path, caplog)
    assert _ieee()
    assert "Precision fp32: IEEE float32 everywhere (TF32 off for cuBLAS matmuls and cuDNN convolutions) (" in log
    assert "torch.backends.cuda.matmul.allow_tf32=False, torch.backends.cudnn.allow_tf32=False" in log


@pytest.mark.parametrize("command", ["train", "eval", "localize", "reproduce"])
def test_commands_with_the_flag_turn_tf32_on_for_a_gpu_and_log_it(
    command, switches, monkeypatch, tmp_path, caplog, restore_logging
):
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    numerics.set_tf32(False)
    fake_gpu(monkeypatch, name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: None)  # seeding: no GPU to seed
    log = _start(command, ["--device", "cuda", "--precision", "tf32"], monkeypatch, tmp_path, caplog)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert "Precision tf32: TF32 tensor cores for float32 matmuls and convolutions" in log
    assert "torch.backends.cuda.matmul.allow_tf32=True, torch.backends.cudnn.allow_tf32=True" in log


def test_the_hub_entry_leaves_the_switches_to_its_caller(switches):
    import hubconf

    hubconf.selavpr(backbone="vit_tiny", backbone_depth=1, allow_random_weights=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


# ------------------------------------------------------------------------------------------------
# --deterministic
# ------------------------------------------------------------------------------------------------


def _attention_flags():
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )


def test_deterministic_training_steps_on_a_gpu_use_deterministic_algorithms_and_math_attention():
    before = _attention_flags()
    assert before[0] is False
    with numerics.deterministic_training(enabled=True, device_type="cuda"):
        assert _attention_flags() == (True, False, False, True)
    assert _attention_flags() == before
    for enabled, device_type in ((True, "cpu"), (False, "cuda")):  # the CPU's numbers stay a plain run's
        with numerics.deterministic_training(enabled=enabled, device_type=device_type):
            assert _attention_flags() == before


def test_an_operation_without_a_deterministic_gpu_kernel_ends_the_run_with_one_message():
    text = "upsample_bicubic2d_backward_out_cuda does not have a deterministic implementation, but you set it"
    with pytest.raises(ValueError, match="--deterministic: upsample_bicubic2d.* drop --deterministic") as e:
        with numerics.deterministic_training(enabled=True, device_type="cuda"):
            raise RuntimeError(text)
    assert isinstance(e.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # other errors pass unchanged
        with numerics.deterministic_training(enabled=True, device_type="cuda"):
            raise RuntimeError("CUDA out of memory")
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_training_step_of_the_tiny_model_runs_under_the_gpu_settings(tiny_model):
    """The ops of a training step have deterministic kernels (here the CPU's; the CUDA ones are listed in
    torch.use_deterministic_algorithms' documentation) and run with the math attention kernel."""
    import loss

    tiny_model.train()
    images = torch.randn(4, 3, 56, 56)
    with numerics.deterministic_training(enabled=True, device_type="cuda"):
        local, glob_ = loss.forward_features(tiny_model, images)
        g, l = loss.triplet_losses(local, glob_, torch.tensor([[0, 1, 2], [0, 1, 3]]), margin=0.1, normaliser=2)
        (g + l).backward()
    assert torch.isfinite(g + l) and any(p.grad is not None for p in tiny_model.parameters())


def test_prepare_deterministic_sets_the_cublas_workspace_only_for_a_gpu():
    env = {}
    assert "nothing to set on the CPU" in numerics.prepare_deterministic(device="cpu", environ=env) and env == {}
    line = numerics.prepare_deterministic(device="cuda", environ=env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} and "set CUBLAS_WORKSPACE_CONFIG=:4096:8" in line
    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    assert "kept CUBLAS_WORKSPACE_CONFIG=:16:8" in numerics.prepare_deterministic(device="cuda", environ=env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}


def test_train_batches_runs_each_step_in_the_deterministic_context(tiny_model, monkeypatch):
    import loss
    import train

    inside, entered = [False], []

    @contextlib.contextmanager
    def recording(*, enabled, device_type):
        entered.append((enabled, device_type))
        inside[0] = True
        yield
        inside[0] = False

    forward = loss.forward_features

    def checked_forward(*args, **kwargs):
        assert inside[0]
        return forward(*args, **kwargs)

    monkeypatch.setattr(numerics, "deterministic_training", recording)
    monkeypatch.setattr(loss, "forward_features", checked_forward)
    tiny_model.train()
    optimizer = torch.optim.Adam([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-5)
    step = optimizer.step
    optimizer.step = lambda *a, **k: (inside[0] or pytest.fail("step outside the context")) and step(*a, **k)
    batch = (torch.randn(4, 3, 56, 56), torch.tensor([[0, 1, 2], [0, 1, 3]]), None)
    losses = train.train_batches(
        [batch, batch],
        ctx=distributed.Context(device="cpu"),
        trainee=train.Trainee(model=tiny_model, train_model=tiny_model, optimizer=optimizer, last_path="none"),
        step=train.StepSettings(
            batch_size=2,
            compute=numerics.Compute(precision="fp32", deterministic=True),
            horizontal_flip=False,
            loss_settings=loss.LossSettings(margin=0.1),
            seed=0,
        ),
        normaliser=2,
        where="test",
        desc="test",
    )
    assert entered == [(True, "cpu"), (True, "cpu")] and len(losses) == 2
