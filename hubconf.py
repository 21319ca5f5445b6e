"""torch.hub entry point ``selavpr``: load it from a local clone with source="local" and checkpoint=PATH.

Weights are never downloaded: give the paths of files you already have (SelaVPR_msls.pth,
SelaVPR_pitts30k.pth, or a checkpoint written by train.py; and/or the DINOv2 file
dinov2_vitl14_pretrain.pth). Only plain module imports and private (underscored) helpers here: torch.hub
lists every public callable of this file as an entry point.

The project's modules have generic top-level names (network, parser, commons, ...). They are imported
here without touching the caller's modules of the same names: a `network` module the caller imported
before is neither used nor replaced, and the caller's `import network` afterwards still finds their own
(ours are kept under private names, ``_selavpr_hub.<name>`` in sys.modules).
"""

import importlib
import os
import sys

dependencies = ["torch", "numpy"]

_ROOT = os.path.dirname(os.path.realpath(__file__))
_PRIVATE = "_selavpr_hub"


def _project_modules() -> set:
    """Top-level names of this repository's modules and packages (hubconf itself excluded)."""
    names = set()
    for entry in os.listdir(_ROOT):
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(_ROOT, entry, "__init__.py")):
            names.add(entry)
    names.discard("hubconf")
    return names


def _is_ours(module) -> bool:
    path = getattr(module, "__file__", None)
    return path is not None and os.path.realpath(path).startswith(_ROOT + os.sep)


def _import_network():
    """This repository's network module, imported without clobbering or being clobbered.

    Reused when already imported from here (e.g. by a script run from the clone). Otherwise the
    entries of sys.modules that carry our modules' names (the caller's own modules) are set aside,
    ours are imported from this folder, moved to private names, and the caller's are put back. Our
    modules keep references to each other, so they work without their public names.
    """
    for name in ("network", f"{_PRIVATE}.network"):
        module = sys.modules.get(name)
        if module is not None and _is_ours(module):
            return module
    names = _project_modules()

    def is_project_name(name: str) -> bool:
        return name.split(".")[0] in names

    callers = {name: module for name, module in sys.modules.items() if is_project_name(name)}
    for name in callers:
        del sys.modules[name]
    sys.path.insert(0, _ROOT)
    try:
        return importlib.import_module("network")
    finally:
        sys.path.remove(_ROOT)  # the first occurrence: ours (torch.hub adds its own entry too)
        for name in [n for n in sys.modules if is_project_name(n)]:
            module = sys.modules.pop(name)
            if _is_ours(module):
                sys.modules[f"{_PRIVATE}.{name}"] = module
        sys.modules.update(callers)


network = _import_network()  # a module, not a callable: torch.hub does not list it as an entry point
checkpoints = network.checkpoints  # its weight files, imported with it


def selavpr(
    checkpoint=None,
    foundation_model_path=None,
    *,
    backbone=None,
    registers=None,
    backbone_depth=None,
    allow_random_weights=False,
):
    """SelaVPR (DINOv2 ViT with adapters, global and local heads) as a plain nn.Module, on the CPU, in eval mode.

    Args:
        checkpoint: path of a SelaVPR checkpoint: the public files (``module.`` keys), a train.py
            checkpoint, or a bare state dict. Loads every weight (strict).
        foundation_model_path: path of the DINOv2 backbone weights (plain state dict). With a checkpoint
            too, the checkpoint is loaded last and wins; alone, adapters and heads keep their
            initialisation (only useful as a starting point for training).
        backbone: "vit_large" (the paper), "vit_small", "vit_base", "vit_giant2", "vit_tiny" (tests).
        registers: the DINOv2-with-registers variant (4 register tokens).
        backbone_depth: number of blocks (default: the backbone's own).
            backbone, registers and backbone_depth default to the settings stored in a checkpoint written
            by this project's train.py, else to the paper's model (ViT-L/14, no registers); a value given
            here that contradicts the checkpoint's is an error naming both.
        allow_random_weights: return a randomly initialised model when no path is given (tests, demos).

    Numerics: this function leaves torch's process-wide switches to the caller. On NVIDIA GPUs from
    Ampere on, torch runs convolutions (the patch embedding, LocalAdapt) in TF32 by default, which moves
    the features by about 1e-4 to 1e-3; for IEEE float32, what the project's commands run with
    ``--precision fp32``, set ``torch.backends.cudnn.allow_tf32 = False`` and
    ``torch.backends.cuda.matmul.allow_tf32 = False`` before calling the model.

    Returns:
        network.GeoLocalizationNet; ``model(images)`` with images (B, 3, H, W), H and W multiples of 14,
        ImageNet-normalised (datasets_ws.base_transform, then datasets_ws.hard_resize to 224 x 224 as in
        the evaluation) -> (local features (B, 4H/14-3, 4W/14-3, 128), global descriptors (B, D)),
        both L2-normalised; ``model.global_descriptors(images)`` -> (B, D) alone.

    Raises:
        FileNotFoundError: a given path does not exist.
        ValueError: no path given without allow_random_weights, or a file that does not fit the model.
    """
    for name, path in (("checkpoint", checkpoint), ("foundation_model_path", foundation_model_path)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(
                f"selavpr({name}={path!r}): no such file. Give the path of a weights file you "
                "have already downloaded (this entry point never downloads anything)."
            )
    if checkpoint is None and foundation_model_path is None and not allow_random_weights:
        raise ValueError(
            "selavpr(): no weights given. Pass checkpoint=<SelaVPR .pth> (e.g. SelaVPR_msls.pth) "
            "and/or foundation_model_path=<DINOv2 .pth>, or allow_random_weights=True for a randomly "
            "initialised model (tests and demos only)."
        )
    given = {
        name: value
        for name, value in (("backbone", backbone), ("registers", registers), ("backbone_depth", backbone_depth))
        if value is not None
    }
    saved = None
    if checkpoint is not None:
        saved = checkpoints.saved_model_settings(
            checkpoints.load_weights_file(checkpoint, what="checkpoint", mmap=True, check=False),
            path=checkpoint,
            what="checkpoint",
        )
    defaults = {"backbone": "vit_large", "backbone_depth": None, "registers": False, "resize": None}
    settings, _ = checkpoints.resolve_model_settings(
        given, saved, defaults, source=f"checkpoint {checkpoint}", names=checkpoints.PYTHON_ARGUMENTS
    )
    model = network.load_model(
        backbone=settings["backbone"],
        registers=settings["registers"],
        backbone_depth=settings["backbone_depth"],
        foundation_model_path=foundation_model_path,
        checkpoint=checkpoint,
        checkpoint_flag="checkpoint",
        allow_random_weights=allow_random_weights,
        device="cpu",
        names=checkpoints.PYTHON_ARGUMENTS,
    )
    return model.eval()
