"""Tensor-level pieces of the KV wire format: element types, int8 quantization, little-endian bytes.

One layer on the wire is its keys then its values, each [num_kv_heads, kv_len, head_dim]. In fp16, bf16
and fp32 each is the tensor cast to that type. In int8 each is the quantized tensor followed by its fp32
scales: keys get one scale per (KV head, channel) over all kept tokens, [num_kv_heads, head_dim], and
values one per (KV head, token), [num_kv_heads, kv_len]. Quantization is symmetric, so each element moves
by at most max |x| / 254 over the elements that share its scale.

Why keys per channel and values per token (the split of KIVI, arXiv:2402.02750): key outliers sit in a
few channels. We measured SmolLM2-135M on four 520-560-token GPL-2 prompts (fp32, CPU,
`benchmarks/wire_error.py`). Against one scale per (KV head, token) for keys too, per-channel key scales
cut the key error from 1.10% to 0.49% and the mean next-token KL divergence from 2.8-6.8e-4 to
1.4-2.1e-4 nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from snapkv.proto import serving_pb2 as pb

INT8_MAX = 127
SCALE_DTYPE = torch.float32
SCALE_BYTES = 4
# The dimension of [num_kv_heads, kv_len, head_dim] that one scale spans: keys share a scale along the
# tokens (one per channel), values along the channels (one per token).
KEY_SCALE_DIM = 1
VALUE_SCALE_DIM = 2

# Integer types of each element size, used to move tensors of any dtype through numpy as raw bits
# (numpy has no bfloat16).
_BITS_TORCH = {1: torch.int8, 2: torch.int16, 4: torch.int32}
_BITS_LITTLE_ENDIAN = {1: np.dtype("i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4")}


@dataclass(frozen=True)
class WireType:
    """Storage of one wire dtype: element type, bytes per element, and the scale layout (int8 only)."""

    name: str
    dtype: torch.dtype
    element_size: int
    scale_layout: int

    @property
    def quantized(self) -> bool:
        return self.scale_layout != pb.SCALE_LAYOUT_NONE

    def tensor_bytes(self, shape: tuple[int, int, int], scale_dim: int) -> int:
        """Return the bytes of one tensor of `shape` [num_kv_heads, kv_len, head_dim], scales included."""
        num_elements = shape[0] * shape[1] * shape[2]
        size = num_elements * self.element_size
        if self.quantized:
            size += num_elements // shape[scale_dim] * SCALE_BYTES
        return size

    def layer_bytes(self, shape: tuple[int, int, int]) -> int:
        """Return the bytes of one layer: keys and values of `shape` [num_kv_heads, kv_len, head_dim]."""
        return self.tensor_bytes(shape, KEY_SCALE_DIM) + self.tensor_bytes(shape, VALUE_SCALE_DIM)


WIRE_TYPES = {
    pb.WIRE_DTYPE_FP16: WireType("fp16", torch.float16, 2, pb.SCALE_LAYOUT_NONE),
    pb.WIRE_DTYPE_BF16: WireType("bf16", torch.bfloat16, 2, pb.SCALE_LAYOUT_NONE),
    pb.WIRE_DTYPE_FP32: WireType("fp32", torch.float32, 4, pb.SCALE_LAYOUT_NONE),
    pb.WIRE_DTYPE_INT8: WireType("int8", torch.int8, 1, pb.SCALE_LAYOUT_KEY_CHANNEL_VALUE_TOKEN_FP32),
}


def quantize_int8(x: torch.Tensor, scale_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [num_kv_heads, kv_len, head_dim] symmetrically, one scale per slice along `scale_dim`.

    Returns the int8 tensor of x's shape and the fp32 scales: x's shape without `scale_dim`. Elements
    that are all zero get scale 0.
    """
    x = x.to(SCALE_DTYPE)
    scales = x.abs().amax(dim=scale_dim) / INT8_MAX
    divisor = torch.where(scales == 0, torch.ones_like(scales), scales)
    quantized = torch.round(x / divisor.unsqueeze(scale_dim)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scales


def dequantize_int8(quantized: torch.Tensor, scales: torch.Tensor, scale_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Invert `quantize_int8` up to rounding: [num_kv_heads, kv_len, head_dim] in `dtype`."""
    return (quantized.to(SCALE_DTYPE) * scales.unsqueeze(scale_dim)).to(dtype)


def encode_layer(keys: torch.Tensor, values: torch.Tensor, wire: WireType) -> list[bytes]:
    """Return the wire bytes of one layer's keys and values, each [num_kv_heads, kv_len, head_dim]."""
    if not wire.quantized:
        return [to_little_endian(keys.to(wire.dtype)), to_little_endian(values.to(wire.dtype))]

    segments = []
    for tensor, scale_dim in ((keys, KEY_SCALE_DIM), (values, VALUE_SCALE_DIM)):
        quantized, scales = quantize_int8(tensor, scale_dim)
        segments += [to_little_endian(quantized), to_little_endian(scales)]
    return segments


def decode_tensor(
    buffer: bytearray, offset: int, shape: tuple[int, int, int], scale_dim: int, wire: WireType, dtype: torch.dtype
) -> torch.Tensor:
    """Read one tensor of `shape` [num_kv_heads, kv_len, head_dim] at `offset`, returned in `dtype`."""
    values = from_little_endian(buffer, offset, shape, wire.dtype)
    if not wire.quantized:
        return values.to(dtype)

    offset += values.numel() * wire.element_size
    scale_shape = tuple(size for dim, size in enumerate(shape) if dim != scale_dim)
    scales = from_little_endian(buffer, offset, scale_shape, SCALE_DTYPE)
    return dequantize_int8(values, scales, scale_dim, dtype)


def decode_layers(
    buffer: bytearray,
    num_layers: int,
    shape: tuple[int, int, int],
    wire: WireType,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild keys and values [num_layers, num_kv_heads, kv_len, head_dim] from a whole payload.

    `buffer` contains one `encode_layer` output per layer, each layer's keys and values of `shape`.
    """
    keys = torch.empty((num_layers, *shape), dtype=dtype, device=device)
    values = torch.empty((num_layers, *shape), dtype=dtype, device=device)
    key_bytes = wire.tensor_bytes(shape, KEY_SCALE_DIM)
    offset = 0
    for layer in range(num_layers):
        keys[layer] = decode_tensor(buffer, offset, shape, KEY_SCALE_DIM, wire, dtype)
        values[layer] = decode_tensor(buffer, offset + key_bytes, shape, VALUE_SCALE_DIM, wire, dtype)
        offset += wire.layer_bytes(shape)
    return keys, values


def to_little_endian(x: torch.Tensor) -> bytes:
    """Return the raw little-endian bytes of x, in row-major order."""
    element_size = x.element_size()
    bits = x.detach().contiguous().cpu().view(_BITS_TORCH[element_size]).numpy()
    return bits.astype(_BITS_LITTLE_ENDIAN[element_size], copy=False).tobytes()


def from_little_endian(buffer: bytearray, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Read a tensor of `shape` and `dtype` from little-endian bytes; the result owns its memory."""
    element_size = torch.empty((), dtype=dtype).element_size()
    count = int(np.prod(shape))
    bits = np.frombuffer(buffer, dtype=_BITS_LITTLE_ENDIAN[element_size], count=count, offset=offset)
    native = bits.astype(bits.dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(native).view(dtype).reshape(shape)
