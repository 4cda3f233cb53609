"""The KV wire codec: round trips per wire dtype, exact sizes, chunking, and every rejection with its
status code. A fuzz test checks that damaged streams only ever raise WireError."""

import dataclasses
import math

import google_crc32c
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Request
from snapkv.kv_cache import PromptCache
from snapkv.messages import model_fingerprint
from snapkv.proto import serving_pb2 as pb
from snapkv.wire import (
    MAX_CHUNK_BYTES,
    WIRE_FORMAT_VERSION,
    IncompatibleKVError,
    KVAssembler,
    KVDataLossError,
    KVTooLargeError,
    MalformedKVError,
    WireError,
    encode_kv,
    encoded_size,
    load_kv_requests,
    split_load_kv,
)
from snapkv.wire_tensors import KEY_SCALE_DIM, VALUE_SCALE_DIM, dequantize_int8, quantize_int8
from tests.conftest import tiny_engine

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 2, 16
FINGERPRINT = pb.ModelFingerprint(
    architecture="LlamaForCausalLM",
    num_layers=NUM_LAYERS,
    num_kv_heads=NUM_KV_HEADS,
    head_dim=HEAD_DIM,
    rope='{"rope_parameters":{"rope_theta":10000.0,"rope_type":"default"}}',
    weights_dtype="float32",
    vocab_size=258,
)
SAMPLING = SamplingParams(max_tokens=20, temperature=0.7, top_p=0.9, top_k=40, seed=7, stop=("\n\n",))
COMPRESSION = CompressionConfig(window=8, budget=40, kernel=5, pooling="avg")


def random_cache(kept_len: int = 40, prompt_length: int = 100, seed: int = 0, shape=None) -> PromptCache:
    num_layers, num_kv_heads, head_dim = shape or (NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM)
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_layers, num_kv_heads, kept_len, head_dim, generator=generator)
    values = torch.randn(num_layers, num_kv_heads, kept_len, head_dim, generator=generator)
    return PromptCache(keys, values, prompt_length)


def encode(cache: PromptCache | None = None, **overrides) -> tuple[pb.KVHeader, list[pb.KVChunk]]:
    settings = dict(
        request_id="req-1",
        model=FINGERPRINT,
        first_token_id=65,
        prompt_ids=tuple(range(100, 200)),
        sampling=SAMPLING,
        compression=COMPRESSION,
        chunk_bytes=1000,
    )
    settings.update(overrides)
    header, chunks = encode_kv(cache or random_cache(), **settings)
    return header, list(chunks)


def assemble(header: pb.KVHeader, chunks: list[pb.KVChunk], **options):
    assembler = KVAssembler(header, FINGERPRINT, **options)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


def wire_bytes(header: pb.KVHeader, chunks: list[pb.KVChunk]) -> int:
    return sum(request.ByteSize() for request in load_kv_requests(header, chunks))


# Round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire_dtype, torch_dtype",
    [(pb.WIRE_DTYPE_FP16, torch.float16), (pb.WIRE_DTYPE_BF16, torch.bfloat16), (pb.WIRE_DTYPE_FP32, torch.float32)],
)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_float_round_trip_equals_cast(wire_dtype, torch_dtype, model_dtype):
    cache = random_cache()
    header, chunks = encode(cache, wire_dtype=wire_dtype)
    received = assemble(header, chunks, dtype=model_dtype)

    assert received.cache.keys.dtype == model_dtype
    assert torch.equal(received.cache.keys, cache.keys.to(torch_dtype).to(model_dtype))
    assert torch.equal(received.cache.values, cache.values.to(torch_dtype).to(model_dtype))
    assert received.cache.prompt_length == 100
    assert received.wire_dtype == wire_dtype


def test_round_trip_carries_request_settings():
    header, chunks = encode()
    received = assemble(header, chunks)

    assert received.request_id == "req-1"
    assert received.first_token_id == 65
    assert received.context_token_ids == (195, 196, 197, 198, 199)
    assert received.sampling == SAMPLING
    assert received.compression == COMPRESSION
    assert header.kept_lengths == [40, 40]
    assert header.format_version == WIRE_FORMAT_VERSION


def test_uncompressed_cache_round_trips_as_none():
    header, chunks = encode(random_cache(kept_len=30, prompt_length=30), compression=None)
    assert header.compression.no_compress
    assert assemble(header, chunks).compression is None


def test_unspecified_wire_dtype_means_fp16():
    header, _ = encode(wire_dtype=pb.WIRE_DTYPE_UNSPECIFIED)
    assert header.wire_dtype == pb.WIRE_DTYPE_FP16


def test_int8_error_within_half_a_step():
    # Symmetric rounding moves each element by at most half a quantization step, max |x| / 254 over the
    # elements that share its scale: a key channel across all tokens, a value vector of one token.
    cache = random_cache(kept_len=200, prompt_length=300)
    header, chunks = encode(cache, wire_dtype=pb.WIRE_DTYPE_INT8)
    received = assemble(header, chunks)

    key_bound = cache.keys.abs().amax(dim=2, keepdim=True) / 254
    value_bound = cache.values.abs().amax(dim=3, keepdim=True) / 254
    assert bool(((cache.keys - received.cache.keys).abs() <= key_bound * (1 + 1e-5)).all())
    assert bool(((cache.values - received.cache.values).abs() <= value_bound * (1 + 1e-5)).all())


@pytest.mark.parametrize(
    "scale_dim, low, high",
    # Measured with this seed on [8, 1024, 64] standard normal data: 0.788% per channel over 1024 tokens,
    # 0.592% per token over 64 channels (a longer slice has a larger max, so a coarser step).
    [(KEY_SCALE_DIM, 0.0075, 0.0082), (VALUE_SCALE_DIM, 0.0056, 0.0062)],
)
def test_int8_relative_error_on_normal_data(scale_dim, low, high):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1024, 64, generator=generator)
    quantized, scales = quantize_int8(x, scale_dim)
    relative_error = float((dequantize_int8(quantized, scales, scale_dim, torch.float32) - x).norm() / x.norm())
    assert low < relative_error < high


def test_int8_zero_slice_stays_zero():
    x = torch.zeros(2, 3, 16)
    x[0, 1] = torch.linspace(-1, 1, 16)
    quantized, scales = quantize_int8(x, VALUE_SCALE_DIM)
    assert scales.shape == (2, 3)
    assert scales[1, 2] == 0
    decoded = dequantize_int8(quantized, scales, VALUE_SCALE_DIM, torch.float32)
    assert torch.equal(decoded[1], torch.zeros(3, 16))
    assert torch.equal(decoded[0, 0], torch.zeros(16))


def test_int8_payload_is_one_byte_plus_scales():
    fp16, _ = encode(wire_dtype=pb.WIRE_DTYPE_FP16)
    int8, _ = encode(wire_dtype=pb.WIRE_DTYPE_INT8)
    num_elements = 2 * NUM_LAYERS * NUM_KV_HEADS * 40 * HEAD_DIM
    key_scales = NUM_LAYERS * NUM_KV_HEADS * HEAD_DIM
    value_scales = NUM_LAYERS * NUM_KV_HEADS * 40
    assert fp16.payload_bytes == num_elements * 2
    assert int8.payload_bytes == num_elements + 4 * (key_scales + value_scales)


def test_served_tokens_match_local_engine():
    # Prefill on a tiny model, ship the cache in fp32, decode from the received copy: same tokens.
    engine = tiny_engine()
    prompt_ids = tuple(range(10, 90))
    request = Request("r", prompt_ids, SamplingParams(max_tokens=12), CompressionConfig(window=8, budget=32))
    result = engine.prefill([request])[0]
    local = [event.token_id for event in engine.decode([result])]

    fingerprint = model_fingerprint(engine.model)
    header, chunks = encode_kv(
        result.cache,
        request_id="r",
        model=fingerprint,
        first_token_id=result.first_token,
        prompt_ids=prompt_ids,
        sampling=request.sampling,
        compression=request.compression,
        wire_dtype=pb.WIRE_DTYPE_FP32,
    )
    assembler = KVAssembler(header, fingerprint)
    for chunk in chunks:
        assembler.add(chunk)
    received = assembler.finish()
    served = [event.token_id for event in engine.decode([dataclasses.replace(result, cache=received.cache)])]

    assert received.cache.kept_length == 32
    assert served == local


# Sizes and chunking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 100, 1000, 4096, 1 << 20])
@pytest.mark.parametrize("wire_dtype", [pb.WIRE_DTYPE_FP16, pb.WIRE_DTYPE_INT8])
def test_chunks_respect_size_and_sum_to_payload(chunk_bytes, wire_dtype):
    header, chunks = encode(random_cache(kept_len=25), wire_dtype=wire_dtype, chunk_bytes=chunk_bytes)

    assert [chunk.index for chunk in chunks] == list(range(header.num_chunks))
    assert all(len(chunk.payload) == chunk_bytes for chunk in chunks[:-1])
    assert 1 <= len(chunks[-1].payload) <= chunk_bytes
    assert sum(len(chunk.payload) for chunk in chunks) == header.payload_bytes
    assert header.num_chunks == math.ceil(header.payload_bytes / chunk_bytes)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 100, 1000, 1 << 20])
def test_encoded_size_equals_bytes_on_the_wire(chunk_bytes):
    # chunk_bytes=1 gives over 10,000 chunks, so indices of one, two and three varint bytes all occur.
    header, chunks = encode(random_cache(kept_len=45), chunk_bytes=chunk_bytes)
    assert encoded_size(header) == wire_bytes(header, chunks)


def test_zero_checksum_is_still_serialized():
    # encoded_size counts 5 bytes of checksum in every chunk, which is true only if 0 is sent too.
    assert pb.KVChunk(index=1, payload=b"x", checksum=0).ByteSize() == pb.KVChunk(index=1, payload=b"x", checksum=1).ByteSize()


def test_20_mib_cache_splits_into_1_mib_chunks():
    # 20 MiB of fp32 keys and values become 10 MiB of fp16 payload: more than gRPC's 4 MiB message limit in
    # total, yet no message of the stream comes near it.
    cache = random_cache(kept_len=1280, prompt_length=5000, shape=(4, 8, 64))
    fingerprint = pb.ModelFingerprint()
    fingerprint.CopyFrom(FINGERPRINT)
    fingerprint.num_layers, fingerprint.num_kv_heads, fingerprint.head_dim = 4, 8, 64
    assert cache.num_bytes == 20 << 20
    header, chunks = encode(cache, model=fingerprint, chunk_bytes=1 << 20)

    assert header.payload_bytes == 10 << 20
    assert len(chunks) == 10
    assert all(len(chunk.payload) <= 1 << 20 for chunk in chunks)
    assert max(request.ByteSize() for request in load_kv_requests(header, chunks)) < (1 << 20) + 64
    assert encoded_size(header) == wire_bytes(header, chunks)
    assert encoded_size(header) > 4 << 20

    assembler = KVAssembler(header, fingerprint)
    for chunk in chunks:
        assembler.add(chunk)
    assert torch.equal(assembler.finish().cache.values, cache.values.half().float())


# Encoder rejections ---------------------------------------------------------------------------------


def test_encoder_rejects_fp16_overflow():
    cache = random_cache()
    cache.keys[1, 0, 3, 5] = 70000.0
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        encode(cache)
    header, _ = encode(cache, wire_dtype=pb.WIRE_DTYPE_BF16)
    assert header.wire_dtype == pb.WIRE_DTYPE_BF16


@pytest.mark.parametrize("wire_dtype", [pb.WIRE_DTYPE_FP16, pb.WIRE_DTYPE_INT8])
def test_encoder_rejects_nan(wire_dtype):
    cache = random_cache()
    cache.values[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="values contain non-finite"):
        encode(cache, wire_dtype=wire_dtype)


def test_encoder_rejects_shape_other_than_model():
    with pytest.raises(ValueError, match=r"keys of shape \(2, 2, 40, 8\), the model calls for \(2, 2, 40, 16\)"):
        encode(random_cache(shape=(2, 2, 8)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(chunk_bytes=0), "chunk_bytes=0"),
        (dict(chunk_bytes=MAX_CHUNK_BYTES + 1), f"chunk_bytes={MAX_CHUNK_BYTES + 1}"),
        (dict(wire_dtype=42), "wire_dtype=42"),
    ],
)
def test_encoder_rejects_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        encode(**overrides)


# Header rejections ----------------------------------------------------------------------------------


def _set_model(field, value):
    return lambda header: setattr(header.model, field, value)


def _set(field, value):
    return lambda header: setattr(header, field, value)


HEADER_CASES = {
    "newer version": (_set("format_version", WIRE_FORMAT_VERSION + 1), IncompatibleKVError, "version 2"),
    "other architecture": (_set_model("architecture", "Qwen2ForCausalLM"), IncompatibleKVError, "architecture"),
    "other head_dim": (_set_model("head_dim", 32), IncompatibleKVError, "head_dim: local 16, remote 32"),
    "other rope": (_set_model("rope", "{}"), IncompatibleKVError, "rope"),
    "other weights dtype": (_set_model("weights_dtype", "bfloat16"), IncompatibleKVError, "weights_dtype"),
    "unknown wire dtype": (_set("wire_dtype", 99), IncompatibleKVError, "wire_dtype=99"),
    "unset wire dtype": (_set("wire_dtype", 0), MalformedKVError, "wire_dtype: it is unset"),
    "unknown scale layout": (_set("scale_layout", 9), IncompatibleKVError, "scale_layout=9"),
    "int8 without scales": (
        lambda h: (setattr(h, "wire_dtype", pb.WIRE_DTYPE_INT8), setattr(h, "scale_layout", pb.SCALE_LAYOUT_NONE)),
        MalformedKVError,
        "expected SCALE_LAYOUT_KEY_CHANNEL_VALUE_TOKEN_FP32",
    ),
    "fp16 with scales": (
        _set("scale_layout", pb.SCALE_LAYOUT_KEY_CHANNEL_VALUE_TOKEN_FP32),
        MalformedKVError,
        "expected SCALE_LAYOUT_NONE",
    ),
    "unset checksum": (_set("checksum_algorithm", 0), MalformedKVError, "checksum_algorithm: it is unset"),
    "unknown checksum": (_set("checksum_algorithm", 5), IncompatibleKVError, "checksum_algorithm=5"),
    "kept lengths short": (lambda h: h.kept_lengths.pop(), MalformedKVError, "1 entries for a model of 2 layers"),
    "kept lengths differ": (lambda h: h.kept_lengths.__setitem__(1, 39), IncompatibleKVError, "differ between layers"),
    "kept above prompt": (_set("prompt_length", 39), MalformedKVError, "kept length 40 for a prompt of 39"),
    "kept zero": (lambda h: h.kept_lengths.__setitem__(slice(None), [0, 0]), MalformedKVError, "kept length 0"),
    "payload bytes": (_set("payload_bytes", 5119), MalformedKVError, "payload_bytes=5119"),
    "chunk bytes zero": (_set("chunk_bytes", 0), MalformedKVError, "chunk_bytes=0"),
    "chunk bytes too big": (_set("chunk_bytes", MAX_CHUNK_BYTES + 1), MalformedKVError, "chunk_bytes="),
    "num chunks": (_set("num_chunks", 5), MalformedKVError, "num_chunks=5"),
    "first token": (_set("first_token_id", 258), MalformedKVError, "first_token_id=258"),
    "context token": (lambda h: h.context_token_ids.__setitem__(0, 258), MalformedKVError, "outside the vocabulary"),
    "long context": (lambda h: h.context_token_ids.append(1), MalformedKVError, "6 tokens, at most 5"),
    "top_p zero": (lambda h: setattr(h.sampling, "top_p", 0.0), MalformedKVError, "top_p=0.0"),
    "no_compress with budget": (lambda h: setattr(h.compression, "no_compress", True), MalformedKVError, "no_compress"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_assembler_rejects_header(case):
    mutate, error_type, message = HEADER_CASES[case]
    header, _ = encode()
    mutate(header)
    with pytest.raises(error_type, match=message):
        KVAssembler(header, FINGERPRINT)


def test_payload_limit_is_resource_exhausted():
    header, _ = encode()
    assert header.payload_bytes == 10240
    KVAssembler(header, FINGERPRINT, max_payload_bytes=10240)
    with pytest.raises(KVTooLargeError, match="10240 bytes exceeds this worker's limit of 10239"):
        KVAssembler(header, FINGERPRINT, max_payload_bytes=10239)


def test_huge_header_claim_allocates_nothing():
    # A consistent header that claims 2**31 kept positions (a 512 GiB fp16 payload) passes the header checks,
    # but memory only grows with chunks that arrive, and a short first chunk is rejected.
    header, _ = encode()
    kept = 1 << 31
    header.prompt_length = kept
    header.kept_lengths[:] = [kept] * NUM_LAYERS
    header.payload_bytes = 2 * NUM_LAYERS * NUM_KV_HEADS * kept * HEAD_DIM * 2
    header.num_chunks = math.ceil(header.payload_bytes / header.chunk_bytes)
    assembler = KVAssembler(header, FINGERPRINT)

    assert header.payload_bytes == 1 << 39
    assert assembler.decoded_bytes == 1 << 40
    with pytest.raises(KVDataLossError, match="has 3 bytes, expected 1000"):
        assembler.add(pb.KVChunk(index=0, payload=b"abc", checksum=google_crc32c.value(b"abc")))


@pytest.mark.parametrize(
    "error_type, code",
    [
        (IncompatibleKVError, "FAILED_PRECONDITION"),
        (MalformedKVError, "INVALID_ARGUMENT"),
        (KVDataLossError, "DATA_LOSS"),
        (KVTooLargeError, "RESOURCE_EXHAUSTED"),
    ],
)
def test_error_codes(error_type, code):
    assert issubclass(error_type, WireError)
    assert error_type("x").code == code


# Chunk rejections -----------------------------------------------------------------------------------


def _with(chunk: pb.KVChunk, **fields) -> pb.KVChunk:
    copy = pb.KVChunk()
    copy.CopyFrom(chunk)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


def _no_checksum(chunk: pb.KVChunk) -> pb.KVChunk:
    copy = _with(chunk)
    copy.ClearField("checksum")
    return copy


def _resized(chunk: pb.KVChunk, payload: bytes) -> pb.KVChunk:
    return _with(chunk, payload=payload, checksum=google_crc32c.value(payload))


CHUNK_CASES = {
    "bad checksum": (lambda c: [c[0], _with(c[1], checksum=c[1].checksum ^ 1)] + c[2:], KVDataLossError, "CRC-32C"),
    "flipped byte": (
        lambda c: [c[0], _with(c[1], payload=b"\x00" + c[1].payload[1:])] + c[2:],
        KVDataLossError,
        "chunk 1 failed its CRC-32C",
    ),
    "missing chunk": (lambda c: [c[0]] + c[2:], KVDataLossError, "chunk 1 is missing: received chunk 2"),
    "out of order": (lambda c: [c[0], c[2], c[1]] + c[3:], KVDataLossError, "chunk 1 is missing"),
    "duplicate": (lambda c: [c[0], c[1], c[1]] + c[2:], MalformedKVError, "chunk 1 was already received"),
    "past the last": (lambda c: c + [_with(c[0], index=len(c))], MalformedKVError, r"chunk 11 is past the last one \(10\)"),
    "no checksum": (lambda c: [c[0], _no_checksum(c[1])] + c[2:], MalformedKVError, "chunk 1 has no checksum"),
    "short chunk": (lambda c: [c[0], _resized(c[1], c[1].payload[:-1])] + c[2:], KVDataLossError, "999 bytes"),
    "long last chunk": (lambda c: c[:-1] + [_resized(c[-1], c[-1].payload + b"\0")], KVDataLossError, "241 bytes"),
    "stream ends early": (lambda c: c[:-1], KVDataLossError, "ended after 10 of 11 chunks"),
}


@pytest.mark.parametrize("case", CHUNK_CASES)
def test_assembler_rejects_chunks(case):
    mutate, error_type, message = CHUNK_CASES[case]
    header, chunks = encode()
    assert len(chunks) == 11
    assert len(chunks[-1].payload) == 240
    with pytest.raises(error_type, match=message):
        assemble(header, mutate(chunks))


@pytest.mark.parametrize("wire_dtype", [pb.WIRE_DTYPE_FP16, pb.WIRE_DTYPE_INT8])
def test_non_finite_payload_rejected(wire_dtype):
    # All-ones bytes are a NaN in fp16 and in the fp32 scales; the checksum is correct, so only the value
    # check can catch it.
    header, chunks = encode(wire_dtype=wire_dtype)
    chunks[-1] = _resized(chunks[-1], b"\xff" * len(chunks[-1].payload))
    with pytest.raises(MalformedKVError, match="not finite"):
        assemble(header, chunks)


def test_finish_twice_is_a_caller_error():
    header, chunks = encode()
    assembler = KVAssembler(header, FINGERPRINT)
    for chunk in chunks:
        assembler.add(chunk)
    assembler.finish()
    with pytest.raises(RuntimeError, match="already called"):
        assembler.finish()


@pytest.mark.parametrize(
    "stream",
    [
        [],
        [pb.LoadKVRequest(chunk=pb.KVChunk(index=0))],
        [pb.LoadKVRequest(header=pb.KVHeader()), pb.LoadKVRequest(header=pb.KVHeader())],
        [pb.LoadKVRequest(header=pb.KVHeader()), pb.LoadKVRequest()],
    ],
    ids=["empty", "chunk first", "second header", "empty message"],
)
def test_split_load_kv_rejects_stream(stream):
    with pytest.raises(MalformedKVError, match="invalid LoadKV stream"):
        header, chunks = split_load_kv(stream)
        list(chunks)


def test_split_load_kv_round_trip():
    header, chunks = encode()
    received_header, received_chunks = split_load_kv(load_kv_requests(header, chunks))
    assert received_header == header
    assert list(received_chunks) == chunks


# Fuzzing --------------------------------------------------------------------------------------------

ENCODED = {wire_dtype: encode(wire_dtype=wire_dtype) for wire_dtype in (pb.WIRE_DTYPE_FP16, pb.WIRE_DTYPE_INT8)}
UINT32 = st.integers(0, 2**32 - 1)


def _feed(header: pb.KVHeader, chunks: list[pb.KVChunk]) -> None:
    """Run the decode side on a possibly damaged stream; anything but success or WireError fails the test."""
    try:
        assemble(header, chunks)
    except WireError:
        pass


@st.composite
def damaged_streams(draw):
    header_template, chunk_templates = ENCODED[draw(st.sampled_from(sorted(ENCODED)))]
    header = pb.KVHeader()
    header.CopyFrom(header_template)
    chunks = [_with(chunk) for chunk in chunk_templates]

    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "truncate", "index", "checksum", "drop", "duplicate", "header"]))
        position = draw(st.integers(0, len(chunks) - 1)) if chunks else None
        if operation == "header":
            serialized = bytearray(header.SerializeToString())
            serialized[draw(st.integers(0, len(serialized) - 1))] ^= draw(st.integers(1, 255))
            try:
                header = pb.KVHeader.FromString(bytes(serialized))
            except DecodeError:  # gRPC rejects unparseable messages before the servicer runs
                pass
        elif position is None:
            continue
        elif operation in ("flip", "truncate"):
            payload = bytearray(chunks[position].payload)
            if operation == "flip" and payload:
                payload[draw(st.integers(0, len(payload) - 1))] ^= draw(st.integers(1, 255))
            elif operation == "truncate":
                del payload[draw(st.integers(0, len(payload))) :]
            fixed = draw(st.booleans())
            checksum = google_crc32c.value(bytes(payload)) if fixed else chunks[position].checksum
            chunks[position] = _with(chunks[position], payload=bytes(payload), checksum=checksum)
        elif operation == "index":
            chunks[position] = _with(chunks[position], index=draw(UINT32))
        elif operation == "checksum":
            chunks[position] = _with(chunks[position], checksum=draw(UINT32))
        elif operation == "drop":
            del chunks[position]
        else:
            chunks.insert(position, _with(chunks[position]))
    return header, chunks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_streams())
def test_fuzz_damaged_stream_raises_only_wire_error(stream):
    header, chunks = stream
    _feed(header, chunks)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(sorted(ENCODED)))
def test_fuzz_random_header_bytes_raise_only_wire_error(data, wire_dtype):
    try:
        header = pb.KVHeader.FromString(data)
    except DecodeError:  # gRPC rejects unparseable messages before the servicer runs
        return
    _feed(header, ENCODED[wire_dtype][1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(UINT32, st.binary(max_size=1200), st.one_of(st.none(), UINT32)), max_size=8))
def test_fuzz_random_chunks_raise_only_wire_error(raw_chunks):
    header, _ = ENCODED[pb.WIRE_DTYPE_FP16]
    chunks = []
    for index, payload, checksum in raw_chunks:
        chunk = pb.KVChunk(index=index, payload=payload)
        if checksum is not None:
            chunk.checksum = checksum
        chunks.append(chunk)
    _feed(header, chunks)
