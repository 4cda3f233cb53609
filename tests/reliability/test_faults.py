"""Faults on the running stack: a decode worker or a prefill actor killed during a request, cancellation
at each stage, a cache that nobody streams, no healthy worker, and max_tokens = 1.

Bounds stated here: a killed decode worker's stream fails within 3 s, and the router stops choosing
that worker within 20 s (it takes three failed health checks, 2 s apart by default). Cancelling after
the first token frees every cache within 2 s. A cancelled prefill leaves the server's in-flight count
within 5 s. Cancelling during prefill cannot stop the forward pass, which runs to its end, but no KV
cache is sent afterwards. A cache that no client streams is freed within its lease (3 s here, 30 s
by default) plus 1 s.
"""

import signal
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest

from router.client import Delta, SnapKVClient, SnapKVError, Summary
from snapkv.cli_services import LOOPBACK, free_port, wait_healthy
from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Request
from snapkv.messages import model_fingerprint
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.text import prompt_ids
from snapkv.wire import encode_kv, load_kv_requests
from tests.conftest import tiny_engine
from tests.reliability.conftest import (
    COMPRESSION,
    DECODE_WORKERS,
    KV_BYTES_PER_POSITION,
    LEASE_S,
    RELEASE_TIMEOUT_S,
    STARTUP_TIMEOUT_S,
    TINY,
    assert_nothing_held,
    decode_status,
    metric,
    nothing_held,
    wait_until,
)

LONG_MAX_TOKENS = 1500  # 64 kept positions plus 1500 fit the 1 MiB worker's 2048 positions
BLOCKING_PROMPT = "a" * 8000  # 8000 tokens: about 3 s of prefill on a 2-core CPU
CANCEL_RELEASE_S = 2.0


def prompt(index: int) -> str:
    return f"request {index}: " + "the quick brown fox jumps over the lazy dog " * 6


def generation_request(text: str, max_tokens: int) -> pb.GenerateRequest:
    compression = pb.Compression(**COMPRESSION)
    return pb.GenerateRequest(prompt=text, sampling=pb.SamplingParams(max_tokens=max_tokens), compression=compression)


def generate(stack, text: str, max_tokens: int) -> tuple[list[int], Summary]:
    with SnapKVClient(stack.address("router"), timeout_s=60) as client:
        items = list(client.generate(text, max_tokens=max_tokens, **COMPRESSION))
    return [token for item in items[:-1] for token in item.token_ids], items[-1]


def consume(address: str, text: str, max_tokens: int, result: dict) -> None:
    """Stream one request into `result`: its deltas, then its summary or its error, and when it ended."""
    result["deltas"] = []
    with SnapKVClient(address, timeout_s=120) as client:
        try:
            for item in client.generate(text, max_tokens=max_tokens, **COMPRESSION):
                if isinstance(item, Delta):
                    result["deltas"].append(item)
                else:
                    result["summary"] = item
        except SnapKVError as error:
            result["error"] = error
    result["ended_at"] = time.monotonic()


def retries(stack) -> float:
    return metric(stack, "router", "snapkv_router_retries_total")


def prefill_in_flight(stack) -> float:
    return metric(stack, "prefill", "snapkv_prefill_in_flight")


def active_sequences(stack) -> list[int]:
    return [decode_status(stack, name).active_sequences for name in DECODE_WORKERS]


def test_killed_decode_worker_spares_other_streams(stack):
    # Scenario: one long stream runs on each decode worker, and decode-2 is killed. Its stream fails
    # promptly while the other one finishes. The router routes around decode-2 until it is started
    # again on the same port, then uses it again, and it decodes exactly as before.
    expected, _ = generate(stack, prompt(0), 24)
    streams = [{}, {}]
    threads = []
    # The tiny model's greedy output for these two prompts runs to 1500 and 1282 tokens.
    for index, (result, text) in enumerate(zip(streams, [prompt(0), prompt(11)])):
        thread = threading.Thread(target=consume, args=(stack.address("router"), text, LONG_MAX_TOKENS, result))
        thread.start()
        threads.append(thread)
        wait_until(lambda: sum(active_sequences(stack)) == index + 1, 20, f"stream {index} did not start decoding")
    assert active_sequences(stack) == [1, 1]

    stack.processes["decode-2"].kill()
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(120)
    failed = [result for result in streams if "error" in result]
    finished = [result for result in streams if "summary" in result]
    assert len(failed) == 1
    assert len(finished) == 1
    error = failed[0]["error"]
    assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
    assert "the output is incomplete" in error.details
    assert failed[0]["ended_at"] - killed_at < 3.0
    summary = finished[0]["summary"]
    assert summary.finish_reason in ("stop", "length")
    assert summary.completion_tokens == sum(len(delta.token_ids) for delta in finished[0]["deltas"])
    assert summary.completion_tokens > 100

    # Until its health checks fail, a request sent to decode-2 is retried on the other worker. Each
    # request alternates between the two, so two requests without a retry mean decode-2 is out.
    def routed_without_retry() -> bool:
        before = retries(stack)
        for _ in range(2):
            generate(stack, prompt(9), 4)
        return retries(stack) == before

    wait_until(routed_without_retry, 20, "the router kept choosing the killed decode worker")
    before = retries(stack)
    for _ in range(4):
        generate(stack, prompt(9), 4)
    assert retries(stack) == before

    stack.start_one("decode-2", STARTUP_TIMEOUT_S)
    restarted = decode_status(stack, "decode-2")
    assert (restarted.kv_resident_bytes, restarted.active_sequences) == (0, 0)

    def served_by_restarted_worker() -> bool:
        tokens, _ = generate(stack, prompt(0), 24)
        assert tokens == expected
        return metric(stack, "decode-2", "snapkv_decode_generated_tokens_total") > 0

    wait_until(served_by_restarted_worker, 30, "the router did not use the restarted decode worker")
    assert_nothing_held(stack)


def test_cancel_before_and_during_prefill_sends_no_kv(stack):
    # Scenario: a long prompt occupies the only prefill actor, and a second request waits in Ray's
    # queue behind it. The client cancels the waiting request, then the running one. Neither sends a
    # KV cache, and the actor serves the next request once its forward pass ends.
    sent_before = metric(stack, "prefill", "snapkv_prefill_kv_sent_bytes_total")
    cancelled_before = metric(stack, "prefill", "snapkv_prefill_requests_total", code="CANCELLED")
    with grpc.insecure_channel(stack.address("router")) as channel:
        stub = pb_grpc.RouterStub(channel)
        running = stub.Generate(generation_request(BLOCKING_PROMPT, 8), timeout=60)
        wait_until(lambda: prefill_in_flight(stack) == 1, 10, "the long prompt did not reach prefill")
        queued = stub.Generate(generation_request(prompt(3), 8), timeout=60)
        wait_until(lambda: prefill_in_flight(stack) == 2, 10, "the second request did not reach prefill")

        queued.cancel()
        # RELEASE_TIMEOUT_S, not CANCEL_RELEASE_S: the busy actor and Ray compete for CPU with the router
        # and this test, and on a 2-core machine the queued prefill once took over 2 s to leave.
        wait_until(lambda: prefill_in_flight(stack) == 1, RELEASE_TIMEOUT_S, "the queued prefill was not cancelled")
        running.cancel()
        wait_until(lambda: prefill_in_flight(stack) == 0, RELEASE_TIMEOUT_S, "the running prefill was not cancelled")

    tokens, summary = generate(stack, prompt(4), 8)
    assert len(tokens) == 8
    assert metric(stack, "prefill", "snapkv_prefill_kv_sent_bytes_total") - sent_before == summary.kv_bytes_sent
    assert metric(stack, "prefill", "snapkv_prefill_requests_total", code="CANCELLED") - cancelled_before == 2
    assert_nothing_held(stack)


def test_cancel_after_first_token_frees_kv_at_once(stack):
    # A client that cancels right after the first token often does so before the router has called
    # Decode.Stream. The router then frees the cache with Decode.Release rather than leave it to the lease.
    with grpc.insecure_channel(stack.address("router")) as channel:
        stub = pb_grpc.RouterStub(channel)
        for index in range(3):
            call = stub.Generate(generation_request(prompt(5 + index), LONG_MAX_TOKENS), timeout=60)
            first = next(call)
            assert len(first.delta.token_ids) == 1
            call.cancel()
            wait_until(lambda: nothing_held(stack), CANCEL_RELEASE_S, "KV still held after cancelling")


def test_cancel_during_decode_frees_kv_at_once(stack):
    with grpc.insecure_channel(stack.address("router")) as channel:
        call = pb_grpc.RouterStub(channel).Generate(generation_request(prompt(8), LONG_MAX_TOKENS), timeout=60)
        for _ in range(4):
            next(call)
        assert sum(active_sequences(stack)) == 1
        call.cancel()
        wait_until(lambda: nothing_held(stack), CANCEL_RELEASE_S, "KV still held after cancelling during decode")


def test_unstreamed_cache_expires_and_is_counted(stack):
    # A cache loaded straight into a decode worker, and never streamed, is freed when its lease ends.
    engine = tiny_engine()
    ids = tuple(prompt_ids(engine.tokenizer, prompt(10)))
    request = Request("unstreamed", ids, SamplingParams(max_tokens=16), CompressionConfig(**COMPRESSION))
    [result] = engine.prefill([request])
    header, chunks = encode_kv(
        result.cache, request_id=request.request_id, model=model_fingerprint(engine.model),
        first_token_id=result.first_token, prompt_ids=ids, sampling=request.sampling,
        compression=request.compression, wire_dtype=pb.WIRE_DTYPE_FP16,
    )
    expirations_before = metric(stack, "decode", "snapkv_decode_lease_expirations_total")

    with grpc.insecure_channel(stack.address("decode")) as channel:
        stub = pb_grpc.DecodeStub(channel)
        loaded = stub.LoadKV(load_kv_requests(header, chunks), timeout=10)
        loaded_at = time.monotonic()
        assert loaded.lease_s == LEASE_S
        assert decode_status(stack, "decode").kv_resident_bytes == (COMPRESSION["budget"] + 16) * KV_BYTES_PER_POSITION

        wait_until(lambda: decode_status(stack, "decode").kv_resident_bytes == 0, LEASE_S + 2.0, "the lease did not expire")
        assert time.monotonic() - loaded_at >= LEASE_S - 0.1
        assert metric(stack, "decode", "snapkv_decode_lease_expirations_total") - expirations_before == 1
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Stream(pb.StreamRequest(handle=loaded.handle), timeout=10))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "lease expired" in error.value.details()


def test_max_tokens_one_returns_first_token_only(stack):
    engine = tiny_engine()
    text = prompt(11)
    ids = tuple(prompt_ids(engine.tokenizer, text))
    request = Request("one", ids, SamplingParams(max_tokens=1), CompressionConfig(**COMPRESSION))
    [local] = engine.prefill([request])
    generated_before = [metric(stack, name, "snapkv_decode_generated_tokens_total") for name in DECODE_WORKERS]

    tokens, summary = generate(stack, text, 1)

    assert tokens == [local.first_token]
    assert summary.completion_tokens == 1
    assert summary.finish_reason == ("stop" if local.first_token == engine.tokenizer.eos_token_id else "length")
    assert summary.kv_bytes_sent == 0
    assert [metric(stack, name, "snapkv_decode_generated_tokens_total") for name in DECODE_WORKERS] == generated_before
    assert_nothing_held(stack)


def prefill_actor_processes(stack) -> list[psutil.Process]:
    prefill = psutil.Process(stack.processes["prefill"].pid)
    return [child for child in prefill.children(recursive=True) if "PrefillActor" in " ".join(child.cmdline())]


def request_succeeds(stack) -> bool:
    """Send a short request; return whether it streamed its tokens, or False on UNAVAILABLE."""
    try:
        tokens, _ = generate(stack, prompt(12), 4)
    except SnapKVError as error:
        assert error.code == grpc.StatusCode.UNAVAILABLE
        return False
    assert len(tokens) == 4
    return True


def test_killed_prefill_actor_fails_cleanly_then_restarts(stack):
    # Scenario: the only prefill actor dies during a request. The router retries once, which finds no
    # ready actor, so the client gets UNAVAILABLE before any token. Ray restarts the actor, the pool
    # takes it back, and the next request succeeds.
    [actor] = prefill_actor_processes(stack)
    restarts_before = metric(stack, "prefill", "snapkv_prefill_actor_restarts_total")
    retries_before = retries(stack)
    result = {}
    thread = threading.Thread(target=consume, args=(stack.address("router"), BLOCKING_PROMPT, 8, result))
    thread.start()
    wait_until(lambda: prefill_in_flight(stack) == 1, 10, "the request did not reach prefill")
    actor.kill()
    thread.join(60)

    assert result["deltas"] == []
    assert result["error"].code == grpc.StatusCode.UNAVAILABLE
    assert "prefill actor" in result["error"].details
    assert retries(stack) - retries_before == 1
    assert metric(stack, "prefill", "snapkv_prefill_actor_restarts_total") - restarts_before == 1

    wait_until(lambda: metric(stack, "prefill", "snapkv_prefill_ready_actors") == 1, 120, "the actor did not return")

    # The router takes the prefill server back after two successful health checks; until then every
    # request fails at once with UNAVAILABLE.
    wait_until(lambda: request_succeeds(stack), 20, "no request succeeded after the actor restarted")
    assert_nothing_held(stack)


def start_router(prefill: str, decode: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    argv = [
        sys.executable, "-m", "snapkv.cli", "router", "--prefill", prefill, "--decode", decode,
        "--host", LOOPBACK, "--port", str(port), "--model", TINY,
    ]
    return f"{LOOPBACK}:{port}", subprocess.Popen(argv, stdout=subprocess.DEVNULL)


def stop_process(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_no_healthy_worker_unavailable_at_once(stack):
    # Two more routers, each with one pool whose only address has nothing listening on it.
    nowhere = f"{LOOPBACK}:{free_port()}"
    routers = {
        "prefill": start_router(nowhere, stack.address("decode")),
        "decode": start_router(stack.address("prefill"), nowhere),
    }
    outcomes = {}
    try:
        for missing, (address, process) in routers.items():
            wait_healthy(f"router without {missing}", address, process, STARTUP_TIMEOUT_S)
            with SnapKVClient(address, timeout_s=30) as client:
                started = time.monotonic()
                with pytest.raises(SnapKVError) as error:
                    list(client.generate(prompt(13), max_tokens=4, **COMPRESSION))
                outcomes[missing] = error.value, time.monotonic() - started
    finally:
        for _, process in routers.values():
            stop_process(process)

    for missing, (error, elapsed) in outcomes.items():
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert f"no healthy {missing} worker" in error.details
        assert nowhere in error.details
        assert elapsed < 1.0
