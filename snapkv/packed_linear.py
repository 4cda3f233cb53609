"""Linear layers through oneDNN with weights packed once, for the skinny products of decoding on CPUs.

A decode step multiplies a few rows of activations (one per sequence in the batch) by every weight
matrix. On the 2-core CPU this project is measured on, PyTorch's default BLAS path ran those products
at a third of the speed of oneDNN with a pre-packed weight. The 8-row vocabulary projection of
SmolLM2-135M (576 x 49152) took 87 ms against 26 ms. A 1,024-token prefill ran about as fast either
way. `pack_linears` swaps every `nn.Linear` of a model for a `PackedLinear` that calls oneDNN's kernel.

NOTE: `torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise` are the operators PyTorch's
own compiler emits for CPU linears. They are not a documented public API and may change with a
PyTorch release, so `packed_linear_available` checks for them and the engine falls back to plain
`nn.Linear` without them.
"""

from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN packs the weights for; a hint only, any row count gives the same result.
BATCH_HINT = 8
# One row (one sequence decoding) ran faster through the plain weight of square and narrowing
# matrices (q, k, v, o, down), and slower through that of widening ones (gate, up, vocabulary).
# With the weights cold in cache, 1536 x 576 took 410 us plain and 316 us packed; 576 x 576 took
# 144 us and 180 us. So a single row takes the packed path only where out_features > in_features.
MIN_PACKED_ROWS = 2


def packed_linear_available() -> bool:
    """Return True when this PyTorch build has oneDNN and its packed-weight linear operators."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """A fp32 CPU `nn.Linear` that also keeps its weight packed in oneDNN's layout; same inputs and outputs.

    The packed copy costs as much memory as the weight.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] < MIN_PACKED_ROWS and self.out_features <= self.in_features:
            return nn.functional.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> int:
    """Replace every fp32 CPU `nn.Linear` in `model` by a `PackedLinear`; return how many were replaced."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            weight = getattr(child, "weight", None)
            if type(child) is nn.Linear and weight.device.type == "cpu" and weight.dtype == torch.float32:
                setattr(module, name, PackedLinear(child))
                replaced += 1
    return replaced
