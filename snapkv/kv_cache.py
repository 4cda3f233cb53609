"""KV cache value types: one prompt's compressed cache, and the batched cache decoding writes into.

`PromptCache` is the unit that prefill produces (and that travels to a decode worker). `BatchCache`
is a transformers `Cache` that stores several sequences of different lengths in preallocated tensors,
so a decode step writes each new key and value in place instead of concatenating.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class PromptCache:
    """The kept prompt keys and values of one sequence, for every layer.

    keys, values: [num_layers, num_kv_heads, kept_len, head_dim], post-RoPE.
    prompt_length: the original prompt length L; the first decoded token sits at position L.
    """

    keys: torch.Tensor
    values: torch.Tensor
    prompt_length: int

    @property
    def kept_length(self) -> int:
        return self.keys.shape[2]

    @property
    def compression_ratio(self) -> float:
        return self.prompt_length / self.kept_length

    @property
    def num_bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def full_size_bytes(self, element_size: int | None = None) -> int:
        """Return what the uncompressed cache of this prompt takes, in bytes."""
        num_layers, num_kv_heads, _, head_dim = self.keys.shape
        element_size = element_size or self.keys.element_size()
        return 2 * num_layers * num_kv_heads * self.prompt_length * head_dim * element_size


class BatchLayer(CacheLayerMixin):
    """One layer of a `BatchCache`: keys and values [batch, num_kv_heads, capacity, head_dim]."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache: "BatchCache"):
        super().__init__()
        self.keys = keys
        self.values = values
        # A weak reference: with a strong one, the cache and its layers would form a cycle, and
        # their keys and values would stay allocated until Python's cycle collector ran.
        self.cache = weakref.proxy(cache)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # preallocated in __init__
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write one new position per sequence at its own length; return the valid span of all rows."""
        q_len = key_states.shape[2]
        if q_len != 1:
            raise ValueError(f"BatchCache takes one new token per sequence per step, got q_len={q_len}")
        kv_len = self.cache.check_step()
        return write_step(
            self.keys, self.values, self.cache.rows, self.cache.lengths, key_states[:, :, 0], value_states[:, :, 0], kv_len
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.step_kv_len, 0

    def get_seq_length(self) -> int:
        return self.cache.step_kv_len - 1

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class BatchCache(Cache):
    """Decode-time KV for a batch of sequences of different lengths, in preallocated tensors.

    Row b stores its prompt cache in positions [0, kept_b) followed by the tokens decoded so far; the
    rest of the row is unused. `attention_mask()` marks each row's valid positions, so padding is
    never attended. Call `advance()` after every forward step.
    """

    def __init__(self, prompts: list[PromptCache], max_new_tokens: int, dtype: torch.dtype | None = None):
        """Store the prompts' keys and values in `dtype` (None: theirs), with room for `max_new_tokens` more."""
        capacity = max(p.kept_length for p in prompts) + max_new_tokens
        dtype = dtype or prompts[0].keys.dtype
        layers = [BatchLayer(keys, values, self) for keys, values in _fill_rows(prompts, capacity, dtype)]
        super().__init__(layers=layers)
        device = prompts[0].keys.device
        self.lengths = torch.tensor([p.kept_length for p in prompts], device=device)
        self.positions = torch.tensor([p.prompt_length for p in prompts], device=device)
        self._rows: torch.Tensor | None = None
        self._max_length = int(self.lengths.max())
        self._min_length = int(self.lengths.min())

    @property
    def rows(self) -> torch.Tensor:
        """Row indices [batch], for writing one position per row; rebuilt only when the batch size changes."""
        if self._rows is None or self._rows.shape[0] != self.batch_size:
            self._rows = torch.arange(self.batch_size, device=self.lengths.device)
        return self._rows

    def add_rows(self, prompts: list[PromptCache], max_new_tokens: int) -> None:
        """Append sequences as new rows (between steps), growing the capacity if they need more."""
        capacity = max(self.capacity, max(p.kept_length for p in prompts) + max_new_tokens)
        for layer, (new_keys, new_values) in zip(self.layers, _fill_rows(prompts, capacity, self.dtype)):
            layer.keys = torch.cat([_pad_capacity(layer.keys, capacity), new_keys])
            layer.values = torch.cat([_pad_capacity(layer.values, capacity), new_values])
        device = self.lengths.device
        self.lengths = torch.cat([self.lengths, torch.tensor([p.kept_length for p in prompts], device=device)])
        self.positions = torch.cat([self.positions, torch.tensor([p.prompt_length for p in prompts], device=device)])
        self._max_length = int(self.lengths.max())
        self._min_length = int(self.lengths.min())

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def step_kv_len(self) -> int:
        """Keys a step attends to: the longest row plus the token being written."""
        return self._max_length + 1

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the keys and values are stored in."""
        return self.layers[0].keys.dtype

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2]

    def check_step(self) -> int:
        """Return `step_kv_len`; raise RuntimeError when the next step would not fit in the capacity."""
        kv_len = self.step_kv_len
        if kv_len > self.capacity:
            raise RuntimeError(f"BatchCache capacity {self.capacity} exhausted")
        return kv_len

    def position_ids(self) -> torch.Tensor:
        """Positions [batch, 1] of the tokens fed in the next step: original prompt length + decoded."""
        return self.positions.unsqueeze(1)

    def attention_mask(self, implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Return a 4D mask [batch, 1, 1, step_kv_len] for the next step in the format `implementation` takes.

        Return None when every row has the same length: each then attends to all `step_kv_len` keys, and
        without a mask sdpa runs its grouped-query kernel directly.
        """
        if self._min_length == self._max_length:
            return None
        columns = torch.arange(self.step_kv_len, device=self.lengths.device)
        valid = columns.unsqueeze(0) <= self.lengths.unsqueeze(1)
        valid = valid[:, None, None, :]
        if implementation == "sdpa":
            return valid
        # eager adds the mask to the logits.
        return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, torch.finfo(dtype).min)

    def advance(self) -> None:
        """Account for the token every row wrote in the step that just ran."""
        self.lengths += 1
        self.positions += 1
        self._max_length += 1
        self._min_length += 1

    def select_rows(self, rows: list[int]) -> None:
        """Keep only these rows (finished sequences leave the batch)."""
        index = torch.tensor(rows, device=self.lengths.device)
        for layer in self.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self._max_length = int(self.lengths.max())
        self._min_length = int(self.lengths.min())


def write_step(
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    kv_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one step into a layer's tensors [batch, num_kv_heads, capacity, head_dim]: row b's new key and
    value [batch, num_kv_heads, head_dim] at position lengths[b], in the cache's dtype. Return the first `kv_len`
    positions of all rows.
    """
    keys[rows, :, lengths] = new_keys.to(keys.dtype)
    values[rows, :, lengths] = new_values.to(values.dtype)
    return keys[:, :, :kv_len], values[:, :, :kv_len]


def _fill_rows(prompts: list[PromptCache], capacity: int, dtype: torch.dtype):
    """Yield per layer the keys and values [len(prompts), num_kv_heads, capacity, head_dim] of the prompts in `dtype`."""
    num_layers, num_kv_heads, _, head_dim = prompts[0].keys.shape
    shape = (len(prompts), num_kv_heads, capacity, head_dim)
    for layer_idx in range(num_layers):
        keys = prompts[0].keys.new_zeros(shape, dtype=dtype)
        values = prompts[0].values.new_zeros(shape, dtype=dtype)
        for row, prompt in enumerate(prompts):
            keys[row, :, : prompt.kept_length] = prompt.keys[layer_idx]
            values[row, :, : prompt.kept_length] = prompt.values[layer_idx]
        yield keys, values


def _pad_capacity(states: torch.Tensor, capacity: int) -> torch.Tensor:
    batch, num_kv_heads, current, head_dim = states.shape
    if current == capacity:
        return states
    padding = states.new_zeros((batch, num_kv_heads, capacity - current, head_dim))
    return torch.cat([states, padding], dim=2)
