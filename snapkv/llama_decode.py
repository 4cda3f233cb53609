"""A decode step for Llama-architecture models (Llama, Mistral, Qwen2) that calls the model's layers directly.

`LlamaForCausalLM.forward` is generic: every step it builds a mask through the mask interface,
dispatches each layer's attention by name and passes keyword arguments through five levels of
modules. For one new token per row on a small model, that bookkeeping is a noticeable share of a
step. `LlamaDecodeStep` does the same arithmetic in the same order on the same modules (so packed
linear layers and their weights are shared, not copied) with less of that work:
- RoPE rotates the queries and keys of a layer in one operation, from one projection output each;
- attention is `scaled_dot_product_attention` with grouped-query heads, on the cache rows in place;
- the cache's mask is built once per step, and only when rows differ in length.

NOTE: the speed gain is not established. On SmolLM2-135M with 512 cached positions, a quick
benchmark run measured a step 13 % faster than the generic forward at batch 1 and 8 % at batch 8.
The full run's medians gave 1 % faster at batch 1, 14 % at batch 4 and 6 % slower at batch 8. Its
rounds were up to 50 % apart, which is this 2-core machine's noise (docs/benchmarks).

The logits are those of the generic forward to within float rounding, and the tests compare the two.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from snapkv.kv_cache import BatchCache

# Families whose decoder layer is Llama's: pre-norm RMSNorm, RoPE on q and k, gated MLP. Qwen2 adds
# biases to q, k and v, which its linear modules apply themselves.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Return why `LlamaDecodeStep` cannot run `model`, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "sliding_window", None) is not None:
        return f"sliding_window={config.sliding_window} is set"
    if getattr(config, "pretraining_tp", 1) != 1:
        return f"pretraining_tp={config.pretraining_tp} is not 1"
    return None


def _rms_norm(norm: nn.Module, states: torch.Tensor) -> torch.Tensor:
    # The arithmetic of LlamaRMSNorm: normalize in fp32, then scale in the input's dtype.
    dtype = states.dtype
    states = states.to(torch.float32)
    states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * states.to(dtype)


class LlamaDecodeStep:
    """One decode step of a Llama-architecture causal LM over a `BatchCache`; see the module docstring."""

    def __init__(self, model: PreTrainedModel):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the Llama decode step does not support this model: {reason}")
        config = model.config
        self.model = model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = model.model.layers[: config.num_hidden_layers]

    def __call__(self, cache: BatchCache, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [batch] at its original position; return next-token logits [batch, vocab_size].

        Does not advance the cache: the caller does, as after the generic forward.
        """
        batch = tokens.shape[0]
        decoder = self.model.model
        hidden = decoder.embed_tokens(tokens)  # [batch, hidden_size]
        cos, sin = decoder.rotary_emb(hidden, cache.position_ids())  # [batch, 1, head_dim]
        mask = cache.attention_mask("sdpa", hidden.dtype)
        half = self.head_dim // 2
        rotated_heads = self.num_heads + self.num_kv_heads

        for layer, cache_layer in zip(self.layers, cache.layers):
            attention = layer.self_attn
            states = _rms_norm(layer.input_layernorm, hidden)
            queries = attention.q_proj(states).view(batch, self.num_heads, self.head_dim)
            keys = attention.k_proj(states).view(batch, self.num_kv_heads, self.head_dim)
            values = attention.v_proj(states).view(batch, self.num_kv_heads, 1, self.head_dim)
            # rotate_half and apply_rotary_pos_emb of transformers, on queries and keys together.
            heads = torch.cat((queries, keys), dim=1)
            heads = heads * cos + torch.cat((-heads[..., half:], heads[..., :half]), dim=-1) * sin
            queries = heads[:, : self.num_heads].unsqueeze(2)
            keys = heads[:, self.num_heads : rotated_heads].unsqueeze(2)

            all_keys, all_values = cache_layer.update(keys, values)
            output = F.scaled_dot_product_attention(
                queries, all_keys, all_values, attn_mask=mask, scale=attention.scaling, enable_gqa=True
            )
            hidden = hidden + attention.o_proj(output.reshape(batch, self.num_heads * self.head_dim))

            mlp = layer.mlp
            states = _rms_norm(layer.post_attention_layernorm, hidden)
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(states)) * mlp.up_proj(states))

        hidden = _rms_norm(decoder.norm, hidden)
        return self.model.lm_head(hidden)
