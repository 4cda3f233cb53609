"""oneDNN packed-weight linear layers give nn.Linear's results, and the engine uses them only where asked."""

import pytest
import torch
from torch import nn

from snapkv.engine import Engine
from snapkv.packed_linear import PackedLinear, pack_linears, packed_linear_available
from snapkv.tiny_models import tiny_model


def test_operators_exist_in_pinned_torch():
    # The engine falls back to nn.Linear without them; with the pinned PyTorch they must be there.
    assert packed_linear_available()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("features", [(48, 80), (80, 48)])  # one row takes the packed path only when widening
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
