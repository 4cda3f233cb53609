"""Next-token choice from logits: greedy, or temperature with top-k and top-p filters."""

from __future__ import annotations

import torch

from snapkv.config import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """Return a per-request random generator (None for greedy decoding), seeded when a seed is given."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token id from one sequence's logits [vocab_size]."""
    if params.greedy:
        return int(torch.argmax(logits))

    # Subtracting the largest logit leaves the distribution unchanged. With the temperature held at
    # fp32's smallest normal number, a tiny temperature then gives 0 for the top token and -inf for
    # the others, which is greedy decoding (the limit as the temperature goes to 0), instead of NaN.
    logits = logits.float()
    scaled = (logits - logits.max()) / max(params.temperature, torch.finfo(torch.float32).tiny)
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth_largest = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))

    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top token always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        scaled = scaled.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))

    probabilities = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))
