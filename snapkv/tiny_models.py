"""Tiny random-weight models and a byte-level tokenizer, built in code, for tests and benchmarks.

They load in milliseconds and need no download, yet exercise the same transformers code paths as real
checkpoints of each family: GQA, RoPE, attention biases (Qwen2), and both attention implementations.
"""

from __future__ import annotations

import torch
from torch import nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from snapkv.model import LoadedModel

FAMILIES = ("llama", "mistral", "qwen2")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_end|>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build a byte-level tokenizer: one token per UTF-8 byte, plus the two special tokens (ids 256 and 257)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    return tokenizer


def tiny_config(family: str, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16):
    """Build a small GQA config of one model family; `vocab_size` covers `byte_tokenizer()`."""
    common = dict(
        vocab_size=258,
        hidden_size=num_heads * head_dim,
        intermediate_size=2 * num_heads * head_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=16384,
        eos_token_id=256,
        pad_token_id=256,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"unknown family={family!r}: expected one of {FAMILIES}")


def tiny_model(family: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **config_overrides) -> LoadedModel:
    """Build a random-weight model of `family`, in fp32, in eval mode, deterministic for a seed."""
    config = tiny_config(family, **config_overrides)
    classes = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}
    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    model = classes[family](config).eval()
    model.requires_grad_(False)
    # transformers starts linear biases (Qwen2's q, k and v) at zero. Random ones make a dropped bias
    # change the logits.
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.normal_(std=0.5)
    return LoadedModel(model=model, tokenizer=byte_tokenizer(), name=f"tiny-{family}")
