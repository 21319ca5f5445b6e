"""How a run computes: what --precision sets, the GPU checks behind it, and train.py's --deterministic.

--precision is the arithmetic of the model (feature extraction and the training forward):

- fp32: IEEE float32 everywhere. Without this, torch runs cuDNN convolutions (the patch embedding,
  LocalAdapt's transposed convolutions) in TF32 on NVIDIA GPUs from Ampere on: its default, so the
  public release ran them so there (with IEEE float32 matmuls, torch's other default).
- tf32: TF32 tensor cores for float32 matmuls and convolutions (NVIDIA Ampere and newer GPUs; on older
  GPUs and on the CPU it computes as fp32), for speed. The re-ranking's similarity products stay IEEE
  float32 (ieee_float32), so its mutual-NN counts are exact for the features it is given.
- bf16: the model runs under bfloat16 autocast (autocast); fp32 master weights and losses; every float32
  operation outside autocast is IEEE float32, as with fp32.

The TF32 switches are process-wide torch settings: every command sets them once at its start
(set_precision) and writes them into its log. A library must not flip them behind its caller's back,
so the torch.hub entry leaves them alone.
"""

import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

PRECISIONS = ("fp32", "tf32", "bf16")

_MEANING = {
    "fp32": "IEEE float32 everywhere (TF32 off for cuBLAS matmuls and cuDNN convolutions)",
    "tf32": "TF32 tensor cores for float32 matmuls and convolutions (NVIDIA Ampere and newer); the "
    "re-ranking's similarity products stay IEEE float32",
    "bf16": "the model under bfloat16 autocast; every other float32 operation IEEE float32 (TF32 off)",
}

# Set in the environment, this makes torch run cuBLAS float32 matmuls in TF32 whatever the flags say.
TF32_OVERRIDE_ENV = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast(device_type: str, precision: str):
    """The context of a model forward at `precision`: bfloat16 autocast on `device_type` ("cpu",
    "cuda") for bf16; nothing for fp32 and tf32 (TF32 is the process-wide setting of set_precision)."""
    check_precision(precision)
    return torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# ------------------------------------------------------------------------------------------------
# --precision at the start of a command
# ------------------------------------------------------------------------------------------------


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for cuBLAS matmuls and cuDNN convolutions, process-wide. Off also puts the
    float32 matmul precision back to "highest" (IEEE float32 on every backend); on touches only the
    two CUDA switches (newer torch also lets oneDNN CPU matmuls use lower precision at "high")."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if not enabled:
        torch.set_float32_matmul_precision("highest")


def tf32_flags() -> str:
    """The torch switches as they are now (read back, for the log)."""
    return (
        f"torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
        f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
        f"float32 matmul precision {torch.get_float32_matmul_precision()!r}"
    )


@dataclass(frozen=True)
class PrecisionSetup:
    """What set_precision did, to be logged once the run's log exists."""

    line: str
    warnings: Tuple[str, ...] = ()

    def log(self) -> None:
        logging.info(self.line)
        for warning in self.warnings:
            logging.warning(warning)


def set_precision(precision: str, *, device: str, environ: Optional[dict] = None) -> PrecisionSetup:
    """Check that `device` can run `precision` and set torch's TF32 switches for it (process-wide).

    Raises ValueError (one line naming the GPU) for bf16 on a GPU where torch cannot run it. Called by
    every command at its start, before its output folder is created; the result is logged afterwards.
    """
    check_precision(precision)
    environ = os.environ if environ is None else environ
    device = torch.device(device)
    warnings: List[str] = []
    if device.type == "cuda":
        if precision == "bf16":
            warnings += _bf16_warnings(device)
        elif precision == "tf32":
            warnings += _tf32_warnings(device)
        if precision != "tf32" and environ.get(TF32_OVERRIDE_ENV) == "1":
            warnings.append(
                f"{TF32_OVERRIDE_ENV}=1 is set in the environment: torch runs cuBLAS float32 matmuls in TF32 "
                f"whatever --precision {precision} asks (also the re-ranking's similarity products, whose "
                "scores are then not exact); unset it for IEEE float32"
            )
    # TF32 only for a GPU run: on newer torch the matmul switch also reaches oneDNN's CPU matmuls.
    set_tf32(precision == "tf32" and device.type == "cuda")
    line = f"Precision {precision}: {_MEANING[precision]} ({tf32_flags()})"
    if precision == "tf32" and device.type != "cuda":
        line += f"; TF32 is for NVIDIA GPUs: this {device.type} run computes in IEEE float32, as fp32"
    return PrecisionSetup(line, tuple(warnings))


def _gpu(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"the GPU {torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def _bf16_warnings(device: torch.device) -> List[str]:
    """bf16 on a GPU: refused where torch's autocast would raise (torch 2.0 on a V100 or T4), a warning
    where torch emulates it (newer torch on those GPUs: slower than fp32)."""
    # The test torch's autocast itself makes before it accepts bfloat16 (it looks at the current device,
    # which is this process's device under torchrun).
    if not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"--precision bf16: {_gpu(device)} has no bfloat16 support in torch {torch.__version__}, "
            "and autocast would fail: use --precision fp32"
        )
    if torch.version.hip is None and torch.cuda.get_device_capability(device)[0] < 8:
        return [
            f"--precision bf16: {_gpu(device)} has no bfloat16 arithmetic; torch emulates it, which is "
            "slower than --precision fp32 there: prefer --precision fp32"
        ]
    return []


def _tf32_warnings(device: torch.device) -> List[str]:
    if torch.version.hip is None and torch.cuda.get_device_capability(device)[0] < 8:
        return [f"--precision tf32: {_gpu(device)} has no TF32 (Ampere and newer have it): it computes as fp32"]
    return []


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Within: TF32 off for cuBLAS and cuDNN (the re-ranking's exact products under --precision tf32);
    the switches are put back afterwards. Does nothing when TF32 is off already (fp32, bf16). Kernels
    pick their arithmetic when they are launched, so launches inside are IEEE float32 even if they run
    on the GPU after the switches were put back."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if not (matmul or cudnn):
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


# ------------------------------------------------------------------------------------------------
# --deterministic: seeded GPU training, reproducible bit for bit
# ------------------------------------------------------------------------------------------------
#
# A seeded run on the CPU is reproducible as it is. A GPU training step is not: the backward of the
# fast attention kernels (flash and memory-efficient) and of other kernels accumulates with atomics, in
# whatever order the threads arrive, and cuBLAS is reproducible only with a fixed workspace setting.
# Forward passes (evaluation, mining) use none of those backward kernels.

CUBLAS_ENV, CUBLAS_DETERMINISTIC = "CUBLAS_WORKSPACE_CONFIG", ":4096:8"


@dataclass(frozen=True)
class Compute:
    """How train.py's steps compute: --precision and --deterministic."""

    precision: str = "fp32"
    deterministic: bool = False


def prepare_deterministic(*, device: str, environ: Optional[dict] = None) -> str:
    """--deterministic, before CUDA starts: on a GPU, cuBLAS needs CUBLAS_WORKSPACE_CONFIG (set to
    :4096:8 unless the user set it) for reproducible results, and torch's deterministic mode refuses
    cuBLAS calls without it. Returns the line to log."""
    environ = os.environ if environ is None else environ
    if torch.device(device).type != "cuda":
        return "--deterministic: nothing to set on the CPU (a seeded CPU run is reproducible as it is)"
    if environ.get(CUBLAS_ENV):
        kept = f"kept {CUBLAS_ENV}={environ[CUBLAS_ENV]} from the environment"
    else:
        environ[CUBLAS_ENV] = CUBLAS_DETERMINISTIC
        kept = f"set {CUBLAS_ENV}={CUBLAS_DETERMINISTIC}"
    return (
        f"--deterministic: {kept}; training steps run with torch's deterministic algorithms and the math "
        "attention kernel (slower; evaluation and mining are unchanged)"
    )


def _math_attention():
    """Only the math kernel of scaled_dot_product_attention (its backward is plain matmuls)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel(SDPBackend.MATH)


@contextmanager
def deterministic_training(*, enabled: bool, device_type: str) -> Iterator[None]:
    """One training step (forward, losses, backward, optimizer step) under --deterministic on a GPU:
    torch's deterministic algorithms (an operation without one raises instead of varying) and the math
    attention kernel; both are put back afterwards. Nothing on the CPU (seeded CPU runs are
    reproducible, and its numbers stay those of a run without the flag) or when not enabled.

    An operation that has no deterministic CUDA implementation ends the run with one message."""
    if not enabled or device_type != "cuda":
        yield
        return
    mode, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        with _math_attention():
            yield
    except RuntimeError as e:
        if "deterministic" not in str(e):
            raise
        raise ValueError(
            f"--deterministic: {str(e).splitlines()[0]} This operation has no deterministic GPU implementation "
            f"in torch {torch.__version__}: drop --deterministic (training then varies between runs in the "
            "last bits)"
        ) from e
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
