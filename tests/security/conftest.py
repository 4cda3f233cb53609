"""One secured stack for the whole security suite, started once.

Decode and prefill serve mutual TLS, so they require client certificates from the test CA, and
prefill pushes KV to decode over mutual TLS. The router serves TLS without client certificates,
talks to both workers over mutual TLS and requires a bearer token. A second router, in this process, requires client
certificates as well, so that tests can check both kinds of router. Each service also serves its
health checks alone, without TLS, on a port of its own (`--health-port`), as probes need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from snapkv.cli_services import LocalStack, free_port
from snapkv.transport import ChannelTLS, ServerTLS
from tests.router.fakes import BackgroundLoop
from tests.security.certs import Authority, Leaf, make_authority, make_leaf

TINY = "tiny-llama"
TOKEN = "s3cret-token-for-tests"


@dataclass(frozen=True)
class Certificates:
    """The test CA, a second CA that nothing trusts, and the leaf certificates."""

    ca: Authority
    other_ca: Authority
    leaves: dict[str, Leaf]
    token_file: Path

    def channel_tls(self, name: str | None = None, ca: Authority | None = None) -> ChannelTLS:
        """TLS that trusts `ca` (the test CA by default) and presents leaf `name`, or no certificate."""
        ca_file = (ca or self.ca).cert_file
        if name is None:
            return ChannelTLS(ca_file)
        return ChannelTLS(ca_file, self.leaves[name].cert_file, self.leaves[name].key_file)

    def server_options(self, name: str, client_ca: bool) -> list[str]:
        leaf = self.leaves[name]
        options = ["--tls-cert", str(leaf.cert_file), "--tls-key", str(leaf.key_file)]
        return options + (["--tls-client-ca", str(self.ca.cert_file)] if client_ca else [])


@pytest.fixture(scope="package")
def certificates(tmp_path_factory) -> Certificates:
    folder = tmp_path_factory.mktemp("tls")
    ca = make_authority(folder, "test-ca")
    other_ca = make_authority(folder, "other-ca")
    leaves = {name: make_leaf(ca, folder, name) for name in ("decode", "prefill", "router", "client")}
    leaves["stranger"] = make_leaf(other_ca, folder, "stranger")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    return Certificates(ca, other_ca, leaves, token_file)


@pytest.fixture(scope="package")
def health_ports() -> dict[str, int]:
    """The plaintext health port of each service of `stack`."""
    return {name: free_port() for name in ("decode", "prefill", "router")}


@pytest.fixture(scope="package")
def stack(certificates, health_ports):
    peer_ca = ["--peer-ca", str(certificates.ca.cert_file)]
    options = {
        "decode": certificates.server_options("decode", client_ca=True),
        "prefill": certificates.server_options("prefill", client_ca=True) + peer_ca,
        "router": certificates.server_options("router", client_ca=False)
        + peer_ca
        + ["--auth-token-file", str(certificates.token_file)],
    }
    for name, port in health_ports.items():
        options[name] += ["--health-port", str(port)]
    health_tls = certificates.channel_tls("client")
    with LocalStack(TINY, service_options=options, health_tls=health_tls) as running:
        running.start(timeout_s=300)
        yield running


@pytest.fixture(scope="package")
def mtls_router(certificates, stack):
    """Address of an in-process router that requires client certificates and the token, in front of `stack`."""
    from router.server import serve, stop
    from snapkv.model import resolve_tokenizer

    router_leaf = certificates.leaves["router"]
    server_tls = ServerTLS(router_leaf.cert_file, router_leaf.key_file, certificates.ca.cert_file)
    background = BackgroundLoop()
    server, port = background.run(
        serve(
            resolve_tokenizer(TINY),
            [stack.address("prefill")],
            [stack.address("decode")],
            tls=server_tls,
            peer_tls=certificates.channel_tls("router"),
            auth_token=TOKEN,
        )
    )
    yield f"127.0.0.1:{port}"
    background.run(stop(server))
    background.close()
