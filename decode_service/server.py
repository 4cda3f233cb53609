"""Decode gRPC server: LoadKV receives a compressed cache, Stream decodes it in the running batch, and
Release frees a loaded cache that will not be streamed.

Admission control: a cache is admitted only if its KV memory (the received keys and values plus room
for `max_tokens` generated positions, in the engine's `kv_dtype`) fits the worker's budget next to every
reservation already held; otherwise LoadKV returns RESOURCE_EXHAUSTED at once, before any chunk is
read, so the router can pick another worker while the client has seen no token. Nothing waits
in a queue for memory.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from prometheus_client import CollectorRegistry

from decode_service.metrics import DecodeMetrics
from decode_service.scheduler import DecodeJob, DecodeScheduler, StepEvent
from decode_service.worker import KVMemory, LoadedCaches
from snapkv.config import dtype_name, head_dim
from snapkv.engine import Engine
from snapkv.messages import model_fingerprint
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.sampling import make_generator
from snapkv.sequence import SequenceState
from snapkv.serving import MalformedRequestInterceptor, add_health_and_reflection, bind_health_server, start_health_server
from snapkv.transport import MAX_LOAD_KV_MESSAGE_BYTES, MAX_REPLY_BYTES, ServerTLS, add_port, server_options
from snapkv.wire import KVAssembler, MalformedKVError, WireError

logger = logging.getLogger(__name__)

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decode"].full_name


def kv_bytes_per_token(engine: Engine) -> int:
    """Bytes one position takes in every layer's keys and values, in the dtype decoding stores them in."""
    config = engine.model.config
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * engine.kv_dtype.itemsize


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(self, engine: Engine, scheduler: DecodeScheduler, memory: KVMemory, loaded: LoadedCaches):
        self.engine = engine
        self.scheduler = scheduler
        self.memory = memory
        self.loaded = loaded
        self.fingerprint = model_fingerprint(engine.model)
        self.per_token_bytes = kv_bytes_per_token(engine)

    async def LoadKV(self, request_iterator, context):
        started = time.perf_counter()
        requests = request_iterator.__aiter__()
        try:
            first = await anext(requests, None)
            if first is None or first.WhichOneof("item") != "header":
                raise MalformedKVError("invalid LoadKV stream: the first message must be a KVHeader")
            header = first.header
            assembler = KVAssembler(header, self.fingerprint, dtype=self.engine.kv_dtype, device=self.engine.device)
        except WireError as error:
            logger.warning("rejected KV header: %s", error)
            await context.abort(getattr(grpc.StatusCode, error.code), str(error))

        reserved = assembler.decoded_bytes + assembler.sampling.max_tokens * self.per_token_bytes
        if not self.memory.try_reserve(reserved):
            free = self.memory.budget_bytes - self.memory.reserved_bytes
            message = (
                f"decode worker is full: request {header.request_id} needs {reserved} bytes of KV memory "
                f"and {free} of {self.memory.budget_bytes} are free; retry on another worker or later"
            )
            logger.warning("%s", message)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        try:
            async for request in requests:
                if request.WhichOneof("item") != "chunk":
                    raise MalformedKVError("invalid LoadKV stream: every message after the KVHeader must be a KVChunk")
                assembler.add(request.chunk)
            received = assembler.finish()
        except WireError as error:
            self.memory.release(reserved)
            logger.warning("rejected KV for request %s: %s", header.request_id, error)
            await context.abort(getattr(grpc.StatusCode, error.code), str(error))
        except BaseException:
            # A cancelled or broken transfer registered nothing, so its memory is released here.
            self.memory.release(reserved)
            raise

        entry = self.loaded.add(received, reserved)
        logger.debug(
            "loaded KV for request %s as handle %s: %d bytes reserved in %.3f s",
            header.request_id, entry.handle, reserved, time.perf_counter() - started,
        )
        return pb.LoadKVResponse(handle=entry.handle, lease_s=self.loaded.lease_s)

    async def Stream(self, request, context):
        entry = self.loaded.claim(request.handle)
        if entry is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown KV handle {request.handle!r}: it was never loaded here, was already streamed, or its lease expired",
            )

        received = entry.received
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sequence = SequenceState.start(
            self.engine.tokenizer, received.sampling, self.engine.stop_ids, tuple(received.context_token_ids),
            make_generator(received.sampling, self.engine.device),
        )
        # The first token came from prefill and has reached the client already; replay it so that the
        # text stream continues from the same state.
        sequence.accept(received.first_token_id)
        job = DecodeJob(
            entry.handle,
            received.request_id,
            received.cache,
            sequence,
            sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            on_done=lambda job: self.memory.release(entry.reserved_bytes),
        )
        self.scheduler.submit(job)
        finished = False
        try:
            while not finished:
                event = await events.get()
                if isinstance(event, BaseException):
                    logger.error("decoding failed for request %s: %s", received.request_id, event)
                    await context.abort(grpc.StatusCode.INTERNAL, f"decoding failed: {event}")
                finished = event.finish_reason is not None
                yield _token_event(event)
        finally:
            if not finished:
                self.scheduler.cancel(job)

    async def Release(self, request, context):
        entry = self.loaded.release(request.handle)
        if entry is not None:
            logger.info(
                "released the unstreamed KV of request %s (handle %s): freed %d bytes",
                entry.received.request_id, entry.handle, entry.reserved_bytes,
            )
        return pb.ReleaseResponse(released=entry is not None)

    def close(self) -> None:
        """Stop the lease checks and the decode loop (failing any sequence still running)."""
        lease_task = getattr(self, "lease_task", None)
        if lease_task is not None:
            lease_task.cancel()
        self.scheduler.stop()

    async def Status(self, request, context):
        return pb.StatusResponse(
            active_sequences=self.scheduler.active_count,
            kv_resident_bytes=self.memory.reserved_bytes,
            kv_budget_bytes=self.memory.budget_bytes,
            queue_depth=self.scheduler.queue_depth,
            model=self.fingerprint,
        )


def _token_event(event: StepEvent) -> pb.TokenEvent:
    finish = FINISH_REASONS.get(event.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
    return pb.TokenEvent(token_ids=[event.token_id], text=event.text, finish_reason=finish)


async def expire_leases(loaded: LoadedCaches, interval_s: float, metrics: DecodeMetrics) -> None:
    """Free caches that no client streamed within their lease, checking every `interval_s` seconds."""
    while True:
        await asyncio.sleep(interval_s)
        metrics.lease_expirations.inc(len(loaded.expire()))


async def serve(
    engine: Engine,
    address: str = "127.0.0.1:0",
    kv_budget_bytes: int = 2 << 30,
    lease_s: float = 30.0,
    max_batch_size: int = 32,
    metrics: DecodeMetrics | None = None,
    tls: ServerTLS | None = None,
    health_address: str | None = None,
    decode_threads: int | None = None,
) -> tuple[grpc.aio.Server, int, DecodeServicer]:
    """Start a decode server on `address`, over TLS when `tls` is set; return it, the bound port and the servicer.

    `health_address`, when set, also serves the health checks alone there without TLS (for probes).

    `metrics` defaults to a `DecodeMetrics` in a registry of its own, for tests and embedded use.
    The command line passes one on the global registry, which its /metrics endpoint serves.
    """
    metrics = metrics or DecodeMetrics(engine.name, address, CollectorRegistry())
    memory = KVMemory(kv_budget_bytes)
    loaded = LoadedCaches(memory, lease_s)
    scheduler = DecodeScheduler(engine, max_batch_size, on_step=metrics.observe_step, num_threads=decode_threads)
    servicer = DecodeServicer(engine, scheduler, memory, loaded)
    servicer.metrics = metrics
    metrics.active_sequences.set_function(lambda: scheduler.active_count)
    metrics.queue_depth.set_function(lambda: scheduler.queue_depth)
    metrics.kv_resident_bytes.set_function(lambda: memory.reserved_bytes)
    metrics.kv_budget_bytes.set(kv_budget_bytes)

    # A compiling engine warms up first, so a failure leaves no port bound and no thread running.
    scheduler.start()
    await asyncio.to_thread(scheduler.ready.wait)
    error = scheduler.warm_up_error
    if error is not None:
        raise RuntimeError(f"decode worker could not compile its decode step: {error}") from error

    server = grpc.aio.server(
        interceptors=[MalformedRequestInterceptor()],
        options=server_options(MAX_LOAD_KV_MESSAGE_BYTES, MAX_REPLY_BYTES),
    )
    pb_grpc.add_DecodeServicer_to_server(servicer, server)
    port = add_port(server, address, tls)

    health_servicer = await add_health_and_reflection(server, [SERVICE_NAME])
    health_server = None if health_address is None else bind_health_server(health_servicer, health_address)

    await server.start()
    if health_server is not None:
        await start_health_server(health_server, server)
    servicer.lease_task = asyncio.create_task(expire_leases(loaded, min(1.0, lease_s / 4), metrics))
    logger.info(
        "decode worker serving %s on port %d: kv budget %d bytes, kv dtype %s, decode weights %s, lease %.1f s, "
        "max batch %d, TLS %s, client certificates %s",
        engine.name, port, kv_budget_bytes, dtype_name(engine.kv_dtype), dtype_name(engine.weight_dtype), lease_s,
        max_batch_size,
        "on" if tls else "off",
        "required" if tls and tls.client_ca_file else "not required",
    )
    return server, port, servicer

