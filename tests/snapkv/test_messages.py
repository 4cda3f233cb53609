"""Conversions between the core's settings and their proto messages, and the model fingerprint."""

import json

import pytest

from snapkv.config import CompressionConfig, SamplingParams
from snapkv.messages import (
    compression_from_proto,
    compression_to_proto,
    fingerprint_mismatches,
    model_fingerprint,
    sampling_from_proto,
    sampling_to_proto,
)
from snapkv.proto import serving_pb2 as pb
from snapkv.tiny_models import tiny_model


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=-3, stop=("###", "\n\n")),
    ],
)
def test_sampling_round_trip(params):
    assert sampling_from_proto(sampling_to_proto(params)) == params


def test_sampling_unset_fields_take_defaults():
    assert sampling_from_proto(pb.SamplingParams()) == SamplingParams()


def test_sampling_rejects_zero_top_p():
    with pytest.raises(ValueError, match="top_p=0.0"):
        sampling_from_proto(pb.SamplingParams(top_p=0.0))


@pytest.mark.parametrize("config", [CompressionConfig(), CompressionConfig(8, 64, 3, "avg", "max"), None])
def test_compression_round_trip(config):
    assert compression_from_proto(compression_to_proto(config)) == config


def test_compression_unset_fields_take_server_defaults():
    server = CompressionConfig(window=16, budget=512)
    assert compression_from_proto(pb.Compression(budget=256), server) == CompressionConfig(window=16, budget=256)
    assert compression_from_proto(pb.Compression(), server) == server


def test_compression_rejects_no_compress_with_settings():
    with pytest.raises(ValueError, match=r"no_compress=True conflicts with \['budget'\]"):
        compression_from_proto(pb.Compression(no_compress=True, budget=256))


def test_compression_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="pooling=9"):
        compression_from_proto(pb.Compression(pooling=9))


def test_compression_rejects_invalid_budget():
    with pytest.raises(ValueError, match="budget=4"):
        compression_from_proto(pb.Compression(budget=4))


def test_model_fingerprint_of_tiny_llama():
    loaded = tiny_model("llama", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
    fingerprint = model_fingerprint(loaded.model)

    assert fingerprint.architecture == "LlamaForCausalLM"
    assert (fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim) == (3, 2, 16)
    assert fingerprint.weights_dtype == "float32"
    assert fingerprint.vocab_size == 258
    assert json.loads(fingerprint.rope)["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}


def test_fingerprint_mismatches_name_each_field():
    local = model_fingerprint(tiny_model("llama").model)
    remote = model_fingerprint(tiny_model("qwen2", num_heads=6).model)

    assert fingerprint_mismatches(local, local) == []
    mismatches = fingerprint_mismatches(local, remote)
    assert mismatches[0] == "architecture: local 'LlamaForCausalLM', remote 'Qwen2ForCausalLM'"
    assert [entry.split(":")[0] for entry in mismatches] == ["architecture"]
