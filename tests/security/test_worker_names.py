"""The router checks each worker's certificate against the host name of its configured target, not
against the IP address the name resolved to, unless a name is given explicitly."""

import asyncio

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2_grpc

from router.registry import DECODE, POOL_SERVICES, RegistryConfig, WorkerRegistry, tls_server_name
from snapkv.transport import ChannelTLS, ServerTLS, add_port
from tests.router.fakes import FakeHealth
from tests.security.certs import make_authority, make_leaf


def test_tls_server_name_of_targets():
    assert tls_server_name("decode.snapkv.svc:50053") == "decode.snapkv.svc"
    assert tls_server_name("localhost:1") == "localhost"
    assert tls_server_name("10.0.0.7:50053") is None
    assert tls_server_name("[::1]:50053") is None


@pytest.fixture
def dns_only_worker(tmp_path):
    """A decode health service over TLS whose certificate names only "localhost", not 127.0.0.1."""
    ca = make_authority(tmp_path, "ca")
    leaf = make_leaf(ca, tmp_path, "decode", alt_names=(x509.DNSName("localhost"),))
    loop = asyncio.new_event_loop()

    async def start():
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(FakeHealth(POOL_SERVICES[DECODE]), server)
        port = add_port(server, "127.0.0.1:0", ServerTLS(leaf.cert_file, leaf.key_file))
        await server.start()
        return server, port

    server, port = loop.run_until_complete(start())
    yield loop, port, ca.cert_file
    loop.run_until_complete(server.stop(None))
    loop.close()


def decode_health(loop, target, port, tls):
    """Resolve `target` to 127.0.0.1:port, run one round of checks, return the worker's health and last error."""

    async def resolver(_target):
        return [f"127.0.0.1:{port}"]

    async def check():
        registry = WorkerRegistry(["127.0.0.1:1"], [target], RegistryConfig(health_timeout_s=5.0), resolver, tls=tls)
        await registry.resolve()
        await registry.check()
        [worker] = registry.workers(DECODE)
        await registry.close()
        return worker.healthy, worker.last_error

    return loop.run_until_complete(check())


def test_worker_checked_against_target_name(dns_only_worker):
    loop, port, ca_file = dns_only_worker
    healthy, error = decode_health(loop, f"localhost:{port}", port, ChannelTLS(ca_file))
    assert healthy, error


def test_worker_ip_target_checked_against_ip(dns_only_worker):
    loop, port, ca_file = dns_only_worker
    healthy, error = decode_health(loop, f"127.0.0.1:{port}", port, ChannelTLS(ca_file))
    assert not healthy
    assert error.startswith("health check failed with UNAVAILABLE")


def test_explicit_name_overrides_target(dns_only_worker):
    loop, port, ca_file = dns_only_worker
    healthy, error = decode_health(loop, f"127.0.0.1:{port}", port, ChannelTLS(ca_file, server_name="localhost"))
    assert healthy, error
