"""Linear layers through oneDNN with weights packed once, for the skinny products of decoding on CPUs.

A decode step multiplies a few rows of activations (one per sequence in the batch) by every weight
matrix. On the 2-core CPUs this project is measured on, PyTorch's default BLAS path ran those products
at a third to a fifth of the speed of oneDNN with a pre-packed weight: the 8-row vocabulary
projection of SmolLM2-135M (576 x 49152) took 87 ms against 26 ms on an AVX2 machine, and 18.4 ms
against 3.7 ms on an AMD EPYC with AVX-512. A 1,024-token prefill ran about as fast either way in
fp32; with bf16 weights (below) prefill gains too.
`pack_linears` swaps every `nn.Linear` of a model for a `PackedLinear` that calls oneDNN's kernel, and
`join_linears` packs layers that read the same input as one product.

`PackedLinear`, `join_linears` and `pack_linears` can pack weights in bf16 (`dtype=torch.bfloat16`):
a product then reads half the bytes, and on CPUs with bf16 instructions (AVX512-BF16, AMX) oneDNN
computes it with them. Inputs are rounded to bf16, and outputs come back in the input's dtype,
rounded to bf16 on the way. On the 2-core Intel Xeon with AMX, the 30 layers' products and the
vocabulary projection of SmolLM2-135M, all packed in bf16 for that measurement, took 9.6 ms against
25.6 ms in fp32 at 8 rows, and 8.8 ms against 19.0 ms at one row. `pack_linears` keeps the
vocabulary projection fp32 (4.2 against 1.3 ms in bf16 at 8 rows).

NOTE: `torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise` are the operators PyTorch's
own compiler emits for CPU linears. They are not a documented public API and may change with a
PyTorch release, so `packed_linear_available` checks for them and the engine falls back to plain
`nn.Linear` without them. Inside `torch.compile`, the product goes through the custom operator
`snapkv::packed_linear`, which the compiler calls as it is: inductor's own lowering of
`_linear_pointwise` expects weights it packed itself, and failed on ours.
"""

from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN packs the weights for; a hint only, any row count gives the same result.
BATCH_HINT = 8


def packed_linear_available() -> bool:
    """Return True when this PyTorch build has oneDNN and its packed-weight linear operators."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@torch.library.custom_op("snapkv::packed_linear", mutates_args=())
def packed_linear(rows: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """Return rows [n, in_features] times a weight packed by `_reorder_linear_weight`, plus bias: [n, out_features]."""
    return torch.ops.mkldnn._linear_pointwise(rows, packed_weight, bias, "none", [], "")


@packed_linear.register_fake
def _(rows: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], out_features))


PACKED_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """A fp32 CPU `nn.Linear` that computes with its weight packed in oneDNN's layout; same input and output shapes.

    `dtype` is the packed weight's: fp32 (the default), which gives the layer's results to within
    float rounding, or bf16, which rounds the weight, the input and the output to bf16 (see the
    module docstring).

    The module keeps the layer's parameters, so the model's state dict, dtype and device read as
    before, and the packed copy costs as much memory again in fp32, half as much in bf16. Every row count takes the packed path.
    One row used to take the plain weight for square and narrowing matrices, which was faster on the
    AVX2 machine of the first measurements. On an AMD EPYC AVX-512 machine (2026-12-05) the packed
    path was faster for them too (576 x 576: 83 us against 124 us; 1536 x 576: 207 us against 245 us,
    weights cold in cache), and as fast for 576 x 192.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in PACKED_DTYPES:
            raise ValueError(f"invalid dtype={dtype}: a packed weight is one of {PACKED_DTYPES}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.dtype = dtype
        self.weight = linear.weight
        self.bias = linear.bias
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), BATCH_HINT)
        self.register_buffer("packed_weight", packed, persistent=False)
        # The bias the product adds, in the packed weight's dtype (the layer's own when that is fp32).
        self.packed_bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != self.dtype:
            rows = rows.to(self.dtype)
        if torch.compiler.is_compiling():
            out = packed_linear(rows, self.packed_weight, self.packed_bias, self.out_features)
        else:  # directly, because the custom operator adds about 3 us a call in inference mode (10 us outside it)
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.packed_bias, "none", [], "")
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}")


@torch.no_grad()
def join_linears(
    linears: list[nn.Module], input_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> PackedLinear:
    """Return one `PackedLinear` for several linear layers that read the same input; its output is
    theirs side by side, in the order given.

    One product with the joined weight replaces several smaller ones (q, k and v; gate and up). Only
    the packed copy of the joined weight is kept: it costs as much memory as the layers' weights.
    `input_scale` [in_features], when given, is folded into the weight: the joined layer applied to
    x gives the layers applied to `input_scale * x` (an RMSNorm's weight, to within float rounding).
    `dtype` is the packed weight's, as in `PackedLinear`.
    """
    in_features = linears[0].in_features
    if any(linear.in_features != in_features for linear in linears):
        sizes = [linear.in_features for linear in linears]
        raise ValueError(f"invalid layers to join: in_features differ ({sizes}). Join only layers that read the same input.")
    weight = torch.cat([linear.weight for linear in linears])
    if input_scale is not None:
        weight = weight * input_scale
    bias = None
    if any(linear.bias is not None for linear in linears):
        bias = torch.cat([
            linear.bias if linear.bias is not None else weight.new_zeros(linear.out_features) for linear in linears
        ])
    joined = nn.Linear(in_features, weight.shape[0], bias=bias is not None, device="meta")
    joined.weight = nn.Parameter(weight, requires_grad=False)
    joined.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    packed = PackedLinear(joined, dtype)
    # The joined weight is a new tensor that only the packed copy needs; keep no second copy.
    packed.weight = None
    return packed


def pack_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every fp32 CPU `nn.Linear` in `model` by a `PackedLinear`; return how many were replaced.

    The layers are packed in `dtype`, except the model's output embeddings (a transformers model's
    `get_output_embeddings()`, the vocabulary projection), which stay fp32 so that the logits are not
    rounded to bf16.
    """
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            weight = getattr(child, "weight", None)
            if type(child) is nn.Linear and weight.device.type == "cpu" and weight.dtype == torch.float32:
                setattr(module, name, PackedLinear(child, torch.float32 if child is output_embeddings else dtype))
                replaced += 1
    return replaced
