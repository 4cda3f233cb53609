"""The decode gRPC server over loopback with a tiny model: caches pushed with the wire codec decode
exactly as in process, memory is reserved and freed, and bad transfers get precise statuses."""

import asyncio
import time

import grpc
import pytest
import torch

from prometheus_client import CollectorRegistry
from torch._dynamo.utils import counters

from decode_service.metrics import DecodeMetrics
from decode_service.server import serve
from snapkv.config import CompressionConfig, SamplingParams, head_dim
from snapkv.engine import Request
from snapkv.messages import model_fingerprint
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.wire import encode_kv, load_kv_requests
from tests.conftest import tiny_engine

SMALL = CompressionConfig(window=8, budget=48, kernel=5)


def prompt(length, seed):
    return tuple(torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist())


def encoded(engine, request, wire_dtype=pb.WIRE_DTYPE_FP32):
    [result] = engine.prefill([request])
    header, chunks = encode_kv(
        result.cache,
        request_id=request.request_id,
        model=model_fingerprint(engine.model),
        first_token_id=result.first_token,
        sampling=request.sampling,
        compression=request.compression,
        wire_dtype=wire_dtype,
        prompt_ids=request.prompt_ids,
    )
    return result, header, list(chunks)


async def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
def run():
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


async def start(engine, **options):
    server, port, servicer = await serve(engine, **options)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, servicer, channel, pb_grpc.DecodeStub(channel)


async def stop(server, servicer, channel):
    await channel.close()
    await server.stop(None)
    servicer.close()


def eight_requests():
    return [
        Request(str(seed), prompt(length, seed), SamplingParams(max_tokens=20), SMALL)
        for length, seed in [(300, 1), (90, 6), (31, 7), (200, 8), (48, 9), (120, 10), (64, 11), (250, 12)]
    ]


async def stream_all(engine, requests, **options):
    """Start a decode server with `options`, push every request's cache to it and stream them all at
    once. Return each one's tokens, the first one included, after the server has freed their memory.

    Steps after the server started must not compile anything. The decode thread's compilations count
    in torch's global counters, because torch's configuration (error_on_recompile too) is per thread.
    """
    server, servicer, channel, stub = await start(engine, **options)

    async def one(request):
        result, header, chunks = encoded(engine, request)
        loaded = await stub.LoadKV(load_kv_requests(header, chunks))
        tokens = [result.first_token]
        async for event in stub.Stream(pb.StreamRequest(handle=loaded.handle)):
            tokens.extend(event.token_ids)
        return tokens

    try:
        graphs = counters["stats"]["unique_graphs"]
        outputs = await asyncio.gather(*(one(r) for r in requests))
        assert counters["stats"]["unique_graphs"] == graphs
        await wait_until(lambda: servicer.memory.reserved_bytes == 0)
        return outputs
    finally:
        await stop(server, servicer, channel)


def test_eight_concurrent_streams_batched(run):
    # Eight requests of different lengths stream at once; each gets exactly its in-process tokens,
    # and the batch-size histogram shows steps that advanced several sequences together.
    engine = tiny_engine()
    requests = eight_requests()
    expected = [[e.token_id for e in engine.generate([r])] for r in requests]
    registry = CollectorRegistry()

    assert run(stream_all(engine, requests, metrics=DecodeMetrics("tiny", "test", registry))) == expected
    labels = {"model": "tiny", "worker": "test"}
    steps = registry.get_sample_value("snapkv_decode_batch_size_count", labels)
    single = registry.get_sample_value("snapkv_decode_batch_size_bucket", {**labels, "le": "1.0"})
    assert steps > 0
    assert single < steps
    assert registry.get_sample_value("snapkv_decode_generated_tokens_total", labels) == sum(len(t) - 1 for t in expected)


def test_worker_with_fp16_cache(run):
    # A worker that stores caches in fp16 rebuilds the fp32 wire payload in fp16, reserves 2 bytes a
    # value for it, and streams what the same engine generates in process.
    engine = tiny_engine(kv_dtype=torch.float16)
    config = engine.model.config
    request = Request("h", prompt(200, 2), SamplingParams(max_tokens=30), SMALL)
    expected = [event.token_id for event in engine.generate([request])]

    async def scenario():
        server, servicer, channel, stub = await start(engine)
        try:
            _, header, chunks = encoded(engine, request)
            loaded = await stub.LoadKV(load_kv_requests(header, chunks))
            per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * 2
            assert servicer.memory.reserved_bytes == (SMALL.budget + 30) * per_position
            tokens = [header.first_token_id]
            async for event in stub.Stream(pb.StreamRequest(handle=loaded.handle)):
                tokens.extend(event.token_ids)
            await wait_until(lambda: servicer.memory.reserved_bytes == 0)
            return tokens
        finally:
            await stop(server, servicer, channel)

    assert run(scenario()) == expected


def test_worker_with_bf16_decode_weights(run):
    # A worker whose decode step reads bf16 weights streams what the same engine generates in process,
    # which differs from the fp32 engine's greedy tokens for this prompt.
    engine = tiny_engine(weight_dtype=torch.bfloat16)
    request = Request("w", prompt(200, 11), SamplingParams(max_tokens=30), SMALL)
    expected = [event.token_id for event in engine.generate([request])]
    assert expected != [event.token_id for event in tiny_engine().generate([request])]
    assert run(stream_all(engine, [request])) == [expected]


def test_compiled_worker_compiles_before_serving(run, fresh_compiler):
    # Real compilation by inductor. serve() returns after the warm-up, so the streams below (batches of
    # 1 to 8 rows of different lengths) must not compile again. Their tokens equal the eager engine's.
    eager = tiny_engine()
    requests = eight_requests()
    expected = [[e.token_id for e in eager.generate([r])] for r in requests]
    engine = tiny_engine(compile_decode=True)
    assert run(stream_all(engine, requests, max_batch_size=8)) == expected


def test_compile_failure_stops_startup(run, fresh_compiler, tmp_path, monkeypatch):
    # No C++ compiler on PATH and an empty kernel cache: inductor cannot build the step's kernels (no
    # mock involved). The environment, unlike torch's configuration, also reaches the decode thread.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    engine = tiny_engine(compile_decode=True)
    # Inductor reports either that no compiler was found, or the failed call, depending on which step fails.
    with pytest.raises(RuntimeError, match="decode worker could not compile its decode step: .*(C\\+\\+ compiler|'g\\+\\+')"):
        run(serve(engine, max_batch_size=2))


def test_cancel_frees_memory(run):
    engine = tiny_engine()
    request = Request("c", prompt(200, 3), SamplingParams(max_tokens=5000), SMALL)

    async def scenario():
        server, servicer, channel, stub = await start(engine)
        try:
            _, header, chunks = encoded(engine, request)
            loaded = await stub.LoadKV(load_kv_requests(header, chunks))
            assert servicer.memory.reserved_bytes > 0
            call = stub.Stream(pb.StreamRequest(handle=loaded.handle))
            await call.read()
            call.cancel()
            await wait_until(lambda: servicer.memory.reserved_bytes == 0)
            assert servicer.scheduler.active_count == 0
        finally:
            await stop(server, servicer, channel)

    run(scenario())


def test_unstreamed_cache_expires(run):
    engine = tiny_engine()

    async def scenario():
        server, servicer, channel, stub = await start(engine, lease_s=0.3)
        try:
            _, header, chunks = encoded(engine, Request("l", prompt(100, 4), SamplingParams(max_tokens=4), SMALL))
            loaded = await stub.LoadKV(load_kv_requests(header, chunks))
            await wait_until(lambda: servicer.memory.reserved_bytes == 0)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Stream(pb.StreamRequest(handle=loaded.handle)).read()
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await stop(server, servicer, channel)

    run(scenario())


def test_full_worker_rejects_load(run):
    engine = tiny_engine()

    async def scenario():
        server, servicer, channel, stub = await start(engine, kv_budget_bytes=10_000)
        try:
            _, header, chunks = encoded(engine, Request("f", prompt(100, 5), SamplingParams(max_tokens=4), SMALL))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.LoadKV(load_kv_requests(header, chunks))
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert servicer.memory.reserved_bytes == 0
        finally:
            await stop(server, servicer, channel)

    run(scenario())


@pytest.mark.parametrize(
    "damage, code",
    [
        ("corrupt", grpc.StatusCode.DATA_LOSS),
        ("truncated", grpc.StatusCode.DATA_LOSS),
        ("duplicated", grpc.StatusCode.INVALID_ARGUMENT),
        ("reordered", grpc.StatusCode.DATA_LOSS),
        ("other_model", grpc.StatusCode.FAILED_PRECONDITION),
        ("no_header", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_transfers_get_precise_status(run, damage, code):
    engine = tiny_engine()

    async def scenario():
        server, servicer, channel, stub = await start(engine)
        try:
            _, header, chunks = encoded(
                engine, Request("b", prompt(300, 6), SamplingParams(max_tokens=4), None), pb.WIRE_DTYPE_FP16
            )
            assert len(chunks) >= 1
            if damage == "corrupt":
                chunks[0].payload = bytes([chunks[0].payload[0] ^ 1]) + chunks[0].payload[1:]
            elif damage == "truncated":
                chunks = chunks[:-1] if len(chunks) > 1 else []
            elif damage == "duplicated":
                chunks = [chunks[0], chunks[0], *chunks[1:]]
            elif damage == "reordered":
                header.chunk_bytes = 4096
                header.num_chunks = -(-header.payload_bytes // 4096)
                payload = b"".join(c.payload for c in chunks)
                _, fresh = encode_kv_like(header, payload)
                chunks = [fresh[1], fresh[0], *fresh[2:]]
            elif damage == "other_model":
                header.model.num_layers += 1
            requests = list(load_kv_requests(header, chunks))
            if damage == "no_header":
                requests = requests[1:]
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.LoadKV(iter(requests))
            assert error.value.code() == code
            assert error.value.details()
            assert servicer.memory.reserved_bytes == 0
        finally:
            await stop(server, servicer, channel)

    run(scenario())


def encode_kv_like(header, payload):
    """Cut a payload into the header's chunk size with valid checksums."""
    import google_crc32c

    size = header.chunk_bytes
    chunks = [
        pb.KVChunk(index=i, payload=payload[i * size : (i + 1) * size], checksum=google_crc32c.value(payload[i * size : (i + 1) * size]))
        for i in range(header.num_chunks)
    ]
    return header, chunks
