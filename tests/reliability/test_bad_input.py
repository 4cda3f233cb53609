"""Bad input on the running stack: each gets its precise status and a message that names the problem,
and afterwards every process still serves and nothing is held.

Requests go through the router as protobuf messages, or as hand-made bytes where the Python client
cannot build them: invalid UTF-8, truncated messages, and negative numbers in unsigned fields (which
arrive as values of 2**31 or more). Damaged KV transfers (corrupt, truncated, duplicated or
reordered chunks, another model's header) are covered in tests/decode_service, the fuzzing of the KV
decoder in tests/snapkv/test_wire.py, and oversize messages in tests/security/test_limits.py.
"""

import grpc
import pytest

from router.requests import DEFAULT_BUDGET_LIMIT, DEFAULT_KERNEL_LIMIT, DEFAULT_MAX_TOKENS_LIMIT
from snapkv.cli import build_parser
from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Request
from snapkv.messages import model_fingerprint
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.text import prompt_ids
from snapkv.wire import encode_kv, load_kv_requests
from tests.conftest import tiny_engine
from tests.reliability.conftest import (
    COMPRESSION,
    DECODE_WORKERS,
    KV_BYTES_PER_POSITION,
    assert_nothing_held,
    decode_status,
    metric,
)

PROMPT = "the quick brown fox jumps over the lazy dog " * 6
GENERATE = "/snapkv.serving.v1.Router/Generate"


def varint(value: int) -> bytes:
    """Encode `value` as a protobuf varint; a negative value takes ten bytes, as int32 and int64 fields send it."""
    value &= (1 << 64) - 1
    encoded = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        encoded.append(low | (0x80 if value else 0))
        if not value:
            return bytes(encoded)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


def varint_field(field_number: int, value: int) -> bytes:
    return varint(field_number << 3) + varint(value)


PROMPT_FIELD = length_delimited(2, PROMPT.encode())
INVALID_UTF8 = b"\xc3\x28"  # a two-byte sequence whose second byte is not a continuation byte

# Hand-made GenerateRequest bytes: field 2 is the prompt, 3 the chat, 5 the sampling parameters.
RAW_CASES = {
    "prompt not UTF-8": (length_delimited(2, INVALID_UTF8), "String field had bad UTF-8"),
    "chat content not UTF-8": (
        length_delimited(3, length_delimited(1, length_delimited(1, b"user") + length_delimited(2, INVALID_UTF8))),
        "String field had bad UTF-8",
    ),
    "stop string not UTF-8": (PROMPT_FIELD + length_delimited(5, length_delimited(6, INVALID_UTF8)), "bad UTF-8"),
    "truncated message": (length_delimited(2, b"abc")[:-1], f"invalid request to {GENERATE}"),
    "negative max_tokens": (PROMPT_FIELD + length_delimited(5, varint_field(1, -1)), "invalid max_tokens=4294967295"),
    "negative top_k": (PROMPT_FIELD + length_delimited(5, varint_field(4, -1)), "invalid top_k=4294967295"),
}


def request(**fields) -> pb.GenerateRequest:
    fields.setdefault("prompt", PROMPT)
    return pb.GenerateRequest(**fields)


MESSAGE_CASES = {
    "empty prompt": (request(prompt=""), "invalid prompt: it is empty"),
    "no input": (pb.GenerateRequest(), "missing input"),
    "prompt beyond the context": (request(prompt="a" * 16400), "exceeds the model's context of 16384 tokens"),
    "max_tokens zero": (request(sampling=pb.SamplingParams(max_tokens=0)), "invalid max_tokens=0"),
    "max_tokens above the limit": (
        request(sampling=pb.SamplingParams(max_tokens=DEFAULT_MAX_TOKENS_LIMIT + 1)),
        f"this server allows at most {DEFAULT_MAX_TOKENS_LIMIT} generated tokens",
    ),
    "negative temperature": (request(sampling=pb.SamplingParams(temperature=-0.5)), "invalid temperature=-0.5"),
    "temperature not a number": (request(sampling=pb.SamplingParams(temperature=float("nan"))), "invalid temperature=nan"),
    "top_p zero": (request(sampling=pb.SamplingParams(top_p=0.0)), "invalid top_p=0.0"),
    "top_p above one": (request(sampling=pb.SamplingParams(top_p=1.5)), "invalid top_p=1.5"),
    "empty stop string": (request(sampling=pb.SamplingParams(stop=[""])), "invalid stop"),
    "budget equal to window": (request(compression=pb.Compression(budget=8, window=8)), "invalid budget=8"),
    "budget above the limit": (
        request(compression=pb.Compression(budget=DEFAULT_BUDGET_LIMIT + 1)),
        f"this server keeps at most {DEFAULT_BUDGET_LIMIT} positions per KV head",
    ),
    "kernel above the limit": (
        request(compression=pb.Compression(kernel=DEFAULT_KERNEL_LIMIT + 2)),
        f"invalid kernel={DEFAULT_KERNEL_LIMIT + 2}",
    ),
    "even kernel": (request(compression=pb.Compression(kernel=4)), "invalid kernel=4"),
    "unknown wire dtype": (request(wire_dtype=99), "invalid wire_dtype=99"),
    "request id too long": (request(request_id="r" * 300), "expected 1 to 256 characters"),
}
BAD_REQUESTS = {name: payload.SerializeToString() for name, (payload, _) in MESSAGE_CASES.items()}
BAD_REQUESTS.update({name: payload for name, (payload, _) in RAW_CASES.items()})
EXPECTED_MESSAGES = {name: message for name, (_, message) in {**MESSAGE_CASES, **RAW_CASES}.items()}


def call_generate(stack, payload: bytes) -> tuple[list[pb.GenerateResponse], grpc.StatusCode, str]:
    """Send serialized GenerateRequest bytes as they are; return the responses, the status and its message."""
    with grpc.insecure_channel(stack.address("router")) as channel:
        generate = channel.unary_stream(GENERATE, response_deserializer=pb.GenerateResponse.FromString)
        responses = []
        try:
            for response in generate(payload, timeout=30):
                responses.append(response)
        except grpc.RpcError as error:
            return responses, error.code(), error.details()
    return responses, grpc.StatusCode.OK, ""


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_rejected_and_nothing_held(stack, case):
    responses, code, details = call_generate(stack, BAD_REQUESTS[case])

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert EXPECTED_MESSAGES[case] in details
    assert responses == []
    stack.check_running()
    assert_nothing_held(stack)


def test_bad_requests_leave_router_serving(stack):
    # Twenty bad requests in a row change nothing for the next good ones: no retries, and both decode
    # workers stay in the rotation (least_loaded alternates between them for sequential requests).
    retries_before = metric(stack, "router", "snapkv_router_retries_total")
    names = sorted(BAD_REQUESTS)
    for index in range(20):
        _, code, _ = call_generate(stack, BAD_REQUESTS[names[index % len(names)]])
        assert code == grpc.StatusCode.INVALID_ARGUMENT

    generated_before = [metric(stack, name, "snapkv_decode_generated_tokens_total") for name in DECODE_WORKERS]
    good = request(sampling=pb.SamplingParams(max_tokens=8), compression=pb.Compression(**COMPRESSION))
    for _ in range(4):
        responses, code, _ = call_generate(stack, good.SerializeToString())
        assert code == grpc.StatusCode.OK
        assert responses[-1].final.usage.completion_tokens == 8

    assert metric(stack, "router", "snapkv_router_retries_total") == retries_before
    generated = [metric(stack, name, "snapkv_decode_generated_tokens_total") for name in DECODE_WORKERS]
    assert all(after > before for after, before in zip(generated, generated_before))
    assert_nothing_held(stack)


def test_cli_limit_defaults_match_router():
    args = build_parser().parse_args(["router", "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2"])
    assert args.max_tokens_limit == DEFAULT_MAX_TOKENS_LIMIT
    assert args.budget_limit == DEFAULT_BUDGET_LIMIT


# Decode worker ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def encoded_cache(engine, request_id: str, max_tokens: int) -> tuple[pb.KVHeader, list[pb.KVChunk]]:
    ids = tuple(prompt_ids(engine.tokenizer, PROMPT))
    request = Request(request_id, ids, SamplingParams(max_tokens=max_tokens), CompressionConfig(**COMPRESSION))
    [result] = engine.prefill([request])
    header, chunks = encode_kv(
        result.cache, request_id=request_id, model=model_fingerprint(engine.model), first_token_id=result.first_token,
        prompt_ids=ids, sampling=request.sampling, compression=request.compression, wire_dtype=pb.WIRE_DTYPE_FP32,
    )
    return header, list(chunks)


def stream_tokens(stub: pb_grpc.DecodeStub, handle: str) -> list[int]:
    return [token for event in stub.Stream(pb.StreamRequest(handle=handle), timeout=60) for token in event.token_ids]


def test_unknown_handle_not_found(stack):
    with grpc.insecure_channel(stack.address("decode")) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(pb_grpc.DecodeStub(channel).Stream(pb.StreamRequest(handle="no-such-handle"), timeout=10))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown KV handle 'no-such-handle'" in error.value.details()


def test_repeated_load_gets_new_handle(stack, engine):
    # A LoadKV stream sent twice is two loads: each has its own handle and reservation, decodes the
    # same tokens, and is freed on its own. A handle streams once; a second Stream gets NOT_FOUND.
    header, chunks = encoded_cache(engine, "twice", 6)
    reserved = (COMPRESSION["budget"] + 6) * KV_BYTES_PER_POSITION
    with grpc.insecure_channel(stack.address("decode")) as channel:
        stub = pb_grpc.DecodeStub(channel)
        first = stub.LoadKV(load_kv_requests(header, chunks), timeout=10)
        second = stub.LoadKV(load_kv_requests(header, chunks), timeout=10)
        assert first.handle != second.handle
        assert decode_status(stack, "decode").kv_resident_bytes == 2 * reserved

        tokens = stream_tokens(stub, first.handle)
        assert len(tokens) == 5  # the first of the 6 tokens came from prefill
        assert stream_tokens(stub, second.handle) == tokens
        with pytest.raises(grpc.RpcError) as error:
            stream_tokens(stub, first.handle)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert_nothing_held(stack)


def test_release_frees_only_waiting_cache(stack, engine):
    header, chunks = encoded_cache(engine, "release", 40)
    with grpc.insecure_channel(stack.address("decode")) as channel:
        stub = pb_grpc.DecodeStub(channel)
        waiting = stub.LoadKV(load_kv_requests(header, chunks), timeout=10)
        assert stub.Release(pb.ReleaseRequest(handle=waiting.handle), timeout=10).released
        assert decode_status(stack, "decode").kv_resident_bytes == 0
        assert not stub.Release(pb.ReleaseRequest(handle=waiting.handle), timeout=10).released

        # A handle whose stream has started is left to that stream, which runs to its end.
        streaming = stub.LoadKV(load_kv_requests(header, chunks), timeout=10)
        events = stub.Stream(pb.StreamRequest(handle=streaming.handle), timeout=60)
        tokens = list(next(events).token_ids)
        assert not stub.Release(pb.ReleaseRequest(handle=streaming.handle), timeout=10).released
        tokens += [token for event in events for token in event.token_ids]
    assert len(tokens) == 39
    assert_nothing_held(stack)


@pytest.mark.parametrize(
    "service, method, payload",
    [
        # LoadKV: a KVHeader (field 1 of LoadKVRequest) whose request_id (field 3) is not UTF-8.
        ("decode", "/snapkv.serving.v1.Decode/LoadKV", length_delimited(1, length_delimited(3, INVALID_UTF8))),
        ("decode", "/snapkv.serving.v1.Decode/Stream", length_delimited(1, INVALID_UTF8)),
        ("prefill", "/snapkv.serving.v1.Prefill/Prefill", length_delimited(1, INVALID_UTF8)),
    ],
    ids=["LoadKV", "Stream", "Prefill"],
)
def test_worker_rejects_invalid_utf8(stack, service, method, payload):
    with grpc.insecure_channel(stack.address(service)) as channel:
        if method.endswith("LoadKV"):
            call = channel.stream_unary(method)
            sent = iter([payload])
        elif method.endswith("Stream"):
            call = channel.unary_stream(method)
            sent = payload
        else:
            call = channel.unary_unary(method)
            sent = payload
        with pytest.raises(grpc.RpcError) as error:
            result = call(sent, timeout=10)
            if method.endswith("Stream"):
                list(result)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "String field had bad UTF-8" in error.value.details()
    stack.check_running()
    assert_nothing_held(stack)
