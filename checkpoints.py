"""Weight files: safe reading (weights_only, or a restricted unpickler on old torch), the public and the
project's checkpoint layouts, the model settings the project's checkpoints record, and atomic writing.

Every weight file of every command goes through load_weights_file; network.load_model puts what it reads
into a model. Nothing here builds a network (network.py does).
"""

import inspect
import logging
import mmap as mmap_module
import os
import pickle
import re
import struct
import types
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import atomic_files
import backbone as vit

# DataParallel prefix carried by every key of the public SelaVPR checkpoints.
MODULE_PREFIX = "module."


@dataclass(frozen=True)
class ArgNames:
    """How messages name the model settings: as command-line flags (`--backbone vit_small`, the scripts)
    or as Python arguments (`backbone='vit_small'`, the torch.hub entry point), so that each caller's
    users are told about what they actually typed."""

    python: bool = False

    def __call__(self, name: str) -> str:
        return f"{name}=" if self.python else f"--{name}"

    def show(self, name: str, value) -> str:
        return f"{name}={self.value(value)}" if self.python else f"--{name} {value}"

    def value(self, value) -> str:
        return repr(value) if self.python else str(value)

    @property
    def kind(self) -> str:
        return "arguments" if self.python else "flags"


FLAGS = ArgNames()
PYTHON_ARGUMENTS = ArgNames(python=True)

# ---------------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------------


def _numpy_multiarray():
    """numpy's multiarray module: numpy 2 moved it to numpy._core (numpy.core is a deprecated alias
    there), numpy 1.x has only numpy.core."""
    core = getattr(np, "_core", None)
    return core.multiarray if core is not None and hasattr(core, "multiarray") else np.core.multiarray


def _numpy_safe_globals() -> list:
    """Exactly the numpy objects a SelaVPR training checkpoint pickles (`recalls` array, `best_r5`
    float64 scalar), under the names numpy 1.x (numpy.core) and 2.x (numpy._core) write."""
    multiarray = _numpy_multiarray()
    return [
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.float64)),
        type(np.dtype(np.float32)),
        type(np.dtype(np.int64)),
        # An empty array's buffer is pickled as a call of bytes(): harmless, and our own
        # checkpoints hold one before the first validation.
        bytes,
    ]


def _torch_allow_list_takes_names() -> bool:
    """Whether this torch's weights_only loader accepts allow-list entries under a given name
    ((object, "module.name"), torch >= 2.6): a file written with numpy 1.x names numpy.core..., which
    numpy 2 calls numpy._core..., and vice versa, so the numpy objects must be allowed under both.

    Older torch (no safe_globals, or entries by object only) gets the restricted unpickler instead.
    The probe reads torch's own resolved allow-list; a torch that renames that private helper also
    gets the restricted unpickler (still safe; tests/test_checkpoints.py notices the change).
    """
    if not hasattr(torch.serialization, "safe_globals"):
        return False
    try:
        from torch import _weights_only_unpickler

        probe = "selavpr_probe.allow_list_by_name"
        with torch.serialization.safe_globals([(OrderedDict, probe)]):
            return probe in _weights_only_unpickler._get_user_allowed_globals()
    except (AttributeError, ImportError, TypeError):  # an older torch: entries by object only
        return False


class RefusedGlobal(pickle.UnpicklingError):
    """A weights file pickles an object outside the allow-list (unpickling it could run code)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refused global {name}")
        self.name = name


def _latin1_encode(text, encoding="latin1"):
    """codecs.encode for protocol-2 pickles of bytes (numpy array buffers): latin-1 only, so that a
    file cannot pick another codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args):
    """bytes() as an empty numpy buffer is pickled; any argument (e.g. a huge size) is refused."""
    if args:
        raise RefusedGlobal("bytes with arguments")
    return b""


def _restricted_allow_list() -> Dict[str, object]:
    """Every global the restricted unpickler resolves, by the name a pickle gives it: tensors (torch's
    storage classes are resolved by torch itself before this list is asked), OrderedDict and the numpy
    objects of a training checkpoint under their numpy 1.x and 2.x names. Nothing else."""
    multiarray = _numpy_multiarray()
    allowed = {
        "collections.OrderedDict": OrderedDict,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch.Size": torch.Size,
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
        # Protocol 2 writes Python 3's bytes as _codecs.encode(str, "latin1") and builtins as __builtin__.
        "_codecs.encode": _latin1_encode,
        "__builtin__.bytes": _empty_bytes,
        "builtins.bytes": _empty_bytes,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[f"{core}.multiarray._reconstruct"] = multiarray._reconstruct
        allowed[f"{core}.multiarray.scalar"] = multiarray.scalar
    # dtypes are plain values (e.g. a tensor's dtype in an optimizer state), not callables that run code.
    allowed.update({f"torch.{name}": value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return allowed


def restricted_pickle_module() -> types.ModuleType:
    """A pickle module for torch's load(pickle_module=...) whose unpickler resolves only
    _restricted_allow_list() and raises RefusedGlobal for any other global, before anything runs.

    It works with every torch version (torch.load has taken pickle_module since 1.0), unlike
    weights_only's allow-lists. Built before a load, so that a missing attribute is a bug that shows
    as such, not a complaint about the user's file.
    """
    allowed = _restricted_allow_list()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            obj = allowed.get(f"{module}.{name}")
            if obj is None:
                raise RefusedGlobal(f"{module}.{name}")
            return obj

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    module = types.ModuleType("selavpr_restricted_pickle")
    module.Unpickler, module.load = Unpickler, load
    module.UnpicklingError = pickle.UnpicklingError
    return module


# Errors that a bad file (truncated, corrupt, not a torch file) makes torch.load raise: torch's zip
# reader raises RuntimeError; the unpicklers UnpicklingError, EOFError, ValueError (e.g. an unknown
# protocol) and, torch's pure-Python weights_only one, IndexError / KeyError / struct.error on garbage.
# Not caught: ImportError, AttributeError, TypeError, NameError - bugs or a broken install, which must
# show as such rather than as advice about the user's file.
_BAD_FILE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    IndexError,
    KeyError,
    struct.error,
    OverflowError,
)


def torch_can_map_files() -> bool:
    """Whether this torch can memory-map a weights file (torch.load's `mmap`, torch >= 2.1) and put the
    mapped tensors into a model without a copy (load_state_dict's `assign`, torch >= 2.1), with private
    (copy-on-write) maps: an in-place update of such a weight (an optimizer step) then changes this
    process's copy of that page, never the file. Asked of torch's own signatures, not of its version
    number; the oldest supported torch (2.0) has neither and reads files whole, as before. POSIX only."""
    if os.name != "posix":
        return False
    if "mmap" not in inspect.signature(torch.load).parameters:
        return False
    if "assign" not in inspect.signature(nn.Module.load_state_dict).parameters:
        return False
    # torch >= 2.2 lets a program make its maps shared (writes would then reach the file): not then.
    options = getattr(torch.serialization, "get_default_mmap_options", None)
    return options is None or options() == mmap_module.MAP_PRIVATE


def _mappable(path: str) -> bool:
    """torch maps only files in its zip format (every torch.save since 1.6), not the legacy one."""
    return torch_can_map_files() and zipfile.is_zipfile(path)


def _torch_load(path: str, *, restricted: bool, mmap: bool = False):
    """The one torch.load of the project: weights_only=True with the numpy allow-list where torch can
    express it, else the restricted unpickler. mmap: map the tensors' storage instead of reading it, where
    this torch and the file allow it (_mappable; else the file is read whole): the tensors' pages are read
    when used, and the pages of tensors never used are never read."""
    extra = {"mmap": True} if mmap and _mappable(path) else {}
    if restricted:
        restricted_pickle = restricted_pickle_module()
        # torch.load refuses pickle_module together with weights_only=True, so weights_only=False is said
        # explicitly (torch >= 2.6 would otherwise default to True and raise). It is still safe: every
        # global of the file goes through restricted_pickle's find_class (allow-list or RefusedGlobal).
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False, **extra)
    allow = _numpy_safe_globals()
    with torch.serialization.safe_globals(allow):
        return torch.load(path, map_location="cpu", weights_only=True, **extra)


def non_finite_tensors(obj, prefix: str = "") -> List[str]:
    """The names of the floating tensors in `obj` (a checkpoint's nested dicts and lists) that hold NaN or
    Inf, with what they hold: ["LocalAdapt.upconv2.bias (NaN)", ...]. One reduction per tensor."""
    found = []
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            kinds = [name for name, bad in (("NaN", torch.isnan(obj).any()), ("Inf", torch.isinf(obj).any())) if bad]
            found.append(f"{prefix or 'tensor'} ({' and '.join(kinds)})")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            found += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found += non_finite_tensors(value, f"{prefix}[{i}]")
    return found


def check_finite(obj, *, path: str, what: str) -> None:
    """A clear error, naming the file and its first offending tensors, when a weights file (or a part of
    it) holds NaN or Inf: such weights give NaN features, on which every candidate scores the same and
    the faiss search returns no candidates at all, with nothing saying why."""
    bad = non_finite_tensors(obj)
    if bad:
        shown = ", ".join(bad[:5]) + (f" … ({len(bad)} tensors in all)" if len(bad) > 5 else "")
        raise ValueError(
            f"{what} {path} holds non-finite values (NaN or Inf) in {shown}. A model with such weights "
            "computes NaN features and meaningless rankings: the file is damaged, or it was saved by a "
            "training run that had diverged. Use an earlier or another checkpoint."
        )


def load_weights_file(
    path: str, *, what: str, restricted: Optional[bool] = None, mmap: bool = False, check: bool = True
) -> dict:
    """Load a weights file safely (tensors, plain containers, numbers and the numpy objects of a training
    checkpoint only); clear errors for bad files.

    `what` names the flag the path came from, for the messages. `restricted` chooses the loader (tests
    run both): None = torch.load(weights_only=True) with the numpy allow-list where this torch can
    express it (>= 2.6), else the restricted unpickler; True = the restricted unpickler. mmap: see
    _torch_load. check: refuse a file with NaN or Inf in any floating tensor (check_finite); False for a
    caller that checks what it uses itself (e.g. after putting mapped weights into a model, so that the
    check reads the pages the model keeps, not a second copy).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path}: no such file. Give the path of an existing weights file.")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path} is a directory. Give the path of a weights file (.pth).")
    if os.path.getsize(path) == 0:
        raise ValueError(
            f"{what} {path} is empty (0 bytes): its download or copy did not finish. Give a complete "
            "weights file (.pth)."
        )
    if restricted is None:
        restricted = not _torch_allow_list_takes_names()
    try:
        data = _torch_load(path, restricted=restricted, mmap=mmap)
    except _BAD_FILE_ERRORS as e:
        refused = e.name if isinstance(e, RefusedGlobal) else _unsupported_global(str(e))
        if refused is not None:
            raise ValueError(
                f"{what} {path} refused: it would run code when unpickled (it pickles {refused}, "
                "which is not a tensor, number, container or numpy array). Nothing in it was run: "
                "use weight files from a source you trust."
            ) from None
        raise ValueError(
            f"{what} {path} could not be loaded ({_first_sentence(e)}): it is truncated or not a "
            "PyTorch weights file. Download or copy it again."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} holds a {type(data).__name__}, not a state dict or checkpoint dict.")
    if check:
        check_finite(data, path=path, what=what)
    return data


def _unsupported_global(message: str) -> Optional[str]:
    """The object named by torch's weights_only refusal ("Unsupported global: GLOBAL posix.system ..." in
    torch 2.6, "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" later)."""
    match = re.search(r"\bGLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def _first_sentence(e: BaseException) -> str:
    """The reason of a load error, without torch's further lines (advice about its own internals)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # weights_only failures put the actual reason after this marker.
    reason = next(
        (line.split("WeightsUnpickler error:", 1)[1].strip() for line in lines if "WeightsUnpickler error:" in line),
        lines[0] if lines else type(e).__name__,
    )
    return reason.split(". ")[0][:200]


def _strip_prefix(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return OrderedDict((k[len(prefix) :], v) for k, v in state.items())
    return state


def _check_shapes(
    model: nn.Module, state: Dict[str, torch.Tensor], path: str, what: str, names: ArgNames = FLAGS
) -> None:
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        settings = " / ".join(names(n) for n in ("backbone", "registers", "backbone_depth"))
        raise ValueError(
            f"{what} {path} does not fit this model ({settings}?): "
            f"shape mismatch for {', '.join(wrong[:5])}{' …' if len(wrong) > 5 else ''}"
        )


def _describe(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" … ({len(keys)} in all)" if len(keys) > limit else "")


def _fits_in_place(model: nn.Module, state: Dict[str, torch.Tensor]) -> bool:
    """Whether `state`'s tensors can become the model's own (load_state_dict's assign) and behave as a copy
    would: each has the dtype of the model's tensor of that name (assign keeps the file's dtype, a copy
    converts), lies on the CPU, and no two share memory (assign would tie them, a copy keeps them apart)."""
    own = model.state_dict()
    storages = set()
    for key, tensor in state.items():
        if key not in own or tensor.dtype != own[key].dtype or tensor.device.type != "cpu":
            return False
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if storage is not None and storage in storages:
            return False
        storages.add(storage)
    return True


def _put_weights(module: nn.Module, state: Dict[str, torch.Tensor], *, strict: bool, in_place: bool) -> bool:
    """load_state_dict(state) into `module`; in_place (torch_can_map_files() and _fits_in_place): the
    file's mapped tensors become the module's parameters (assign=True) instead of being copied into them,
    so that a model and its weights file are one copy in memory, not two. Every parameter keeps its
    requires_grad (assign keeps the module's), and its place in the module; the caller moves the model to
    its device afterwards, as before. Returns whether it was done in place."""
    in_place = in_place and torch_can_map_files() and _fits_in_place(module, state)
    if in_place:
        module.load_state_dict(state, strict=strict, assign=True)
    else:
        if any(t.is_meta for t in module.state_dict().values()):
            # Built without memory (network.load_model) but the file's tensors cannot become the model's
            # (another dtype, shared storage): allocate, then copy every one of them in (strict).
            module.to_empty(device="cpu")
        module.load_state_dict(state, strict=strict)
    return in_place


def load_foundation_weights(model: nn.Module, path: str, *, in_place: bool = False, names: ArgNames = FLAGS) -> None:
    """Load the public DINOv2 file into model.backbone: every key of the file must be used, and only
    adapter parameters may be missing. in_place: see _put_weights; names: how messages name settings."""
    what = names("foundation_model_path").rstrip("=")
    state = load_weights_file(path, what=what, mmap=in_place, check=False)
    state = _strip_prefix(state, "backbone.")
    own = model.backbone.state_dict()
    unexpected = set(state) - set(own)
    missing = {k for k in set(own) - set(state) if ".adapter" not in k}
    del own  # the model's initial weights: freed as soon as they are replaced
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        hint = (
            f" (a register file needs {names.show('registers', True)}, a plain one must run without it)"
            if any("register_tokens" in k for k in missing | unexpected)
            else ""
        )
        if "model_state_dict" in state:
            checkpoint = "checkpoint=" if names.python else "--resume or --load_weights"
            hint = f" (this is a SelaVPR checkpoint: give it with {checkpoint} instead)"
        raise ValueError(
            f"{what} {path} does not match {names.show('backbone', model.backbone_name)} "
            f"({len(model.backbone.blocks)} blocks){hint}: {'; '.join(parts)}"
        )
    _check_shapes(model.backbone, state, path, what, names)
    if not in_place:
        check_finite(state, path=path, what=what)
    _put_weights(model.backbone, state, strict=False, in_place=in_place)
    if in_place:  # after: on the pages the model keeps (see load_model_weights)
        check_finite(state, path=path, what=what)
    logging.info(f"Loaded foundation weights from {path} ({len(state)} tensors; adapters keep their init)")


def checkpoint_model_state(checkpoint: dict) -> Dict[str, torch.Tensor]:
    """The model's state dict (no `module.` prefix) from a training checkpoint or a bare state dict."""
    state = checkpoint.get("model_state_dict", checkpoint)
    return _strip_prefix(state, MODULE_PREFIX)


def load_model_weights(
    model: nn.Module, path: str, *, what: str = "--resume", in_place: bool = False, names: ArgNames = FLAGS
) -> dict:
    """Load a SelaVPR checkpoint's weights strictly (with or without `module.`, training dict or bare
    state dict); returns the whole file's dict for the caller's other entries.

    in_place (a model being built: network.load_model): the file is memory-mapped and its tensors become
    the model's (_put_weights); the check for NaN / Inf then runs after, on the pages the model keeps, so
    that the model's initial weights are freed before the file's are read. Otherwise the file is checked,
    then copied into the model's own tensors."""
    checkpoint = load_weights_file(path, what=what, mmap=in_place, check=False)
    state = checkpoint_model_state(checkpoint)
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    del own
    if missing or unexpected:
        parts = [f"missing keys: {_describe(missing)}"] if missing else []
        parts += [f"unexpected keys: {_describe(unexpected)}"] if unexpected else []
        raise ValueError(
            f"{what} {path} is not a SelaVPR checkpoint of this model (check {names('backbone')}, "
            f"{names('registers')}): {'; '.join(parts)}"
        )
    _check_shapes(model, state, path, what, names)
    # The model's tensors under the model's names (no "model_state_dict.module." before them), and the rest.
    rest = {k: v for k, v in checkpoint.items() if k != "model_state_dict"} if "model_state_dict" in checkpoint else {}
    everything = dict(state, **rest)
    if not in_place:
        check_finite(everything, path=path, what=what)
    if _put_weights(model, state, strict=True, in_place=in_place):
        logging.info(f"Loaded model weights from {what} {path} (memory-mapped: one copy in memory)")
    else:
        logging.info(f"Loaded model weights from {what} {path}")
    if in_place:
        check_finite(everything, path=path, what=what)
    return checkpoint


def public_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model's state dict with the `module.` prefix of the public release (DataParallel layout)."""
    inner = model.module if hasattr(model, "module") else model
    return OrderedDict((MODULE_PREFIX + k, v.detach().cpu()) for k, v in inner.state_dict().items())


def save_checkpoint(
    path: str,
    *,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    epoch_num: int = 0,
    recalls=None,
    best_r5: float = 0.0,
    not_improved_num: int = 0,
    resize: Optional[Sequence[int]] = None,
    extra: Optional[dict] = None,
) -> None:
    """Write a checkpoint in the public layout, atomically (temp file + rename).

    Top-level entries as the public release: epoch_num, model_state_dict (`module.` keys),
    optimizer_state_dict, recalls (numpy array), best_r5 (numpy float64), not_improved_num. Ours beside
    them: `model_settings` (backbone, depth, registers and, when given, the input size the model was
    trained at), so that later commands rebuild the model without repeating the flags, and the `extra`
    entries (e.g. random states for an exact resume). The public release ignores entries it does not know.
    """
    inner = model.module if hasattr(model, "module") else model
    checkpoint = {
        "epoch_num": int(epoch_num),
        "model_state_dict": public_state_dict(model),
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else {},
        "recalls": np.asarray(recalls if recalls is not None else [], dtype=np.float64),
        "best_r5": np.float64(best_r5),
        "not_improved_num": int(not_improved_num),
        SETTINGS_KEY: model_flags_of(inner, resize=resize),
    }
    checkpoint.update(extra or {})
    atomic_torch_save(checkpoint, path)


def estimated_checkpoint_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """About how many bytes save_checkpoint writes for `model` and `optimizer`: every weight of the model
    (frozen ones included, as the public layout has them), the optimizer's per-parameter state (Adam: two
    tensors per trained parameter; SGD with momentum: one) and 1 MiB for the small entries."""
    inner = model.module if hasattr(model, "module") else model
    weights = sum(t.numel() * t.element_size() for t in inner.state_dict().values())
    slots = 0
    if optimizer is not None:
        if isinstance(optimizer, torch.optim.Adam):
            slots = 2
        elif any(group.get("momentum", 0) for group in optimizer.param_groups):
            slots = 1
    trained = sum(
        p.numel() * p.element_size() for g in (optimizer.param_groups if optimizer else []) for p in g["params"]
    )
    return weights + slots * trained + 2**20


def atomic_torch_save(obj, path: str) -> None:
    """torch.save(obj) to `path` through atomic_files.atomic_write (temp file, then rename): a run
    killed while saving leaves the previous file intact."""

    def write(tmp):
        # Through a Python file object: a full disk then raises OSError(ENOSPC), which run_main reports
        # as such; torch.save(obj, <path>) writes in C++ and fails with a cryptic RuntimeError instead.
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                # torch's zip writer, closing after a failed write, may replace the OSError with its own.
                cause = e.__context__
                while cause is not None and not isinstance(cause, OSError):
                    cause = cause.__context__
                if cause is None:
                    raise
                raise cause from None

    atomic_files.atomic_write(path, write)


# ---------------------------------------------------------------------------------------------------
# Model settings stored in the checkpoints this project writes
# ---------------------------------------------------------------------------------------------------

# The flags that decide the architecture (a checkpoint fits only that one) and the input size; their
# defaults are the paper's model. Files of the public release carry no settings: they get these.
SETTINGS_KEY = "model_settings"
ARCHITECTURE_FLAGS = ("backbone", "backbone_depth", "registers")
MODEL_FLAGS = ARCHITECTURE_FLAGS + ("resize",)


def model_flags_of(model: nn.Module, *, resize: Optional[Sequence[int]] = None) -> dict:
    """The MODEL_FLAGS values of `model` (resize when given): what a later run needs to rebuild it, kept
    in its checkpoints under SETTINGS_KEY; plain types only (loadable with weights_only=True)."""
    settings = {
        "backbone": model.backbone_name,
        "backbone_depth": len(model.backbone.blocks),
        "registers": bool(model.backbone.num_register_tokens),
    }
    if resize is not None:
        settings["resize"] = [int(resize[0]), int(resize[1])]
    return settings


def saved_model_settings(checkpoint: dict, *, path: str, what: str) -> Optional[dict]:
    """The `model_settings` entry of a checkpoint written by this project (None for other files),
    checked for the types a later run relies on."""
    saved = checkpoint.get(SETTINGS_KEY)
    if saved is None:
        return None
    ok = (
        isinstance(saved, dict)
        and isinstance(saved.get("backbone"), str)
        and saved["backbone"] in vit.FACTORIES
        and isinstance(saved.get("backbone_depth"), int)
        and saved["backbone_depth"] > 0
        and isinstance(saved.get("registers"), bool)
        and (
            "resize" not in saved
            or (
                isinstance(saved["resize"], (list, tuple))
                and len(saved["resize"]) == 2
                and all(isinstance(v, int) and v > 0 for v in saved["resize"])
            )
        )
    )
    if not ok:
        raise ValueError(
            f"{what} {path}: its '{SETTINGS_KEY}' entry is malformed ({saved!r:.200}); it was not "
            "written by this project's train.py. Remove the entry or give a file written by train.py."
        )
    return dict(saved)


def resolve_model_settings(
    given: Dict[str, object],
    saved: Optional[dict],
    defaults: Dict[str, object],
    *,
    source: str,
    names: ArgNames = FLAGS,
) -> Tuple[dict, Optional[str]]:
    """Settings for this run: each flag given on the command line, else the checkpoint's value, else
    its default. Returns (settings, a note for the log or None).

    `given` holds only the flags present on the command line (the arguments given, for the hub). A given
    backbone, depth or registers choice that differs from the checkpoint's is an error naming both (those
    weights cannot fit); a given --resize wins over the size the checkpoint was trained at (any multiple
    of 14 works). names: how the messages name the settings (flags, or the hub's Python arguments).
    """
    saved = saved or {}
    conflicts = []
    for flag in ARCHITECTURE_FLAGS:
        if flag in given and flag in saved and given[flag] != saved[flag]:
            conflicts.append(f"{names.show(flag, given[flag])} (given) but {names.value(saved[flag])} in the file")
    if conflicts:
        raise ValueError(
            f"{source} was trained with another model: {'; '.join(conflicts)}. Drop those {names.kind} "
            "(the file's settings are used when they are not given) or give the matching file."
        )
    settings = {flag: given[flag] if flag in given else saved.get(flag, defaults[flag]) for flag in MODEL_FLAGS}
    taken = [flag for flag in MODEL_FLAGS if flag not in given and flag in saved]
    if not taken:
        return settings, None
    shown = ", ".join(f"--{f} {' '.join(map(str, settings[f])) if f == 'resize' else settings[f]}" for f in taken)
    return settings, f"Model settings taken from {source}: {shown} (flags given on the command line win)"
