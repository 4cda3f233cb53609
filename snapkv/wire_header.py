"""KV wire header checks, and the errors of the KV wire codec with the gRPC status each maps to.

`snapkv.wire` explains when each error is raised. `code` is a `grpc.StatusCode` member name, so a
servicer replies with `context.abort(grpc.StatusCode[error.code], str(error))`.
"""

from __future__ import annotations

import math

from snapkv.config import CompressionConfig, SamplingParams
from snapkv.messages import compression_from_proto, fingerprint_mismatches, sampling_from_proto
from snapkv.proto import serving_pb2 as pb
from snapkv.text import PROMPT_CONTEXT_TOKENS
from snapkv.wire_tensors import WIRE_TYPES

WIRE_FORMAT_VERSION = 1
# gRPC rejects received messages above 4 MiB unless the receiver raises that limit; 1 KiB less leaves
# room for the chunk message's other fields.
MAX_CHUNK_BYTES = (4 << 20) - (1 << 10)
CHECKSUM_ALGORITHMS = (pb.CHECKSUM_ALGORITHM_CRC32C,)


class WireError(Exception):
    """A KV transfer that the decode side rejects; `code` names the gRPC status of the reply."""

    code = "UNKNOWN"


class IncompatibleKVError(WireError):
    code = "FAILED_PRECONDITION"


class MalformedKVError(WireError):
    code = "INVALID_ARGUMENT"


class KVDataLossError(WireError):
    code = "DATA_LOSS"


class KVTooLargeError(WireError):
    code = "RESOURCE_EXHAUSTED"


def payload_bytes(header: pb.KVHeader) -> int:
    """Return the payload size that the header's shapes and wire dtype call for."""
    wire = WIRE_TYPES[header.wire_dtype]
    num_kv_heads, head_dim = header.model.num_kv_heads, header.model.head_dim
    return sum(wire.layer_bytes((num_kv_heads, kept_len, head_dim)) for kept_len in header.kept_lengths)


def chunk_size(header: pb.KVHeader, index: int) -> int:
    """Return the payload size of chunk `index`: `chunk_bytes`, or the rest for the last chunk."""
    return min(header.chunk_bytes, header.payload_bytes - index * header.chunk_bytes)


def encoded_size(header: pb.KVHeader) -> int:
    """Return the serialized bytes of the whole LoadKV stream that carries this header's cache.

    The stream is one `LoadKVRequest` with the header, then one per chunk. gRPC's 5-byte prefix per
    message and the HTTP/2 frame headers are not counted.
    """
    total = _field_size(header.ByteSize())
    for index in range(header.num_chunks):
        size = chunk_size(header, index)
        index_field = 1 + _varint_size(index) if index else 0  # proto3 does not serialize a 0
        checksum_field = 1 + 4  # optional fixed32, so it is serialized even when 0
        total += _field_size(index_field + _field_size(size) + checksum_field)
    return total


def _field_size(length: int) -> int:
    """Return the bytes of a length-delimited field numbered below 16: tag, length, content."""
    return 1 + _varint_size(length) + length


def _varint_size(value: int) -> int:
    return max(1, math.ceil(value.bit_length() / 7))


def check_header(
    header: pb.KVHeader, fingerprint: pb.ModelFingerprint
) -> tuple[SamplingParams, CompressionConfig | None]:
    """Check a header against the local model and itself; return its sampling and compression settings.

    Raises IncompatibleKVError or MalformedKVError. The version comes first, because another version's
    fields may mean something else.
    """
    if header.format_version != WIRE_FORMAT_VERSION:
        raise IncompatibleKVError(
            f"KV format version {header.format_version} is not supported: this worker reads version "
            f"{WIRE_FORMAT_VERSION}; deploy prefill and decode workers of one release"
        )
    mismatches = fingerprint_mismatches(fingerprint, header.model)
    if mismatches:
        raise IncompatibleKVError(f"KV cache comes from another model: {'; '.join(mismatches)}")

    _check_encoding(header)
    _check_lengths(header)
    _check_chunking(header)
    _check_token_ids(header)
    try:
        return sampling_from_proto(header.sampling), compression_from_proto(header.compression)
    except ValueError as error:
        raise MalformedKVError(f"invalid KV header settings: {error}") from error


def _check_token_ids(header: pb.KVHeader) -> None:
    vocab_size = header.model.vocab_size
    if header.first_token_id >= vocab_size:
        raise MalformedKVError(f"invalid first_token_id={header.first_token_id}: the vocabulary has {vocab_size} tokens")
    if len(header.context_token_ids) > PROMPT_CONTEXT_TOKENS:
        raise MalformedKVError(
            f"invalid context_token_ids: {len(header.context_token_ids)} tokens, at most {PROMPT_CONTEXT_TOKENS}"
        )
    if any(token_id >= vocab_size for token_id in header.context_token_ids):
        raise MalformedKVError(f"invalid context_token_ids: an id is outside the vocabulary of {vocab_size} tokens")


def _check_encoding(header: pb.KVHeader) -> None:
    _check_enum(header.wire_dtype, pb.WIRE_DTYPE_UNSPECIFIED, WIRE_TYPES, "wire_dtype")
    _check_enum(header.checksum_algorithm, pb.CHECKSUM_ALGORITHM_UNSPECIFIED, CHECKSUM_ALGORITHMS, "checksum_algorithm")
    if header.scale_layout not in pb.ScaleLayout.values():
        raise IncompatibleKVError(f"scale_layout={header.scale_layout} is unknown to this worker")

    expected = WIRE_TYPES[header.wire_dtype].scale_layout
    if header.scale_layout != expected:
        raise MalformedKVError(
            f"invalid scale_layout={pb.ScaleLayout.Name(header.scale_layout)} for "
            f"{pb.WireDtype.Name(header.wire_dtype)}: expected {pb.ScaleLayout.Name(expected)}"
        )


def _check_enum(value: int, unspecified: int, supported, field_name: str) -> None:
    if value == unspecified:
        raise MalformedKVError(f"invalid {field_name}: it is unset")
    if value not in supported:
        raise IncompatibleKVError(f"{field_name}={value} is not supported by this worker")


def _check_lengths(header: pb.KVHeader) -> None:
    kept_lengths = list(header.kept_lengths)
    if len(kept_lengths) != header.model.num_layers:
        raise MalformedKVError(
            f"invalid kept_lengths: {len(kept_lengths)} entries for a model of {header.model.num_layers} layers"
        )
    if len(set(kept_lengths)) > 1:
        raise IncompatibleKVError(
            f"kept_lengths differ between layers ({min(kept_lengths)} to {max(kept_lengths)}), "
            "which this worker does not support"
        )
    kept = kept_lengths[0]
    if not 1 <= kept <= header.prompt_length:
        raise MalformedKVError(f"invalid kept length {kept} for a prompt of {header.prompt_length} tokens")


def _check_chunking(header: pb.KVHeader) -> None:
    expected = payload_bytes(header)
    if header.payload_bytes != expected:
        raise MalformedKVError(f"invalid payload_bytes={header.payload_bytes}: the shapes call for {expected}")
    if not 1 <= header.chunk_bytes <= MAX_CHUNK_BYTES:
        raise MalformedKVError(f"invalid chunk_bytes={header.chunk_bytes}: expected 1 to {MAX_CHUNK_BYTES}")
    num_chunks = math.ceil(expected / header.chunk_bytes)
    if header.num_chunks != num_chunks:
        raise MalformedKVError(
            f"invalid num_chunks={header.num_chunks}: {expected} bytes in chunks of {header.chunk_bytes} "
            f"make {num_chunks}"
        )
