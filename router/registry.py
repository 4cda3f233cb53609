"""Worker registry: the prefill and decode pools, their addresses, health and load.

Each pool is configured as a list of "host:port" targets. Every `resolve_interval_s` a host name is
resolved again with getaddrinfo, so a Kubernetes headless Service name expands to the IPs of its pods.
Each resolved address is one worker with its own gRPC channel. When an address disappears, its worker
stops receiving requests at once, and its channel is closed after its in-flight requests end.

Every `health_interval_s` each worker gets a grpc.health.v1 Check for its own service
(snapkv.serving.v1.Prefill or snapkv.serving.v1.Decode). A check fails on an RPC error, on a timeout
after `health_timeout_s`, or on any status other than SERVING. A healthy worker becomes unhealthy
after `unhealthy_threshold` consecutive failed checks, and an unhealthy one becomes healthy again
after `healthy_threshold` consecutive successful checks. A new worker starts unhealthy and becomes
healthy at its first successful check, so that start-up waits for one check instead of
`healthy_threshold`. Decode workers that pass the check are also asked for Decode.Status, which gives
their free KV memory to the kv_aware policy.

With TLS, each worker's certificate is checked against the host name of its configured target rather
than against the resolved IP, so a certificate for "decode.snapkv.svc" serves every pod behind that
name. A target given as an IP address is checked against that IP.

Limitations: health comes only from these periodic checks. A worker that fails requests while it
still reports SERVING keeps getting traffic, and only the router's single retry before the first
token protects the client. The free KV memory is as old as the last Status poll, so kv_aware sends
a burst of requests that arrives between two polls to the same worker.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.policies import WorkerLoad
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.transport import (
    MAX_PREFILL_REQUEST_BYTES,
    MAX_REPLY_BYTES,
    ChannelTLS,
    message_size_options,
    open_aio_channel,
)

logger = logging.getLogger(__name__)

PREFILL = "prefill"
DECODE = "decode"
POOL_SERVICES = {
    PREFILL: pb.DESCRIPTOR.services_by_name["Prefill"].full_name,
    DECODE: pb.DESCRIPTOR.services_by_name["Decode"].full_name,
}

# Prefill channels send whole prompts as token ids; decode channels send only handles and status polls.
CHANNEL_OPTIONS = {
    PREFILL: message_size_options(MAX_REPLY_BYTES, MAX_PREFILL_REQUEST_BYTES),
    DECODE: message_size_options(MAX_REPLY_BYTES, MAX_REPLY_BYTES),
}

Resolver = Callable[[str], Awaitable[list[str]]]


@dataclass(frozen=True)
class RegistryConfig:
    """How often workers are resolved and checked, and how many checks change their health."""

    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    resolve_interval_s: float = 10.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2

    def __post_init__(self) -> None:
        for name in ("health_interval_s", "health_timeout_s", "resolve_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"invalid {name}={value!r}: expected a number of seconds > 0")
        for name in ("unhealthy_threshold", "healthy_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"invalid {name}={value!r}: expected an integer >= 1")


def split_host_port(target: str) -> tuple[str, int]:
    """Split "host:port" or "[ipv6]:port"; raise ValueError naming the target when it is malformed."""
    host, separator, port = target.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid worker address {target!r}: expected host:port with a port in 1..65535")
    return host, int(port)


def tls_server_name(target: str) -> str | None:
    """Return the name a worker's certificate must carry: the target's host, or None for an IP address."""
    host, _ = split_host_port(target)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_target(target: str) -> list[str]:
    """Resolve a "host:port" target to the sorted "ip:port" addresses of all its hosts."""
    host, port = split_host_port(target)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({join_host_port(info[4][0], info[4][1]) for info in infos})


@dataclass(eq=False)
class Worker:
    """One resolved worker address: its channel, stubs, health state and load."""

    pool: str
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.PrefillStub | pb_grpc.DecodeStub
    health_stub: health_pb2_grpc.HealthStub
    healthy: bool = False
    was_ever_healthy: bool = False
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: str = "not checked yet"
    outstanding: int = 0  # requests the router has sent and not yet seen finish
    kv_free_bytes: int = 0  # decode workers only, from the last Status poll
    retired: bool = False  # its address no longer resolves, so the channel closes once idle

    def record_check(self, error: str | None, config: RegistryConfig) -> bool:
        """Count one health check result, where None is a success, and return whether `healthy` changed."""
        if error is None:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            recovered = self.consecutive_successes >= config.healthy_threshold or not self.was_ever_healthy
            if not self.healthy and recovered:
                self.healthy = self.was_ever_healthy = True
                return True
            return False

        self.last_error = error
        self.consecutive_failures += 1
        self.consecutive_successes = 0
        if self.healthy and self.consecutive_failures >= config.unhealthy_threshold:
            self.healthy = False
            return True
        return False

    def load(self) -> WorkerLoad:
        return WorkerLoad(self.address, self.outstanding, self.kv_free_bytes)


@dataclass
class _Pool:
    targets: tuple[str, ...]
    workers: dict[str, Worker] = field(default_factory=dict)  # by address, in order of discovery
    resolved: dict[str, list[str]] = field(default_factory=dict)  # last good resolution per target
    counter: int = 0  # round-robin position, advanced by every pick


class WorkerRegistry:
    """The prefill and decode workers, kept resolved and health-checked by two background tasks."""

    def __init__(
        self,
        prefill_addresses: Sequence[str],
        decode_addresses: Sequence[str],
        config: RegistryConfig = RegistryConfig(),
        resolver: Resolver = resolve_target,
        on_health_change: Callable[[], Awaitable[None]] | None = None,
        tls: ChannelTLS | None = None,
    ):
        self.config = config
        self._tls = tls
        self._resolver = resolver
        self._on_health_change = on_health_change
        self._pools: dict[str, _Pool] = {}
        for pool, targets in ((PREFILL, prefill_addresses), (DECODE, decode_addresses)):
            if isinstance(targets, str) or not targets:
                raise ValueError(f"invalid {pool} addresses {targets!r}: expected a non-empty list of host:port")
            for target in targets:
                split_host_port(target)
            self._pools[pool] = _Pool(tuple(targets))
        self._retired: list[Worker] = []
        self._failing_targets: set[str] = set()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Resolve and check every worker once, then keep doing both in the background."""
        await self.resolve()
        await self.check()
        self._tasks = [
            asyncio.create_task(self._repeat(self.config.resolve_interval_s, self.resolve)),
            asyncio.create_task(self._repeat(self.config.health_interval_s, self.check)),
        ]

    async def close(self) -> None:
        """Stop the background tasks and close every channel."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        workers = [w for pool in self._pools.values() for w in pool.workers.values()] + self._retired
        await asyncio.gather(*(worker.channel.close() for worker in workers))
        for pool in self._pools.values():
            pool.workers.clear()
        self._retired.clear()

    async def _repeat(self, interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step()
            except Exception:
                logger.exception("worker registry step %s failed; retrying in %.1f s", step.__name__, interval_s)

    def workers(self, pool: str) -> list[Worker]:
        """Return every current worker of `pool`, healthy or not, in order of discovery."""
        return list(self._pools[pool].workers.values())

    def healthy(self, pool: str, exclude: Iterable[str] = ()) -> list[Worker]:
        excluded = set(exclude)
        return [w for w in self._pools[pool].workers.values() if w.healthy and w.address not in excluded]

    def pick(
        self,
        pool: str,
        policy: Callable[[Sequence[WorkerLoad], int], WorkerLoad | None],
        exclude: Iterable[str] = (),
    ) -> Worker | None:
        """Pick a healthy worker of `pool` that is not in `exclude` with `policy`, or None if there is none."""
        state = self._pools[pool]
        candidates = self.healthy(pool, exclude)
        choice = policy([worker.load() for worker in candidates], state.counter)
        state.counter += 1
        return None if choice is None else state.workers[choice.address]

    def acquire(self, worker: Worker) -> None:
        worker.outstanding += 1

    def release(self, worker: Worker) -> None:
        worker.outstanding -= 1

    def describe(self, pool: str) -> str:
        """Summarise a pool's health for an error message, with the last error of each unhealthy worker."""
        state = self._pools[pool]
        workers = list(state.workers.values())
        num_healthy = sum(worker.healthy for worker in workers)
        text = f"{num_healthy} of {len(workers)} {pool} workers are healthy (configured: {', '.join(state.targets)})"
        failures = [f"{w.address}: {w.last_error}" for w in workers if not w.healthy][:3]
        return text + ("; " + "; ".join(failures) if failures else "")

    async def resolve(self) -> None:
        """Resolve every target again, adding workers for new addresses and retiring the vanished ones."""
        for pool_name, pool in self._pools.items():
            addresses: dict[str, str] = {}  # resolved address -> the target it came from
            for target in pool.targets:
                for address in await self._resolve_target(pool, target):
                    addresses.setdefault(address, target)

            for address, target in addresses.items():
                if address not in pool.workers:
                    pool.workers[address] = self._connect(pool_name, address, target)
                    logger.info("added %s worker %s", pool_name, address)
            for address in [address for address in pool.workers if address not in addresses]:
                worker = pool.workers.pop(address)
                worker.retired = True
                self._retired.append(worker)
                logger.info("removed %s worker %s: its address no longer resolves", pool_name, address)
        await self._close_idle_retired()

    async def _resolve_target(self, pool: _Pool, target: str) -> list[str]:
        """Resolve one target. On failure, return its last good addresses and warn once until it recovers."""
        try:
            addresses = await self._resolver(target)
        except OSError as error:
            if target not in self._failing_targets:
                logger.warning(
                    "could not resolve worker address %s (%s); keeping its last %d addresses",
                    target, error, len(pool.resolved.get(target, [])),
                )
                self._failing_targets.add(target)
            return pool.resolved.get(target, [])

        if target in self._failing_targets:
            logger.info("worker address %s resolves again", target)
            self._failing_targets.discard(target)
        pool.resolved[target] = addresses
        return addresses

    def _connect(self, pool: str, address: str, target: str) -> Worker:
        tls = None if self._tls is None else self._tls.with_server_name(tls_server_name(target))
        channel = open_aio_channel(address, tls, CHANNEL_OPTIONS[pool])
        stub = pb_grpc.PrefillStub(channel) if pool == PREFILL else pb_grpc.DecodeStub(channel)
        return Worker(pool, address, channel, stub, health_pb2_grpc.HealthStub(channel))

    async def _close_idle_retired(self) -> None:
        idle = [worker for worker in self._retired if worker.outstanding == 0]
        self._retired = [worker for worker in self._retired if worker.outstanding > 0]
        await asyncio.gather(*(worker.channel.close() for worker in idle))

    async def check(self) -> None:
        """Run one health check on every worker, and one Status poll on every healthy decode worker."""
        workers = [w for pool in self._pools.values() for w in pool.workers.values()]
        changes = await asyncio.gather(*(self._check_worker(worker) for worker in workers))
        await self._close_idle_retired()
        if any(changes) and self._on_health_change is not None:
            await self._on_health_change()

    async def _check_worker(self, worker: Worker) -> bool:
        error = await self._probe(worker)
        changed = worker.record_check(error, self.config)
        if changed and worker.healthy:
            logger.info("%s worker %s is healthy", worker.pool, worker.address)
        elif changed:
            logger.warning(
                "%s worker %s is unhealthy after %d failed health checks: %s",
                worker.pool, worker.address, worker.consecutive_failures, error,
            )
        elif not worker.was_ever_healthy and worker.consecutive_failures == self.config.unhealthy_threshold:
            # A worker starts unhealthy, so one that never passes a check changes no state; warn once.
            logger.warning(
                "%s worker %s has failed its first %d health checks and gets no requests: %s",
                worker.pool, worker.address, worker.consecutive_failures, error,
            )
        if worker.pool == DECODE and error is None:
            await self._poll_status(worker)
        return changed

    async def _probe(self, worker: Worker) -> str | None:
        """Run one grpc.health.v1 Check and return None if the worker is SERVING, else the failure."""
        request = health_pb2.HealthCheckRequest(service=POOL_SERVICES[worker.pool])
        try:
            reply = await worker.health_stub.Check(request, timeout=self.config.health_timeout_s)
        except grpc.aio.AioRpcError as error:
            return f"health check failed with {error.code().name}: {error.details()}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"health status is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None

    async def _poll_status(self, worker: Worker) -> None:
        try:
            status = await worker.stub.Status(pb.StatusRequest(), timeout=self.config.health_timeout_s)
        except grpc.aio.AioRpcError as error:
            # The health check decides whether the worker gets traffic. A stale free-memory figure
            # only makes kv_aware less precise.
            logger.debug("Status of decode worker %s failed: %s", worker.address, error.code().name)
            return
        worker.kv_free_bytes = max(0, status.kv_budget_bytes - status.kv_resident_bytes)
