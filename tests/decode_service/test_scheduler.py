"""Continuous batching on a tiny model: sequences that join a running batch at different steps decode
exactly what they decode alone, and the loop really batches them."""

import queue
import threading

import pytest
import torch

from decode_service.scheduler import DecodeJob, DecodeScheduler
from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Request
from tests.conftest import tiny_engine

SMALL = CompressionConfig(window=8, budget=48, kernel=5)


def prompt(length, seed):
    return tuple(torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist())


def make_job(engine, request, handle):
    [result] = engine.prefill([request])
    sequence = engine.start_sequence(result)
    sequence.accept(result.first_token)
    events = queue.Queue()
    done = threading.Event()
    job = DecodeJob(handle, request.request_id, result.cache, sequence, events.put, lambda job: done.set())
    return job, events, done, result.first_token


def collect(events, first_token, limit=None, timeout=60):
    """Read events until the sequence finishes (or `limit` events); return the tokens and finish reason."""
    tokens = [first_token]
    while limit is None or len(tokens) <= limit:
        event = events.get(timeout=timeout)
        assert not isinstance(event, BaseException), event
        tokens.append(event.token_id)
        if event.finish_reason is not None:
            return tokens, event.finish_reason
    return tokens, None


def test_late_joiners_decode_as_alone():
    engine = tiny_engine()
    requests = [
        Request(str(seed), prompt(length, seed), SamplingParams(max_tokens=tokens), SMALL)
        for length, seed, tokens in [(300, 1, 40), (90, 6, 12), (31, 7, 25)]
    ]
    expected = [[e.token_id for e in engine.generate([r])] for r in requests]
    # The first request must still be running when the others join.
    assert len(expected[0]) > 20

    batch_sizes = []
    scheduler = DecodeScheduler(engine, max_batch_size=8, on_step=lambda size, seconds: batch_sizes.append(size))
    scheduler.start()
    try:
        first = make_job(engine, requests[0], "h0")
        scheduler.submit(first[0])
        # The others join while the first is decoding.
        tokens0, reason = collect(first[1], first[3], limit=3)
        assert reason is None
        late = [make_job(engine, r, f"h{i}") for i, r in enumerate(requests[1:], start=1)]
        for job, *_ in late:
            scheduler.submit(job)

        rest, reason = collect(first[1], tokens0[-1])
        assert tokens0 + rest[1:] == expected[0]
        for index, (job, events, done, first_token) in enumerate(late, start=1):
            tokens, reason = collect(events, first_token)
            assert tokens == expected[index]
            assert done.wait(5)
    finally:
        scheduler.stop()
    assert max(batch_sizes) == 3
    assert scheduler.active_count == 0


def test_cancel_releases_sequence():
    engine = tiny_engine()
    scheduler = DecodeScheduler(engine)
    scheduler.start()
    try:
        job, events, done, _ = make_job(engine, Request("c", prompt(100, 7), SamplingParams(max_tokens=10_000), SMALL), "h")
        scheduler.submit(job)
        events.get(timeout=30)
        scheduler.cancel(job)
        assert done.wait(10)
    finally:
        scheduler.stop()
    assert scheduler.active_count == 0


def test_loop_thread_sets_its_thread_count():
    # OpenMP keeps the thread count per thread: the decode loop sets its own, and the caller's stays.
    engine = tiny_engine()
    caller_threads = torch.get_num_threads()
    loop_threads = []
    scheduler = DecodeScheduler(engine, on_step=lambda size, seconds: loop_threads.append(torch.get_num_threads()),
                                num_threads=caller_threads + 1)
    scheduler.start()
    try:
        job, events, done, first_token = make_job(engine, Request("t", prompt(60, 3), SamplingParams(max_tokens=3), SMALL), "h")
        scheduler.submit(job)
        collect(events, first_token)
        assert done.wait(10)
    finally:
        scheduler.stop()
    assert loop_threads
    assert set(loop_threads) == {caller_threads + 1}
    assert torch.get_num_threads() == caller_threads


def test_invalid_thread_count_rejected():
    with pytest.raises(ValueError, match="invalid num_threads=0"):
        DecodeScheduler(tiny_engine(), num_threads=0)
