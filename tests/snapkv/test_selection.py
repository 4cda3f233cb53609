"""Baseline selections (sinks plus recent, random) at SnapKV's budget: exact kept positions, repeatable
random draws, and the engine's prefill and decode paths using them like SnapKV's own positions."""

import pytest
import torch

from snapkv.compress import compress_layer, kept_positions
from snapkv.config import CompressionConfig
from snapkv.engine import Request
from snapkv.selection import random_prefix, sinks_recent_prefix
from tests.conftest import tiny_engine
from tests.snapkv.test_compress import random_layer
from tests.snapkv.test_engine import GREEDY_16, decode_logits, greedy_tokens, masked_reference_logits, prompt

BASELINES = ("sinks_recent", "random")


def positions_of(method, kv_len=30, window=4, budget=10, seed=0, layer_idx=0, batch=2, num_kv_heads=3):
    queries, keys, _ = random_layer(batch=batch, num_heads=2 * num_kv_heads, num_kv_heads=num_kv_heads, kv_len=kv_len, window=window)
    config = CompressionConfig(window=window, budget=budget, method=method, seed=seed)
    return kept_positions(queries, keys, config, scaling=0.35, layer_idx=layer_idx)


def test_sinks_recent_exact_positions():
    positions = positions_of("sinks_recent", kv_len=20, window=4, budget=10)
    assert positions.shape == (2, 3, 10)
    for b in range(2):
        for head in range(3):
            # Four sinks, then the last six positions, of which the last four are the window.
            assert positions[b, head].tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]


def test_sinks_recent_fewer_sinks_than_slots():
    # Only two slots before the window: both go to sinks, and the window fills the rest.
    positions = positions_of("sinks_recent", kv_len=30, window=8, budget=10)
    assert positions[0, 0].tolist() == [0, 1, 22, 23, 24, 25, 26, 27, 28, 29]


def test_sinks_recent_prefix_directly():
    assert sinks_recent_prefix(1, 1, prefix_len=12, num_keep=6, device="cpu")[0, 0].tolist() == [0, 1, 2, 3, 10, 11]
    assert sinks_recent_prefix(1, 1, prefix_len=12, num_keep=3, device="cpu")[0, 0].tolist() == [0, 1, 2]


def test_random_keeps_window_and_count():
    positions = positions_of("random", kv_len=200, window=8, budget=40)
    assert positions.shape == (2, 3, 40)
    for b in range(2):
        for head in range(3):
            row = positions[b, head].tolist()
            assert row[-8:] == list(range(192, 200))
            prefix = row[:-8]
            assert len(set(prefix)) == 32
            assert prefix == sorted(prefix)
            assert prefix[0] >= 0
            assert prefix[-1] < 192


def test_random_repeats_with_same_seed():
    first = positions_of("random", kv_len=200, window=8, budget=40, seed=7, layer_idx=3)
    second = positions_of("random", kv_len=200, window=8, budget=40, seed=7, layer_idx=3)
    assert torch.equal(first, second)


def test_random_differs_across_seeds_layers_heads():
    base = positions_of("random", kv_len=200, window=8, budget=40, seed=7, layer_idx=3)
    other_seed = positions_of("random", kv_len=200, window=8, budget=40, seed=8, layer_idx=3)
    other_layer = positions_of("random", kv_len=200, window=8, budget=40, seed=7, layer_idx=4)
    assert not torch.equal(base, other_seed)
    assert not torch.equal(base, other_layer)
    assert not torch.equal(base[0, 0], base[0, 1])
    assert not torch.equal(base[0, 0], base[1, 0])


def test_random_prefix_is_uniform():
    # 4,000 draws of 5 positions out of 20: each position is kept about 1,000 times (binomial sd ~27).
    draws = random_prefix(4000, 1, prefix_len=20, num_keep=5, seed=1, layer_idx=0, device="cpu")
    counts = torch.bincount(draws.flatten(), minlength=20)
    assert counts.sum().item() == 20_000
    assert counts.min().item() > 850
    assert counts.max().item() < 1150


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_within_budget_is_untouched(method):
    queries, keys, values = random_layer(kv_len=32, window=8)
    config = CompressionConfig(window=8, budget=32, method=method)
    kept_keys, kept_values, positions = compress_layer(queries, keys, values, config, 1.0)
    assert kept_keys is keys
    assert kept_values is values
    assert positions is None


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_budget_above_length_is_identical(method):
    engine = tiny_engine()
    ids = prompt(100)
    compressed = engine.prefill([Request("a", ids, GREEDY_16, CompressionConfig(window=8, budget=100, method=method))])[0]
    full = engine.prefill([Request("b", ids, GREEDY_16, None)])[0]
    assert torch.equal(compressed.cache.keys, full.cache.keys)
    assert torch.equal(compressed.cache.values, full.cache.values)
    assert compressed.kept_positions == [None] * engine.num_layers


def test_engine_sinks_recent_positions_every_layer():
    engine = tiny_engine()
    config = CompressionConfig(window=8, budget=48, method="sinks_recent")
    [result] = engine.prefill([Request("a", prompt(300, seed=1), GREEDY_16, config)])
    expected = [0, 1, 2, 3] + list(range(256, 300))
    for positions in result.kept_positions:
        assert positions.shape == (2, 48)
        assert positions[0].tolist() == expected
        assert positions[1].tolist() == expected


def test_engine_random_positions_differ_per_layer():
    engine = tiny_engine()
    ids = prompt(300, seed=1)
    config = CompressionConfig(window=8, budget=48, method="random", seed=5)
    [first] = engine.prefill([Request("a", ids, GREEDY_16, config)])
    [again] = engine.prefill([Request("b", ids, GREEDY_16, config)])
    [full] = engine.prefill([Request("c", ids, GREEDY_16, None)])

    assert not torch.equal(first.kept_positions[0], first.kept_positions[1])
    for layer, positions in enumerate(first.kept_positions):
        assert torch.equal(positions, again.kept_positions[layer])
        # The cache contains the full prefill's keys and values at exactly these positions.
        for head in range(2):
            assert torch.equal(first.cache.keys[layer, head], full.cache.keys[layer, head, positions[head]])
            assert torch.equal(first.cache.values[layer, head], full.cache.values[layer, head, positions[head]])


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_equals_masked_full_cache(method):
    # Decoding from a baseline's cache continues at the original positions, like SnapKV's.
    engine = tiny_engine()
    ids = prompt(300, seed=1)
    request = Request("a", ids, GREEDY_16, CompressionConfig(window=8, budget=48, method=method, seed=3))
    [result] = engine.prefill([request])

    tokens = greedy_tokens(engine, request)
    ours = decode_logits(engine, result, tokens[:-1])
    reference = masked_reference_logits("llama", ids, result.kept_positions, tokens[:-1])
    assert (ours - reference).abs().max().item() <= 1e-4
