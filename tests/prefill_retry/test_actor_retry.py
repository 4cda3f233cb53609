"""Prefill actors killed during a request, on `tests.reliability`'s stack with two Ray actors.

When one actor dies, the router's one retry finishes the request on the other actor. When every
actor is gone, the client gets UNAVAILABLE before any token.
"""

import threading
import time

import grpc
import psutil
import pytest

from tests.reliability.conftest import assert_nothing_held, metric, running_stack, wait_until
from tests.reliability.test_faults import (
    BLOCKING_PROMPT,
    consume,
    prefill_actor_processes,
    prefill_in_flight,
    request_succeeds,
    retries,
)

PREFILL_ACTORS = 2
CPU_SAMPLE_S = 0.05


@pytest.fixture(scope="module")
def stack():
    with running_stack(PREFILL_ACTORS) as running:
        yield running


def busy_actor(stack) -> psutil.Process:
    """Return the prefill actor process that runs the request in flight: the first one seen using the CPU.

    The samples are short because the tiny model's prefill of the blocking prompt took under half a
    second on one 2-core machine (about 3 s on another), and the actor must be killed before it ends.
    """
    actors = prefill_actor_processes(stack)
    assert len(actors) == PREFILL_ACTORS
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        before = [cpu_seconds(actor) for actor in actors]
        time.sleep(CPU_SAMPLE_S)
        used = [cpu_seconds(actor) - start for actor, start in zip(actors, before)]
        if max(used) > 0:
            return actors[used.index(max(used))]
    pytest.fail("no prefill actor used the CPU while a request was in flight")


def cpu_seconds(process: psutil.Process) -> float:
    user, system = process.cpu_times()[:2]
    return user + system


def ready_actors(stack) -> float:
    return metric(stack, "prefill", "snapkv_prefill_ready_actors")


def kill_during_prefill(stack, kill) -> dict:
    """Stream a request with a long prompt, call `kill` while an actor runs it, and return the result."""
    result = {}
    thread = threading.Thread(target=consume, args=(stack.address("router"), BLOCKING_PROMPT, 8, result))
    thread.start()
    wait_until(lambda: prefill_in_flight(stack) == 1, 10, "the request did not reach prefill")
    kill()
    thread.join(60)
    assert not thread.is_alive()
    return result


def test_killed_prefill_actor_retried_on_another(stack):
    # Scenario: the actor running a request dies before any token is sent. The router retries the
    # request once. The pool sends it to the other actor, and the client gets every token. Ray
    # restarts the dead actor, and the pool takes it back.
    assert ready_actors(stack) == PREFILL_ACTORS
    restarts_before = metric(stack, "prefill", "snapkv_prefill_actor_restarts_total")
    retries_before = retries(stack)

    result = kill_during_prefill(stack, lambda: busy_actor(stack).kill())

    assert "error" not in result, result.get("error")
    assert sum(len(delta.token_ids) for delta in result["deltas"]) == 8
    assert result["summary"].finish_reason == "length"
    assert retries(stack) - retries_before == 1
    assert metric(stack, "prefill", "snapkv_prefill_actor_restarts_total") - restarts_before == 1
    wait_until(lambda: ready_actors(stack) == PREFILL_ACTORS, 120, "the actor did not return")
    assert_nothing_held(stack)


def test_killed_prefill_actors_fail_cleanly_then_restart(stack):
    # Scenario: every prefill actor dies while one of them runs a request. The router's one retry
    # finds no live actor, so the client gets UNAVAILABLE before any token. Ray restarts the
    # actors, the pool takes them back, and the next request succeeds.
    assert ready_actors(stack) == PREFILL_ACTORS
    retries_before = retries(stack)

    def kill_all() -> None:
        busy = busy_actor(stack)
        for actor in prefill_actor_processes(stack):
            if actor.pid != busy.pid:
                actor.kill()
        busy.kill()

    result = kill_during_prefill(stack, kill_all)

    assert result["deltas"] == []
    assert result["error"].code == grpc.StatusCode.UNAVAILABLE
    assert "prefill actor" in result["error"].details
    assert retries(stack) - retries_before == 1

    wait_until(lambda: ready_actors(stack) == PREFILL_ACTORS, 120, "the actors did not return")
    # The router takes the prefill server back after two successful health checks. Until then every
    # request fails at once with UNAVAILABLE.
    wait_until(lambda: request_succeeds(stack), 20, "no request succeeded after the actors restarted")
    assert_nothing_held(stack)
