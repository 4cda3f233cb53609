"""Prefill gRPC server: the Prefill service in front of a pool of Ray prefill actors.

Statuses: INVALID_ARGUMENT for a bad request; UNAVAILABLE when no actor is ready or one died during
the request; CANCELLED when the client goes away. A failed KV transfer returns decode's status
(RESOURCE_EXHAUSTED from a full worker, FAILED_PRECONDITION from another model), except that decode's
INVALID_ARGUMENT becomes INTERNAL and its CANCELLED or a transfer timeout become UNAVAILABLE. Every
failure carries the trailing metadata `snapkv-failed-peer`: "prefill", or "decode <host:port>" when
the decode worker failed, so that a retrying router can avoid that worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc
import ray
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from prefill_service.config import PrefillConfig
from prefill_service.local_ray import init_local_ray
from prefill_service.metrics import PrefillMetrics
from prefill_service.pool import ActorPool, RequestFailed
from snapkv.model import DEFAULT_MODEL
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.serving import MalformedRequestInterceptor, add_health_and_reflection, bind_health_server, start_health_server
from snapkv.transport import MAX_PREFILL_REQUEST_BYTES, MAX_REPLY_BYTES, ServerTLS, add_port, server_options

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Prefill"].full_name
FAILED_PEER_KEY = "snapkv-failed-peer"


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(self, pool: ActorPool, metrics: PrefillMetrics):
        self.pool = pool
        self.metrics = metrics

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            response = await self.pool.prefill(request.SerializeToString())
        except RequestFailed as failure:
            self._log_failure(request.request_id or "(no id)", failure)
            self.metrics.count(failure.code.name)
            await context.abort(failure.code, failure.message, trailing_metadata=((FAILED_PEER_KEY, failure.failed_peer),))
        except asyncio.CancelledError:
            elapsed_s = time.perf_counter() - started
            logger.info("prefill %s: cancelled by the client after %.3f s", request.request_id, elapsed_s)
            self.metrics.count(grpc.StatusCode.CANCELLED.name)
            raise
        finally:
            self.metrics.in_flight.dec()

        response.queue_s = max(0.0, time.perf_counter() - started - response.prefill_s - response.transfer_s)
        self.metrics.observe(response)
        self.metrics.count(grpc.StatusCode.OK.name)
        _log_success(request.request_id, response)
        return response

    @staticmethod
    def _log_failure(request_id: str, failure: RequestFailed) -> None:
        if failure.code == grpc.StatusCode.INTERNAL:
            logger.error("prefill %s: status INTERNAL: %s", request_id, failure.message, exc_info=failure)
        else:
            logger.warning(
                "prefill %s: status %s from %s: %s", request_id, failure.code.name, failure.failed_peer, failure.message
            )


def _log_success(request_id: str, response: pb.PrefillResponse) -> None:
    sent = f"{response.kv_bytes_sent} KV bytes sent" if response.handle else "finished at its first token, no KV sent"
    logger.info(
        "prefill %s: %d prompt tokens, %d kept (ratio %.2f), prefill %.3f s, transfer %.3f s, queue %.3f s, %s, status OK",
        request_id, response.prompt_tokens, response.kept_tokens, response.prompt_tokens / response.kept_tokens,
        response.prefill_s, response.transfer_s, response.queue_s, sent,
    )


async def serve(
    model_spec: str = DEFAULT_MODEL,
    address: str = "127.0.0.1:0",
    num_actors: int = 1,
    cpus_per_actor: int | None = None,
    ray_address: str | None = None,
    *,
    metrics: PrefillMetrics | None = None,
    tls: ServerTLS | None = None,
    health_address: str | None = None,
    **settings,
) -> tuple[grpc.aio.Server, int]:
    """Start the actors, wait until each has loaded the model, then serve Prefill on `address`.

    Uses the Ray this process is already connected to. Otherwise it connects to `ray_address`, or
    starts a local Ray on loopback when `ray_address` is None (see `prefill_service.local_ray`).
    `cpus_per_actor` None shares this machine's cores among the actors. `tls` serves over TLS, and
`health_address`, when set, also serves the health checks alone there without TLS (for probes).
    `settings` are further `PrefillConfig` fields, `decode_tls` among them for the KV transfers.
    `metrics` defaults to a `PrefillMetrics` in a registry of its own. Returns the server and the
    bound port. `await shutdown(server)` stops the server, kills the actors and stops a Ray that
    `serve` started.
    """
    if cpus_per_actor is None:
        cpus_per_actor = max(1, (os.cpu_count() or 1) // num_actors)
    config = PrefillConfig(num_actors=num_actors, cpus_per_actor=cpus_per_actor, **settings)
    metrics = metrics or PrefillMetrics(model_spec, address, CollectorRegistry())

    # Ray starts before this process creates a gRPC server: with a server created first, 2 of 10 local
    # Ray start-ups timed out, their forked GCS or raylet never starting (gRPC's threads and fork).
    owns_ray = _connect_ray(ray_address, config.num_actors * config.cpus_per_actor)
    server = grpc.aio.server(
        interceptors=[MalformedRequestInterceptor()],
        options=server_options(MAX_PREFILL_REQUEST_BYTES, MAX_REPLY_BYTES),
    )
    # Bound before the actors load, which takes seconds: in the test suite, a port chosen for this
    # server was taken in that time (Ray's own processes bind free ports). Serving starts later.
    # NOTE: if starting fails, the port stays bound until this process exits: grpc.aio releases the
    # port of a server that never started only then (checked with grpcio 1.85; stop() does not).
    port = add_port(server, address, tls)
    num_gpus = config.gpus_per_actor
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    pool = ActorPool(model_spec, config, num_gpus, metrics)

    async def shutdown_actors() -> None:
        await pool.close()
        if owns_ray:
            ray.shutdown()

    try:
        await pool.start()
        pb_grpc.add_PrefillServicer_to_server(PrefillServicer(pool, metrics), server)
        # Handlers must be registered before the server starts; every actor has loaded by now, so SERVING is true.
        health = await add_health_and_reflection(server, [SERVICE_NAME])
        health_server = None if health_address is None else bind_health_server(health, health_address)
        await server.start()
        if health_server is not None:
            await start_health_server(health_server, server)
    except BaseException:
        await shutdown_actors()
        raise
    health_updates: set[asyncio.Task] = set()  # referenced until done, so that no update is garbage-collected

    def update_health() -> None:
        task = asyncio.ensure_future(_set_health(health, pool.num_ready > 0))
        health_updates.add(task)
        task.add_done_callback(health_updates.discard)

    pool.on_change = update_health

    # grpc.aio.Server has no place for owned resources, so they ride on it: the command line calls
    # `shutdown_actors` after `server.stop()`, and tests reach the actors through `prefill_pool`.
    server.shutdown_actors = shutdown_actors
    server.prefill_pool = pool
    logger.info(
        "prefill server serving %s on port %d: num_actors=%d, cpus_per_actor=%d, gpus_per_actor=%s, "
        "transfer_timeout_s=%.0f, prefill weights %s, default %s, TLS %s, client certificates %s, TLS to decode %s",
        model_spec, port, config.num_actors, config.cpus_per_actor, num_gpus, config.transfer_timeout_s,
        config.weights, config.compression, "on" if tls else "off",
        "required" if tls and tls.client_ca_file else "not required", "on" if config.decode_tls else "off",
    )
    return server, port


async def shutdown(server: grpc.aio.Server, grace_s: float | None = 5.0) -> None:
    """Stop a server made by `serve`, waiting up to `grace_s` for calls in progress, then kill its actors."""
    await server.stop(grace_s)
    await server.shutdown_actors()


def _connect_ray(ray_address: str | None, num_cpus_needed: int) -> bool:
    """Make sure this process is connected to Ray; return True when this call connected it."""
    if ray.is_initialized():
        return False
    if ray_address is None:
        num_cores = os.cpu_count() or 1
        if num_cpus_needed > num_cores:
            # Ray would never schedule the last actors; the actors share the cores instead.
            logger.warning(
                "the prefill actors request %d CPUs in total but this machine has %d cores", num_cpus_needed, num_cores
            )
        init_local_ray(max(num_cores, num_cpus_needed))
    else:
        ray.init(address=ray_address)
    return True


async def _set_health(health, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health.set(name, status)
