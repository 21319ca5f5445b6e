"""How a run computes: what --precision sets, and the GPU checks behind it.

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
