"""The DINOv2 ViT with adapters: equivalences, positional interpolation, factories."""

import math

import pytest
import torch
import torch.nn.functional as F

import backbone as vit
from backbone.layers import Adapter, Attention, Block


def test_factories_have_dinov2_sizes():
    expected = {
        "vit_small": (384, 12, 6),
        "vit_base": (768, 12, 12),
        "vit_large": (1024, 24, 16),
        "vit_giant2": (1536, 40, 24),
    }
    for name, (dim, depth, heads) in expected.items():
        assert vit.ARCHITECTURES[name][:3] == (dim, depth, heads)
    m = vit.vit_small(depth=1)
    assert m.embed_dim == 384 and len(m.blocks) == 1 and m.blocks[0].attn.num_heads == 6
    assert m.pos_embed.shape == (1, 1370, 384)


def test_giant2_uses_swiglu_with_public_key_shapes():
    block = Block(1536, num_heads=24, ffn="swiglu")
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items() if k.startswith("mlp.")}
    assert shapes == {
        "mlp.w12.weight": (8192, 1536),
        "mlp.w12.bias": (8192,),
        "mlp.w3.weight": (1536, 4096),
        "mlp.w3.bias": (1536,),
    }


def test_adapter_starts_with_zero_output_and_parallel_has_no_skip():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    serial, parallel = Adapter(32, skip=True), Adapter(32, skip=False)
    assert torch.equal(serial(x), x)
    assert torch.equal(parallel(x), torch.zeros_like(x))
    assert serial.D_fc1.out_features == 16


def test_sdpa_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4)
    x = torch.randn(2, 17, 64)
    B, N, D = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // 4), dim=-1)
    explicit = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, D))
    assert (attn(x) - explicit).abs().max().item() <= 1e-5


def _plain_block_forward(blk, x):
    """A DINOv2 block without adapters."""
    x = x + blk.ls1(blk.attn(blk.norm1(x)))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


@pytest.mark.parametrize("registers", [False, True])
def test_zero_adapters_equal_plain_backbone(registers):
    torch.manual_seed(0)
    m = vit.vit_small(depth=3, registers=registers).eval()
    images = torch.randn(2, 3, 112, 98)
    with torch.no_grad():
        adapted = m(images)
        x = m.prepare_tokens(images)
        for blk in m.blocks:
            x = _plain_block_forward(blk, x)
        plain = m.norm(x)[:, 1 + m.num_register_tokens :]
    assert adapted.shape == (2, 8 * 7, 384)
    assert (adapted - plain).abs().max().item() <= 1e-6


def test_nonzero_adapters_change_the_output():
    torch.manual_seed(0)
    m = vit.vit_small(depth=1).eval()
    images = torch.randn(1, 3, 56, 56)
    before = m(images)
    torch.nn.init.normal_(m.blocks[0].adapter2.D_fc2.weight, std=0.1)
    assert (m(images) - before).abs().max().item() > 1e-3


def test_pos_embed_interpolation_uses_scale_factor_with_offset():
    torch.manual_seed(0)
    m = vit.vit_small(depth=1)
    table = m.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    out = m.interpolate_pos_encoding(20, 16)  # rows first: a 280 x 224 input
    expected = F.interpolate(table, scale_factor=((20 + 0.1) / 37, (16 + 0.1) / 37), mode="bicubic", antialias=False)
    assert out.shape == (1, 1 + 20 * 16, 384)
    assert torch.equal(out[:, 0], m.pos_embed[:, 0])
    assert torch.equal(out[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 320, -1))
    # `size=` would give the same shape but other values: the factor matters.
    by_size = F.interpolate(table, size=(20, 16), mode="bicubic", antialias=False)
    assert (by_size.permute(0, 2, 3, 1).reshape(1, 320, -1) - out[:, 1:]).abs().max() > 1e-4
    assert m.interpolate_pos_encoding(37, 37) is m.pos_embed


def test_registers_get_no_positional_embedding():
    torch.manual_seed(0)
    m = vit.vit_small(depth=1, registers=True)
    tokens = m.prepare_tokens(torch.zeros(1, 3, 28, 28))
    assert tokens.shape == (1, 1 + 4 + 4, 384)
    conv_bias = m.patch_embed.proj.bias
    assert torch.equal(tokens[0, 1:5], m.register_tokens[0])
    assert not torch.equal(tokens[0, 5], conv_bias)  # patches do get one


def test_input_not_multiple_of_patch_fails_clearly():
    m = vit.vit_small(depth=1)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        m(torch.zeros(1, 3, 225, 224))


def test_init_follows_spec():
    torch.manual_seed(0)
    m = vit.vit_small(depth=2)
    for name, p in m.named_parameters():
        if name.endswith("D_fc2.weight") or name.endswith("D_fc2.bias"):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith(".bias") and ("attn" in name or "mlp" in name or "D_fc1" in name):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith("qkv.weight") or name.endswith("D_fc1.weight"):
            assert p.abs().max() <= 2.0 and 0.015 < p.std() < 0.025, name
    assert m.cls_token.abs().max() < 1e-4
    assert torch.count_nonzero(m.mask_token) == 0
