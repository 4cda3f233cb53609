"""oneDNN packed-weight linear layers give nn.Linear's results, and the engine uses them only where asked."""

import pytest
import torch
from torch import nn

from snapkv.engine import Engine
from snapkv.packed_linear import PackedLinear, join_linears, pack_linears, packed_linear_available
from snapkv.tiny_models import tiny_model


def test_operators_exist_in_pinned_torch():
    # The engine falls back to nn.Linear without them; with the pinned PyTorch they must be there.
    assert packed_linear_available()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("features", [(48, 80), (80, 48)])  # widening and narrowing
@pytest.mark.parametrize("rows", [(1,), (2,), (8,), (3, 5), (4, 1)])
def test_packed_linear_matches_linear(rows, features, bias):
    torch.manual_seed(0)
    in_features, out_features = features
    linear = nn.Linear(in_features, out_features, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(*rows, in_features)
    out = packed(x)
    assert out.shape == (*rows, out_features)
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [(1,), (8,), (3, 5)])
def test_joined_outputs_side_by_side(rows):
    # q, k and v of a Qwen2 layer have biases; Llama's gate and up have none. Mixed biases join too.
    torch.manual_seed(0)
    linears = [nn.Linear(48, 64, bias=True), nn.Linear(48, 16, bias=False), nn.Linear(48, 16, bias=True)]
    joined = join_linears(linears)
    x = torch.randn(*rows, 48)
    out = joined(x)
    assert out.shape == (*rows, 96)
    torch.testing.assert_close(out, torch.cat([linear(x) for linear in linears], dim=-1), rtol=1e-5, atol=1e-5)
    # Only the packed copy of the joined weight is kept.
    assert joined.weight is None
    assert join_linears(linears[1:2]).bias is None


def test_joined_input_scale_folds_into_weight():
    # An RMSNorm's weight folded into the product that follows the norm.
    torch.manual_seed(0)
    linears = [nn.Linear(48, 32, bias=False), nn.Linear(48, 32, bias=False)]
    scale = torch.rand(48) + 0.5
    x = torch.randn(4, 48)
    out = join_linears(linears, input_scale=scale)(x)
    torch.testing.assert_close(out, torch.cat([linear(scale * x) for linear in linears], dim=-1), rtol=1e-5, atol=1e-5)


def test_join_rejects_different_inputs():
    with pytest.raises(ValueError, match="in_features differ \\(\\[48, 32\\]\\)"):
        join_linears([nn.Linear(48, 8), nn.Linear(32, 8)])


def test_pack_linears_replaces_every_linear():
    loaded = tiny_model("llama")
    num_linears = sum(type(module) is nn.Linear for module in loaded.model.modules())
    assert pack_linears(loaded.model) == num_linears
    assert not any(type(module) is nn.Linear for module in loaded.model.modules())


def test_engine_packs_only_when_asked():
    assert Engine(tiny_model("llama")).packed_layers > 0
    plain = Engine(tiny_model("llama"), pack_weights=False)
    assert plain.packed_layers == 0
    assert not any(isinstance(module, PackedLinear) for module in plain.model.modules())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(1,), (8,), (3, 5)])
def test_bf16_packed_linear_rounds_to_bf16(rows, bias):
    # A bf16 packed weight: the product of the bf16-rounded input and weight, rounded to bf16, returned in fp32.
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear, torch.bfloat16)
    assert packed.packed_weight.dtype == torch.bfloat16
    x = torch.randn(*rows, 48)
    out = packed(x)
    assert out.dtype == torch.float32
    assert out.shape == (*rows, 80)
    bias16 = None if linear.bias is None else linear.bias.bfloat16()
    expected = nn.functional.linear(x.bfloat16(), linear.weight.bfloat16(), bias16).float()
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    # bf16 rounding shows against the fp32 layer: the bf16 weight was used.
    assert not torch.allclose(out, linear(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, linear(x), rtol=3e-2, atol=3e-2)


def test_bf16_joined_layers():
    torch.manual_seed(0)
    linears = [nn.Linear(48, 32, bias=False), nn.Linear(48, 16, bias=True)]
    joined = join_linears(linears, dtype=torch.bfloat16)
    assert joined.packed_weight.dtype == joined.packed_bias.dtype == torch.bfloat16
    x = torch.randn(4, 48)
    torch.testing.assert_close(joined(x), torch.cat([linear(x) for linear in linears], dim=-1), rtol=3e-2, atol=3e-2)


def test_packed_dtype_must_be_fp32_or_bf16():
    with pytest.raises(ValueError, match="invalid dtype=torch.float16: a packed weight is one of"):
        PackedLinear(nn.Linear(8, 8), torch.float16)
