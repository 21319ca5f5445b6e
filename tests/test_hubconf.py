"""hubconf.py: the torch.hub entry point loads local weight files, never downloads."""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY

import checkpoints
import network


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model with random weights, its public-layout checkpoint and its backbone-only file."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(**TINY).eval()
    with torch.no_grad():  # non-default head values, so that a head left at its init would show
        model.aggregation[1].p.fill_(2.5)
    checkpoint = str(folder / "selavpr_tiny.pth")
    checkpoints.save_checkpoint(checkpoint, model=model)
    foundation = str(folder / "dinov2_tiny.pth")
    torch.save({k: v for k, v in model.backbone.state_dict().items() if ".adapter" not in k}, foundation)
    return model, checkpoint, foundation


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the hub entry point tried to download something")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_torch_hub_load_local_checkpoint(saved, no_downloads):
    reference, checkpoint, _ = saved
    model = torch.hub.load(
        ROOT, "selavpr", source="local", checkpoint=checkpoint, backbone="vit_tiny", backbone_depth=2
    )
    assert type(model) is network.GeoLocalizationNet and not model.training
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        local, glob = model(images)
        ref_local, ref_glob = reference(images)
    assert local.shape == (2, 13, 13, 128) and glob.shape == (2, 192)
    assert torch.equal(local, ref_local) and torch.equal(glob, ref_glob)


def test_foundation_weights_alone_load_the_backbone(saved, no_downloads):
    reference, _, foundation = saved
    model = torch.hub.load(
        ROOT, "selavpr", source="local", foundation_model_path=foundation, backbone="vit_tiny", backbone_depth=2
    )
    own = model.backbone.state_dict()
    for key, value in reference.backbone.state_dict().items():
        if ".adapter" not in key:
            assert torch.equal(own[key], value), key
    assert float(model.aggregation[1].p.detach()) == 3.0  # heads keep their initialisation


# A user's own modules named like ours (network.py, parser.py), in their own folder.
USER_FIRST = """
import sys, torch
sys.path.insert(0, {user!r})
import network, parser  # the user's
model = torch.hub.load({root!r}, "selavpr", source="local", backbone="vit_tiny", backbone_depth=2,
                       allow_random_weights=True)
with torch.no_grad():
    local, glob = model(torch.randn(1, 3, 56, 56))
assert glob.shape == (1, 192) and local.shape == (1, 13, 13, 128)
import network as again, parser as parser_again
assert again is network and again.OWNER == "user" and parser_again.OWNER == "user", "clobbered"
print("ok")
"""
HUB_FIRST = """
import sys, torch
model = torch.hub.load({root!r}, "selavpr", source="local", backbone="vit_tiny", backbone_depth=2,
                       allow_random_weights=True)
sys.path.insert(0, {user!r})
import network, parser
assert network.OWNER == "user" and parser.OWNER == "user", "the hub load left its modules under public names"
again = torch.hub.load({root!r}, "selavpr", source="local", backbone="vit_tiny", backbone_depth=2,
                       allow_random_weights=True)
assert type(again) is type(model) and sys.modules["network"] is network
print("ok")
"""


@pytest.mark.parametrize("script", [USER_FIRST, HUB_FIRST], ids=["user_module_first", "hub_first"])
def test_hub_load_neither_clobbers_nor_is_clobbered_by_user_modules(tmp_path, script):
    user = tmp_path / "user_code"
    user.mkdir()
    for name in ("network", "parser"):
        (user / f"{name}.py").write_text('OWNER = "user"\n')
    result = subprocess.run(
        [sys.executable, "-c", script.format(root=ROOT, user=str(user))],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_clear_errors_for_missing_files_and_missing_weights(saved, tmp_path):
    hubconf = importlib.import_module("hubconf")
    with pytest.raises(FileNotFoundError, match=r"selavpr\(checkpoint=.*nope.pth.*no such file.*never downloads"):
        hubconf.selavpr(str(tmp_path / "nope.pth"), backbone="vit_tiny", backbone_depth=2)
    with pytest.raises(FileNotFoundError, match="foundation_model_path="):
        hubconf.selavpr(foundation_model_path=str(tmp_path / "missing.pth"), backbone="vit_tiny", backbone_depth=2)
    with pytest.raises(ValueError, match="no weights given.*allow_random_weights=True"):
        hubconf.selavpr(backbone="vit_tiny", backbone_depth=2)
    # The hub's messages name its Python arguments, not the scripts' command-line flags.
    with pytest.raises(
        ValueError, match=r"another model: backbone_depth=3 \(given\) but 2 in the file\. Drop those arg"
    ):
        hubconf.selavpr(saved[1], backbone="vit_tiny", backbone_depth=3)  # the file records 2 blocks
    public = str(tmp_path / "public_layout.pth")  # no recorded settings: the keys decide
    checkpoint = checkpoints.load_weights_file(saved[1], what="test")
    torch.save({"model_state_dict": checkpoint["model_state_dict"]}, public)
    with pytest.raises(ValueError, match=r"not a SelaVPR checkpoint of this model \(check backbone=, registers=\)"):
        hubconf.selavpr(public, backbone="vit_tiny", backbone_depth=3)
    model = hubconf.selavpr(backbone="vit_tiny", backbone_depth=2, allow_random_weights=True)
    assert not model.training and len(model.backbone.blocks) == 2


def test_hubconf_declares_dependencies_and_one_entry_point():
    hubconf = importlib.import_module("hubconf")
    assert "torch" in hubconf.dependencies
    for package in hubconf.dependencies:
        assert importlib.util.find_spec(package) is not None, package
    # torch.hub lists every public callable of hubconf.py as an entry point.
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert entries == ["selavpr"]
    assert os.path.samefile(os.path.dirname(hubconf.__file__), ROOT)


def test_a_project_checkpoint_rebuilds_its_model_without_arguments(saved, no_downloads):
    reference, checkpoint, _ = saved  # written by checkpoints.save_checkpoint: it records vit_tiny, 2 blocks
    model = torch.hub.load(ROOT, "selavpr", source="local", checkpoint=checkpoint)
    assert model.backbone_name == "vit_tiny" and len(model.backbone.blocks) == 2
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"backbone='vit_small' \(given\) but 'vit_tiny' in the file") as info:
        torch.hub.load(ROOT, "selavpr", source="local", checkpoint=checkpoint, backbone="vit_small")
    assert "--" not in str(info.value).replace(checkpoint, "")  # no command-line flag in the hub's message


def test_one_image_without_its_batch_dimension_is_explained():
    """A (3, H, W) tensor (one image) gets a message with the expected shape and the fix, not "not enough
    values to unpack"."""
    hubconf = importlib.import_module("hubconf")
    model = hubconf.selavpr(backbone="vit_tiny", backbone_depth=2, allow_random_weights=True)
    image = torch.zeros(3, 56, 56)
    for call in (model, model.global_descriptors):
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got a tensor of shape \(3, 56, 56\).*unsqueeze\(0\)"):
            call(image)
    local, glob = model(image.unsqueeze(0))
    assert local.shape[0] == glob.shape[0] == 1


def test_weights_with_nan_are_refused_through_the_hub(tmp_path):
    hubconf = importlib.import_module("hubconf")
    torch.manual_seed(0)
    model = hubconf.selavpr(backbone="vit_tiny", backbone_depth=2, allow_random_weights=True)
    with torch.no_grad():
        model.LocalAdapt.upconv2.bias.fill_(float("nan"))
    path = str(tmp_path / "nan.pth")
    checkpoints.save_checkpoint(path, model=model)
    with pytest.raises(ValueError, match=r"checkpoint .*nan\.pth holds non-finite values .*LocalAdapt\.upconv2\.bias"):
        hubconf.selavpr(path)
