"""SnapKV selection of prompt KV positions (arXiv 2404.14469), as pure tensor functions.

For one layer of one batch of equal-length prompts:

1. the last `window` queries attend to every prompt key (causal inside the window, softmax in fp32);
2. the weights are summed over the window queries for each key before the window;
3. the scores of the query heads that share a KV head are reduced to one score per KV head;
4. pooling along the sequence spreads a hit to its neighbours;
5. the top `budget - window` positions per KV head are kept, sorted by position, and the window's own
   keys and values are appended.

Keys are post-RoPE, so kept entries need no re-rotation, and decoding continues at the original prompt
length. Nothing here logs above DEBUG, reads global state or performs I/O.

`CompressionConfig.method` can swap steps 1 to 4 and the top-k of step 5 for a baseline from
`snapkv.selection` (sinks plus recent, or random), which picks the prefix positions without scores.
The window is appended as in step 5 either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from snapkv.config import CompressionConfig
from snapkv.selection import random_prefix, sinks_recent_prefix


def score_prefix(window_queries: torch.Tensor, keys: torch.Tensor, scaling: float, gqa_reduction: str) -> torch.Tensor:
    """Score each prefix key by the attention the observation window gives it.

    window_queries: [batch, num_heads, window, head_dim], the queries of the last `window` positions.
    keys: [batch, num_kv_heads, kv_len, head_dim], the keys of every prompt position.
    Returns [batch, num_kv_heads, kv_len - window] in fp32.

    One KV head at a time, its query heads attend together, so the largest temporary is one fp32
    tensor of [batch, num_heads / num_kv_heads, window, kv_len]; keys are never repeated per query head.
    """
    batch, num_heads, window, head_dim = window_queries.shape
    _, num_kv_heads, kv_len, _ = keys.shape
    group_size = num_heads // num_kv_heads
    prefix_len = kv_len - window

    # Each KV head serves `group_size` consecutive query heads (the layout `repeat_kv` assumes).
    grouped_queries = window_queries.reshape(batch, num_kv_heads, group_size * window, head_dim)
    # Window query i sits at position prefix_len + i and must not see the window keys after it.
    future = torch.ones(window, window, dtype=torch.bool, device=keys.device).triu_(diagonal=1)

    scores = keys.new_empty((batch, num_kv_heads, prefix_len), dtype=torch.float32)
    for head in range(num_kv_heads):
        queries = grouped_queries[:, head].float()  # [B, g*W, D]
        head_keys = keys[:, head].float()  # [B, K, D]
        # einsum lets the BLAS read the keys transposed; matmul on a transposed view copies them first.
        logits = torch.einsum("bqd,bkd->bqk", queries, head_keys).mul_(scaling)  # [B, g*W, K]
        logits.view(batch, group_size, window, kv_len)[..., prefix_len:].masked_fill_(future, float("-inf"))

        # Softmax in place, so the logits are the only large temporary.
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        weights = logits.div_(logits.sum(dim=-1, keepdim=True))
        per_query_head = weights.view(batch, group_size, window, kv_len)[..., :prefix_len].sum(dim=2)  # [B, g, K-W]

        if gqa_reduction == "mean":
            scores[:, head] = per_query_head.mean(dim=1)
        else:
            scores[:, head] = per_query_head.amax(dim=1)
    return scores


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Smooth scores [batch, num_kv_heads, length] along the sequence, keeping the length.

    Average pooling divides by the positions inside the sequence only, so the first and last scores
    are not diluted by padding.
    """
    batch, num_kv_heads, length = scores.shape
    if kernel == 1:
        return scores

    flat = scores.reshape(batch * num_kv_heads, 1, length)
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return pooled.reshape(batch, num_kv_heads, length)


def select_positions(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Return the `num_keep` highest-scoring positions per row, in increasing position order.

    scores: [batch, num_kv_heads, length]. Ties go to the lower position: a stable descending sort
    keeps equal scores in position order, which `torch.topk` does not promise.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :num_keep].sort(dim=-1).values


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Gather states [batch, num_kv_heads, kv_len, head_dim] at positions [batch, num_kv_heads, n]."""
    head_dim = states.shape[-1]
    index = positions.unsqueeze(-1).expand(-1, -1, -1, head_dim)
    return states.gather(2, index)


def kept_positions(
    window_queries: torch.Tensor, keys: torch.Tensor, config: CompressionConfig, scaling: float, layer_idx: int = 0
) -> torch.Tensor:
    """Return the positions [batch, num_kv_heads, budget] that `config.method` keeps, window included, sorted.

    `layer_idx` only seeds the random baseline, so that each layer draws its own positions.
    """
    batch, num_kv_heads, kv_len, _ = keys.shape
    window = config.window
    prefix_len = kv_len - window
    num_keep = config.budget - window

    if config.method == "sinks_recent":
        prefix_positions = sinks_recent_prefix(batch, num_kv_heads, prefix_len, num_keep, keys.device)
    elif config.method == "random":
        prefix_positions = random_prefix(batch, num_kv_heads, prefix_len, num_keep, config.seed, layer_idx, keys.device)
    else:
        scores = score_prefix(window_queries, keys, scaling, config.gqa_reduction)
        scores = pool_scores(scores, config.kernel, config.pooling)
        prefix_positions = select_positions(scores, num_keep)

    window_positions = torch.arange(kv_len - window, kv_len, device=keys.device)
    window_positions = window_positions.expand(batch, num_kv_heads, window)
    return torch.cat([prefix_positions, window_positions], dim=-1)


def compress_layer(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    config: CompressionConfig,
    scaling: float,
    layer_idx: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Compress one layer's prompt keys and values [batch, num_kv_heads, kv_len, head_dim].

    Returns (keys, values, positions): the kept keys and values, [batch, num_kv_heads, kept, head_dim],
    and the kept positions [batch, num_kv_heads, kept]. A prompt no longer than the budget comes back
    unchanged, as the same tensors, with positions None.
    """
    kv_len = keys.shape[2]
    if kv_len <= config.budget:
        return keys, values, None

    positions = kept_positions(window_queries, keys, config, scaling, layer_idx)
    return gather_positions(keys, positions), gather_positions(values, positions), positions
