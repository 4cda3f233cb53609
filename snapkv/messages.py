"""Conversions between the core's value types and their proto messages, and the model fingerprint.

Every `*_from_proto` function raises `ValueError` naming the field and the value when a message contains
a value the core rejects, so a servicer can map it to INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

from snapkv.config import CompressionConfig, SamplingParams, dtype_name, head_dim
from snapkv.proto import serving_pb2 as pb

if TYPE_CHECKING:  # the router uses this module without loading transformers and torch
    from transformers import PreTrainedModel

POOLING_TO_PROTO = {"max": pb.POOLING_MAX, "avg": pb.POOLING_AVG}
POOLING_FROM_PROTO = {value: name for name, value in POOLING_TO_PROTO.items()}
GQA_REDUCTION_TO_PROTO = {"mean": pb.GQA_REDUCTION_MEAN, "max": pb.GQA_REDUCTION_MAX}
GQA_REDUCTION_FROM_PROTO = {value: name for name, value in GQA_REDUCTION_TO_PROTO.items()}

# Config attributes that change how RoPE rotates keys. transformers 5 gathers them in `rope_parameters`;
# the others cover configs that still keep them as separate attributes.
ROPE_ATTRIBUTES = ("rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor")


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    message = pb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop=list(params.stop),
    )
    if params.seed is not None:
        message.seed = params.seed
    return message


def sampling_from_proto(message: pb.SamplingParams) -> SamplingParams:
    """Build `SamplingParams`; unset optional fields take the dataclass defaults."""
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=message.max_tokens if message.HasField("max_tokens") else defaults.max_tokens,
        temperature=message.temperature,
        top_p=message.top_p if message.HasField("top_p") else defaults.top_p,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
    )


def compression_to_proto(config: CompressionConfig | None) -> pb.Compression:
    """Return every field set, or `no_compress` alone for None (the whole prompt cache is kept)."""
    if config is None:
        return pb.Compression(no_compress=True)
    return pb.Compression(
        budget=config.budget,
        window=config.window,
        kernel=config.kernel,
        pooling=POOLING_TO_PROTO[config.pooling],
        gqa_reduction=GQA_REDUCTION_TO_PROTO[config.gqa_reduction],
    )


def compression_from_proto(
    message: pb.Compression, defaults: CompressionConfig = CompressionConfig()
) -> CompressionConfig | None:
    """Return None for `no_compress`, else `defaults` with the fields the message sets replaced."""
    overrides: dict[str, object] = {}
    for name in ("budget", "window", "kernel"):
        if message.HasField(name):
            overrides[name] = getattr(message, name)
    if message.pooling != pb.POOLING_UNSPECIFIED:
        overrides["pooling"] = _enum_name(POOLING_FROM_PROTO, "pooling", message.pooling)
    if message.gqa_reduction != pb.GQA_REDUCTION_UNSPECIFIED:
        overrides["gqa_reduction"] = _enum_name(GQA_REDUCTION_FROM_PROTO, "gqa_reduction", message.gqa_reduction)

    if message.no_compress:
        if overrides:
            raise ValueError(
                f"invalid compression: no_compress=True conflicts with {sorted(overrides)}; set one or the other"
            )
        return None
    return dataclasses.replace(defaults, **overrides)


def _enum_name(names: dict[int, str], field_name: str, value: int) -> str:
    if value not in names:
        raise ValueError(f"invalid {field_name}={value!r}: expected one of {sorted(names)}")
    return names[value]


def model_fingerprint(model: PreTrainedModel) -> pb.ModelFingerprint:
    """Describe the parts of a model that decide whether a KV cache made elsewhere fits it."""
    config = model.config
    num_heads = config.num_attention_heads
    rope = {name: getattr(config, name) for name in ROPE_ATTRIBUTES if getattr(config, name, None) is not None}
    return pb.ModelFingerprint(
        architecture=type(model).__name__,
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim(config),
        rope=json.dumps(rope, sort_keys=True, separators=(",", ":"), default=str),
        weights_dtype=dtype_name(model.dtype),
        vocab_size=config.vocab_size,
    )


def fingerprint_mismatches(local: pb.ModelFingerprint, remote: pb.ModelFingerprint) -> list[str]:
    """Return one 'field: local X, remote Y' entry per field that differs; empty when the models match."""
    mismatches = []
    for field in pb.ModelFingerprint.DESCRIPTOR.fields:
        ours, theirs = getattr(local, field.name), getattr(remote, field.name)
        if ours != theirs:
            mismatches.append(f"{field.name}: local {ours!r}, remote {theirs!r}")
    return mismatches
