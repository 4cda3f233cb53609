"""The worker registry against fake workers over loopback: health thresholds, Status polls, resolution.

The tests call `check()` and `resolve()` themselves instead of starting the background tasks, so that
every health check they count is one they ran.
"""

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2

from router.policies import least_loaded
from router.registry import DECODE, RegistryConfig, WorkerRegistry, resolve_target, split_host_port
from tests.router.fakes import Cluster, FakeDecode, FakePrefill

THRESHOLDS = RegistryConfig(unhealthy_threshold=3, healthy_threshold=2, health_timeout_s=2.0)


@pytest.fixture
def cluster():
    running = Cluster()
    yield running
    running.close()


def test_health_thresholds(cluster):
    # Scenario: a healthy worker fails two checks (still healthy), fails a third (unhealthy), passes
    # one (still unhealthy), passes a second (healthy again).
    prefill = cluster.fake(FakePrefill())
    decode = cluster.fake(FakeDecode())

    async def scenario():
        registry = WorkerRegistry([prefill.address], [decode.address], THRESHOLDS)
        await registry.resolve()
        [worker] = registry.workers(DECODE)
        health = []

        async def check():
            await registry.check()
            health.append(worker.healthy)

        await check()
        decode.health.serving = False
        for _ in range(3):
            await check()
        decode.health.serving = True
        for _ in range(2):
            await check()
        await registry.close()
        return health, worker.last_error

    health, last_error = cluster.run(scenario())

    assert health == [True, True, True, False, False, True]
    assert last_error == "health status is NOT_SERVING"


def test_new_worker_healthy_after_first_success(cluster):
    # Start-up needs one successful check, not healthy_threshold of them.
    prefill = cluster.fake(FakePrefill())
    decode = cluster.fake(FakeDecode())
    decode.health.serving = False

    async def scenario():
        registry = WorkerRegistry([prefill.address], [decode.address], THRESHOLDS)
        await registry.resolve()
        [worker] = registry.workers(DECODE)
        await registry.check()
        before = worker.healthy
        decode.health.serving = True
        await registry.check()
        after = worker.healthy
        await registry.close()
        return before, after

    assert cluster.run(scenario()) == (False, True)


def check_stopped_decode(cluster, checks: int):
    """Run `checks` health checks on a registry whose decode worker has stopped; return its address and worker."""
    prefill = cluster.fake(FakePrefill())
    stopped = cluster.fake(FakeDecode())
    cluster.run(stopped.server.stop(None))

    async def scenario():
        registry = WorkerRegistry([prefill.address], [stopped.address], THRESHOLDS)
        await registry.resolve()
        for _ in range(checks):
            await registry.check()
        [worker] = registry.workers(DECODE)
        await registry.close()
        return worker

    return stopped.address, cluster.run(scenario())


def test_unreachable_worker_fails_checks(cluster):
    _, worker = check_stopped_decode(cluster, checks=1)

    assert not worker.healthy
    assert worker.consecutive_failures == 1
    assert worker.last_error.startswith("health check failed with UNAVAILABLE")


def test_never_healthy_worker_is_logged_once(cluster, caplog):
    # A worker that never passes a check stays unhealthy, so its state never changes. The registry
    # still warns once: after as many failed checks as would make a healthy worker unhealthy.
    with caplog.at_level(logging.WARNING, logger="router.registry"):
        address, _ = check_stopped_decode(cluster, checks=THRESHOLDS.unhealthy_threshold + 2)
    warnings = [r.getMessage() for r in caplog.records if "has failed its first" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"decode worker {address} has failed its first {THRESHOLDS.unhealthy_threshold} health checks "
        "and gets no requests: health check failed with UNAVAILABLE")


def test_health_check_asks_for_pool_service(cluster):
    # A worker that serves health but not the pool's service (here: the decode service asked of a
    # prefill server) fails its checks.
    prefill = cluster.fake(FakePrefill())
    wrong = cluster.fake(FakePrefill())

    async def scenario():
        registry = WorkerRegistry([prefill.address], [wrong.address], THRESHOLDS)
        await registry.start()
        [worker] = registry.workers(DECODE)
        await registry.close()
        return worker.healthy, worker.last_error

    healthy, last_error = cluster.run(scenario())

    assert not healthy
    assert "NOT_FOUND" in last_error


def test_decode_status_gives_free_kv_bytes(cluster):
    prefill = cluster.fake(FakePrefill())
    decode = cluster.fake(FakeDecode(kv_free_bytes=12_345))

    async def scenario():
        registry = WorkerRegistry([prefill.address], [decode.address], THRESHOLDS)
        await registry.start()
        loads = [worker.load() for worker in registry.workers(DECODE)]
        await registry.close()
        return loads

    [load] = cluster.run(scenario())

    assert load.kv_free_bytes == 12_345
    assert load.address == decode.address


def test_pick_counts_outstanding_requests(cluster):
    prefill = cluster.fake(FakePrefill())
    decodes = [cluster.fake(FakeDecode()) for _ in range(2)]

    async def scenario():
        registry = WorkerRegistry([prefill.address], [d.address for d in decodes], THRESHOLDS)
        await registry.start()
        first = registry.pick(DECODE, least_loaded)
        registry.acquire(first)
        second = registry.pick(DECODE, least_loaded)
        excluded = registry.pick(DECODE, least_loaded, exclude=[d.address for d in decodes])
        registry.release(first)
        outstanding = first.outstanding
        await registry.close()
        return first.address, second.address, excluded, outstanding

    first, second, excluded, outstanding = cluster.run(scenario())

    assert first != second
    assert excluded is None
    assert outstanding == 0


def test_resolution_adds_and_retires_workers(cluster):
    # Scenario: a headless Service name first resolves to two pods, then to one. The vanished pod's
    # worker leaves the pool at once, and its channel closes once its in-flight request ends.
    prefill = cluster.fake(FakePrefill())
    pods = [cluster.fake(FakeDecode()) for _ in range(2)]
    dns = {"decode.headless:50052": [pod.address for pod in pods]}

    async def resolver(target):
        if target not in dns:
            raise OSError(f"cannot resolve {target}")
        return list(dns[target])

    async def channel_closed(worker):
        try:
            await worker.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.aio.UsageError:
            return True
        return False

    async def scenario():
        registry = WorkerRegistry(["127.0.0.1:1"], ["decode.headless:50052"], THRESHOLDS, resolver=resolver)
        dns["127.0.0.1:1"] = [prefill.address]
        await registry.start()
        before = [w.address for w in registry.workers(DECODE)]
        vanished = registry.workers(DECODE)[0]
        registry.acquire(vanished)

        dns["decode.headless:50052"] = [pods[1].address]
        await registry.resolve()
        after = [w.address for w in registry.workers(DECODE)]
        closed_while_busy = await channel_closed(vanished)
        registry.release(vanished)
        await registry.check()
        closed_when_idle = await channel_closed(vanished)
        await registry.close()
        return before, after, vanished.retired, closed_while_busy, closed_when_idle

    before, after, retired, closed_while_busy, closed_when_idle = cluster.run(scenario())

    assert before == [pods[0].address, pods[1].address]
    assert after == [pods[1].address]
    assert retired
    assert not closed_while_busy
    assert closed_when_idle


def test_failed_resolution_keeps_last_addresses(cluster):
    prefill = cluster.fake(FakePrefill())
    decode = cluster.fake(FakeDecode())
    answers = {"prefill.svc:1": [prefill.address], "decode.svc:1": [decode.address]}

    async def resolver(target):
        if target not in answers:
            raise OSError(f"cannot resolve {target}")
        return list(answers[target])

    async def scenario():
        registry = WorkerRegistry(["prefill.svc:1"], ["decode.svc:1"], THRESHOLDS, resolver=resolver)
        await registry.resolve()
        answers.pop("decode.svc:1")
        await registry.resolve()
        addresses = [w.address for w in registry.workers(DECODE)]
        await registry.close()
        return addresses

    assert cluster.run(scenario()) == [decode.address]


def test_resolve_target_numeric_and_localhost():
    assert asyncio.run(resolve_target("127.0.0.1:50051")) == ["127.0.0.1:50051"]
    assert "127.0.0.1:50051" in asyncio.run(resolve_target("localhost:50051"))


@pytest.mark.parametrize(
    "target, expected",
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9", ("::1", 9)), ("decode-0.svc:50052", ("decode-0.svc", 50052))],
)
def test_split_host_port(target, expected):
    assert split_host_port(target) == expected


@pytest.mark.parametrize("target", ["127.0.0.1", ":80", "host:0", "host:70000", "host:http"])
def test_split_host_port_rejects_malformed(target):
    with pytest.raises(ValueError, match="invalid worker address"):
        split_host_port(target)


@pytest.mark.parametrize(
    "prefill, decode, message",
    [([], ["127.0.0.1:2"], "invalid prefill addresses"), (["127.0.0.1:1"], "127.0.0.1:2", "invalid decode addresses")],
)
def test_registry_rejects_bad_address_lists(prefill, decode, message):
    with pytest.raises(ValueError, match=message):
        WorkerRegistry(prefill, decode)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(health_interval_s=0), "health_interval_s=0"),
        (dict(unhealthy_threshold=0), "unhealthy_threshold=0"),
        (dict(healthy_threshold=1.5), "healthy_threshold=1.5"),
    ],
)
def test_registry_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        RegistryConfig(**options)
