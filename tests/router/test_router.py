"""The router over real gRPC on loopback, in front of fake prefill and decode workers.

The fakes in tests/router/fakes.py are stand-ins for the real workers, which need model loading and
Ray. They reply from a script so that the router's own logic is tested in isolation: what it sends
upstream, what it relays, how it retries, and how failures and cancellations end a call.
"""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from router.registry import RegistryConfig
from snapkv.tiny_models import byte_tokenizer
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from tests.router.fakes import (
    DECODED,
    EOS,
    PREFILLED,
    PROMPT,
    SPACE,
    B,
    Cluster,
    FakeDecode,
    FakePrefill,
    E,
    L,
    U,
    token_ids,
    wait_for,
    wait_until,
)

@pytest.fixture
def cluster():
    running = Cluster()
    yield running
    running.close()


def request(**fields) -> pb.GenerateRequest:
    fields.setdefault("prompt", PROMPT)
    return pb.GenerateRequest(**fields)


def texts(responses) -> list[str]:
    return [r.delta.text for r in responses if r.WhichOneof("event") == "delta"]


def test_happy_path_relays_first_token_deltas_and_final(cluster):
    prefill = cluster.fake(FakePrefill(PREFILLED))
    decode = cluster.fake(FakeDecode(DECODED))
    router = cluster.router([prefill], [decode])
    compression = pb.Compression(budget=64, window=8)
    sent = request(
        request_id="r1",
        sampling=pb.SamplingParams(max_tokens=20, stop=["zzz"]),
        compression=compression,
        wire_dtype=pb.WIRE_DTYPE_FP32,
    )

    responses, code, _ = cluster.generate(router, sent)

    assert code == grpc.StatusCode.OK
    assert texts(responses) == [" ", "b", "l", "u", "e", ""]
    assert [list(r.delta.token_ids) for r in responses[:-1]] == [[SPACE], [B], [L], [U], [E], [EOS]]
    final = responses[-1].final
    assert final.request_id == "r1"
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (10, 6)
    assert final.compression.kept_tokens == 4
    assert final.compression.compression_ratio == 2.5
    assert (final.compression.kv_bytes_full, final.compression.kv_bytes_sent) == (10_000, 2_000)
    assert final.compression.wire_dtype == pb.WIRE_DTYPE_FP32
    assert (final.timings.prefill_s, final.timings.transfer_s) == (0.25, 0.05)
    assert 0 < final.timings.ttft_s <= final.timings.e2e_s
    assert final.timings.tpot_s >= 0

    # What the workers received: the tokenized prompt, the chosen decode worker, the handle.
    [prefill_request] = prefill.servicer.requests
    assert prefill_request.request_id == "r1"
    assert list(prefill_request.prompt_token_ids) == token_ids(PROMPT)
    assert prefill_request.decode_address == decode.address
    assert prefill_request.sampling.max_tokens == 20
    assert list(prefill_request.sampling.stop) == ["zzz"]
    assert prefill_request.compression == compression
    assert prefill_request.wire_dtype == pb.WIRE_DTYPE_FP32
    assert decode.servicer.handles == ["handle-1"]


def test_chat_input_uses_chat_template(cluster):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    prefill = cluster.fake(FakePrefill(PREFILLED))
    router = cluster.router([prefill], [cluster.fake(FakeDecode(DECODED))], tokenizer=tokenizer)
    system, user = pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="Hi")
    chat = pb.Chat(messages=[system, user])

    _, code, _ = cluster.generate(router, pb.GenerateRequest(chat=chat))

    assert code == grpc.StatusCode.OK
    [sent] = prefill.servicer.requests
    assert list(sent.prompt_token_ids) == token_ids("system: Be brief.\nuser: Hi\nassistant:")


def test_router_assigns_request_id_when_unset(cluster):
    router = cluster.router([cluster.fake(FakePrefill(PREFILLED))], [cluster.fake(FakeDecode(DECODED))])

    responses, code, _ = cluster.generate(router, request())

    assert code == grpc.StatusCode.OK
    assert len(responses[-1].final.request_id) == 32


@pytest.mark.parametrize(
    "first_token, max_tokens, expected_text, expected_reason",
    [(token_ids("H")[0], 1, "H", pb.FINISH_REASON_LENGTH), (EOS, 20, "", pb.FINISH_REASON_STOP)],
)
def test_first_token_that_finishes_skips_decode(cluster, first_token, max_tokens, expected_text, expected_reason):
    # An empty handle means prefill's first token was also the last one; prefill reports the finish reason.
    reply = pb.PrefillResponse(
        first_token_id=first_token, prompt_tokens=10, kept_tokens=10, kv_bytes_full=500, finish_reason=expected_reason
    )
    decode = cluster.fake(FakeDecode(DECODED))
    router = cluster.router([cluster.fake(FakePrefill(reply))], [decode])

    responses, code, _ = cluster.generate(router, request(sampling=pb.SamplingParams(max_tokens=max_tokens)))

    assert code == grpc.StatusCode.OK
    assert texts(responses) == [expected_text]
    final = responses[-1].final
    assert final.finish_reason == expected_reason
    assert final.usage.completion_tokens == 1
    assert final.compression.compression_ratio == 1.0
    assert final.timings.tpot_s == 0.0
    assert decode.servicer.handles == []


def test_first_token_completing_stop_string_finishes(cluster):
    reply = pb.PrefillResponse(
        first_token_id=token_ids("!")[0], prompt_tokens=10, kept_tokens=10, finish_reason=pb.FINISH_REASON_STOP
    )
    router = cluster.router([cluster.fake(FakePrefill(reply))], [cluster.fake(FakeDecode())])

    responses, code, _ = cluster.generate(router, request(sampling=pb.SamplingParams(max_tokens=1, stop=["!"])))

    assert code == grpc.StatusCode.OK
    assert texts(responses) == [""]
    assert responses[-1].final.finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_prefill_failure_retried_on_other_workers(cluster, code):
    failing = cluster.fake(FakePrefill(error=(code, "worker is going away")))
    working = cluster.fake(FakePrefill(PREFILLED))
    first_decode = cluster.fake(FakeDecode(DECODED))
    second_decode = cluster.fake(FakeDecode(DECODED))
    # round_robin starts with the first configured worker, so the failing one is tried first.
    router = cluster.router([failing, working], [first_decode, second_decode], policy="round_robin",
                            prefill_policy="round_robin")

    responses, status, _ = cluster.generate(router, request())

    assert status == grpc.StatusCode.OK
    assert "".join(texts(responses)) == " blue"
    assert len(failing.servicer.requests) == 1
    assert failing.servicer.requests[0].decode_address == first_decode.address
    assert len(working.servicer.requests) == 1
    assert working.servicer.requests[0].decode_address == second_decode.address
    assert second_decode.servicer.handles == ["handle-1"]
    assert first_decode.servicer.handles == []


def test_prefill_retried_only_once(cluster):
    failing = [cluster.fake(FakePrefill(error=(grpc.StatusCode.UNAVAILABLE, "down"))) for _ in range(3)]
    router = cluster.router(failing, [cluster.fake(FakeDecode(DECODED))])

    responses, code, details = cluster.generate(router, request())

    assert code == grpc.StatusCode.UNAVAILABLE
    assert responses == []
    assert "down" in details
    assert sum(len(fake.servicer.requests) for fake in failing) == 2


def test_retry_changes_decode_worker_only_once(cluster):
    # With one prefill worker whose decode workers are all full, the retry moves to another decode
    # worker, and there is no third attempt even though a third decode worker is healthy.
    full = cluster.fake(FakePrefill(error=(grpc.StatusCode.RESOURCE_EXHAUSTED, "decode worker is full")))
    decodes = [cluster.fake(FakeDecode(DECODED)) for _ in range(3)]
    router = cluster.router([full], decodes, policy="round_robin")

    _, code, details = cluster.generate(router, request())

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "attempt 2 of at most 2" in details
    first, second = [r.decode_address for r in full.servicer.requests]
    assert first == decodes[0].address
    assert second != first


def test_prefill_invalid_argument_not_retried(cluster):
    rejecting = cluster.fake(FakePrefill(error=(grpc.StatusCode.INVALID_ARGUMENT, "prompt longer than the model")))
    other = cluster.fake(FakePrefill(PREFILLED))
    router = cluster.router([rejecting, other], [cluster.fake(FakeDecode(DECODED))], prefill_policy="round_robin")

    _, code, details = cluster.generate(router, request())

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt longer than the model" in details
    assert other.servicer.requests == []


def test_no_healthy_decode_worker_unavailable_at_once(cluster):
    prefill = cluster.fake(FakePrefill(PREFILLED))
    decode = cluster.fake(FakeDecode(DECODED))
    decode.health.serving = False
    router = cluster.router([prefill], [decode])

    started = time.monotonic()
    responses, code, details = cluster.generate(router, request())

    assert code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 1.0
    assert responses == []
    assert "no healthy decode worker" in details
    assert "NOT_SERVING" in details
    assert prefill.servicer.requests == []


def test_unreachable_prefill_worker_unavailable(cluster):
    stopped = cluster.fake(FakePrefill(PREFILLED))
    cluster.run(stopped.server.stop(None))
    router = cluster.router([stopped], [cluster.fake(FakeDecode(DECODED))])

    _, code, details = cluster.generate(router, request())

    assert code == grpc.StatusCode.UNAVAILABLE
    assert "no healthy prefill worker" in details


@pytest.mark.parametrize(
    "error, expected",
    [
        ((grpc.StatusCode.UNAVAILABLE, "decode worker lost"), grpc.StatusCode.UNAVAILABLE),
        ((grpc.StatusCode.INTERNAL, "decoding failed"), grpc.StatusCode.ABORTED),
        (None, grpc.StatusCode.ABORTED),  # the stream ends without a finish reason
    ],
)
def test_decode_failure_after_first_token_is_terminal(cluster, error, expected):
    decode = cluster.fake(FakeDecode(DECODED[:2], error=error))
    router = cluster.router([cluster.fake(FakePrefill(PREFILLED))], [decode])

    responses, code, details = cluster.generate(router, request())

    assert code == expected
    assert texts(responses) == [" ", "b", "l"]
    assert all(r.WhichOneof("event") == "delta" for r in responses)
    assert "the output is incomplete" in details
    assert "after 3 tokens" in details


def test_decode_server_stopping_mid_stream_is_terminal(cluster):
    decode = cluster.fake(FakeDecode(DECODED[:1], then="hang"))
    router = cluster.router([cluster.fake(FakePrefill(PREFILLED))], [decode])

    async def scenario():
        async with grpc.aio.insecure_channel(router) as channel:
            call = pb_grpc.RouterStub(channel).Generate(request())
            received = [await call.read(), await call.read()]
            await decode.server.stop(None)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call.read()
            return received, failure.value.code()

    received, code = cluster.run(scenario())

    assert [r.delta.text for r in received] == [" ", "b"]
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


def test_client_cancel_cancels_decode_stream(cluster):
    decode = cluster.fake(FakeDecode(DECODED[:2], then="hang"))
    router = cluster.router([cluster.fake(FakePrefill(PREFILLED))], [decode])

    async def scenario():
        async with grpc.aio.insecure_channel(router) as channel:
            call = pb_grpc.RouterStub(channel).Generate(request())
            received = [await call.read() for _ in range(3)]
            call.cancel()
            return received

    received = cluster.run(scenario())

    assert [r.delta.text for r in received] == [" ", "b", "l"]
    wait_until(decode.servicer.cancelled.is_set)


def test_client_cancel_cancels_prefill(cluster):
    prefill = cluster.fake(FakePrefill(hang=True))
    router = cluster.router([prefill], [cluster.fake(FakeDecode(DECODED))])

    async def scenario():
        async with grpc.aio.insecure_channel(router) as channel:
            call = pb_grpc.RouterStub(channel).Generate(request())
            await wait_for(lambda: len(prefill.servicer.requests) == 1)
            call.cancel()
            await wait_for(prefill.servicer.cancelled.is_set)

    cluster.run(scenario())


DEADLINE_SLACK_S = 0.05


def test_deadline_becomes_upstream_timeout(cluster):
    prefill = cluster.fake(FakePrefill(hang=True))
    router = cluster.router([prefill], [cluster.fake(FakeDecode(DECODED))])

    _, code, _ = cluster.generate(router, request(), timeout_s=1.0)

    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    [remaining] = prefill.servicer.time_remaining
    # The deadline crosses the router and gRPC's timeout header. Once, with the full suite loading
    # both cores, the fake prefill read 1.009 s, so a few milliseconds over are allowed.
    assert 0 < remaining <= 1.0 + DEADLINE_SLACK_S
    wait_until(prefill.servicer.cancelled.is_set)


@pytest.mark.parametrize(
    "sent, message",
    [
        (request(sampling=pb.SamplingParams(temperature=-1.0)), "temperature=-1.0"),
        (request(sampling=pb.SamplingParams(top_p=1.5)), "top_p=1.5"),
        (request(sampling=pb.SamplingParams(max_tokens=0)), "max_tokens=0"),
        (request(compression=pb.Compression(kernel=4)), "kernel=4"),
        (request(compression=pb.Compression(no_compress=True, budget=64)), "no_compress"),
        (request(wire_dtype=99), "wire_dtype=99"),
        (request(prompt=""), "prompt"),
        (pb.GenerateRequest(), "missing input"),
        (pb.GenerateRequest(chat=pb.Chat()), "no messages"),
        # The byte tokenizer has no chat template, so chat input is rejected.
        (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])), "chat template"),
        (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="hi")])), "role='robot'"),
        (request(sampling=pb.SamplingParams(max_tokens=91)), "maximum context of 100 tokens"),
    ],
)
def test_invalid_request_rejected(cluster, sent, message):
    prefill = cluster.fake(FakePrefill(PREFILLED))
    router = cluster.router([prefill], [cluster.fake(FakeDecode(DECODED))], max_context=100)

    responses, code, details = cluster.generate(router, sent)

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert responses == []
    assert prefill.servicer.requests == []


def test_prompt_filling_max_context_accepted(cluster):
    prefill, decode = cluster.fake(FakePrefill(PREFILLED)), cluster.fake(FakeDecode(DECODED))
    router = cluster.router([prefill], [decode], max_context=100)

    _, code, _ = cluster.generate(router, request(sampling=pb.SamplingParams(max_tokens=90)))

    assert code == grpc.StatusCode.OK


def test_kv_aware_picks_decode_with_most_free_memory(cluster):
    prefill = cluster.fake(FakePrefill(PREFILLED))
    fuller = cluster.fake(FakeDecode(DECODED, kv_free_bytes=1_000))
    emptier = cluster.fake(FakeDecode(DECODED, kv_free_bytes=9_000))
    router = cluster.router([prefill], [fuller, emptier], policy="kv_aware")

    for _ in range(2):
        _, code, _ = cluster.generate(router, request())
        assert code == grpc.StatusCode.OK

    assert [r.decode_address for r in prefill.servicer.requests] == [emptier.address, emptier.address]


def test_worker_health_changes_reach_routing_and_readiness(cluster):
    # Scenario: the only decode worker starts failing its health checks, so the router stops routing
    # to it and reports itself not ready. When the worker recovers, both come back.
    decode = cluster.fake(FakeDecode(DECODED))
    config = RegistryConfig(health_interval_s=0.02, unhealthy_threshold=2, healthy_threshold=2)
    router = cluster.router([cluster.fake(FakePrefill(PREFILLED))], [decode], registry_config=config)

    def readiness():
        async def check():
            async with grpc.aio.insecure_channel(router) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = await stub.Check(health_pb2.HealthCheckRequest(service="snapkv.serving.v1.Router"))
                return reply.status

        return cluster.run(check())

    def generate_code():
        return cluster.generate(router, request())[1]

    assert readiness() == health_pb2.HealthCheckResponse.SERVING
    decode.health.serving = False
    wait_until(lambda: readiness() == health_pb2.HealthCheckResponse.NOT_SERVING)
    assert generate_code() == grpc.StatusCode.UNAVAILABLE

    decode.health.serving = True
    wait_until(lambda: readiness() == health_pb2.HealthCheckResponse.SERVING)
    assert generate_code() == grpc.StatusCode.OK


def test_router_serves_health_and_reflection(cluster):
    router = cluster.router([cluster.fake(FakePrefill(PREFILLED))], [cluster.fake(FakeDecode(DECODED))])

    async def check():
        async with grpc.aio.insecure_channel(router) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            services = [s.name async for reply in stream for s in reply.list_services_response.service]
            return health.status, services

    status, services = cluster.run(check())

    assert status == health_pb2.HealthCheckResponse.SERVING
    assert "snapkv.serving.v1.Router" in services
    assert "grpc.health.v1.Health" in services


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(policy="fastest"), "policy='fastest'"),
        (dict(prefill_policy="kv_aware"), "prefill_policy='kv_aware'"),
        (dict(max_context=0), "max_context=0"),
    ],
)
def test_serve_rejects_bad_options(cluster, options, message):
    with pytest.raises(ValueError, match=message):
        cluster.router([cluster.fake(FakePrefill(PREFILLED))], [cluster.fake(FakeDecode(DECODED))], **options)
