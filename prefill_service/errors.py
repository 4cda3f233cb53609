"""Errors a prefill actor raises for one request. Each names the gRPC status of the server's reply.

They cross the Ray boundary by pickling, so each keeps every constructor argument in `args`.
"""

from __future__ import annotations


class PrefillError(Exception):
    """A request the actor could not complete; `code` is the name of a `grpc.StatusCode`."""

    code = "INTERNAL"


class InvalidPrefillRequest(PrefillError, ValueError):
    """The request itself is wrong: the client must change it before sending it again."""

    code = "INVALID_ARGUMENT"


class PrefillCancelled(PrefillError):
    """The server cancelled the request, because its client went away, before the KV transfer ended."""

    code = "CANCELLED"


class DecodeTransferError(PrefillError):
    """The decode worker rejected the KV transfer or could not be reached.

    `code` is the status of the reply, derived from decode's own (see `PrefillWorker.push`), and
    `decode_address` the worker that failed, so the router can pick another one.
    """

    def __init__(self, code: str, message: str, decode_address: str):
        super().__init__(code, message, decode_address)
        self.code = code
        self.decode_address = decode_address

    def __str__(self) -> str:
        return self.args[1]
