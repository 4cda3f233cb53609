"""The router's bearer token: calls without it or with another token fail with UNAUTHENTICATED,
the right one works, health checks and reflection stay open, and no token reaches the logs."""

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from router.auth import BearerTokenInterceptor, check_token
from router.client import SnapKVClient, SnapKVError, Summary
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.transport import open_channel
from tests.security.conftest import TOKEN

PROMPT = "the quick brown fox jumps over the lazy dog " * 4


def generate(address, tls, token):
    with SnapKVClient(address, timeout_s=60, tls=tls, auth_token=token) as client:
        return list(client.generate(PROMPT, max_tokens=2, budget=32, window=8, kernel=5))


def test_missing_token_is_unauthenticated(stack, certificates):
    with pytest.raises(SnapKVError) as error:
        generate(stack.address("router"), certificates.channel_tls(), token=None)
    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in error.value.details
    assert "authorization: Bearer <token>" in error.value.details


def test_wrong_token_is_unauthenticated(stack, certificates):
    for token in ("wrong-token", TOKEN + "x", TOKEN[:-1]):
        with pytest.raises(SnapKVError) as error:
            generate(stack.address("router"), certificates.channel_tls(), token=token)
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "invalid bearer token" in error.value.details


def test_right_token_works(stack, certificates):
    items = generate(stack.address("router"), certificates.channel_tls(), token=TOKEN)
    assert isinstance(items[-1], Summary)
    assert items[-1].completion_tokens == 2


def test_other_scheme_is_unauthenticated(stack, certificates):
    with open_channel(stack.address("router"), certificates.channel_tls()) as channel:
        call = pb_grpc.RouterStub(channel).Generate(
            pb.GenerateRequest(prompt=PROMPT), metadata=(("authorization", f"Basic {TOKEN}"),), timeout=30
        )
        with pytest.raises(grpc.RpcError) as error:
            list(call)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_token(stack, certificates):
    with open_channel(stack.address("router"), certificates.channel_tls()) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "snapkv.serving.v1.Router"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {service.name for service in reply.list_services_response.service}
        assert "snapkv.serving.v1.Router" in names


def test_token_never_logged(mtls_router, certificates, caplog):
    caplog.set_level(logging.DEBUG)
    tls = certificates.channel_tls("client")
    generate(mtls_router, tls, token=TOKEN)
    with pytest.raises(SnapKVError):
        generate(mtls_router, tls, token="guessed-token-value")
    assert "rejected a call to /snapkv.serving.v1.Router/Generate: invalid bearer token" in caplog.text
    assert TOKEN not in caplog.text
    assert "guessed-token-value" not in caplog.text


def test_token_must_be_header_safe():
    for token in ("", "two words", "line\nbreak", "caf\u00e9"):
        with pytest.raises(ValueError):
            check_token(token)
    with pytest.raises(ValueError):
        BearerTokenInterceptor("")
