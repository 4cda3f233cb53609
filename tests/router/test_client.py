"""The blocking and asyncio clients against a router in front of fake workers (see tests/router/fakes.py)."""

import grpc
import pytest

from router.client import AsyncSnapKVClient, Delta, SnapKVClient, SnapKVError, Summary, build_request
from snapkv.proto import serving_pb2 as pb
from tests.router.fakes import (
    DECODED,
    EOS,
    PREFILLED,
    PROMPT,
    SPACE,
    B,
    Cluster,
    E,
    FakeDecode,
    FakePrefill,
    L,
    U,
    wait_until,
)


@pytest.fixture
def cluster():
    running = Cluster()
    yield running
    running.close()


@pytest.fixture
def router(cluster):
    return cluster.router([cluster.fake(FakePrefill(PREFILLED))], [cluster.fake(FakeDecode(DECODED))])


def check_summary(summary: Summary) -> None:
    assert summary.request_id == "c1"
    assert summary.finish_reason == "stop"
    assert (summary.prompt_tokens, summary.completion_tokens) == (10, 6)
    assert (summary.kept_tokens, summary.compression_ratio) == (4, 2.5)
    assert (summary.kv_bytes_full, summary.kv_bytes_sent) == (10_000, 2_000)
    assert summary.wire_dtype == "int8"
    assert (summary.prefill_s, summary.transfer_s) == (0.25, 0.05)
    assert 0 < summary.ttft_s <= summary.e2e_s


def test_sync_generate_yields_deltas_then_summary(router):
    with SnapKVClient(router) as client:
        items = list(client.generate(prompt=PROMPT, max_tokens=20, wire_dtype="int8", request_id="c1"))

    assert items[:-1] == [
        Delta(" ", (SPACE,)), Delta("b", (B,)), Delta("l", (L,)), Delta("u", (U,)), Delta("e", (E,)),
        Delta("", (EOS,)),
    ]
    check_summary(items[-1])


def test_sync_complete_returns_whole_text(router):
    with SnapKVClient(router) as client:
        completion = client.complete(prompt=PROMPT, wire_dtype="int8", request_id="c1")

    assert completion.text == " blue"
    check_summary(completion.summary)


def test_sync_client_raises_status_code(router):
    with SnapKVClient(router) as client, pytest.raises(SnapKVError) as failure:
        client.complete(prompt=PROMPT, temperature=-1.0)

    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature=-1.0" in failure.value.details
    assert str(failure.value).startswith("INVALID_ARGUMENT: ")


def test_sync_client_raises_on_failure_after_first_token(cluster):
    decode = cluster.fake(FakeDecode(DECODED[:1], error=(grpc.StatusCode.UNAVAILABLE, "decode worker lost")))
    router = cluster.router([cluster.fake(FakePrefill(PREFILLED))], [decode])
    received = []

    with SnapKVClient(router) as client, pytest.raises(SnapKVError) as failure:
        for item in client.generate(prompt=PROMPT):
            received.append(item)

    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert [item.text for item in received] == [" ", "b"]


def test_sync_client_closing_iterator_cancels(cluster):
    decode = cluster.fake(FakeDecode(DECODED[:1], then="hang"))
    router = cluster.router([cluster.fake(FakePrefill(PREFILLED))], [decode])

    with SnapKVClient(router) as client:
        stream = client.generate(prompt=PROMPT)
        assert next(stream).text == " "
        # The first token comes from prefill; wait until the router has the decode stream open too.
        wait_until(lambda: decode.servicer.handles == ["handle-1"])
        stream.close()
        wait_until(decode.servicer.cancelled.is_set)


def test_sync_client_deadline(cluster):
    router = cluster.router([cluster.fake(FakePrefill(hang=True))], [cluster.fake(FakeDecode(DECODED))])

    with SnapKVClient(router, timeout_s=0.5) as client, pytest.raises(SnapKVError) as failure:
        client.complete(prompt=PROMPT)

    assert failure.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_async_client_generate_and_complete(cluster, router):
    async def scenario():
        async with AsyncSnapKVClient(router) as client:
            items = [item async for item in client.generate(prompt=PROMPT, wire_dtype="int8", request_id="c1")]
            completion = await client.complete(prompt=PROMPT, wire_dtype="int8", request_id="c1")
            return items, completion

    items, completion = cluster.run(scenario())

    assert "".join(item.text for item in items[:-1]) == " blue"
    assert all(isinstance(item, Delta) for item in items[:-1])
    check_summary(items[-1])
    assert completion.text == " blue"
    check_summary(completion.summary)


def test_async_client_raises_status_code(cluster):
    router = cluster.router([cluster.fake(FakePrefill(PREFILLED))], [cluster.fake(FakeDecode(DECODED[:2]))])

    async def scenario():
        async with AsyncSnapKVClient(router) as client:
            try:
                await client.complete(prompt=PROMPT)
            except SnapKVError as error:
                return error

    error = cluster.run(scenario())

    assert error.code == grpc.StatusCode.ABORTED
    assert "without a finish reason" in error.details


def test_build_request_sets_only_given_fields():
    request = build_request(
        messages=[{"role": "user", "content": "hi"}], max_tokens=5, seed=7, stop=["\n"], budget=64, pooling="avg"
    )

    assert request.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [("user", "hi")]
    assert request.sampling.max_tokens == 5
    assert request.sampling.seed == 7
    assert not request.sampling.HasField("top_p")
    assert list(request.sampling.stop) == ["\n"]
    assert request.compression.budget == 64
    assert not request.compression.HasField("window")
    assert request.compression.pooling == pb.POOLING_AVG
    assert not request.HasField("request_id")
    assert request.wire_dtype == pb.WIRE_DTYPE_UNSPECIFIED


def test_build_request_leaves_compression_unset_by_default():
    assert not build_request(prompt="hi").HasField("compression")
    assert build_request(prompt="hi", no_compress=True).compression == pb.Compression(no_compress=True)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prompt="a", messages=[]), "exactly one of prompt or messages"),
        (dict(), "exactly one of prompt or messages"),
        (dict(prompt="a", wire_dtype="fp8"), "wire_dtype='fp8'"),
        (dict(prompt="a", pooling="min"), "pooling='min'"),
        # Values that the protocol's unsigned fields cannot carry fail here, naming the field.
        (dict(prompt="a", max_tokens=-5), r"invalid max_tokens=-5: the request carries it as an integer from 0 to 4294967295"),
        (dict(prompt="a", budget=2**32), r"invalid budget=4294967296: the request carries it as an integer from 0 to 4294967295"),
        (dict(prompt="a", top_k=-1), r"invalid top_k=-1: the request carries it as an integer from 0"),
        (dict(prompt="a", temperature="hot"), r"invalid temperature='hot': "),
    ],
)
def test_build_request_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        build_request(**options)
