"""TLS and bearer-token flags of the `snapkv-serve` commands, and their translation into transport settings.

`snapkv.cli` adds these flags to its parser and calls `apply_options` on the parsed namespace, which
sets `args.tls`, `args.peer_tls` and `args.auth_token` for the command handlers. Every flag is off
by default, so the services keep serving plain gRPC on loopback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SERVICE_COMMANDS = ("decode", "prefill", "router")


def add_client_options(command: argparse.ArgumentParser, token_variable: str) -> None:
    """Add the TLS and bearer-token options of `generate --target`."""
    command.add_argument(
        "--tls-ca", type=Path, metavar="FILE",
        help="connect with TLS and verify the router's certificate against this CA certificate (PEM)",
    )
    command.add_argument(
        "--tls-cert", type=Path, metavar="FILE",
        help="client certificate chain (PEM) for a router that requires one; implies TLS",
    )
    command.add_argument("--tls-key", type=Path, metavar="FILE", help="private key (PEM) of --tls-cert")
    command.add_argument(
        "--tls-server-name", metavar="NAME",
        help="name the router's certificate must carry when it differs from the host of --target",
    )
    command.add_argument(
        "--auth-token-file", type=Path, metavar="FILE",
        help=f"send the bearer token stored in this file (default: ${token_variable} when it is set)",
    )


def add_server_options(command: argparse.ArgumentParser, outgoing: bool) -> None:
    """Add the TLS options of a service; `outgoing` adds those of its channels to other services."""
    command.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve TLS with this certificate chain (PEM)")
    command.add_argument("--tls-key", type=Path, metavar="FILE", help="private key (PEM) of --tls-cert")
    command.add_argument(
        "--tls-client-ca", type=Path, metavar="FILE",
        help="require a client certificate signed by this CA (PEM) on every connection (mutual TLS); needs --tls-cert",
    )
    if not outgoing:
        return
    command.add_argument(
        "--peer-ca", type=Path, metavar="FILE",
        help="connect to other services with TLS and verify their certificates against this CA (PEM); "
        "--tls-cert and --tls-key, when given, are presented as the client certificate",
    )
    command.add_argument(
        "--peer-tls-name", metavar="NAME",
        help="name that every peer certificate must carry (default: the host of each peer address)",
    )


def apply_options(args: argparse.Namespace) -> None:
    """Set `args.tls`, `args.peer_tls` and `args.auth_token` (None when unused) from the flags.

    Reads every named file now, so that a missing or unreadable one fails before a model loads.
    Raises ValueError for an incomplete combination of flags and OSError for an unreadable file.
    """
    args.tls = args.peer_tls = args.auth_token = None
    if args.command in SERVICE_COMMANDS:
        args.tls = _server_tls(args)
        args.peer_tls = _peer_tls(args)
    elif args.command == "generate" and not args.local:
        args.tls = _client_tls(args)
    token_file = getattr(args, "auth_token_file", None)
    if token_file is not None:
        args.auth_token = read_token_file(token_file)


def read_token_file(path: Path) -> str:
    """Read a bearer token: the file's text without surrounding whitespace."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"could not read the bearer token file {path}: {error}") from error
    if not token:
        raise ValueError(f"invalid bearer token file {path}: it is empty")
    return token


def _require_pair(args: argparse.Namespace) -> None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")


def _server_tls(args: argparse.Namespace):
    from snapkv.transport import ServerTLS

    _require_pair(args)
    if args.tls_cert is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca requires --tls-cert and --tls-key")
        return None
    tls = ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)
    tls.credentials()
    return tls


def _peer_tls(args: argparse.Namespace):
    from snapkv.transport import ChannelTLS

    peer_ca = getattr(args, "peer_ca", None)
    if peer_ca is None:
        if getattr(args, "peer_tls_name", None) is not None:
            raise ValueError("--peer-tls-name requires --peer-ca")
        return None
    tls = ChannelTLS(peer_ca, args.tls_cert, args.tls_key, args.peer_tls_name)
    tls.credentials()
    return tls


def _client_tls(args: argparse.Namespace):
    from snapkv.transport import ChannelTLS

    _require_pair(args)
    if args.tls_ca is None and args.tls_cert is None:
        if args.tls_server_name is not None:
            raise ValueError("--tls-server-name requires --tls-ca or --tls-cert")
        return None
    tls = ChannelTLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    tls.credentials()
    return tls
