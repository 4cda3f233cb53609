"""The engine on tiny random-weight models: compression changes nothing it should not, and decoding
from a compressed cache is exactly decoding from the full cache with the evicted keys masked."""

import gc
import weakref

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Request
from snapkv.kv_cache import BatchCache
from snapkv.tiny_models import tiny_model
from tests.conftest import FAMILY_SHAPES, tiny_engine

GREEDY_16 = SamplingParams(max_tokens=16)
SMALL = CompressionConfig(window=8, budget=48, kernel=5)


def prompt(length: int, seed: int = 0) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, 256, (length,), generator=generator).tolist())


def decode_logits(engine, result, tokens):
    """Teacher-force `tokens` from one prefill result; return the logits [len(tokens), vocab] of each step."""
    cache = BatchCache([result.cache], max_new_tokens=len(tokens) + 1)
    return torch.stack([engine.decode_step(cache, torch.tensor([t]))[0] for t in tokens])


def greedy_tokens(engine, request):
    return [event.token_id for event in engine.generate([request])]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_budget_above_length_is_identical(attn_implementation):
    engine = tiny_engine(attn_implementation=attn_implementation)
    ids = prompt(100)
    compressed = engine.prefill([Request("a", ids, GREEDY_16, CompressionConfig(window=8, budget=100))])[0]
    full = engine.prefill([Request("b", ids, GREEDY_16, None)])[0]

    assert torch.equal(compressed.cache.keys, full.cache.keys)
    assert torch.equal(compressed.cache.values, full.cache.values)
    assert torch.equal(compressed.logits, full.logits)

    tokens = greedy_tokens(engine, Request("c", ids, GREEDY_16, None))
    assert torch.equal(decode_logits(engine, compressed, tokens), decode_logits(engine, full, tokens))


def test_full_cache_decoding_matches_transformers_generate():
    # An independent check of the batch cache and the positions: transformers' own greedy loop.
    engine = tiny_engine()
    ids = prompt(120)
    ours = greedy_tokens(engine, Request("a", ids, GREEDY_16, None))
    reference = tiny_model("llama", **FAMILY_SHAPES["llama"]).model.generate(
        torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=256
    )
    assert ours == reference[0, len(ids) :].tolist()


def masked_reference_logits(family, ids, kept_positions, tokens):
    """Decode the full cache with every evicted key masked, per layer and per KV head."""
    loaded = tiny_model(family, **FAMILY_SHAPES[family])
    model = loaded.model
    length = len(ids)
    group = model.config.num_attention_heads // model.config.num_key_value_heads

    def masked_attention(module, query, key, value, attention_mask, **kwargs):
        kv_len = key.shape[2]
        if query.shape[2] > 1:  # prefill: plain causal attention
            allowed = torch.ones(query.shape[2], kv_len, dtype=torch.bool).tril()[None, None]
        else:
            allowed_per_kv_head = torch.ones(key.shape[1], kv_len, dtype=torch.bool)
            allowed_per_kv_head[:, :length] = False
            for head, positions in enumerate(kept_positions[module.layer_idx]):
                allowed_per_kv_head[head, positions] = True
            allowed = allowed_per_kv_head.repeat_interleave(group, dim=0)[None, :, None, :]
        return sdpa_attention_forward(module, query, key, value, allowed, **kwargs)

    AttentionInterface.register("masked_reference", masked_attention)
    AttentionMaskInterface.register("masked_reference", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation("masked_reference")

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.tensor([ids]), cache=cache, use_cache=True)
        logits = []
        for step, token in enumerate(tokens):
            output = model(torch.tensor([[token]]), position_ids=torch.tensor([[length + step]]), cache=cache)
            logits.append(output.logits[0, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_compressed_equals_masked_full_cache(family):
    engine = tiny_engine(family)
    ids = prompt(300, seed=1)
    request = Request("a", ids, GREEDY_16, SMALL)
    [result] = engine.prefill([request])
    assert result.cache.kept_length == 48

    tokens = greedy_tokens(engine, request)
    ours = decode_logits(engine, result, tokens[:-1])
    reference = masked_reference_logits(family, ids, result.kept_positions, tokens[:-1])
    assert (ours - reference).abs().max().item() <= 1e-4


def test_ragged_batch_equals_single_runs():
    # Prompts longer than, equal to and shorter than the budget, batched with left padding.
    engine = tiny_engine("qwen2")
    requests = [Request(str(n), prompt(n, seed=n), GREEDY_16, SMALL) for n in (300, 48, 20, 131)]
    batched = engine.prefill(requests)
    batched_tokens = {}
    for event in engine.decode(batched):
        batched_tokens.setdefault(event.index, []).append(event.token_id)

    for index, request in enumerate(requests):
        [alone] = engine.prefill([request])
        together = batched[index]
        assert together.cache.kept_length == min(len(request.prompt_ids), 48)
        assert together.cache.prompt_length == len(request.prompt_ids)
        for layer, positions in enumerate(alone.kept_positions):
            if positions is None:
                assert together.kept_positions[layer] is None
            else:
                assert torch.equal(positions, together.kept_positions[layer])
        torch.testing.assert_close(together.cache.keys, alone.cache.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.cache.values, alone.cache.values, atol=1e-5, rtol=1e-5)
        assert batched_tokens[index] == greedy_tokens(engine, request)


def test_padding_is_never_kept():
    engine = tiny_engine()
    short, long = prompt(100, seed=2), prompt(400, seed=3)
    results = engine.prefill([Request("s", short, GREEDY_16, SMALL), Request("l", long, GREEDY_16, SMALL)])
    for layer_positions in results[0].kept_positions:
        assert layer_positions.min().item() >= 0
        assert layer_positions.max().item() == 99


def test_consecutive_long_prompts_compressed():
    engine = tiny_engine()
    first = engine.prefill([Request("1", prompt(500, seed=4), GREEDY_16, SMALL)])[0]
    second = engine.prefill([Request("2", prompt(700, seed=5), GREEDY_16, SMALL)])[0]
    assert (first.cache.kept_length, first.cache.prompt_length) == (48, 500)
    assert (second.cache.kept_length, second.cache.prompt_length) == (48, 700)
    # No state carries over: a fresh engine compresses the second prompt identically.
    again = tiny_engine().prefill([Request("2", prompt(700, seed=5), GREEDY_16, SMALL)])[0]
    assert torch.equal(second.cache.keys, again.cache.keys)


def test_eager_and_sdpa_select_the_same_positions():
    ids = prompt(260, seed=6)
    results = [
        tiny_engine(attn_implementation=impl).prefill([Request("a", ids, GREEDY_16, SMALL)])[0]
        for impl in ("sdpa", "eager")
    ]
    for sdpa_positions, eager_positions in zip(results[0].kept_positions, results[1].kept_positions):
        assert torch.equal(sdpa_positions, eager_positions)


def test_seeded_sampling_repeats():
    engine = tiny_engine()
    sampling = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    request = Request("a", prompt(80), sampling, SMALL)
    assert greedy_tokens(engine, request) == greedy_tokens(engine, request)


def test_stop_token_ends_generation():
    engine = tiny_engine()
    [result] = engine.prefill([Request("a", prompt(50), SamplingParams(max_tokens=5), None)])
    result.first_token = 257  # the chat end-of-turn marker of the byte tokenizer
    events = list(engine.decode([result]))
    assert [(e.token_id, e.text, e.finish_reason) for e in events] == [(257, "", "stop")]


def test_max_tokens_sets_length_finish():
    engine = tiny_engine()
    events = list(engine.generate([Request("a", prompt(50), SamplingParams(max_tokens=3), None)]))
    assert len(events) == 3
    assert [e.finish_reason for e in events] == [None, None, "length"]


@pytest.mark.parametrize(
    "ids, max_tokens, message",
    [((), 4, "empty"), (tuple(range(200)) * 82, 4, "exceeds the model's context")],
)
def test_invalid_requests_are_rejected(ids, max_tokens, message):
    engine = tiny_engine()
    with pytest.raises(ValueError, match=message):
        engine.prefill([Request("a", ids, SamplingParams(max_tokens=max_tokens), SMALL)])


def test_dropped_batch_cache_frees_kv():
    """A dropped `BatchCache` frees its keys and values at once, with the cycle collector off. Its
    layers must not refer back to it strongly, or the memory stays allocated until the collector runs."""
    engine = tiny_engine("llama")
    [result] = engine.prefill([Request("a", list(range(1, 40)), GREEDY_16, CompressionConfig(window=8, budget=16))])
    gc.disable()
    try:
        cache = BatchCache([result.cache], max_new_tokens=16)
        engine.decode_step(cache, torch.tensor([result.first_token]))
        keys = weakref.ref(cache.layers[0].keys)
        del cache
        assert keys() is None, "the dropped cache's keys are still allocated"
    finally:
        gc.enable()
