"""The training losses: local mutual-NN loss properties and where its gradient goes."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

import loss
import network


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_local_loss_is_zero_when_positive_and_negative_coincide():
    q, p = _unit(3, 7, 7, 16, seed=0), _unit(3, 7, 7, 16, seed=1)
    assert loss.local_triplet_loss(q, p, p).item() == 0.0


def test_local_loss_is_positive_when_the_negative_matches_better():
    q, p = _unit(2, 6, 6, 16, seed=2), _unit(2, 6, 6, 16, seed=3)
    n = q + 0.01 * _unit(2, 6, 6, 16, seed=4)  # nearly the query itself
    value = loss.local_triplet_loss(q, p, F.normalize(n, dim=-1))
    assert value.item() > 0.1
    assert loss.local_triplet_loss(q, F.normalize(n, dim=-1), p).item() == 0.0  # and zero the other way round


def test_triplet_losses_normalisation_and_global_part():
    torch.manual_seed(0)
    local = _unit(4, 5, 5, 8, seed=5)
    glob = _unit(4, 12, seed=6)
    triplets = torch.tensor([[0, 1, 2], [0, 1, 3]])
    g, l = loss.triplet_losses(local, glob, triplets, margin=0.1, normaliser=8)
    expected = torch.nn.TripletMarginLoss(margin=0.1, p=2, reduction="sum")(glob[[0, 0]], glob[[1, 1]], glob[[2, 3]])
    assert torch.isclose(g, expected / 8)

    # The local part from the definition, written out: mutual nearest neighbours of the flattened maps
    # (argmax both ways), mean dot product over them, hinge, summed over triplets, divided by 8.
    def sim(a, b):
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        s = b @ a.T  # (L_b, L_a)
        best_a, best_b = s.argmax(dim=1), s.argmax(dim=0)  # per b location / per a location
        pairs = [(j, int(best_a[j])) for j in range(s.shape[0]) if int(best_b[best_a[j]]) == j]
        return sum(float(s[j, i]) for j, i in pairs) / len(pairs)

    hinge = [max(0.0, sim(local[0], local[n]) - sim(local[0], local[1])) for n in (2, 3)]
    assert abs(l.item() - sum(hinge) / 8) < 1e-6
    assert l.item() > 0  # these random features give a non-trivial hinge (else the check above is weak)


def test_gradient_flows_only_into_trainable_parameters():
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(**TINY)
    model.freeze()
    with torch.no_grad():  # non-zero adapters so that their first layers get a gradient too
        for name, p in model.named_parameters():
            if "D_fc2" in name:
                p.normal_(std=0.02)
    images = torch.randn(4, 3, 56, 56)
    local, glob = model(images)
    # The second triplet's negative is the query image itself, so the local loss is surely positive.
    g, l = loss.triplet_losses(local, glob, torch.tensor([[0, 1, 2], [0, 1, 0]]), margin=0.5, normaliser=2)
    assert l.item() > 0
    (g + l).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert model.LocalAdapt.upconv1.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].adapter1.D_fc1.weight.grad.abs().sum() > 0
    assert not model.backbone.blocks[0].attn.qkv.weight.requires_grad


def test_local_loss_alone_trains_the_local_head():
    torch.manual_seed(1)
    model = network.GeoLocalizationNet(**TINY)
    model.freeze()
    local, _ = model(torch.randn(3, 3, 56, 56))
    loss.local_triplet_loss(local[:1], local[1:2], local[2:3]).backward()
    assert model.LocalAdapt.upconv2.weight.grad is not None
    assert model.aggregation[1].p.grad is None or model.aggregation[1].p.grad.abs().sum() == 0


def _one_training_step(precision):
    """One optimiser step of the tiny model from fixed weights and images at `precision`:
    (global loss, local loss, the updated trainable parameters, dtypes of the outputs)."""
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(**TINY)
    model.freeze()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "D_fc2" in name:
                p.normal_(std=0.02)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    images = torch.randn(8, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    local, glob = loss.forward_features(model, images, precision=precision)
    g, l = loss.triplet_losses(
        local, glob, torch.tensor([[0, 1, 2], [0, 1, 3], [4, 5, 6], [4, 5, 4]]), margin=0.5, normaliser=4
    )
    optimizer.zero_grad(set_to_none=True)
    (g + l).backward()
    optimizer.step()
    return g.item(), l.item(), [p.detach().clone() for p in trainable], (local.dtype, glob.dtype)


def test_bf16_training_step_is_finite_and_close_to_fp32():
    g32, l32, params32, dtypes32 = _one_training_step("fp32")
    g16, l16, params16, dtypes16 = _one_training_step("bf16")
    assert dtypes32 == dtypes16 == (torch.float32, torch.float32)  # losses are computed in float32
    assert all(map(torch.isfinite, torch.tensor([g32, l32, g16, l16])))
    assert l32 > 0 and l16 > 0
    # bf16 keeps ~3 significant digits: the losses agree to a few per cent, but are not equal (autocast ran).
    assert abs(g16 - g32) <= 0.05 * abs(g32) and abs(l16 - l32) <= 0.05 * abs(l32)
    assert (g16, l16) != (g32, l32)
    # fp32 master weights: the updated parameters stay float32 and finite.
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params16)


def test_fp32_training_forward_is_the_plain_call():
    torch.manual_seed(0)
    model = network.GeoLocalizationNet(**TINY).eval()
    images = torch.randn(2, 3, 56, 56)
    local, glob = loss.forward_features(model, images, precision="fp32")
    ref_local, ref_glob = model(images)
    assert torch.equal(local, ref_local) and torch.equal(glob, ref_glob)
    with pytest.raises(ValueError, match="--precision"):
        loss.forward_features(model, images, precision="fp16")


def test_local_loss_weight_scales_the_local_term_only():
    g = torch.tensor(0.3, requires_grad=True)
    l = torch.tensor(0.07, requires_grad=True)
    # The paper's weight (1) is the plain sum, bit for bit.
    assert loss.LossSettings().total(g, l).item() == (g + l).item()
    total = loss.LossSettings(local_weight=0.25).total(g, l)
    total.backward()
    assert g.grad.item() == 1.0 and l.grad.item() == 0.25


def test_global_adaptation_alone_leaves_the_local_head_untouched(tiny_model):
    # --local_loss_weight 0: LocalAdapt gets no gradient, so Adam does not move it; the adapters do move.
    tiny_model.freeze()
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    torch.manual_seed(0)
    images = torch.randn(4, 3, 56, 56)
    local, glob = tiny_model(images)
    g, l = loss.triplet_losses(local, glob, torch.tensor([[0, 1, 2], [0, 1, 3]]), margin=0.5, normaliser=2)
    optimizer.zero_grad()
    loss.LossSettings(margin=0.5, local_weight=0.0).total(g, l).backward()
    optimizer.step()
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("LocalAdapt."))
    assert not torch.equal(
        before["backbone.blocks.0.adapter1.D_fc2.weight"], after["backbone.blocks.0.adapter1.D_fc2.weight"]
    )
