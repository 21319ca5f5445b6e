"""checkpoints.py: weight files - the public layouts, safe loading (weights_only and the restricted
unpickler), refusals that name the file and the reason, and the project's checkpoints round-tripping."""

import os
import zipfile

import numpy as np
import pytest
import torch
from conftest import TINY

import checkpoints
import network


def _tiny_foundation_state(registers=False):
    torch.manual_seed(3)
    model = network.GeoLocalizationNet(**TINY, registers=registers)
    return {k: v for k, v in model.backbone.state_dict().items() if ".adapter" not in k}


@pytest.mark.parametrize("registers", [False, True])
def test_foundation_missing_or_extra_key_is_named(tmp_path, registers):
    state = _tiny_foundation_state(registers)
    model = network.GeoLocalizationNet(**TINY, registers=registers)
    good = tmp_path / "good.pth"
    torch.save(state, good)
    checkpoints.load_foundation_weights(model, str(good))
    assert torch.equal(model.backbone.pos_embed, state["pos_embed"])
    if registers:
        assert torch.equal(model.backbone.register_tokens, state["register_tokens"])

    missing = dict(state)
    del missing["blocks.1.attn.qkv.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.attn\.qkv\.bias"):
        checkpoints.load_foundation_weights(model, str(tmp_path / "missing.pth"))

    extra = dict(state, **{"head.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys: head\.weight"):
        checkpoints.load_foundation_weights(model, str(tmp_path / "extra.pth"))


def test_register_file_without_registers_flag_is_explained(tmp_path):
    torch.save(_tiny_foundation_state(registers=True), tmp_path / "reg.pth")
    with pytest.raises(ValueError, match=r"register_tokens.*|--registers"):
        checkpoints.load_foundation_weights(network.GeoLocalizationNet(**TINY), str(tmp_path / "reg.pth"))
    torch.save(_tiny_foundation_state(registers=False), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="--registers"):
        checkpoints.load_foundation_weights(
            network.GeoLocalizationNet(**TINY, registers=True), str(tmp_path / "plain.pth")
        )


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def test_checkpoint_public_layout_round_trip_bit_identical(tmp_path, tiny_model):
    model = _perturbed(tiny_model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    path = tmp_path / "last_model.pth"
    checkpoints.save_checkpoint(
        str(path),
        model=model,
        optimizer=optimizer,
        epoch_num=3,
        recalls=np.array([50.0, 70.0, 80.0, 90.0]),
        best_r5=70.0,
        not_improved_num=1,
    )
    raw = torch.load(path, weights_only=False)  # inspect the layout the public release would read
    assert set(raw) == {
        "epoch_num",
        "model_state_dict",
        "optimizer_state_dict",
        "recalls",
        "best_r5",
        "not_improved_num",
        "model_settings",
    }  # ours: the public release ignores it
    assert raw["model_settings"] == {"backbone": "vit_tiny", "backbone_depth": 2, "registers": False}
    assert all(k.startswith("module.") for k in raw["model_state_dict"])
    assert isinstance(raw["recalls"], np.ndarray) and isinstance(raw["best_r5"], np.float64)
    assert not [f for f in os.listdir(tmp_path) if f != "last_model.pth"]  # no temp file left

    fresh = network.GeoLocalizationNet(**TINY).eval()
    ckpt = checkpoints.load_model_weights(fresh, str(path))
    assert ckpt["epoch_num"] == 3 and float(ckpt["best_r5"]) == 70.0
    images = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        a, b = model(images), fresh(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_checkpoint_without_module_prefix_and_bare_state_dict(tmp_path, tiny_model):
    model = _perturbed(tiny_model)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    torch.save({"model_state_dict": checkpoints.public_state_dict(model)}, tmp_path / "prefixed.pth")
    for name in ("bare.pth", "prefixed.pth"):
        fresh = network.GeoLocalizationNet(**TINY)
        checkpoints.load_model_weights(fresh, str(tmp_path / name))
        assert torch.equal(fresh.LocalAdapt.upconv1.weight, model.LocalAdapt.upconv1.weight)


def _pickle_of(path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def _rewrite_pickle(path, old: bytes, new: bytes):
    """Rewrite the data.pkl of a torch zip file (protocol-2 GLOBAL opcodes hold plain text names)."""
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            z.writestr(info, data.replace(old, new) if info.filename.endswith("data.pkl") else data)


# Both loaders run on every torch: LOADERS[0] is what this torch uses (weights_only=True with the numpy
# allow-list on torch >= 2.6, the restricted unpickler before), LOADERS[1] is the restricted unpickler.
LOADERS = [pytest.param(None, id="default_loader"), pytest.param(True, id="restricted_unpickler")]


def _public_layout_checkpoint(path, model):
    """A checkpoint as the public release writes it: optimizer state, numpy recalls and float64 best_r5."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model(torch.randn(1, 3, 28, 28))[1].sum().backward()
    optimizer.step()
    checkpoints.save_checkpoint(
        str(path),
        model=model,
        optimizer=optimizer,
        epoch_num=4,
        recalls=np.array([50.0, 70.0, 80.0, 90.0]),
        best_r5=70.0,
        not_improved_num=1,
    )
    return optimizer


def _assert_same(a, b):
    """Equal nested checkpoints: tensors bit-identical, numpy arrays and scalars equal, same types."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("numpy_names", ["numpy.core", "numpy._core"])
@pytest.mark.parametrize("restricted", LOADERS)
def test_public_checkpoint_with_numpy_objects_loads_under_either_numpy_naming(
    tmp_path, tiny_model, numpy_names, restricted
):
    """Public checkpoints were pickled by numpy 1.x (numpy.core...), ours by numpy 2 (numpy._core...): both
    load, whichever numpy is installed, with either loader."""
    path = tmp_path / "ckpt.pth"
    _public_layout_checkpoint(path, tiny_model)
    for spelling in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        _rewrite_pickle(path, spelling, numpy_names.encode() + b".multiarray")
    assert (numpy_names.encode() + b".multiarray\n_reconstruct") in _pickle_of(path)
    ckpt = checkpoints.load_weights_file(str(path), what="--resume", restricted=restricted)
    assert np.array_equal(ckpt["recalls"], [50.0, 70.0, 80.0, 90.0]) and ckpt["recalls"].dtype == np.float64
    assert isinstance(ckpt["best_r5"], np.float64) and ckpt["best_r5"] == 70.0
    assert ckpt["epoch_num"] == 4 and ckpt["not_improved_num"] == 1
    fresh = network.GeoLocalizationNet(**TINY)
    checkpoints.load_model_weights(fresh, str(path))
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_restricted_unpickler_gives_what_torch_load_gives(tmp_path, tiny_model):
    """The restricted unpickler (the loader of torch < 2.6) reads a training checkpoint (Adam state, random
    states, empty and full numpy arrays, bf16 tensors) exactly as an unrestricted torch.load does."""
    import commons

    path = tmp_path / "ckpt.pth"
    optimizer = _public_layout_checkpoint(path, tiny_model)
    checkpoints.save_checkpoint(
        str(path),
        model=tiny_model,
        optimizer=optimizer,
        epoch_num=1,
        recalls=None,
        extra={"rng_states": commons.get_rng_states(device="cpu"), "bf16": torch.ones(3, dtype=torch.bfloat16)},
    )
    reference = torch.load(path, map_location="cpu", weights_only=False)  # our own file: the reference reading
    restricted = checkpoints.load_weights_file(str(path), what="--resume", restricted=True)
    _assert_same(reference, restricted)
    assert restricted["recalls"].shape == (0,)  # an empty array pickles a bytes() call
    _assert_same(reference, checkpoints.load_weights_file(str(path), what="--resume"))


def test_default_loader_is_weights_only_where_torch_can_allow_numpy_names():
    """torch >= 2.6 takes allow-list entries by name: there the loader must be torch.load(weights_only=True),
    not the fallback (this fails if torch renames what the probe reads)."""
    release = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert checkpoints._torch_allow_list_takes_names() == (release >= (2, 6))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("restricted", LOADERS)
def test_pickle_that_would_run_code_is_refused_naming_the_object(tmp_path, tiny_model, restricted):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": tiny_model.state_dict(), "payload": _Evil(marker)}, path)
    with pytest.raises(
        ValueError,
        match=r"evil\.pth refused: it would run code when unpickled \(it pickles "
        r"posix\.system.*Nothing in it was run",
    ) as info:
        checkpoints.load_weights_file(str(path), what="--resume", restricted=restricted)
    assert "truncated" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(X\x0b\x00\x00\x00print('hi')tR.",
        b"c_codecs\nencode\n(X\x02\x00\x00\x00hiX\x04\x00\x00\x00zlibtR.",
        b"c__builtin__\nbytes\n(J\x00\x00\x00\x40tR.",
    ],
    ids=["builtins.eval", "codecs_other_than_latin1", "bytes_of_a_size"],
)
def test_restricted_unpickler_refuses_anything_off_its_allow_list(tmp_path, tiny_model, payload):
    """The restricted unpickler's allow-list is exact: other globals, and the two harmless-looking helpers
    protocol 2 needs (_codecs.encode, bytes) with other arguments, are refused."""
    path = tmp_path / "crafted.pth"
    torch.save({"x": torch.ones(1)}, path)
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            z.writestr(info, b"\x80\x02" + payload if info.filename.endswith("data.pkl") else data)
    with pytest.raises(ValueError, match=r"crafted\.pth refused: it would run code when unpickled"):
        checkpoints.load_weights_file(str(path), what="--resume", restricted=True)


def test_a_bug_or_broken_install_is_not_blamed_on_the_file(tmp_path, tiny_model, monkeypatch):
    """Only errors that come from the file become advice about the file: an AttributeError or ImportError
    (a numpy or torch without what the loader needs) shows as itself."""
    path = tmp_path / "good.pth"
    checkpoints.save_checkpoint(str(path), model=tiny_model)
    for restricted in (None, True):
        monkeypatch.setattr(checkpoints, "_numpy_multiarray", lambda: np.no_such_module)
        with pytest.raises(AttributeError, match="no_such_module"):
            checkpoints.load_weights_file(str(path), what="--resume", restricted=restricted)
        monkeypatch.undo()

    def broken_load(*args, **kwargs):
        raise ImportError("cannot import name 'x' from 'torch._utils'")

    monkeypatch.setattr(torch, "load", broken_load)
    with pytest.raises(ImportError):
        checkpoints.load_weights_file(str(path), what="--resume")


@pytest.mark.parametrize("restricted", LOADERS)
def test_truncated_or_foreign_file_is_called_so(tmp_path, tiny_model, restricted):
    good = tmp_path / "good.pth"
    checkpoints.save_checkpoint(str(good), model=tiny_model)
    (tmp_path / "trunc.pth").write_bytes(good.read_bytes()[:1000])
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    for name in ("trunc.pth", "notes.pth"):
        with pytest.raises(
            ValueError,
            match=name + r" could not be loaded \(.+\): it is truncated or not a PyTorch "
            "weights file. Download or copy it again",
        ):
            checkpoints.load_weights_file(str(tmp_path / name), what="--resume", restricted=restricted)


def test_bad_weight_paths_have_clear_messages(tmp_path):
    model = network.GeoLocalizationNet(**TINY)
    with pytest.raises(FileNotFoundError, match="--resume .*no such file"):
        checkpoints.load_model_weights(model, str(tmp_path / "nope.pth"))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        checkpoints.load_model_weights(model, str(tmp_path))
    truncated = tmp_path / "trunc.pth"
    torch.save(model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        checkpoints.load_model_weights(model, str(truncated))
    other = network.GeoLocalizationNet(backbone="vit_small", backbone_depth=1)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a SelaVPR checkpoint of this model|does not fit"):
        checkpoints.load_model_weights(model, str(tmp_path / "other.pth"))


# ---------------------------------------------------------------------------------------------------
# Non-finite weights, and weights memory-mapped into the model (one copy)
# ---------------------------------------------------------------------------------------------------


def _poisoned(tmp_path, tiny_model, poison, name="poisoned.pth"):
    """A train.py-layout checkpoint of tiny_model whose state `poison` edits in place."""
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    poison(state)
    path = str(tmp_path / name)
    torch.save({"model_state_dict": {checkpoints.MODULE_PREFIX + k: v for k, v in state.items()}}, path)
    return path


@pytest.mark.parametrize("in_place", [True, False])
def test_nan_or_inf_weights_are_refused_naming_the_file_and_the_tensors(tmp_path, tiny_model, in_place):
    """NaN in the local head gave NaN dense features and equal scores for every candidate; NaN in an adapter
    or GeM's p, NaN descriptors and faiss's -1 padding: now the file is refused when it is loaded."""

    def poison(state):
        state["LocalAdapt.upconv2.bias"][3] = float("nan")
        state["backbone.blocks.1.adapter1.D_fc1.weight"][0, 0] = float("inf")
        state["aggregation.1.p"][0] = float("nan")

    path = _poisoned(tmp_path, tiny_model, poison)
    with pytest.raises(ValueError) as info:
        checkpoints.load_model_weights(network.GeoLocalizationNet(**TINY), path, in_place=in_place)
    message = str(info.value)
    assert message.startswith(f"--resume {path} holds non-finite values (NaN or Inf) in ")
    for shown in (
        "LocalAdapt.upconv2.bias (NaN)",
        "aggregation.1.p (NaN)",
        "backbone.blocks.1.adapter1.D_fc1.weight (Inf)",
    ):
        assert shown in message
    # Through the one model loader, and the file reader itself (every command's weights go there).
    with pytest.raises(ValueError, match="--load_weights .* holds non-finite values"):
        network.load_model(**TINY, checkpoint=path, checkpoint_flag="--load_weights")
    with pytest.raises(ValueError, match="holds non-finite values"):
        checkpoints.load_weights_file(path, what="--resume")
    assert checkpoints.load_weights_file(path, what="--resume", check=False)  # for callers that check later


def test_nan_in_foundation_weights_is_refused(tmp_path):
    state = _tiny_foundation_state()
    state["blocks.0.norm1.weight"][1] = float("-inf")
    torch.save(state, tmp_path / "dinov2.pth")
    with pytest.raises(ValueError, match=r"--foundation_model_path .*dinov2\.pth holds .* blocks\.0\.norm1\.weight"):
        network.load_model(**TINY, foundation_model_path=str(tmp_path / "dinov2.pth"))


def _sha(path):
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_weights_are_mapped_into_the_model_once_and_the_file_is_never_written(tmp_path, tiny_model):
    """load_model memory-maps the file and its tensors become the model's (no second copy); the model is
    the one a copy gives (values, frozen flags, device), and training it in place leaves the file as it was
    (a private, copy-on-write map)."""
    if not checkpoints.torch_can_map_files():
        pytest.skip("this torch cannot map weight files (torch 2.0): the copy path is tested below")
    _perturbed(tiny_model)
    path = str(tmp_path / "ckpt.pth")
    checkpoints.save_checkpoint(path, model=tiny_model)
    before = _sha(path)
    mapped = network.load_model(**TINY, checkpoint=path)
    copied = network.load_model(**TINY, allow_random_weights=True)  # random weights, then the file copied in
    checkpoints.load_model_weights(copied, path)
    for (name, p), (_, q) in zip(mapped.named_parameters(), copied.named_parameters()):
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad and p.device == q.device, name
        assert isinstance(p, torch.nn.Parameter)
    assert mapped.backbone.blocks[0].adapter1.D_fc1.weight.requires_grad
    assert not mapped.backbone.blocks[0].attn.qkv.weight.requires_grad  # frozen, as before
    # The parameters live in the file's pages, mapped into this process (Linux lists the maps): they are
    # what torch mapped from it, not copies.
    with open("/proc/self/maps") as f:
        ranges = [[int(a, 16) for a in line.split()[0].split("-")] for line in f if line.rstrip().endswith(path)]
    assert ranges, "the weights file is not mapped"
    for name, p in mapped.named_parameters():
        assert any(start <= p.data_ptr() < stop for start, stop in ranges), name
    assert not any(start <= copied.LocalAdapt.upconv1.weight.data_ptr() < stop for start, stop in ranges)
    # An optimizer step on the mapped weights changes them in memory only.
    optimizer = torch.optim.Adam([p for p in mapped.parameters() if p.requires_grad], lr=0.1)
    local, glob = mapped(torch.randn(2, 3, 56, 56))
    (local.sum() + glob.sum()).backward()
    optimizer.step()
    assert not torch.equal(mapped.LocalAdapt.upconv2.weight, copied.LocalAdapt.upconv2.weight)
    assert _sha(path) == before


def test_the_copy_path_where_torch_cannot_map(tmp_path, tiny_model, monkeypatch):
    """The oldest supported torch has neither torch.load(mmap) nor load_state_dict(assign): the file is read
    whole and copied in, as before; so is a file whose dtypes differ from the model's (a copy converts,
    mapping would not)."""
    _perturbed(tiny_model)
    path = str(tmp_path / "ckpt.pth")
    checkpoints.save_checkpoint(path, model=tiny_model)
    monkeypatch.setattr(checkpoints, "torch_can_map_files", lambda: False)
    model = network.load_model(**TINY, checkpoint=path)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in model.state_dict().items())
    monkeypatch.undo()
    half = str(tmp_path / "half.pth")
    torch.save({k: v.half() for k, v in tiny_model.state_dict().items()}, half)
    model = network.load_model(**TINY, checkpoint=half)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert torch.equal(model.LocalAdapt.upconv1.weight, tiny_model.LocalAdapt.upconv1.weight.half().float())


def test_a_checkpoint_model_is_built_without_initial_weights_unless_training(tmp_path, tiny_model):
    """With a checkpoint, evaluation builds the model on the meta device: no initial weights are made
    (torch's random stream is left where it was), every weight is the file's. train.py asks for the
    random initialisation anyway (keep_random_stream): the random numbers it draws afterwards are then
    those of the public code, which initialises the model before loading the checkpoint."""
    _perturbed(tiny_model)
    path = str(tmp_path / "ckpt.pth")
    checkpoints.save_checkpoint(path, model=tiny_model)
    torch.manual_seed(7)
    GeoLocalizationNet = network.GeoLocalizationNet
    GeoLocalizationNet(**TINY)
    after_init = torch.rand(3)
    for keep in (False, True):
        torch.manual_seed(7)
        model = network.load_model(**TINY, checkpoint=path, keep_random_stream=keep)
        drawn = torch.rand(3)
        assert not any(t.is_meta for t in model.state_dict().values())
        assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in model.state_dict().items())
        if keep or not checkpoints.torch_can_map_files():
            assert torch.equal(drawn, after_init)  # initialised first, as the public code
        else:
            torch.manual_seed(7)
            assert torch.equal(drawn, torch.rand(3))  # nothing drawn: no initialisation


def test_torch_can_map_files_asks_torch_itself(monkeypatch):
    """The feature test reads torch's signatures (not its version) and refuses shared maps."""
    import inspect

    expected = (
        os.name == "posix"
        and "mmap" in inspect.signature(torch.load).parameters
        and "assign" in inspect.signature(torch.nn.Module.load_state_dict).parameters
    )
    assert checkpoints.torch_can_map_files() == expected
    if expected and hasattr(torch.serialization, "get_default_mmap_options"):
        import mmap

        monkeypatch.setattr(torch.serialization, "get_default_mmap_options", lambda: mmap.MAP_SHARED)
        assert not checkpoints.torch_can_map_files()
