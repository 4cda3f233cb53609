"""Message-size limits: an oversize message gets RESOURCE_EXHAUSTED from each server, which goes on
serving, and the largest legitimate message of each hop fits under its limit."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.client import SnapKVClient, SnapKVError, Summary
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.transport import (
    MAX_GENERATE_REQUEST_BYTES,
    MAX_LOAD_KV_MESSAGE_BYTES,
    MAX_PREFILL_REQUEST_BYTES,
    MAX_REPLY_BYTES,
    open_channel,
)
from snapkv.wire_header import MAX_CHUNK_BYTES
from tests.security.conftest import TOKEN

AUTHORIZATION = (("authorization", f"Bearer {TOKEN}"),)


def unlimited_channel(address, tls):
    """A channel that sends messages of any size, so that the server's own limit is what rejects them."""
    return open_channel(address, tls, [("grpc.max_send_message_length", -1)])


def assert_serving(address, tls):
    with open_channel(address, tls) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_oversize_generate_request_rejected(stack, certificates):
    tls = certificates.channel_tls()
    request = pb.GenerateRequest(prompt="a" * (MAX_GENERATE_REQUEST_BYTES + 1))
    with unlimited_channel(stack.address("router"), tls) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(pb_grpc.RouterStub(channel).Generate(request, metadata=AUTHORIZATION, timeout=30))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # The router still serves a normal request afterwards.
    assert_serving(stack.address("router"), tls)
    with SnapKVClient(stack.address("router"), timeout_s=60, tls=tls, auth_token=TOKEN) as client:
        items = list(client.generate("a short prompt", max_tokens=2, budget=32, window=8, kernel=5))
    assert isinstance(items[-1], Summary)


def test_client_rejects_oversize_prompt_before_sending(stack, certificates):
    tls = certificates.channel_tls()
    with SnapKVClient(stack.address("router"), timeout_s=30, tls=tls, auth_token=TOKEN) as client:
        with pytest.raises(SnapKVError) as error:
            list(client.generate("a" * (MAX_GENERATE_REQUEST_BYTES + 1), max_tokens=2))
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_oversize_prefill_request_rejected(stack, certificates):
    tls = certificates.channel_tls("client")
    request = pb.PrefillRequest(request_id="x" * (MAX_PREFILL_REQUEST_BYTES + 1))
    with unlimited_channel(stack.address("prefill"), tls) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.PrefillStub(channel).Prefill(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(stack.address("prefill"), tls)


def test_oversize_kv_message_rejected(stack, certificates):
    tls = certificates.channel_tls("client")
    oversize = pb.LoadKVRequest(chunk=pb.KVChunk(index=0, payload=bytes(MAX_LOAD_KV_MESSAGE_BYTES), checksum=0))
    with unlimited_channel(stack.address("decode"), tls) as channel:
        stub = pb_grpc.DecodeStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.LoadKV(iter([oversize]), timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # Nothing was reserved, and the worker still serves Status.
        status = stub.Status(pb.StatusRequest(), timeout=10)
    assert status.kv_resident_bytes == 0


def test_largest_messages_fit_their_limits():
    # The largest KV chunk the codec makes, with the largest index and checksum values.
    chunk = pb.LoadKVRequest(chunk=pb.KVChunk(index=2**32 - 1, payload=bytes(MAX_CHUNK_BYTES), checksum=2**32 - 1))
    assert chunk.ByteSize() <= MAX_LOAD_KV_MESSAGE_BYTES

    # A KV header carries the request's stop strings, at most a whole GenerateRequest of them.
    stops = ["s" * (MAX_GENERATE_REQUEST_BYTES // 4)] * 4
    header = pb.LoadKVRequest(
        header=pb.KVHeader(
            request_id="r" * 256, kept_lengths=[2**31] * 256, context_token_ids=[2**31] * 5,
            sampling=pb.SamplingParams(stop=stops),
        )
    )
    assert header.ByteSize() <= MAX_LOAD_KV_MESSAGE_BYTES

    # A reply of a decode step, with a long piece of text, is far below the reply limit.
    event = pb.TokenEvent(token_ids=[2**31], text="x" * 4096, finish_reason=pb.FINISH_REASON_STOP)
    assert event.ByteSize() * 100 < MAX_REPLY_BYTES
