"""Hook SnapKV into a transformers model's own attention during prefill.

`install(model)` registers an attention implementation named `snapkv_<inner>` that calls the model's
configured attention (`sdpa` or `eager`) unchanged and, while a `PrefillCapture` is active in the
current context, hands each layer's post-RoPE queries, keys and values to it. The capture compresses
the layer at once, so at most one layer's full-length keys and values are alive beyond what the
forward pass itself holds, and no transformers cache is built during prefill.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from snapkv.config import CompressionConfig
from snapkv.compress import compress_layer

logger = logging.getLogger(__name__)

SUPPORTED_INNER = ("sdpa", "eager")
_active_capture: ContextVar["PrefillCapture | None"] = ContextVar("snapkv_prefill_capture", default=None)


class PrefillCapture:
    """Collect the (compressed) keys and values of every layer for a left-padded prefill batch.

    After the forward pass, `keys[b]` and `values[b]` are [num_layers, num_kv_heads, kept_b, head_dim]
    for sequence b, where kept_b = prompt_lengths[b] when `config` is None or the prompt fits the budget.
    Padding positions are never scored or kept: each sequence is sliced to its own real tokens first.
    """

    def __init__(self, prompt_lengths: list[int], config: CompressionConfig | None, num_layers: int):
        self.prompt_lengths = prompt_lengths
        self.config = config
        self.num_layers = num_layers
        self.keys: list[torch.Tensor | None] = [None] * len(prompt_lengths)
        self.values: list[torch.Tensor | None] = [None] * len(prompt_lengths)
        self.positions: list[list[torch.Tensor | None]] = [[None] * num_layers for _ in prompt_lengths]

    def kept_length(self, prompt_length: int) -> int:
        return prompt_length if self.config is None else self.config.kept_length(prompt_length)

    def record(self, layer_idx: int, scaling: float, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Store one layer: queries [B, H, Q, D] and keys, values [B, H_kv, K, D], left-padded to K."""
        batch, num_kv_heads, kv_len, head_dim = keys.shape
        logger.debug("layer %d: queries %s, keys %s", layer_idx, tuple(queries.shape), tuple(keys.shape))

        for b, length in enumerate(self.prompt_lengths):
            start = kv_len - length
            row_keys = keys[b : b + 1, :, start:]
            row_values = values[b : b + 1, :, start:]
            if self.config is None:
                kept_keys, kept_values, positions = row_keys, row_values, None
            else:
                window_queries = queries[b : b + 1, :, -self.config.window :]
                kept_keys, kept_values, positions = compress_layer(
                    window_queries, row_keys, row_values, self.config, scaling, layer_idx
                )

            if self.keys[b] is None:
                shape = (self.num_layers, num_kv_heads, self.kept_length(length), head_dim)
                self.keys[b] = keys.new_empty(shape)
                self.values[b] = values.new_empty(shape)
            self.keys[b][layer_idx].copy_(kept_keys[0])
            self.values[b][layer_idx].copy_(kept_values[0])
            self.positions[b][layer_idx] = None if positions is None else positions[0]


@contextlib.contextmanager
def capturing(capture: PrefillCapture) -> Iterator[PrefillCapture]:
    """Make `capture` receive every attention layer's states inside this block (this context only)."""
    token = _active_capture.set(capture)
    try:
        yield capture
    finally:
        _active_capture.reset(token)


def _model_eager_attention(module: torch.nn.Module) -> Callable:
    # transformers defines `eager_attention_forward` per model family, in the module of its classes.
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward; use attn_implementation='sdpa'")
    return function


def _make_attention(inner: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        capture = _active_capture.get()
        if capture is not None and query.shape[2] == key.shape[2]:
            capture.record(module.layer_idx, module.scaling, query, key, value)

        if inner == "eager":
            forward = _model_eager_attention(module)
        else:
            forward = AttentionInterface._global_mapping[inner]
        return forward(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register(inner: str) -> str:
    name = f"snapkv_{inner}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def install(model: PreTrainedModel) -> str:
    """Route the model's attention through the capture hook; return the inner implementation name."""
    current = model.config._attn_implementation
    inner = current.removeprefix("snapkv_")
    if inner not in SUPPORTED_INNER:
        raise ValueError(f"unsupported attn_implementation={current!r}: expected one of {SUPPORTED_INNER}")
    model.set_attn_implementation(_register(inner))
    return inner
