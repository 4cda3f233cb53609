"""A decode step for Llama-architecture models (Llama, Mistral, Qwen2) that calls the model's layers directly.

`LlamaForCausalLM.forward` is generic: every step it builds a mask through the mask interface,
dispatches each layer's attention by name and passes keyword arguments through five levels of
modules. For one new token per row on a small model, that bookkeeping is a noticeable share of a
step. `LlamaDecodeStep` does the same arithmetic on the same modules (so packed linear layers and
their weights are shared, not copied) with less of that work:
- RoPE rotates the queries and keys of a layer in one operation, from one projection output each;
- attention is `scaled_dot_product_attention` on the cache rows in place, in the cache's dtype, with
  the query heads of each KV head passed as that head's queries, so the kernel reads each cached key
  and value once;
- the cache's mask is built once per step, and only when rows differ in length;
- with `join_projections`, q, k and v are one product and gate and up another, each with the weight
  of the RMSNorm before it folded in;
- with `weight_dtype=torch.bfloat16`, the joined products are packed in bf16, for a model whose
  other layers `pack_linears` packed in bf16 (`Engine(weight_dtype=torch.bfloat16)`);
- with `compile_step`, torch.compile turns the step into one graph of generated kernels and library
  calls, compiled once for each kind of step. On one row on a CPU with fp32 weights, the linear
  layers other than the vocabulary projection become generated kernels too. They read the plain
  weights faster than oneDNN's fp32 packed products on both an Intel and an AMD AVX-512 machine. On the AMD one, the compiled
  batch-1 step took 15.6 and 20.6 ms with them, against 27.6 and 27.2 ms packed (two interleaved
  pairs of runs).

Speed, SmolLM2-135M, 512 cached positions, full decode benchmark runs with fp32 caches. On an AMD
AVX-512 machine: 35.5 ms per step against 42.3 ms for the generic forward at batch 1, and 48.3
against 55.1 ms at batch 8. Compiled, 22.9 and 42.8 ms. On an Intel AVX-512 machine, compiled
against eager: 28.0 against 41.3 ms at batch 1, and 54.5 against 64.6 ms at batch 8
(docs/benchmarks/README.md, which also gives figures with fp16 caches). On the AVX2 machine measured
before, an earlier version of this module gained less than that machine's noise.

The logits are those of the generic forward to within float rounding, and the tests compare the two.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from snapkv.config import head_dim
from snapkv.kv_cache import BatchCache, write_step
from snapkv.packed_linear import join_linears

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


def _normalize(norm: nn.Module, states: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm's normalization, in fp32 and in one operation, without its weight.
    return F.rms_norm(states.float(), (states.shape[-1],), eps=norm.variance_epsilon).to(states.dtype)


def _rms_norm(norm: nn.Module, states: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm's arithmetic: normalize in fp32, then scale in the input's dtype.
    return norm.weight * _normalize(norm, states)


def _linear(linear: nn.Module, states: torch.Tensor, generated: bool) -> torch.Tensor:
    """Apply a linear layer to `states` [rows, in_features].

    With `generated` (only while torch.compile traces), compute it as an elementwise product with
    the plain `linear.weight` and a sum, which the compiler turns into a kernel of its own. Joined
    layers keep no plain weight (their `weight` is None), so they never take this path.
    """
    if not generated:
        return linear(states)
    product = (states.unsqueeze(-2) * linear.weight).sum(-1)
    return product if linear.bias is None else product + linear.bias


class LlamaDecodeStep:
    """One decode step of a Llama-architecture causal LM over a `BatchCache`; see the module docstring."""

    def __init__(
        self,
        model: PreTrainedModel,
        join_projections: bool = False,
        compile_step: bool = False,
        weight_dtype: torch.dtype = torch.float32,
    ):
        """`join_projections` computes q, k and v as one packed product, and gate and up as another
        (`snapkv.packed_linear.join_linears`). It needs oneDNN and an fp32 CPU model, and costs as
        much memory again as those weights (266 MiB measured for SmolLM2-135M). The weight of the
        RMSNorm before each joined product is folded into it, which changes the logits by float
        rounding only.

        `weight_dtype` is the dtype the joined products are packed in. Pass the dtype the model's own
        layers were packed in (`snapkv.packed_linear.pack_linears`), which the step calls for o_proj
        and down_proj; the vocabulary projection stays fp32 either way. With bf16, the joined weights
        take 133 MiB instead of 266 for SmolLM2-135M, and the one-row compiled step keeps the packed
        products (see `_step`). It needs `join_projections`.

        `compile_step` runs the step through `torch.compile` (inductor, which needs a C++ compiler on
        CPUs): the operations between the linear layers and attention become a few generated kernels,
        and Python runs once per step instead of once per operation. Each new kind of step compiles
        once, on first use: one row, several rows of one length, and several rows of different
        lengths (a mask); see `Engine.warm_up_decode` (a step that writes the last position of its
        cache compiles once more). Logits then differ from the eager step's by
        float rounding (the generated kernels sum in another order).
        """
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the Llama decode step does not support this model: {reason}")
        if weight_dtype != torch.float32 and not join_projections:
            raise ValueError(
                f"invalid weight_dtype={weight_dtype} without join_projections: the step packs its weights in "
                "another dtype only with packed products (an fp32 CPU model and oneDNN). Pass join_projections=True "
                "or weight_dtype=torch.float32."
            )
        config = model.config
        self.model = model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.layers = model.model.layers[: config.num_hidden_layers]
        # Query heads then KV heads: the heads RoPE rotates, at the front of a q/k/v projection.
        self.rotated_heads = self.num_heads + self.num_kv_heads
        self.group_size = self.num_heads // self.num_kv_heads
        self.weight_dtype = weight_dtype
        self.qkv_proj: list[nn.Module] | None = None
        self.gate_up_proj: list[nn.Module] | None = None
        if join_projections:
            self.qkv_proj = [
                join_linears(
                    [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                    input_scale=layer.input_layernorm.weight,
                    dtype=weight_dtype,
                )
                for layer in self.layers
            ]
            self.gate_up_proj = [
                join_linears(
                    [layer.mlp.gate_proj, layer.mlp.up_proj],
                    input_scale=layer.post_attention_layernorm.weight,
                    dtype=weight_dtype,
                )
                for layer in self.layers
            ]
        # Compile for any cache length and batch size (dynamic shapes): both change as sequences
        # decode, join and leave. By default (torch 2.13) dynamic compiling also traces the float
        # attributes of the modules (RMSNorm's epsilon, attention's scaling) as symbolic inputs. The
        # operators need them as constants, so Dynamo then traces each graph again from the start.
        # Constant floats avoid that: 143 s against 210 s to compile on a 2-core Intel Xeon.
        self._forward = self._step
        if compile_step:
            self._forward = torch._dynamo.config.patch(specialize_float=True)(torch.compile(self._step, dynamic=True))

    def __call__(self, cache: BatchCache, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [batch] at its original position; return next-token logits [batch, vocab_size].

        Does not advance the cache: the caller does, as after the generic forward.
        """
        kv_len = cache.check_step()
        return self._forward(
            tokens,
            cache.position_ids(),
            cache.rows,
            cache.lengths,
            kv_len,
            cache.attention_mask("sdpa", self.model.dtype),  # [batch, 1, 1, kv_len] or None
            [layer.keys for layer in cache.layers],
            [layer.values for layer in cache.layers],
        )

    def _step(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        rows: torch.Tensor,
        lengths: torch.Tensor,
        kv_len: int,
        mask: torch.Tensor | None,
        cached_keys: list[torch.Tensor],
        cached_values: list[torch.Tensor],
    ) -> torch.Tensor:
        """Run the step on a `BatchCache`'s tensors; with `compile_step`, torch.compile compiles this function."""
        batch = tokens.shape[0]
        # One row on a CPU, compiled: generated products, 17.3 against 24.7 ms packed for all of them on an
        # Intel AVX-512 machine. Packed ones were faster at 8 rows. The compiler specializes a batch of one
        # row, so each graph takes one path.
        # bf16 packed products were faster than fp32 generated ones at one row too.
        generated = (batch == 1 and tokens.device.type == "cpu" and torch.compiler.is_compiling()
                     and self.weight_dtype == torch.float32)
        decoder = self.model.model
        hidden = decoder.embed_tokens(tokens)  # [batch, hidden_size]
        cos, sin = decoder.rotary_emb(hidden, position_ids)  # [batch, 1, head_dim]
        # transformers' rotate_half(x) * sin equals x with its halves swapped, times sin with its
        # first half negated.
        half = self.head_dim // 2
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            heads, values = self._project_qkv(index, layer, hidden, generated)  # [B, H + H_kv, D], [B, H_kv, D]
            # apply_rotary_pos_emb of transformers, on queries and keys together.
            swapped = heads.unflatten(-1, (2, half)).flip(-2).flatten(-2)
            heads = torch.addcmul(heads * cos, swapped, signed_sin)
            # The query heads that share a KV head attend as that head's `group_size` queries. sdpa then
            # reads each cached key and value once, and the row's mask applies to all of them.
            queries = heads[:, : self.num_heads].reshape(batch, self.num_kv_heads, self.group_size, self.head_dim)
            keys = heads[:, self.num_heads : self.rotated_heads]

            all_keys, all_values = write_step(
                cached_keys[index], cached_values[index], rows, lengths, keys, values, kv_len
            )
            # In the cache's dtype: a cache stored in fp16 has sdpa read half the bytes.
            output = F.scaled_dot_product_attention(
                queries.to(all_keys.dtype), all_keys, all_values, attn_mask=mask, scale=attention.scaling
            )  # [B, H_kv, group_size, D]
            attended = output.reshape(batch, self.num_heads * self.head_dim).to(hidden.dtype)
            hidden = hidden + _linear(attention.o_proj, attended, generated)

            hidden = hidden + _linear(layer.mlp.down_proj, self._gate_up(index, layer, hidden, generated), generated)

        hidden = _rms_norm(decoder.norm, hidden)
        # Packed even for one row: the compiler fused the norm into a generated vocabulary projection,
        # and that kernel took about 6 ms against 4.3 ms for the packed product.
        return self.model.lm_head(hidden)

    def _project_qkv(
        self, index: int, layer: nn.Module, hidden: torch.Tensor, generated: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the queries and keys before RoPE [batch, num_heads + num_kv_heads, head_dim] and the
        values [batch, num_kv_heads, head_dim] of one layer, from its input [batch, hidden_size]."""
        batch = hidden.shape[0]
        attention = layer.self_attn
        if self.qkv_proj is None or generated:
            states = _rms_norm(layer.input_layernorm, hidden)
            queries = _linear(attention.q_proj, states, generated).view(batch, self.num_heads, self.head_dim)
            keys = _linear(attention.k_proj, states, generated).view(batch, self.num_kv_heads, self.head_dim)
            values = _linear(attention.v_proj, states, generated).view(batch, self.num_kv_heads, self.head_dim)
            return torch.cat((queries, keys), dim=1), values
        states = _normalize(layer.input_layernorm, hidden)
        projected = self.qkv_proj[index](states).view(batch, self.rotated_heads + self.num_kv_heads, self.head_dim)
        return projected[:, : self.rotated_heads], projected[:, self.rotated_heads :]

    def _gate_up(self, index: int, layer: nn.Module, hidden: torch.Tensor, generated: bool) -> torch.Tensor:
        """Return act(gate(x)) * up(x) for x the normalized `hidden`: the input of the down projection."""
        mlp = layer.mlp
        if self.gate_up_proj is None or generated:
            states = _rms_norm(layer.post_attention_layernorm, hidden)
            return mlp.act_fn(_linear(mlp.gate_proj, states, generated)) * _linear(mlp.up_proj, states, generated)
        states = _normalize(layer.post_attention_layernorm, hidden)
        gate, up = self.gate_up_proj[index](states).chunk(2, dim=-1)
        return mlp.act_fn(gate) * up
