"""Helpers shared by the three gRPC servers: health and reflection registration, running until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)


async def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> health.aio.HealthServicer:
    """Register grpc.health.v1 (every service SERVING) and server reflection on `server`."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return health_servicer


async def wait_for_signal() -> None:
    """Return when the process receives SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def serve_until_signal(server: grpc.aio.Server, cleanup: Callable[[], Awaitable[None] | None] | None = None) -> None:
    """Run a started server until SIGINT or SIGTERM, then stop it with a short grace period."""
    await wait_for_signal()
    logger.info("shutting down")
    await server.stop(grace=5)
    if cleanup is not None:
        result = cleanup()
        if asyncio.iscoroutine(result):
            await result
