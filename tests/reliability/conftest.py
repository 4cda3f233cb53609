"""One stack for the reliability tests: two decode workers, prefill (local Ray, one actor) and the
router, as separate processes on loopback with the tiny random-weight Llama. `running_stack` also
starts the variant with two prefill actors that `tests/prefill_retry` uses.

The decode workers get small KV budgets (4 MiB and 1 MiB) so that admission control is easy to
reach, and a 3 s lease so that an unstreamed cache is freed quickly. They store caches in fp32
(`--kv-dtype fp32`, where the default stores this fp32 model's in fp16), so that the sizes in these
tests are those of fp32 keys and values. Tests that kill a worker start it again before they end, so
the next test finds the whole stack running.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from snapkv.cli_services import LocalStack, free_port
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc

TINY = "tiny-llama"
DECODE_WORKERS = ("decode", "decode-2")
KV_BUDGET_MIB = {"decode": 4, "decode-2": 1}
LEASE_S = 3.0
# tiny-llama keeps 2 layers x 2 KV heads x head dim 16 in fp32 (`--kv-dtype fp32`), for keys and
# values: 512 bytes per position.
KV_BYTES_PER_POSITION = 2 * 2 * 2 * 16 * 4
COMPRESSION = dict(budget=64, window=8, kernel=5)
STARTUP_TIMEOUT_S = 300.0
RELEASE_TIMEOUT_S = 5.0  # a finished, cancelled or failed request frees its KV within this time


@contextmanager
def running_stack(prefill_actors: int) -> Iterator[LocalStack]:
    """Start the stack described above with `prefill_actors` Ray actors; stop it on exit."""
    options = {name: ["--kv-budget-mib", str(mib)] for name, mib in KV_BUDGET_MIB.items()}
    if prefill_actors > 1:
        # One core per actor: the tiny model needs no more, and Ray then fits the actors on two cores.
        options["prefill"] = ["--actors", str(prefill_actors), "--cpus-per-actor", "1"]
    running = LocalStack(
        TINY,
        metrics_port=free_port(),
        num_decode_workers=len(DECODE_WORKERS),
        decode_options=("--lease-s", str(LEASE_S), "--kv-dtype", "fp32"),
        service_options=options,
    )
    with running:
        # The decode workers load the model at the same time; prefill and router then start in order.
        with ThreadPoolExecutor(len(DECODE_WORKERS)) as starting:
            list(starting.map(lambda name: running.start_one(name, STARTUP_TIMEOUT_S), DECODE_WORKERS))
        for name in ("prefill", "router"):
            running.start_one(name, STARTUP_TIMEOUT_S)
        yield running


@pytest.fixture(scope="package")
def stack():
    with running_stack(prefill_actors=1) as running:
        yield running


def wait_until(condition, timeout_s: float = 10.0, message: str = "condition not reached") -> float:
    """Poll `condition` until it is true; return the seconds it took, or fail after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{message} within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def decode_status(stack: LocalStack, name: str) -> pb.StatusResponse:
    with grpc.insecure_channel(stack.address(name)) as channel:
        return pb_grpc.DecodeStub(channel).Status(pb.StatusRequest(), timeout=5)


def metric(stack: LocalStack, service: str, name: str, **labels: str) -> float:
    """Return the sum of the samples called `name` whose labels include `labels`, from one service's /metrics."""
    url = f"http://127.0.0.1:{stack.metrics_ports[service]}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def nothing_held(stack: LocalStack) -> bool:
    """Return whether no decode worker has KV reserved or a sequence running, and prefill has no call in flight."""
    for name in DECODE_WORKERS:
        status = decode_status(stack, name)
        if status.kv_resident_bytes or status.active_sequences or status.queue_depth:
            return False
    return metric(stack, "prefill", "snapkv_prefill_in_flight") == 0


def assert_nothing_held(stack: LocalStack, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
    wait_until(lambda: nothing_held(stack), timeout_s, "KV, sequences or prefill calls still held")
