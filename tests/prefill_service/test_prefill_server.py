"""The prefill server on a real local Ray, with real gRPC over loopback and a tiny model: a prefilled
request streams from the decode worker exactly what the engine generates in process, and failures get
precise statuses. One Ray, one prefill server (one actor) and the decode workers serve the whole module."""

import asyncio
import socket
import time
from types import SimpleNamespace

import grpc
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.exceptions import RayActorError

from decode_service.server import serve as serve_decode
from prefill_service.config import PrefillConfig
from prefill_service.local_ray import init_local_ray
from prefill_service.pool import ActorSlot, pick_slot
from prefill_service.server import FAILED_PEER_KEY, shutdown
from prefill_service.server import serve as serve_prefill
from prefill_service.worker import PrefillWorker
from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Engine, Request
from snapkv.messages import compression_to_proto, model_fingerprint, sampling_to_proto
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.wire import encode_kv, encoded_size
from snapkv.tiny_models import tiny_model
from tests.conftest import FAMILY_SHAPES, tiny_engine

SMALL = CompressionConfig(window=8, budget=48, kernel=5)
# tiny-llama: 2 layers, 2 KV heads, head dim 16, fp32 weights.
FULL_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4


def prompt(length, seed):
    return tuple(torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist())


def prefill_request(request_id, prompt_ids, decode_address, max_tokens=12, compression=SMALL, wire_dtype=pb.WIRE_DTYPE_FP32):
    message = pb.PrefillRequest(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        sampling=sampling_to_proto(SamplingParams(max_tokens=max_tokens)),
        decode_address=decode_address,
        wire_dtype=wire_dtype,
    )
    if compression is not None:
        message.compression.CopyFrom(compression_to_proto(compression))
    return message


def closed_port():
    """Return a loopback port that nothing listens on: bound once, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def loop():
    # Current as well: grpc.aio looks the loop up when a call is created, outside run_until_complete,
    # and finds none once an earlier test's asyncio.run() has cleared the current loop.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture(scope="module")
def ray_session():
    init_local_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def services(loop, ray_session):
    engine = tiny_engine()

    async def start():
        decode, decode_port, decode_servicer = await serve_decode(engine)
        full, full_port, full_servicer = await serve_decode(engine, kv_budget_bytes=10_000)
        prefill, prefill_port = await serve_prefill("tiny-llama", num_actors=1, cpus_per_actor=1)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{prefill_port}")
        decode_channel = grpc.aio.insecure_channel(f"127.0.0.1:{decode_port}")
        return SimpleNamespace(
            engine=engine,
            prefill_server=prefill,
            prefill=pb_grpc.PrefillStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
            decode=pb_grpc.DecodeStub(decode_channel),
            decode_address=f"127.0.0.1:{decode_port}",
            decode_servicer=decode_servicer,
            full_address=f"127.0.0.1:{full_port}",
            channels=(channel, decode_channel),
            decode_servers=((decode, decode_servicer), (full, full_servicer)),
        )

    env = loop.run_until_complete(start())
    yield env

    async def stop():
        for channel in env.channels:
            await channel.close()
        await shutdown(env.prefill_server, grace_s=None)
        for server, servicer in env.decode_servers:
            await server.stop(None)
            servicer.close()

    loop.run_until_complete(stop())


def engine_tokens(engine, request):
    """Generate in process on one thread, as the prefill actor does, so that both compute alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [event.token_id for event in engine.generate([request])]
    finally:
        torch.set_num_threads(threads)


async def stream_tokens(decode, handle):
    tokens = []
    async for event in decode.Stream(pb.StreamRequest(handle=handle)):
        tokens.extend(event.token_ids)
    return tokens


def test_worker_engine_only_prefills():
    # The actor's engine builds no Llama decode step (and so no joined decode weights), and its
    # prefill results equal those of an engine with one.
    worker = PrefillWorker.from_model(tiny_model("llama", **FAMILY_SHAPES["llama"]), PrefillConfig())
    assert worker.engine.decode_path == "generic"
    assert worker.engine._llama_step is None
    full = Engine(tiny_model("llama", **FAMILY_SHAPES["llama"]))
    requests = [Request(str(seed), prompt(length, seed), SamplingParams(max_tokens=4), SMALL)
                for seed, length in [(1, 120), (2, 40)]]
    for prefill_only, reference in zip(worker.engine.prefill(requests), full.prefill(requests)):
        assert prefill_only.first_token == reference.first_token
        assert torch.equal(prefill_only.cache.keys, reference.cache.keys)
        assert torch.equal(prefill_only.cache.values, reference.cache.values)


def test_worker_with_bf16_weights():
    # PrefillConfig(weights="bf16") packs the actor engine's layers in bf16; its prefill still runs.
    worker = PrefillWorker.from_model(tiny_model("llama", **FAMILY_SHAPES["llama"]), PrefillConfig(weights="bf16"))
    assert worker.engine.weight_dtype == torch.bfloat16
    assert worker.engine.model.model.layers[0].mlp.down_proj.packed_weight.dtype == torch.bfloat16
    [result] = worker.engine.prefill([Request("b", prompt(120, 1), SamplingParams(max_tokens=4), SMALL)])
    assert result.cache.keys.shape[2] == SMALL.budget
    with pytest.raises(ValueError, match="invalid weights='fp16': expected one of"):
        PrefillConfig(weights="fp16")


def test_pick_slot_prefers_fewest_in_flight():
    slots = [
        ActorSlot(0, None, in_flight=2, ready=True),
        ActorSlot(1, None, in_flight=1, ready=True),
        ActorSlot(2, None, ready=False),
    ]
    assert pick_slot(slots).index == 1
    slots[0].in_flight = 1
    assert pick_slot(slots).index == 0  # a tie goes to the lower index
    assert pick_slot([ActorSlot(0, None, ready=False)]) is None


async def health_status(services):
    reply = await services.health.Check(health_pb2.HealthCheckRequest(service="snapkv.serving.v1.Prefill"))
    return reply.status


def test_health_reports_serving(loop, services):
    assert loop.run_until_complete(health_status(services)) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("length", [120, 30])  # compressed to 48 positions; shorter than the budget, kept whole
def test_prefilled_request_streams_engine_output(loop, services, length):
    prompt_ids = prompt(length, seed=length)
    sampling = SamplingParams(max_tokens=12)
    expected = engine_tokens(services.engine, Request(f"p{length}", prompt_ids, sampling, SMALL))

    async def scenario():
        response = await services.prefill.Prefill(prefill_request(f"p{length}", prompt_ids, services.decode_address))
        streamed = await stream_tokens(services.decode, response.handle)
        await wait_until(lambda: services.decode_servicer.memory.reserved_bytes == 0)
        return response, [response.first_token_id, *streamed]

    response, tokens = loop.run_until_complete(scenario())
    assert tokens == expected
    assert response.handle
    assert response.prompt_tokens == length
    assert response.kept_tokens == min(length, SMALL.budget)
    assert response.kv_bytes_full == length * FULL_BYTES_PER_TOKEN
    assert response.prefill_s > 0
    assert response.transfer_s > 0
    assert response.queue_s >= 0

    # The header that the actor sent is rebuilt here from the same cache shape and request fields.
    [result] = services.engine.prefill([Request(f"p{length}", prompt_ids, sampling, SMALL)])
    header, _ = encode_kv(
        result.cache,
        request_id=f"p{length}",
        model=model_fingerprint(services.engine.model),
        first_token_id=response.first_token_id,
        prompt_ids=prompt_ids,
        sampling=sampling,
        compression=SMALL,
        wire_dtype=pb.WIRE_DTYPE_FP32,
    )
    assert response.kv_bytes_sent == encoded_size(header)


def test_max_tokens_one_finishes_without_transfer(loop, services):
    prompt_ids = prompt(60, seed=3)
    expected = engine_tokens(services.engine, Request("one", prompt_ids, SamplingParams(max_tokens=1), SMALL))

    response = loop.run_until_complete(
        services.prefill.Prefill(prefill_request("one", prompt_ids, services.decode_address, max_tokens=1))
    )
    assert response.handle == ""
    assert response.finish_reason == pb.FINISH_REASON_LENGTH
    assert [response.first_token_id] == expected
    assert response.kv_bytes_sent == 0
    assert response.transfer_s == 0
    assert services.decode_servicer.memory.reserved_bytes == 0


# Each change turns a valid request into one the server must reject before any prefill.
INVALID_CHANGES = {
    "empty prompt": lambda message: message.ClearField("prompt_token_ids"),
    "token outside the vocabulary": lambda message: message.prompt_token_ids.append(258),
    "prompt beyond the context": lambda message: message.prompt_token_ids.extend([1] * 16380),
    "no request id": lambda message: message.ClearField("request_id"),
    "no decode address": lambda message: message.ClearField("decode_address"),
    "decode address without port": lambda message: setattr(message, "decode_address", "127.0.0.1"),
    "budget not above window": lambda message: message.compression.CopyFrom(pb.Compression(window=8, budget=8)),
    "max_tokens zero": lambda message: setattr(message.sampling, "max_tokens", 0),
    "unknown wire dtype": lambda message: setattr(message, "wire_dtype", 99),
}


@pytest.mark.parametrize("case", sorted(INVALID_CHANGES))
def test_invalid_request_is_invalid_argument(loop, services, case):
    message = prefill_request("bad", prompt(20, seed=1), services.decode_address)
    INVALID_CHANGES[case](message)

    with pytest.raises(grpc.aio.AioRpcError) as error:
        loop.run_until_complete(services.prefill.Prefill(message))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details()
    assert dict(error.value.trailing_metadata())[FAILED_PEER_KEY] == "prefill"


@pytest.mark.parametrize(
    "target, code",
    [("closed", grpc.StatusCode.UNAVAILABLE), ("full", grpc.StatusCode.RESOURCE_EXHAUSTED)],
)
def test_decode_failure_is_forwarded(loop, services, target, code):
    # Nothing listens on a closed port; the full worker's 10,000-byte budget is below this cache's size.
    address = f"127.0.0.1:{closed_port()}" if target == "closed" else services.full_address
    message = prefill_request("d", prompt(120, seed=2), address)

    with pytest.raises(grpc.aio.AioRpcError) as error:
        loop.run_until_complete(services.prefill.Prefill(message))
    assert error.value.code() == code
    assert address in error.value.details()
    assert dict(error.value.trailing_metadata())[FAILED_PEER_KEY] == f"decode {address}"


class StalledDecode(pb_grpc.DecodeServicer):
    """A decode worker that reads a LoadKV header, then waits until the call is cancelled."""

    def __init__(self):
        self.header_received = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def LoadKV(self, request_iterator, context):
        await anext(aiter(request_iterator))
        self.header_received.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def test_client_cancel_stops_transfer(loop, services):
    # The client gives up while the actor pushes a cache to a decode worker that never replies: the
    # actor cancels its LoadKV call and is free for the next request.
    async def scenario():
        stalled = StalledDecode()
        server = grpc.aio.server()
        pb_grpc.add_DecodeServicer_to_server(stalled, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            call = services.prefill.Prefill(prefill_request("cancel", prompt(120, seed=5), f"127.0.0.1:{port}"))
            await asyncio.wait_for(stalled.header_received.wait(), 10)
            call.cancel()
            await asyncio.wait_for(stalled.cancelled.wait(), 10)
        finally:
            await server.stop(None)
        next_request = prefill_request("next", prompt(30, seed=6), services.decode_address, max_tokens=1)
        return await services.prefill.Prefill(next_request)

    response = loop.run_until_complete(scenario())
    assert response.prompt_tokens == 30


def test_dead_actor_is_unavailable_then_replaced(loop, services):
    # Kill the only actor for good: the next request fails with UNAVAILABLE (the router may retry it
    # elsewhere) and health turns NOT_SERVING. The pool starts a replacement, and once it has loaded,
    # health is SERVING and requests succeed again.
    pool = services.prefill_server.prefill_pool
    dead = pool.slots[0].actor
    ray.kill(dead, no_restart=True)
    message = prefill_request("after", prompt(40, seed=4), services.decode_address, max_tokens=1)

    async def scenario():
        deadline = time.monotonic() + 10
        while True:  # ray.kill returns before the actor is gone
            try:
                await dead.ready.remote()
            except RayActorError:
                break
            assert time.monotonic() < deadline, "the killed actor still answers"
            await asyncio.sleep(0.05)

        with pytest.raises(grpc.aio.AioRpcError) as error:
            await services.prefill.Prefill(message)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(error.value.trailing_metadata())[FAILED_PEER_KEY] == "prefill"
        health_while_dead = await health_status(services)

        await wait_until(lambda: pool.num_ready == 1, timeout=60)
        deadline = time.monotonic() + 5
        while await health_status(services) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health did not return to SERVING"
            await asyncio.sleep(0.02)
        return health_while_dead, await services.prefill.Prefill(message)

    health_while_dead, response = loop.run_until_complete(scenario())
    assert health_while_dead == health_pb2.HealthCheckResponse.NOT_SERVING
    assert pool.slots[0].actor is not dead
    assert response.prompt_tokens == 40
