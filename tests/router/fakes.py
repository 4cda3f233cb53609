"""Fake prefill and decode workers, and an event loop in a background thread to run them and the router.

The fakes are stand-ins for the real workers, which need a loaded model and Ray. They serve the same
gRPC services over loopback but reply from a script, so that the router's own logic (routing,
retries, relaying, cancellation, health) can be tested in isolation and with exact expected values.

Everything asynchronous (fake servers, the router, async clients) runs on one background event loop,
so that the blocking client can run in the test's own thread against it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.registry import POOL_SERVICES
from router.server import serve, stop
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.tiny_models import byte_tokenizer

TOKENIZER = byte_tokenizer()
EOS = TOKENIZER.eos_token_id


def token_ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False).input_ids


PROMPT = "The sky is"  # the byte tokenizer makes one token per byte: 10 prompt tokens
SPACE, B, L, U, E = token_ids(" blue")

PREFILLED = pb.PrefillResponse(
    handle="handle-1",
    first_token_id=SPACE,
    prompt_tokens=10,
    kept_tokens=4,
    kv_bytes_full=10_000,
    kv_bytes_sent=2_000,
    queue_s=0.01,
    prefill_s=0.25,
    transfer_s=0.05,
)
# Decode continues after the first token (a space) with "blue", then the end-of-sequence token.
DECODED = [pb.TokenEvent(token_ids=[token], text=text) for token, text in zip((B, L, U, E), "blue")] + [
    pb.TokenEvent(token_ids=[EOS], text="", finish_reason=pb.FINISH_REASON_STOP)
]


class BackgroundLoop:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout_s: float = 20.0):
        """Run `coroutine` on the loop and return its result, waiting at most `timeout_s`."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wait_until(condition, timeout_s: float = 10.0, interval_s: float = 0.01) -> None:
    """Poll `condition` from a thread until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not reached within {timeout_s} s"
        time.sleep(interval_s)


async def wait_for(condition, timeout_s: float = 10.0, interval_s: float = 0.01) -> None:
    """Poll `condition` on the event loop until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not reached within {timeout_s} s"
        await asyncio.sleep(interval_s)


class FakeHealth(health_pb2_grpc.HealthServicer):
    """Health service that returns SERVING or NOT_SERVING depending on `serving`, counting the checks."""

    def __init__(self, service: str):
        self.service = service
        self.serving = True
        self.num_checks = 0

    async def Check(self, request, context):
        self.num_checks += 1
        if request.service not in ("", self.service):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


class FakePrefill(pb_grpc.PrefillServicer):
    """Prefill service that returns `reply`, aborts with `error` (a code and a message), or hangs if `hang`."""

    def __init__(self, reply: pb.PrefillResponse | None = None, error=None, hang: bool = False):
        self.reply = reply or pb.PrefillResponse()
        self.error = error
        self.hang = hang
        self.requests: list[pb.PrefillRequest] = []
        self.time_remaining: list[float | None] = []
        self.cancelled = threading.Event()

    async def Prefill(self, request, context):
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        if self.error is not None:
            await context.abort(*self.error)
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return self.reply


class FakeDecode(pb_grpc.DecodeServicer):
    """Decode service that streams the scripted `events` for any handle, then ends, hangs, or aborts with `error`."""

    def __init__(self, events=(), then: str = "end", error=None, kv_free_bytes: int = 1 << 20):
        self.events = list(events)
        self.then = then  # "end" or "hang"
        self.error = error
        self.kv_free_bytes = kv_free_bytes
        self.handles: list[str] = []
        self.cancelled = threading.Event()

    async def Stream(self, request, context):
        self.handles.append(request.handle)
        try:
            for event in self.events:
                await context.write(event)
            if self.error is not None:
                await context.abort(*self.error)
            if self.then == "hang":
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def Status(self, request, context):
        budget = 1 << 30
        return pb.StatusResponse(kv_budget_bytes=budget, kv_resident_bytes=budget - self.kv_free_bytes)


@dataclass
class RunningFake:
    """A fake worker serving on 127.0.0.1:port."""

    server: grpc.aio.Server
    port: int
    servicer: FakePrefill | FakeDecode
    health: FakeHealth

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_fake(servicer: FakePrefill | FakeDecode) -> RunningFake:
    """Serve `servicer` and a FakeHealth for its service on a free loopback port."""
    server = grpc.aio.server()
    if isinstance(servicer, FakePrefill):
        pb_grpc.add_PrefillServicer_to_server(servicer, server)
        health = FakeHealth(POOL_SERVICES["prefill"])
    else:
        pb_grpc.add_DecodeServicer_to_server(servicer, server)
        health = FakeHealth(POOL_SERVICES["decode"])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return RunningFake(server, port, servicer, health)


class Cluster:
    """Fake workers and routers on one background loop, all stopped by `close`."""

    def __init__(self):
        self.background = BackgroundLoop()
        self.fakes: list[RunningFake] = []
        self.routers: list[grpc.aio.Server] = []

    def run(self, coroutine, timeout_s: float = 20.0):
        return self.background.run(coroutine, timeout_s)

    def fake(self, servicer: FakePrefill | FakeDecode) -> RunningFake:
        running = self.run(start_fake(servicer))
        self.fakes.append(running)
        return running

    def router(self, prefills: list[RunningFake], decodes: list[RunningFake], tokenizer=TOKENIZER, **options) -> str:
        """Start a router in front of the fakes and return its address."""
        server, port = self.run(
            serve(tokenizer, [f.address for f in prefills], [f.address for f in decodes], **options)
        )
        self.routers.append(server)
        return f"127.0.0.1:{port}"

    def generate(self, address: str, request: pb.GenerateRequest, timeout_s: float | None = None):
        """Call Generate; return the responses received and the call's final status code and details."""

        async def call():
            async with grpc.aio.insecure_channel(address) as channel:
                responses = []
                stream = pb_grpc.RouterStub(channel).Generate(request, timeout=timeout_s)
                try:
                    async for response in stream:
                        responses.append(response)
                except grpc.aio.AioRpcError as error:
                    return responses, error.code(), error.details()
                return responses, await stream.code(), await stream.details()

        return self.run(call())

    def close(self) -> None:
        async def stop_all():
            for router in self.routers:
                await stop(router)
            for running in self.fakes:
                await running.server.stop(None)

        self.run(stop_all())
        self.background.close()
