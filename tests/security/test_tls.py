"""TLS on every hop of the secured stack: the right CA connects, a wrong CA or a missing client
certificate does not, and a request crosses router, prefill and decode over mutual TLS."""

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.client import SnapKVClient, SnapKVError, Summary
from snapkv import cli
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.cli_services import free_port
from snapkv.transport import ChannelTLS, ServerTLS, open_channel
from tests.conftest import tiny_engine
from tests.router.fakes import BackgroundLoop, wait_until
from tests.security.conftest import TOKEN

PROMPT = "the quick brown fox jumps over the lazy dog " * 6
COMPRESSION = dict(budget=32, window=8, kernel=5)


def generate(address, tls, max_tokens=4, token=TOKEN):
    with SnapKVClient(address, timeout_s=60, tls=tls, auth_token=token) as client:
        return list(client.generate(PROMPT, max_tokens=max_tokens, **COMPRESSION))


def health_status(address, tls, service=""):
    with open_channel(address, tls) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def test_generate_over_tls_on_every_hop(stack, certificates):
    # The router verifies both workers and prefill verifies decode, all with client certificates, so
    # a cache that reaches decode and a complete generation prove that every internal hop completed mTLS.
    items = generate(stack.address("router"), certificates.channel_tls())
    summary = items[-1]
    assert isinstance(summary, Summary)
    assert summary.completion_tokens == 4
    assert summary.finish_reason == "length"
    assert summary.kv_bytes_sent > 0


def test_router_with_wrong_ca_is_unavailable(stack, certificates):
    with pytest.raises(SnapKVError) as error:
        generate(stack.address("router"), certificates.channel_tls(ca=certificates.other_ca))
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_router_without_tls_is_unavailable(stack):
    with pytest.raises(SnapKVError) as error:
        generate(stack.address("router"), None)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_router_name_mismatch_is_unavailable(stack, certificates):
    # The certificate names 127.0.0.1 and localhost only.
    tls = ChannelTLS(certificates.ca.cert_file, server_name="router.example.com")
    with pytest.raises(SnapKVError) as error:
        generate(stack.address("router"), tls)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", ["decode", "prefill"])
def test_internal_service_requires_client_certificate(stack, certificates, service):
    address = stack.address(service)
    assert health_status(address, certificates.channel_tls("client")) == health_pb2.HealthCheckResponse.SERVING

    for tls in (certificates.channel_tls(), certificates.channel_tls("stranger")):
        with pytest.raises(grpc.RpcError) as error:
            health_status(address, tls)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_decode_without_client_certificate_gets_no_status(stack, certificates):
    with open_channel(stack.address("decode"), certificates.channel_tls()) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.DecodeStub(channel).Status(pb.StatusRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_router_requires_client_certificate(mtls_router, certificates):
    items = generate(mtls_router, certificates.channel_tls("client"), max_tokens=2)
    assert items[-1].completion_tokens == 2

    for tls in (certificates.channel_tls(), certificates.channel_tls("stranger")):
        with pytest.raises(SnapKVError) as error:
            generate(mtls_router, tls, max_tokens=2)
        assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_generate_command_with_ca_and_token(stack, certificates, capsys):
    status = cli.main([
        "generate", "--target", stack.address("router"), "--prompt", PROMPT, "--max-tokens", "3",
        "--budget", "32", "--window", "8", "--kernel", "5", "--json",
        "--tls-ca", str(certificates.ca.cert_file), "--auth-token-file", str(certificates.token_file),
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    figures = json.loads(captured.out)
    assert figures["finish_reason"] == "length"
    assert figures["kv_bytes_sent"] > 0


def test_generate_command_with_client_certificate(mtls_router, certificates, capsys):
    client = certificates.leaves["client"]
    status = cli.main([
        "generate", "--target", mtls_router, "--prompt", PROMPT, "--max-tokens", "2", "--json",
        "--tls-ca", str(certificates.ca.cert_file), "--tls-cert", str(client.cert_file),
        "--tls-key", str(client.key_file), "--auth-token-file", str(certificates.token_file),
    ])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert json.loads(captured.out)["finish_reason"] == "length"


@pytest.mark.parametrize("service", ["decode", "prefill", "router"])
def test_health_port_serves_plaintext_probes(stack, health_ports, service):
    # Kubernetes' gRPC probes do not use TLS: the health port reports the service's statuses to them.
    address = f"127.0.0.1:{health_ports[service]}"
    assert health_status(address, None) == health_pb2.HealthCheckResponse.SERVING
    service_name = pb.DESCRIPTOR.services_by_name[service.capitalize()].full_name
    assert health_status(address, None, service_name) == health_pb2.HealthCheckResponse.SERVING

    with pytest.raises(grpc.RpcError) as error:
        health_status(address, None, "no.such.Service")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_port_serves_nothing_else(stack, health_ports):
    # The router's API needs TLS and the token. On the health port it does not exist at all.
    with open_channel(f"127.0.0.1:{health_ports['router']}", None) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(pb_grpc.RouterStub(channel).Generate(pb.GenerateRequest(prompt=PROMPT), timeout=10))
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED

    with open_channel(f"127.0.0.1:{health_ports['decode']}", None) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.DecodeStub(channel).Status(pb.StatusRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def health_port_closed(address) -> bool:
    try:
        health_status(address, None)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        return True
    return False


def test_health_port_stops_with_server(certificates):
    # An in-process decode server over mutual TLS: its plaintext health port closes once it stops.
    from decode_service.server import serve

    async def stop(server, servicer) -> None:
        await server.stop(grace=None)
        servicer.close()

    leaf = certificates.leaves["decode"]
    health_address = f"127.0.0.1:{free_port()}"
    tls = ServerTLS(leaf.cert_file, leaf.key_file, certificates.ca.cert_file)
    background = BackgroundLoop()
    try:
        server, _, servicer = background.run(serve(tiny_engine(), tls=tls, health_address=health_address))
        assert health_status(health_address, None) == health_pb2.HealthCheckResponse.SERVING

        background.run(stop(server, servicer))
        wait_until(lambda: health_port_closed(health_address), timeout_s=5)
    finally:
        background.close()
