"""Router gRPC server: the client's only endpoint, in front of the prefill and decode pools.

For each Generate call the router tokenizes the prompt, picks a prefill worker and a decode worker
together, and calls Prefill with the decode worker's address. Prefill pushes the compressed KV cache
straight to that decode worker and returns the first token, which the router sends to the client at
once. The router then streams the rest from Decode.Stream and ends with one Final message.

Failures:
- Before the first token, a Prefill call that fails with UNAVAILABLE, RESOURCE_EXHAUSTED or CANCELLED
  (the worker or its decode worker is gone or full) is retried once. The retry avoids both workers of
  the failed attempt where the pool has another healthy one, and it is skipped when neither pool has.
- After the first token, a failure ends the call with UNAVAILABLE, DEADLINE_EXCEEDED or ABORTED and a
  message stating that the output is incomplete. A stream that ends without a finish reason is ABORTED.
- A client that cancels cancels the Prefill or Stream call in flight, and the client's deadline
  becomes the timeout of each outgoing call. A cache that prefill loaded into a decode worker but no
  stream consumed to its end is released with Decode.Release.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from transformers import PreTrainedTokenizerBase

from router.auth import BearerTokenInterceptor
from router.metrics import RouterMetrics
from router.policies import POLICIES
from router.registry import DECODE, PREFILL, RegistryConfig, Worker, WorkerRegistry
from router.requests import RequestLimits, RequestTrace, RoutedRequest, final_message, log_finished, parse_request
from snapkv.messages import sampling_to_proto
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.serving import MalformedRequestInterceptor, bind_health_server, start_health_server
from snapkv.text import TextStream, stop_token_ids
from snapkv.transport import (
    MAX_GENERATE_REQUEST_BYTES,
    MAX_REPLY_BYTES,
    ChannelTLS,
    ServerTLS,
    add_port,
    is_loopback_address,
    server_options,
)

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Router"].full_name
PREFILL_POLICIES = ("least_loaded", "round_robin")
MAX_PREFILL_ATTEMPTS = 2  # the first call and one retry
RETRYABLE_PREFILL_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)
RELEASE_TIMEOUT_S = 5.0

# The task that closes each server's worker registry once the server stops. It also keeps the task
# alive, because asyncio keeps only weak references to tasks.
_REGISTRY_CLOSERS: dict[grpc.aio.Server, asyncio.Task] = {}


class RouteError(Exception):
    """A request failure with the status code and message that the client receives."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _remaining_s(context: grpc.aio.ServicerContext) -> float | None:
    """Return the time left before the client's deadline, or None without one."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise RouteError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
    return remaining


class RouterServicer(pb_grpc.RouterServicer):
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        registry: WorkerRegistry,
        policy: str,
        prefill_policy: str,
        limits: RequestLimits,
        metrics: RouterMetrics,
    ):
        self.metrics = metrics
        metrics.declare_retry_reasons(code.name for code in RETRYABLE_PREFILL_CODES)
        self.tokenizer = tokenizer
        self.registry = registry
        self.decode_policy = POLICIES[policy]
        self.prefill_policy = POLICIES[prefill_policy]
        self.limits = limits
        self.stop_ids = stop_token_ids(tokenizer, ())
        self._releases: set[asyncio.Task] = set()  # referenced until done, so that none is garbage-collected

    async def Generate(self, request, context):
        # Written with context.write rather than as an async generator, so that a client's
        # cancellation raises CancelledError here at once, wherever the call waits, and the finally
        # blocks below cancel the upstream calls.
        trace = RequestTrace()
        try:
            try:
                routed = parse_request(request, self.tokenizer, self.limits)
            except ValueError as error:
                raise RouteError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error
            trace.request_id = routed.request_id
            trace.prompt_tokens = len(routed.prompt_ids)
            await self._generate(routed, trace, context)
            trace.status = grpc.StatusCode.OK.name
        except RouteError as error:
            trace.status, trace.error = error.code.name, error.message
            await context.abort(error.code, error.message)
        except asyncio.CancelledError:
            trace.status = grpc.StatusCode.CANCELLED.name
            raise
        except Exception as error:
            # grpc logs the traceback and sends UNKNOWN to the client.
            trace.error = f"unexpected error {error!r}"
            raise
        finally:
            log_finished(trace)
            self.metrics.observe(trace)

    async def _generate(self, routed: RoutedRequest, trace: RequestTrace, context) -> None:
        reply, decode = await self._prefill(routed, context)
        streamed = not reply.handle
        try:
            trace.prefill = reply
            await context.write(pb.GenerateResponse(delta=self._first_delta(routed, reply, trace)))
            if reply.handle:
                await self._relay(decode, reply.handle, trace, context)
                streamed = True
        finally:
            if not streamed:
                self._free_unstreamed_kv(decode, reply.handle, routed.request_id)
            self.registry.release(decode)
        await context.write(pb.GenerateResponse(final=final_message(trace, routed.wire_dtype)))

    def _free_unstreamed_kv(self, decode: Worker, handle: str, request_id: str) -> None:
        """Ask the decode worker to free a cache whose stream did not run to its end, in the background.

        A client that cancels right after the first token often does so before Decode.Stream has
        claimed the handle, which would leave the cache held until its lease runs out. Release is a
        no-op for a handle that a stream claimed, because that stream frees the cache itself.
        """
        task = asyncio.create_task(self._release(decode, handle, request_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    @staticmethod
    async def _release(decode: Worker, handle: str, request_id: str) -> None:
        try:
            reply = await decode.stub.Release(pb.ReleaseRequest(handle=handle), timeout=RELEASE_TIMEOUT_S)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as error:
            # The cache is freed anyway when its lease runs out, or was freed with a worker that died.
            logger.debug("request %s: releasing handle %s on %s failed: %s", request_id, handle, decode.address, error)
            return
        if reply.released:
            logger.info("request %s: freed its unstreamed KV cache on %s", request_id, decode.address)

    def _first_delta(self, routed: RoutedRequest, reply: pb.PrefillResponse, trace: RequestTrace) -> pb.TextDelta:
        """Detokenize the first token, and set the finish reason when prefill finished the request with it."""
        token = reply.first_token_id
        text = TextStream(self.tokenizer, stop=routed.sampling.stop, context_ids=routed.prompt_ids)
        if token in self.stop_ids:
            # The decode worker does the same: an end-of-sequence token adds no text.
            delta = text.finish()
        else:
            delta = text.push(token)
        if not reply.handle:
            # With no handle, prefill finished the request at this token and reports the finish reason.
            delta += text.finish()
            trace.finish_reason = reply.finish_reason
        trace.add_tokens(1)
        return pb.TextDelta(text=delta, token_ids=[token])

    async def _prefill(self, routed: RoutedRequest, context) -> tuple[pb.PrefillResponse, Worker]:
        """Run Prefill, retrying once on other workers; return the reply and the acquired decode worker."""
        failed_prefill: set[str] = set()
        failed_decode: set[str] = set()
        for attempt in range(1, MAX_PREFILL_ATTEMPTS + 1):
            prefill, decode = self._pick_workers(failed_prefill, failed_decode)
            self.registry.acquire(decode)
            try:
                return await self._call_prefill(routed, prefill, decode, context), decode
            except grpc.aio.AioRpcError as error:
                self.registry.release(decode)
                failed_prefill.add(prefill.address)
                failed_decode.add(decode.address)
                if attempt == MAX_PREFILL_ATTEMPTS or not self._can_retry(error, failed_prefill, failed_decode):
                    raise RouteError(
                        _prefill_status(error),
                        f"prefill on {prefill.address} failed with {error.code().name} "
                        f"(attempt {attempt} of at most {MAX_PREFILL_ATTEMPTS}): {error.details()}",
                    )
                self.metrics.observe_retry(error.code().name)
                logger.warning(
                    "request %s: prefill on %s with decode worker %s failed with %s (%s); retrying on other workers",
                    routed.request_id, prefill.address, decode.address, error.code().name, error.details(),
                )
            except BaseException:
                self.registry.release(decode)
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _pick_workers(self, failed_prefill: set[str], failed_decode: set[str]) -> tuple[Worker, Worker]:
        """Pick both workers, avoiding the failed ones where the pool has another healthy worker."""
        prefill = self.registry.pick(PREFILL, self.prefill_policy, failed_prefill)
        prefill = prefill or self.registry.pick(PREFILL, self.prefill_policy)
        decode = self.registry.pick(DECODE, self.decode_policy, failed_decode)
        decode = decode or self.registry.pick(DECODE, self.decode_policy)
        if prefill is None:
            message = f"no healthy prefill worker: {self.registry.describe(PREFILL)}"
            raise RouteError(grpc.StatusCode.UNAVAILABLE, message)
        if decode is None:
            message = f"no healthy decode worker: {self.registry.describe(DECODE)}"
            raise RouteError(grpc.StatusCode.UNAVAILABLE, message)
        return prefill, decode

    def _can_retry(self, error: grpc.aio.AioRpcError, failed_prefill: set[str], failed_decode: set[str]) -> bool:
        """Allow a retry for a retryable code when at least one pool has a healthy worker not yet tried."""
        if error.code() not in RETRYABLE_PREFILL_CODES:
            return False
        return bool(self.registry.healthy(PREFILL, failed_prefill) or self.registry.healthy(DECODE, failed_decode))

    async def _call_prefill(
        self, routed: RoutedRequest, prefill: Worker, decode: Worker, context
    ) -> pb.PrefillResponse:
        request = pb.PrefillRequest(
            request_id=routed.request_id,
            prompt_token_ids=routed.prompt_ids,
            sampling=sampling_to_proto(routed.sampling),
            decode_address=decode.address,
            wire_dtype=routed.wire_dtype,
        )
        if routed.compression is not None:
            request.compression.CopyFrom(routed.compression)
        self.registry.acquire(prefill)
        try:
            return await prefill.stub.Prefill(request, timeout=_remaining_s(context))
        finally:
            self.registry.release(prefill)

    async def _relay(self, decode: Worker, handle: str, trace: RequestTrace, context) -> None:
        """Relay Decode.Stream as TextDelta messages until the finish reason; raise RouteError otherwise."""
        call = decode.stub.Stream(pb.StreamRequest(handle=handle), timeout=_remaining_s(context))
        try:
            async for event in call:
                if event.token_ids:
                    trace.add_tokens(len(event.token_ids))
                if event.token_ids or event.text:
                    delta = pb.TextDelta(text=event.text, token_ids=event.token_ids)
                    await context.write(pb.GenerateResponse(delta=delta))
                if event.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    trace.finish_reason = event.finish_reason
                    return
        except grpc.aio.AioRpcError as error:
            raise RouteError(
                _after_first_token_status(error),
                f"decode worker {decode.address} failed after {trace.completion_tokens} tokens with "
                f"{error.code().name}: {error.details()}; the output is incomplete",
            ) from error
        finally:
            call.cancel()
        raise RouteError(
            grpc.StatusCode.ABORTED,
            f"decode worker {decode.address} ended the stream after {trace.completion_tokens} tokens without a "
            "finish reason; the output is incomplete",
        )


def _prefill_status(error: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """Map a failed Prefill call to the status the client receives, which is the worker's own status.

    The exception is CANCELLED, which becomes UNAVAILABLE. It can only come from the worker's side,
    such as a server shutting down, because this client's own cancellation raises CancelledError instead.
    """
    return grpc.StatusCode.UNAVAILABLE if error.code() == grpc.StatusCode.CANCELLED else error.code()


def _after_first_token_status(error: grpc.aio.AioRpcError) -> grpc.StatusCode:
    if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return error.code()
    return grpc.StatusCode.ABORTED


async def serve(
    tokenizer: PreTrainedTokenizerBase,
    prefill_addresses: list[str],
    decode_addresses: list[str],
    address: str = "127.0.0.1:0",
    policy: str = "least_loaded",
    max_context: int | None = None,
    prefill_policy: str = "least_loaded",
    registry_config: RegistryConfig = RegistryConfig(),
    metrics: RouterMetrics | None = None,
    tls: ServerTLS | None = None,
    peer_tls: ChannelTLS | None = None,
    auth_token: str | None = None,
    limits: RequestLimits = RequestLimits(),
    health_address: str | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start the router on `address` after one round of worker resolution and health checks.

    `policy` picks decode workers (round_robin, least_loaded or kv_aware) and `prefill_policy` picks
    prefill workers (least_loaded or round_robin). `tls` serves clients over TLS, `peer_tls` opens
    the channels to the workers with TLS, and `auth_token` requires that bearer token on every call
    except health checks and reflection. `limits` bounds what one request may ask for, and
    `max_context`, when given, replaces its `max_context`. `health_address`, when set, also serves the
    health checks alone there without TLS or token (for probes). Return the server and the bound port.
    Stopping the server also stops the worker registry and closes its channels.
    """
    if policy not in POLICIES:
        raise ValueError(f"invalid policy={policy!r}: expected one of {sorted(POLICIES)}")
    if prefill_policy not in PREFILL_POLICIES:
        raise ValueError(f"invalid prefill_policy={prefill_policy!r}: expected one of {PREFILL_POLICIES}")
    if max_context is not None:
        if not isinstance(max_context, int) or max_context < 2:
            raise ValueError(f"invalid max_context={max_context!r}: expected an integer >= 2 or None")
        limits = dataclasses.replace(limits, max_context=max_context)

    health_servicer = health.aio.HealthServicer()
    registry = WorkerRegistry(
        prefill_addresses,
        decode_addresses,
        registry_config,
        on_health_change=lambda: _publish_readiness(health_servicer, registry),
        tls=peer_tls,
    )
    # Without `metrics`, a registry of its own keeps tests and embedded routers apart.
    metrics = metrics or RouterMetrics("-", address, CollectorRegistry())
    servicer = RouterServicer(tokenizer, registry, policy, prefill_policy, limits, metrics)

    # Authentication runs first, so that an unauthenticated call gets UNAUTHENTICATED even when its request is malformed.
    interceptors = [] if auth_token is None else [BearerTokenInterceptor(auth_token)]
    server = grpc.aio.server(
        interceptors=[*interceptors, MalformedRequestInterceptor()],
        options=server_options(MAX_GENERATE_REQUEST_BYTES, MAX_REPLY_BYTES),
    )
    pb_grpc.add_RouterServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    port = add_port(server, address, tls)
    health_server = None if health_address is None else bind_health_server(health_servicer, health_address)
    if auth_token is not None and tls is None and not is_loopback_address(address):
        logger.warning(
            "the router requires a bearer token but serves %s without TLS, so tokens cross the network in clear text",
            address,
        )

    await registry.start()
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await _publish_readiness(health_servicer, registry)
    if health_server is not None:
        await start_health_server(health_server, server)
    _REGISTRY_CLOSERS[server] = asyncio.create_task(_close_after_termination(server, registry))
    logger.info(
        "router serving on port %d: decode policy %s, prefill policy %s, %s, prefill %s, decode %s, %s, "
        "TLS %s, client certificates %s, worker TLS %s, bearer token %s",
        port, policy, prefill_policy, limits, prefill_addresses, decode_addresses, registry_config,
        _on_off(tls), _on_off(tls and tls.client_ca_file), _on_off(peer_tls), _on_off(auth_token),
    )
    return server, port


def _on_off(setting: object) -> str:
    return "on" if setting else "off"


async def _publish_readiness(health_servicer: health.aio.HealthServicer, registry: WorkerRegistry) -> None:
    """Report the Router service SERVING only while both pools have a healthy worker.

    Readiness probes should check the Router service name. The empty service name stays SERVING while
    the process runs, for liveness probes.
    """
    ready = bool(registry.healthy(PREFILL)) and bool(registry.healthy(DECODE))
    status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set(SERVICE_NAME, status)


async def _close_after_termination(server: grpc.aio.Server, registry: WorkerRegistry) -> None:
    try:
        await server.wait_for_termination()
    finally:
        await registry.close()
        _REGISTRY_CLOSERS.pop(server, None)


async def stop(server: grpc.aio.Server, grace_s: float | None = None) -> None:
    """Stop a server started by `serve` and wait until its worker registry is closed."""
    closer = _REGISTRY_CLOSERS.get(server)
    await server.stop(grace_s)
    if closer is not None:
        await closer
