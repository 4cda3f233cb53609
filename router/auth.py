"""Bearer-token authentication for the router: a gRPC server interceptor.

Every call must carry the metadata `authorization: Bearer <token>`, except grpc.health.v1 and server
reflection, which stay open so that Kubernetes probes and grpcurl work without the token. A call
without the header or with another token fails with UNAUTHENTICATED before it reaches the servicer.
Tokens are compared in constant time, and neither the expected nor the received token is logged.

The token travels in clear text unless the connection uses TLS.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "
OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME)
WARNING_INTERVAL_S = 60.0


def check_token(token: str) -> str:
    """Return `token` if it can travel in a gRPC header; raise ValueError otherwise."""
    if not token:
        raise ValueError("invalid bearer token: it is empty")
    if not all(33 <= ord(char) <= 126 for char in token):
        raise ValueError("invalid bearer token: expected printable ASCII characters without spaces")
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Return the call metadata that authenticates a client with `token`."""
    return ((AUTHORIZATION_KEY, BEARER_PREFIX + check_token(token)),)


def _service_of(method: str) -> str:
    """Return the service of a full method name "/package.Service/Method"."""
    return method.lstrip("/").partition("/")[0]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject every call outside `OPEN_SERVICES` whose bearer token is missing or differs from `token`."""

    def __init__(self, token: str):
        self._expected = (BEARER_PREFIX + check_token(token)).encode()
        self._num_rejected = 0
        self._last_warning = float("-inf")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if _service_of(handler_call_details.method) in OPEN_SERVICES:
            return await continuation(handler_call_details)
        problem = self._problem(handler_call_details.invocation_metadata or ())
        handler = await continuation(handler_call_details)
        if problem is None or handler is None:
            return handler
        self._record_rejection(handler_call_details.method, problem)
        return _rejecting_handler(handler, f"{problem}; send the metadata 'authorization: Bearer <token>'")

    def _problem(self, metadata) -> str | None:
        """Return why the call's metadata fails authentication, or None when it passes."""
        values = [value for key, value in metadata if key == AUTHORIZATION_KEY]
        if not values:
            return "missing bearer token"
        received = values[0].encode() if isinstance(values[0], str) else values[0]
        if len(values) > 1 or not hmac.compare_digest(received, self._expected):
            return "invalid bearer token"
        return None

    def _record_rejection(self, method: str, problem: str) -> None:
        logger.debug("rejected a call to %s: %s", method, problem)
        self._num_rejected += 1
        now = time.monotonic()
        if now - self._last_warning >= WARNING_INTERVAL_S:
            logger.warning(
                "rejected %d unauthenticated calls since the last warning, the latest to %s: %s",
                self._num_rejected, method, problem,
            )
            self._num_rejected = 0
            self._last_warning = now


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """Return a handler of the same kind as `handler` that fails every call with UNAUTHENTICATED."""

    async def reject(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        reject, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
