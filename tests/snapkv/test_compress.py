"""SnapKV selection as pure tensor functions, checked against a direct reading of the method."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from snapkv.compress import compress_layer, kept_positions, pool_scores, score_prefix, select_positions
from snapkv.config import CompressionConfig


def reference_scores(window_queries, keys, scaling, reduction):
    """Score loop by loop in fp64: each window query attends causally, weights summed over the window."""
    batch, num_heads, window, _ = window_queries.shape
    _, num_kv_heads, kv_len, _ = keys.shape
    group = num_heads // num_kv_heads
    prefix = kv_len - window
    scores = torch.zeros(batch, num_heads, prefix, dtype=torch.float64)
    for b in range(batch):
        for h in range(num_heads):
            for i in range(window):
                visible = keys[b, h // group, : prefix + i + 1].double()
                weights = torch.softmax(visible @ window_queries[b, h, i].double() * scaling, dim=0)
                scores[b, h] += weights[:prefix]
    grouped = scores.view(batch, num_kv_heads, group, prefix)
    return grouped.mean(dim=2) if reduction == "mean" else grouped.amax(dim=2)


def random_layer(batch=2, num_heads=6, num_kv_heads=2, kv_len=40, head_dim=8, window=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, num_heads, window, head_dim, generator=generator)
    keys = torch.randn(batch, num_kv_heads, kv_len, head_dim, generator=generator)
    values = torch.randn(batch, num_kv_heads, kv_len, head_dim, generator=generator)
    return queries, keys, values


def test_scores_match_reference():
    queries, keys, _ = random_layer()
    for reduction in ("mean", "max"):
        expected = reference_scores(queries, keys, 0.35, reduction)
        actual = score_prefix(queries, keys, 0.35, reduction)
        assert actual.dtype == torch.float32
        assert actual.shape == (2, 2, 35)
        torch.testing.assert_close(actual.double(), expected, atol=1e-6, rtol=1e-5)


def test_scores_are_fp32_for_half_inputs():
    queries, keys, _ = random_layer()
    actual = score_prefix(queries.bfloat16(), keys.bfloat16(), 0.35, "mean")
    expected = reference_scores(queries.bfloat16().float(), keys.bfloat16().float(), 0.35, "mean")
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, atol=1e-6, rtol=1e-5)


def test_max_pool_spreads_a_hit_to_neighbours():
    scores = torch.zeros(1, 1, 10)
    scores[0, 0, 4] = 1.0
    pooled = pool_scores(scores, kernel=3, pooling="max")
    assert pooled[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]


def test_avg_pool_ignores_positions_outside_sequence():
    scores = torch.tensor([[[3.0, 0.0, 0.0, 0.0, 6.0]]])
    pooled = pool_scores(scores, kernel=3, pooling="avg")
    assert pooled[0, 0].tolist() == [1.5, 1.0, 0.0, 2.0, 3.0]


def test_select_breaks_ties_by_lower_position():
    scores = torch.tensor([[[1.0, 5.0, 2.0, 5.0, 5.0, 0.0]]])
    assert select_positions(scores, 2)[0, 0].tolist() == [1, 3]
    assert select_positions(scores, 4)[0, 0].tolist() == [1, 2, 3, 4]


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(st.integers(0, 4), min_size=2, max_size=60),
    kernel=st.sampled_from([1, 3, 5, 7]),
    pooling=st.sampled_from(["max", "avg"]),
    keep_fraction=st.floats(0.01, 1.0),
)
def test_kept_set_is_highest_pooled_scores(data, kernel, pooling, keep_fraction):
    # Small integer scores make ties common, so the tie rule is exercised too.
    scores = torch.tensor(data, dtype=torch.float32).view(1, 1, -1)
    num_keep = max(1, int(keep_fraction * len(data)))
    pooled = pool_scores(scores, kernel, pooling)[0, 0]
    kept = select_positions(scores=pool_scores(scores, kernel, pooling), num_keep=num_keep)[0, 0].tolist()

    assert kept == sorted(set(kept))
    assert len(kept) == num_keep
    dropped = [p for p in range(len(data)) if p not in kept]
    for k in kept:
        for d in dropped:
            assert pooled[k] > pooled[d] or (pooled[k] == pooled[d] and k < d)


def test_window_kept_when_prefix_ties_maximum():
    # Every key is identical, so all prefix scores tie the maximum: the window must still be kept whole.
    config = CompressionConfig(window=4, budget=10, kernel=3)
    keys = torch.ones(1, 2, 30, 8)
    queries = torch.ones(1, 4, 4, 8)
    positions = kept_positions(queries, keys, config, scaling=0.125)
    for head in range(2):
        assert positions[0, head].tolist() == [0, 1, 2, 3, 4, 5, 26, 27, 28, 29]


def test_selection_repeats_exactly():
    queries, keys, values = random_layer(kv_len=200, window=8)
    config = CompressionConfig(window=8, budget=40, kernel=5)
    first = compress_layer(queries, keys, values, config, 0.35)
    second = compress_layer(queries, keys, values, config, 0.35)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_compressed_shape_keeps_kv_heads():
    queries, keys, values = random_layer(batch=3, num_heads=9, num_kv_heads=3, kv_len=120, head_dim=16, window=8)
    config = CompressionConfig(window=8, budget=32, kernel=7)
    kept_keys, kept_values, positions = compress_layer(queries, keys, values, config, 0.25)
    assert kept_keys.shape == (3, 3, 32, 16)
    assert kept_values.shape == (3, 3, 32, 16)
    assert positions.shape == (3, 3, 32)
    # The gathered rows are exactly the keys and values at the kept positions.
    for b in range(3):
        for h in range(3):
            assert torch.equal(kept_keys[b, h], keys[b, h, positions[b, h]])
            assert torch.equal(kept_values[b, h], values[b, h, positions[b, h]])


def test_prompt_within_budget_is_untouched():
    queries, keys, values = random_layer(kv_len=32, window=8)
    kept_keys, kept_values, positions = compress_layer(queries, keys, values, CompressionConfig(window=8, budget=32), 1.0)
    assert kept_keys is keys
    assert kept_values is values
    assert positions is None
