"""The quality benchmark's single-prefill shortcut builds the same caches, and decodes the same tokens,
as `Engine.prefill` with each compression setting (tiny random-weight model)."""

import pytest
import torch

from benchmarks.quality_engine import greedy_tokens, prefill_results, prefill_states, teacher_forced_nll
from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Request
from tests.conftest import tiny_engine
from tests.snapkv.test_engine import decode_logits, prompt

GREEDY_8 = SamplingParams(max_tokens=8)
CONFIGS = [
    None,
    CompressionConfig(window=8, budget=48, kernel=5),
    CompressionConfig(window=8, budget=48, method="sinks_recent"),
    CompressionConfig(window=8, budget=48, method="random", seed=4),
    CompressionConfig(window=8, budget=200),  # above the prompt length: untouched
]


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("qwen2")


@pytest.mark.parametrize("config", CONFIGS)
def test_cache_equals_engine_prefill(engine, config):
    ids = prompt(150, seed=2)
    [expected] = engine.prefill([Request("a", ids, GREEDY_8, config)])
    [ours] = prefill_results(prefill_states(engine, ids, window=8), [config], GREEDY_8)

    assert torch.equal(ours.cache.keys, expected.cache.keys)
    assert torch.equal(ours.cache.values, expected.cache.values)
    assert ours.cache.prompt_length == 150
    assert torch.equal(ours.logits, expected.logits)
    assert ours.first_token == expected.first_token
    for layer, positions in enumerate(expected.kept_positions):
        if positions is None:
            assert ours.kept_positions[layer] is None
        else:
            assert torch.equal(ours.kept_positions[layer], positions)


def test_batched_nll_equals_single_decoding(engine):
    # Teacher forcing all settings as rows of one batch gives each row's single-sequence logits.
    ids = prompt(150, seed=3)
    targets = tuple(prompt(6, seed=4))
    results = prefill_results(prefill_states(engine, ids, window=8), CONFIGS, GREEDY_8)
    nll = teacher_forced_nll(engine, results, targets)

    assert nll.shape == (len(CONFIGS), 6)
    for row, result in enumerate(results):
        logits = torch.cat([result.logits[None], decode_logits(engine, result, targets[:-1])])
        expected = -torch.log_softmax(logits, dim=-1)[torch.arange(6), list(targets)]
        torch.testing.assert_close(nll[row], expected, atol=1e-4, rtol=1e-4)


def test_greedy_rows_equal_engine_generate(engine):
    ids = prompt(150, seed=5)
    results = prefill_results(prefill_states(engine, ids, window=8), CONFIGS, GREEDY_8)
    tokens = greedy_tokens(engine, results, num_tokens=8)
    for row, config in enumerate(CONFIGS):
        expected = [event.token_id for event in engine.generate([Request("a", ids, GREEDY_8, config)])]
        assert tokens[row].tolist()[: len(expected)] == expected
