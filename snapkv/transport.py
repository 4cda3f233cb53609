"""gRPC transport shared by the services and the client: message-size limits, TLS and channel set-up.

Message-size limits per hop, sized from the largest message each hop carries. A message above the
receiver's limit fails its call with RESOURCE_EXHAUSTED, and the server goes on serving.

- client -> router, `MAX_GENERATE_REQUEST_BYTES` (4 MiB): a GenerateRequest, mostly prompt text.
  4 MiB of text is roughly a million tokens, more than the context of the models served here.
- router -> prefill, `MAX_PREFILL_REQUEST_BYTES` (16 MiB): the same prompt as token ids. Byte-level
  tokenizers make at most about one token per byte of text, and an id below 2**21 takes at most 3
  bytes, so 4x leaves room for the chat template and the request's stop strings.
- prefill -> decode, `MAX_LOAD_KV_MESSAGE_BYTES` (5 MiB): a KVChunk carries at most 1 MiB of payload
  (`snapkv.wire_header.MAX_CHUNK_BYTES`), and the KVHeader carries the request's stop strings, which
  come from a GenerateRequest.
- every reply, `MAX_REPLY_BYTES` (1 MiB): token events, PrefillResponse, Status, health and
  reflection replies are a few KiB at most.

TLS is optional on every hop. `ServerTLS` is a server's identity, plus the CA that client
certificates must chain to for mutual TLS. `ChannelTLS` is the CA that a client verifies its server
against, plus its own certificate for mutual TLS. Certificate files are read when a server binds or
a channel opens, so a restarted process picks up renewed files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc

MiB = 1 << 20
MAX_GENERATE_REQUEST_BYTES = 4 * MiB
MAX_PREFILL_REQUEST_BYTES = 4 * MAX_GENERATE_REQUEST_BYTES
MAX_LOAD_KV_MESSAGE_BYTES = MAX_GENERATE_REQUEST_BYTES + MiB
MAX_REPLY_BYTES = MiB

ChannelOptions = list[tuple[str, object]]


def message_size_options(max_receive_bytes: int, max_send_bytes: int) -> ChannelOptions:
    """Return the gRPC options that limit received and sent messages to these sizes."""
    return [
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", max_send_bytes),
    ]


# gRPC servers bind with SO_REUSEPORT by default: a second server on a port that is already served
# binds as well, and the kernel splits new connections between the two. This project's servers take
# their port alone, so a port in use is a failed bind.
EXCLUSIVE_PORT_OPTION = ("grpc.so_reuseport", 0)


def server_options(max_receive_bytes: int, max_send_bytes: int) -> ChannelOptions:
    """Return the options of this project's gRPC servers: message size limits, and a port of their own."""
    return [*message_size_options(max_receive_bytes, max_send_bytes), EXCLUSIVE_PORT_OPTION]


def read_pem(path: Path, description: str) -> bytes:
    """Read a PEM file; raise OSError or ValueError naming `description` and the path when it is unusable."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise OSError(f"could not read the {description} file {path}: {error.strerror or error}") from error
    if b"-----BEGIN " not in data:
        raise ValueError(f"invalid {description} file {path}: expected PEM text with a '-----BEGIN' line")
    return data


def _check_pair(cert_file: Path | None, key_file: Path | None, owner: str) -> None:
    if (cert_file is None) != (key_file is None):
        raise ValueError(
            f"invalid {owner}: cert_file={cert_file} and key_file={key_file}; give both or neither"
        )


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate chain and key, and optionally the CA that client certificates must chain to.

    With `client_ca_file` the server requires a client certificate on every connection (mutual
    TLS) and closes connections without a valid one.
    """

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        key = read_pem(self.key_file, "TLS key")
        chain = read_pem(self.cert_file, "TLS certificate")
        client_ca = None if self.client_ca_file is None else read_pem(self.client_ca_file, "client CA")
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


@dataclass(frozen=True)
class ChannelTLS:
    """Client-side TLS settings: the CA to verify the server with, and the certificate to present.

    `ca_file` None trusts the system's root CAs. `server_name` is the name the server's certificate
    must carry when it differs from the host in the target address (for example when the target
    is a pod IP).
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        _check_pair(self.cert_file, self.key_file, "client certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        ca = None if self.ca_file is None else read_pem(self.ca_file, "CA certificate")
        key = chain = None
        if self.cert_file is not None:
            key = read_pem(self.key_file, "TLS key")
            chain = read_pem(self.cert_file, "TLS certificate")
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)

    def with_server_name(self, server_name: str | None) -> "ChannelTLS":
        """Return a copy that verifies `server_name` unless this one already names a server."""
        if self.server_name is not None or server_name is None:
            return self
        return ChannelTLS(self.ca_file, self.cert_file, self.key_file, server_name)

    def options(self) -> ChannelOptions:
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]


def add_port(server: grpc.aio.Server | grpc.Server, address: str, tls: ServerTLS | None) -> int:
    """Bind `server` to `address`, with TLS when `tls` is set; return the port, or raise OSError."""
    if tls is None:
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as error:  # how recent grpcio reports a failed bind
            raise OSError(f"could not bind {address}: {error}. Another process may be using the port: choose a free one") from error
    else:
        credentials = tls.credentials()
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError as error:
            # gRPC reports a certificate it cannot use only as a failed bind, and logs the cause.
            raise OSError(
                f"could not bind {address} with TLS: {error}. Check that {tls.cert_file} and {tls.key_file} "
                "are a PEM certificate chain and its matching private key"
            ) from error
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


def open_channel(address: str, tls: ChannelTLS | None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """Open a blocking channel to `address`, with TLS when `tls` is set."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def open_aio_channel(
    address: str, tls: ChannelTLS | None, options: Sequence[tuple[str, object]] = ()
) -> grpc.aio.Channel:
    """Open an asyncio channel to `address`, with TLS when `tls` is set."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def is_loopback_address(address: str) -> bool:
    """Return whether a "host:port" address names this machine's loopback interface."""
    host = address.rpartition(":")[0].removeprefix("[").removesuffix("]")
    return host == "localhost" or host.startswith("127.") or host == "::1"
