"""Baseline selections of prompt KV positions, at the same budget as SnapKV, as pure tensor functions.

They exist to measure what SnapKV's scoring buys: each one fills the `budget - window` slots before
the observation window without looking at attention, and the caller appends the window as for SnapKV.

- Sinks plus recent, as in StreamingLLM (Xiao et al., arXiv 2309.17453): the first `NUM_SINKS`
  positions, which draw much of the attention whatever their content, then the positions just
  before the window. Together with the window they form the most recent `budget - NUM_SINKS` tokens.
- Random: a uniform random subset of the prefix, drawn independently per sequence, KV head and layer
  from a generator seeded with the request's seed and the layer index, so a run repeats exactly.
"""

from __future__ import annotations

import torch

NUM_SINKS = 4


def sinks_recent_prefix(batch: int, num_kv_heads: int, prefix_len: int, num_keep: int, device) -> torch.Tensor:
    """Return the first sinks and the last recent positions of a prefix, [batch, num_kv_heads, num_keep], sorted.

    Fewer than `NUM_SINKS` sinks are kept when `num_keep` is smaller than that.
    """
    num_sinks = min(NUM_SINKS, num_keep)
    sinks = torch.arange(num_sinks, device=device)
    recent = torch.arange(prefix_len - (num_keep - num_sinks), prefix_len, device=device)
    return torch.cat([sinks, recent]).expand(batch, num_kv_heads, num_keep)


def random_prefix(
    batch: int, num_kv_heads: int, prefix_len: int, num_keep: int, seed: int, layer_idx: int, device
) -> torch.Tensor:
    """Return `num_keep` distinct uniform random prefix positions per row, [batch, num_kv_heads, num_keep], sorted.

    Layer l of seed s draws from a CPU generator seeded with s * 2**16 + l, so the positions do not depend
    on the device, and layers (below 65,536 of them) and seeds get different draws.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed * 2**16 + layer_idx)
    noise = torch.rand(batch, num_kv_heads, prefix_len, generator=generator)  # [B, H_kv, K-W]

    # Sorting independent uniform draws gives a uniform random permutation, so its first entries are a uniform sample.
    sample = noise.argsort(dim=-1)[..., :num_keep]
    return sample.sort(dim=-1).values.to(device)
