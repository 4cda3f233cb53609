"""The whole stack as a user runs it: decode, prefill (local Ray) and router as separate processes on
loopback, driven through the Python client. Tiny random-weight model except where marked."""

import threading
import time
import urllib.request

import grpc
import pytest

from router.client import SnapKVClient, SnapKVError, Summary
from snapkv.cli_services import LocalStack, free_port
from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Request
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.text import prompt_ids
from tests.conftest import tiny_engine

TINY = "tiny-llama"
COMPRESSION = dict(budget=64, window=8, kernel=5)
PROMPTS = [f"request {i}: " + "the quick brown fox jumps over the lazy dog " * (4 + 3 * i) for i in range(8)]


@pytest.fixture(scope="module")
def stack():
    with LocalStack(TINY, metrics_port=free_port()) as running:
        running.start(timeout_s=300)
        yield running


@pytest.fixture(scope="module")
def local():
    # As the stack's decode worker: its default, "auto", stores the fp32 tiny model's cache in fp16.
    return tiny_engine("llama", kv_dtype="auto")


def local_tokens(engine, text, max_tokens):
    request = Request("local", tuple(prompt_ids(engine.tokenizer, text)), SamplingParams(max_tokens=max_tokens),
                      CompressionConfig(**COMPRESSION))
    return [event.token_id for event in engine.generate([request])]


def served_tokens(address, text, max_tokens, wire_dtype="fp32"):
    with SnapKVClient(address, timeout_s=120) as client:
        items = list(client.generate(text, max_tokens=max_tokens, wire_dtype=wire_dtype, **COMPRESSION))
    tokens = [token for item in items[:-1] for token in item.token_ids]
    assert isinstance(items[-1], Summary)
    return tokens, items[-1]


def decode_status(stack):
    with grpc.insecure_channel(stack.address("decode")) as channel:
        return pb_grpc.DecodeStub(channel).Status(pb.StatusRequest(), timeout=5)


def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_served_equals_local(stack, local):
    tokens, summary = served_tokens(stack.address("router"), PROMPTS[3], 24)
    assert tokens == local_tokens(local, PROMPTS[3], 24)
    assert summary.prompt_tokens == len(prompt_ids(local.tokenizer, PROMPTS[3]))
    assert summary.kept_tokens == 64
    assert summary.completion_tokens == len(tokens)
    assert summary.wire_dtype == "fp32"
    assert summary.kv_bytes_sent > 2 * 2 * 2 * 64 * 16 * 4  # two layers, two KV heads, head dim 16, fp32


def test_eight_concurrent_streams_are_batched(stack, local):
    # Long generations (up to 300 tokens) so that decoding overlaps the one-at-a-time prefills.
    results = [None] * len(PROMPTS)

    def run(index):
        results[index] = served_tokens(stack.address("router"), PROMPTS[index], 300)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    for index, text in enumerate(PROMPTS):
        assert results[index] == local_tokens(local, text, 300), f"request {index} differs"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['decode']}/metrics").read().decode()
    single_steps = next(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("snapkv_decode_batch_size_bucket") and 'le="1.0"' in l)
    all_steps = next(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("snapkv_decode_batch_size_count"))
    assert single_steps < all_steps, "no decode step advanced more than one sequence"

    # The router measured time to first token for each of the eight requests.
    router_metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['router']}/metrics").read().decode()
    ttft_count = next(
        float(line.split()[-1])
        for line in router_metrics.splitlines()
        if line.startswith("snapkv_router_time_to_first_token_seconds_count")
    )
    assert ttft_count >= len(PROMPTS)


def test_cancel_frees_kv(stack):
    with SnapKVClient(stack.address("router")) as client:
        stream = client.generate(PROMPTS[0], max_tokens=4000, **COMPRESSION)
        next(stream)
        next(stream)
        wait_until(lambda: decode_status(stack).active_sequences == 1)
        stream.close()
    wait_until(lambda: decode_status(stack).kv_resident_bytes == 0 and decode_status(stack).active_sequences == 0)


def test_killed_decode_worker_fails_stream_promptly():
    with LocalStack(TINY) as own:
        own.start(timeout_s=300)
        with SnapKVClient(own.address("router")) as client:
            stream = client.generate(PROMPTS[0], max_tokens=4000, **COMPRESSION)
            next(stream)
            next(stream)
            own.processes["decode"].kill()
            killed_at = time.monotonic()
            with pytest.raises(SnapKVError) as error:
                for _ in stream:
                    pass
            elapsed = time.monotonic() - killed_at
    assert error.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
    assert error.value.details
    assert elapsed < 5.0
