"""Helpers shared by the three gRPC servers: health and reflection registration, a plaintext port for
health checks alone, running until a signal, and the interceptor that rejects unparseable requests
with INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from typing import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from snapkv.transport import EXCLUSIVE_PORT_OPTION

logger = logging.getLogger(__name__)

# Tasks that stop health-only servers when their main server stops, referenced until done.
_HEALTH_SERVER_STOPPERS: set[asyncio.Task] = set()


async def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> health.aio.HealthServicer:
    """Register grpc.health.v1 (every service SERVING) and server reflection on `server`."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return health_servicer


def bind_health_server(health_servicer: health.aio.HealthServicer, address: str) -> grpc.aio.Server:
    """Return a server, not yet started, with `health_servicer` alone bound to `address` without TLS.

    Kubernetes' gRPC probes do not use TLS, so a server that serves TLS can still be probed there.
    The statuses are the main server's own, and no other service is registered. Raises OSError when
    the address cannot be bound; bind before starting anything else, so that nothing is left running.
    """
    health_server = grpc.aio.server(options=[EXCLUSIVE_PORT_OPTION])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    try:
        port = health_server.add_insecure_port(address)
    except RuntimeError as error:  # how recent grpcio reports a failed bind
        raise OSError(f"failed to bind the health port {address}: {error}; choose a free port") from error
    if port == 0:
        raise OSError(f"failed to bind the health port {address}; choose a free port")
    return health_server


async def start_health_server(health_server: grpc.aio.Server, server: grpc.aio.Server) -> None:
    """Start `health_server` and stop it when the started `server` stops."""
    await health_server.start()

    async def stop_with_server() -> None:
        await server.wait_for_termination()
        await health_server.stop(grace=None)

    # The task also keeps `health_server` referenced. In testing, an unreferenced grpc.aio server stopped
    # serving once it was garbage-collected.
    task = asyncio.create_task(stop_with_server())
    _HEALTH_SERVER_STOPPERS.add(task)
    task.add_done_callback(_HEALTH_SERVER_STOPPERS.discard)


async def wait_for_signal() -> None:
    """Return when the process receives SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def serve_until_signal(
    server: grpc.aio.Server, cleanup: Callable[[], Awaitable[None] | None] | None = None, name: str = "server"
) -> None:
    """Run a started server until SIGINT or SIGTERM, then stop it with a short grace period.

    `name` (such as "decode worker on port 50053") names the stopping server in the log.
    """
    await wait_for_signal()
    logger.info("%s shutting down", name)
    await server.stop(grace=5)
    if cleanup is not None:
        result = cleanup()
        if asyncio.iscoroutine(result):
            await result


class _UnparsedRequest:
    """Stands in for a request message whose bytes did not parse, until the handler rejects the call."""

    def __init__(self, error: DecodeError):
        self.error = error


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Fail calls whose request messages do not parse with INVALID_ARGUMENT and the parse error.

    Without it, grpcio fails such a call with UNKNOWN ("Unexpected <class DecodeError>"). Typical
    causes are a string field that is not valid UTF-8 (proto3 requires UTF-8) and truncated bytes.
    Place it after an authentication interceptor, so that unauthenticated calls still get
    UNAUTHENTICATED.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _checking_handler(handler, handler_call_details.method)


def _checking_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """Wrap `handler`: its deserializer returns a placeholder instead of raising DecodeError, and its
    behavior rejects a call when a placeholder arrives."""
    parse = handler.request_deserializer

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as error:
            return _UnparsedRequest(error)

    async def reject(unparsed: _UnparsedRequest, context: grpc.aio.ServicerContext) -> None:
        logger.warning("rejected a call to %s: %s", method, unparsed.error)
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"invalid request to {method}: {unparsed.error}; send a complete message whose strings are valid UTF-8",
        )

    async def checked_stream(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
        async for request in requests:
            if isinstance(request, _UnparsedRequest):
                await reject(request, context)
            yield request

    kind = (handler.request_streaming, handler.response_streaming)
    behavior = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[kind]

    async def check(request, context):
        """Reject an unparsed single request; wrap a request stream so each message is checked as it arrives."""
        if isinstance(request, _UnparsedRequest):
            await reject(request, context)
        return checked_stream(request, context) if handler.request_streaming else request

    if inspect.isasyncgenfunction(behavior):
        async def checked(request, context):
            async for response in behavior(await check(request, context), context):
                yield response
    else:
        async def checked(request, context):
            result = behavior(await check(request, context), context)
            return await result if inspect.isawaitable(result) else result

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(checked, request_deserializer=deserialize, response_serializer=handler.response_serializer)
