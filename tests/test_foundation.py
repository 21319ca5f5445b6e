"""The project's small foundation model: the shipped weight file (layout, loader, provenance) and the
script that makes it (tools/pretrain_foundation.py)."""

import hashlib
import importlib.util
import json
import os
import re
import sys

import pytest
import torch
from conftest import ROOT, read_manifest, run_script

import checkpoints
import network

WEIGHTS = os.path.join(ROOT, "weights", "foundation_vit_tiny_d4.pth")
PROVENANCE = os.path.join(ROOT, "weights", "foundation_vit_tiny_d4.provenance.json")


def _pretrain_module():
    spec = importlib.util.spec_from_file_location(
        "pretrain_foundation", os.path.join(ROOT, "tools", "pretrain_foundation.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_shipped_foundation_loads_strictly_through_the_dinov2_loader():
    model = network.GeoLocalizationNet(backbone="vit_tiny", backbone_depth=4)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    checkpoints.load_foundation_weights(model, WEIGHTS)  # every key of the file used, only adapters missing
    state = checkpoints.load_weights_file(WEIGHTS, what="test")  # weights_only=True
    own = model.backbone.state_dict()
    assert set(state) == {k for k in own if ".adapter" not in k}
    for k, v in state.items():
        assert v.dtype == torch.float32, k
        assert torch.equal(own[k], v), k  # loaded as it is in the file
        assert not torch.equal(before[k], v) or k == "mask_token", k  # pre-trained, not the initialisation
    # The adapters keep their zero-output initialisation: the adapted network starts as the foundation.
    assert all(torch.count_nonzero(v) == 0 for k, v in own.items() if ".adapter" in k and ".D_fc2." in k)


def test_shipped_foundation_has_the_public_dinov2_key_layout():
    # The public ViT-L/14 file's keys, for the blocks this 4-block model has, with the widths scaled.
    public = read_manifest("dinov2_vitl14_pretrain")
    wanted = {k: v for k, v in public.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < 4}
    state = checkpoints.load_weights_file(WEIGHTS, what="test")
    assert set(state) == set(wanted)
    scale = {1024: 192, 3072: 576, 4096: 768}
    for k, shape in wanted.items():
        assert list(state[k].shape) == [scale.get(s, s) for s in shape], k
    assert list(state["pos_embed"].shape) == [1, 1 + 37 * 37, 192]  # sized for 518 x 518, as DINOv2


def test_shipped_foundation_matches_its_provenance():
    with open(PROVENANCE) as f:
        provenance = json.load(f)
    assert provenance["sha256"] == _sha256(WEIGHTS)
    assert 0 not in provenance["data"]["seeds"]  # never the demo's data set (seed 0)
    assert provenance["data"]["disjoint_from_demo"]["shared"] == 0
    assert provenance["command"].startswith("python3 tools/pretrain_foundation.py")
    assert any("step" in line for line in provenance["log"])


def test_pretraining_script_runs_a_few_steps_and_is_deterministic(tmp_path):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run / "f.pth"
        args = [
            "tools/pretrain_foundation.py",
            "--output",
            str(out),
            "--data_folder",
            str(tmp_path / "pool"),  # generated once, reused by the second run
            "--data_preset",
            "tiny",
            "--data_seeds",
            "5",
            "--backbone_depth",
            "2",
            "--steps",
            "2",
            "--batch_size",
            "6",
            "--skip_disjoint_check",
        ]
        result = run_script(args, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outputs.append(out)
    model = network.GeoLocalizationNet(backbone="vit_tiny", backbone_depth=2)
    checkpoints.load_foundation_weights(model, str(outputs[0]))
    provenance = json.loads((tmp_path / "a" / "f.provenance.json").read_text())
    assert provenance["sha256"] == _sha256(outputs[0])
    assert provenance["data"]["seeds"] == [5] and provenance["threads"] == 2
    assert re.search(r"step +2/2 +image loss [\d.]+ +patch loss [\d.]+", "\n".join(provenance["log"]))
    assert (tmp_path / "a" / "f.log").read_text().splitlines() == provenance["log"]
    # Same seed, flags, machine and threads: the same bytes.
    assert _sha256(outputs[0]) == _sha256(outputs[1])


def test_pretraining_refuses_the_demo_seed(tmp_path):
    result = run_script(
        [
            "tools/pretrain_foundation.py",
            "--output",
            str(tmp_path / "f.pth"),
            "--data_folder",
            str(tmp_path),
            "--data_preset",
            "tiny",
            "--data_seeds",
            "3",
            "0",
            "--steps",
            "1",
        ],
        timeout=120,
    )
    assert result.returncode != 0
    assert "--data_seeds must not contain 0" in result.stdout + result.stderr
    assert not (tmp_path / "f.pth").exists()


def test_disjointness_check_finds_a_shared_image(tmp_path, monkeypatch):
    pf = _pretrain_module()
    monkeypatch.setattr(pf, "DEMO_DATA", dict(seed=0, preset="tiny"))  # a small stand-in for the demo's set
    log = pf.Log()
    pool = pf.build_pool(str(tmp_path / "pool"), seeds=[4], preset="tiny", log=log)
    assert pf.check_disjoint_from_demo(pool, log=log)["shared"] == 0
    import synthetic

    demo = synthetic.generate(str(tmp_path / "demo"), "synthetic", synthetic.SyntheticOptions(seed=0, preset="tiny"))
    copied = sorted(p for p in demo.rglob("*.jpg"))[0]
    with pytest.raises(RuntimeError, match="1 pool images are byte-identical"):
        pf.check_disjoint_from_demo(pool + [str(copied)], log=log)


def test_patch_correspondences_follow_the_crop_boxes():
    pf = _pretrain_module()
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    left = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    # The same box: every patch maps to itself.
    targets, inside = pf.patch_targets(whole, whole, (8, 8))
    assert inside.all() and torch.equal(targets[0], torch.arange(64))
    # The left half, seen in the whole image: columns 0..7 of the half land on columns 0..3 of the whole.
    targets, inside = pf.patch_targets(left, whole, (8, 8))
    assert inside.all()
    assert torch.equal(targets[0].view(8, 8), torch.arange(8).view(8, 1) * 8 + torch.arange(8).view(1, 8) // 2)
    # The whole image in the left half: only its left half is inside, column c -> column 2c (+0.5 -> 2c+1).
    targets, inside = pf.patch_targets(whole, left, (8, 8))
    assert torch.equal(inside[0].view(8, 8), torch.arange(8).view(1, 8).expand(8, 8) < 4)
    assert torch.equal(targets[0].view(8, 8)[:, :4], torch.arange(8).view(8, 1) * 8 + 2 * torch.arange(4) + 1)
    # Crops are the boxes they say they are: a box's crop equals the image region it names.
    image = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.25, 0.5, 0.5]])
    crops = pf.crop_resize(image, boxes, (16, 16))
    assert torch.allclose(crops[0], image[0], atol=1e-3)
    assert torch.allclose(pf.crop_resize(image, boxes, (8, 8))[1], image[1, :, 4:12, 8:16], atol=1e-3)
