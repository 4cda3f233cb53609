"""Run one prompt under many compression settings with a single prefill, on the engine's own code.

Compression never changes the prefill pass itself: each layer attends over the full prompt, and the
engine compresses that layer's keys and values only afterwards (see `snapkv.attention`). So one forward
pass that keeps every layer's full keys, values and window queries yields, through the engine's
`compress_layer`, exactly the caches that `Engine.prefill` would build for each setting, at a tenth
of the cost when ten settings are compared. `tests/benchmarks/test_quality_engine.py` checks that
equality. Decoding then goes through `Engine.decode` and `Engine.decode_step`, all settings of one
prompt batched together as rows of one `BatchCache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snapkv import attention
from snapkv.compress import compress_layer
from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Engine, PrefillResult, Request
from snapkv.kv_cache import BatchCache, PromptCache
from snapkv.sampling import sample_token


class _StatesCapture(attention.PrefillCapture):
    """Keep each layer's full keys and values (as the uncompressed capture does) plus its window queries."""

    def __init__(self, prompt_length: int, num_layers: int, window: int):
        super().__init__([prompt_length], None, num_layers)
        self.window = window
        self.window_queries: list[torch.Tensor | None] = [None] * num_layers
        self.scaling: list[float | None] = [None] * num_layers

    def record(self, layer_idx: int, scaling: float, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        # A copy, so that the layer's full [1, H, Q, D] queries are not kept alive by a view.
        self.window_queries[layer_idx] = queries[:, :, -self.window :].clone()
        self.scaling[layer_idx] = scaling
        super().record(layer_idx, scaling, queries, keys, values)


@dataclass
class PromptStates:
    """One prompt's full prefill: keys and values [num_layers, num_kv_heads, L, head_dim], window queries per layer."""

    prompt_ids: tuple[int, ...]
    keys: torch.Tensor
    values: torch.Tensor
    window_queries: list[torch.Tensor]  # per layer [1, num_heads, window, head_dim]
    scaling: list[float]
    logits: torch.Tensor  # [vocab_size], fp32, at the last prompt position


@torch.inference_mode()
def prefill_states(engine: Engine, prompt_ids: tuple[int, ...], window: int) -> PromptStates:
    """Run the prompt once, as `Engine.prefill` does for a single unpadded prompt, keeping full states."""
    engine.check_request(Request("quality", prompt_ids, SamplingParams(max_tokens=1), None))
    length = len(prompt_ids)
    capture = _StatesCapture(length, engine.num_layers, window)
    input_ids = torch.tensor([prompt_ids], device=engine.device)
    position_ids = torch.arange(length, device=engine.device).unsqueeze(0)
    with attention.capturing(capture):
        output = engine.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=1)
    logits = output.logits[0, -1].float()
    return PromptStates(prompt_ids, capture.keys[0], capture.values[0], capture.window_queries, capture.scaling, logits)


@torch.inference_mode()
def compressed_cache(states: PromptStates, config: CompressionConfig | None) -> tuple[PromptCache, list]:
    """Return the prompt cache and the kept positions per layer that `Engine.prefill` builds with `config`."""
    length = len(states.prompt_ids)
    if config is None:
        return PromptCache(states.keys, states.values, length), [None] * len(states.scaling)

    kept_keys, kept_values, kept_positions = [], [], []
    for layer_idx, (queries, scaling) in enumerate(zip(states.window_queries, states.scaling)):
        keys, values, positions = compress_layer(
            queries[:, :, -config.window :],
            states.keys[layer_idx].unsqueeze(0),
            states.values[layer_idx].unsqueeze(0),
            config,
            scaling,
            layer_idx,
        )
        kept_keys.append(keys[0])
        kept_values.append(values[0])
        kept_positions.append(None if positions is None else positions[0])
    return PromptCache(torch.stack(kept_keys), torch.stack(kept_values), length), kept_positions


def prefill_results(
    states: PromptStates, configs: list[CompressionConfig | None], sampling: SamplingParams
) -> list[PrefillResult]:
    """Build one greedy `PrefillResult` per compression setting, ready for `Engine.decode`."""
    results = []
    for number, config in enumerate(configs):
        cache, positions = compressed_cache(states, config)
        request = Request(f"quality-{number}", states.prompt_ids, sampling, config)
        first = sample_token(states.logits, sampling, None)
        results.append(PrefillResult(request, cache, first, states.logits, None, positions))
    return results


def generate_texts(engine: Engine, results: list[PrefillResult]) -> list[str]:
    """Decode every result together; return each one's output text, cut at its stop token."""
    texts = [""] * len(results)
    for event in engine.decode(results):
        texts[event.index] += event.text
    return texts


@torch.inference_mode()
def teacher_forced_nll(engine: Engine, results: list[PrefillResult], targets: tuple[int, ...]) -> torch.Tensor:
    """Feed `targets` to every row through the decode path; return each target's NLL in nats, [rows, len(targets)].

    The first target is scored from the prefill logits, which are the same for every row.
    """
    rows = len(results)
    cache = BatchCache([r.cache for r in results], len(targets), engine.kv_dtype)
    logits = torch.stack([r.logits for r in results])  # [rows, vocab_size]
    nll = torch.empty(rows, len(targets))
    for step, target in enumerate(targets):
        if step > 0:
            logits = engine.decode_step(cache, torch.full((rows,), targets[step - 1]))
        nll[:, step] = -torch.log_softmax(logits, dim=-1)[:, target]
    return nll


@torch.inference_mode()
def greedy_tokens(engine: Engine, results: list[PrefillResult], num_tokens: int) -> torch.Tensor:
    """Decode `num_tokens` greedy tokens per row, ignoring stop tokens; return them as [rows, num_tokens]."""
    rows = len(results)
    cache = BatchCache([r.cache for r in results], num_tokens, engine.kv_dtype)
    tokens = torch.empty(rows, num_tokens, dtype=torch.long)
    tokens[:, 0] = torch.tensor([r.first_token for r in results])
    for step in range(1, num_tokens):
        logits = engine.decode_step(cache, tokens[:, step - 1])
        tokens[:, step] = logits.argmax(dim=-1)
    return tokens
