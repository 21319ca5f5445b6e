"""GeoLocalizationNet and build_model: the architecture, its public key layout, shapes from the input."""

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import read_manifest

import checkpoints
import network


def _args(**kw):
    base = dict(
        backbone="vit_tiny",
        backbone_depth=2,
        registers=False,
        foundation_model_path=None,
        resume=None,
        load_weights=None,
        allow_random_weights=False,
        device="cpu",
    )
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def vit_large_model():
    torch.manual_seed(0)
    return network.GeoLocalizationNet().eval()


def test_vit_large_trainable_parameters_and_public_key_layout(vit_large_model):
    model = vit_large_model
    model.freeze()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 53_059_969
    assert sum(v for k, v in trainable.items() if ".adapter" in k) == 50_405_376
    assert sum(v for k, v in trainable.items() if k.startswith("LocalAdapt.")) == 2_654_592
    assert sum(v for k, v in trainable.items() if k.startswith("aggregation.")) == 1
    ours = {k: list(v.shape) for k, v in checkpoints.public_state_dict(model).items()}
    assert ours == read_manifest("selavpr_checkpoint")


def test_vit_large_shapes_and_unit_norm(vit_large_model):
    with torch.inference_mode():
        local, glob = vit_large_model(torch.randn(2, 3, 224, 224))
        assert local.shape == (2, 61, 61, 128) and glob.shape == (2, 1024)
        assert torch.allclose(local.norm(dim=-1), torch.ones(2, 61, 61), atol=1e-5)
        assert torch.allclose(glob.norm(dim=-1), torch.ones(2), atol=1e-5)
        local, glob = vit_large_model(torch.randn(1, 3, 280, 224))
        assert local.shape == (1, 77, 61, 128) and glob.shape == (1, 1024)


def _random_state(layout):
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in layout.items()}


def test_public_dinov2_layout_loads_with_every_key_used(vit_large_model, tmp_path):
    layout = read_manifest("dinov2_vitl14_pretrain")
    state = _random_state(layout)
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save(state, path)
    model = vit_large_model
    checkpoints.load_foundation_weights(model, str(path))
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert torch.count_nonzero(loaded["blocks.0.adapter1.D_fc2.weight"]) == 0


def test_build_model_requires_weights_or_explicit_opt_in(caplog):
    with pytest.raises(ValueError, match="--allow_random_weights"):
        network.build_model(_args())
    with caplog.at_level(logging.WARNING):
        model = network.build_model(_args(allow_random_weights=True))
    assert "RANDOM WEIGHTS" in caplog.text
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".adapter" in n or not n.startswith("backbone.")}
    # train.py's --train_backbone, passed as a keyword (the other commands have no training flags).
    model = network.build_model(_args(allow_random_weights=True), train_backbone=True)
    assert all(p.requires_grad for p in model.parameters())


def test_build_model_resume_loads_weights(tmp_path, tiny_model):
    model = tiny_model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    checkpoints.save_checkpoint(str(tmp_path / "c.pth"), model=model)
    built = network.build_model(_args(resume=str(tmp_path / "c.pth")))
    assert torch.equal(built.aggregation[1].p, model.aggregation[1].p)


def test_tiny_model_shapes_from_input(tiny_model):
    local, glob = tiny_model(torch.randn(3, 3, 98, 126))
    assert local.shape == (3, 4 * 7 - 3, 4 * 9 - 3, 128) and glob.shape == (3, 192)
