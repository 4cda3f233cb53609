"""Python clients of the router: `SnapKVClient` (blocking) and `AsyncSnapKVClient` (asyncio).

    with SnapKVClient("127.0.0.1:50051") as client:
        for item in client.generate(prompt="Why is the sky blue?", max_tokens=64):
            if isinstance(item, Delta):
                print(item.text, end="", flush=True)
        print(client.complete(prompt="Hello", max_tokens=8).text)

`generate` yields one `Delta` per TextDelta and ends with one `Summary`. Every failure, a stream that
ends without a Final message included, raises `SnapKVError` carrying the gRPC status code.

For a router with TLS, pass `tls=ChannelTLS(ca_file=...)` (with `cert_file` and `key_file` when the
router requires client certificates); for one that requires a bearer token, pass `auth_token`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Mapping, Sequence

import grpc
from google.protobuf.descriptor import FieldDescriptor

from router.auth import bearer_metadata
from snapkv.messages import GQA_REDUCTION_TO_PROTO, POOLING_TO_PROTO
from snapkv.proto import serving_pb2 as pb
from snapkv.proto import serving_pb2_grpc as pb_grpc
from snapkv.transport import (
    MAX_GENERATE_REQUEST_BYTES,
    MAX_REPLY_BYTES,
    ChannelTLS,
    message_size_options,
    open_aio_channel,
    open_channel,
)

WIRE_DTYPES = {
    "fp16": pb.WIRE_DTYPE_FP16,
    "bf16": pb.WIRE_DTYPE_BF16,
    "int8": pb.WIRE_DTYPE_INT8,
    "fp32": pb.WIRE_DTYPE_FP32,
}
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
CHANNEL_OPTIONS = message_size_options(MAX_REPLY_BYTES, MAX_GENERATE_REQUEST_BYTES)


class SnapKVError(Exception):
    """A failed Generate call: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Delta:
    """Newly generated text and the token ids it came from."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Summary:
    """The Final message of a request: usage, compression and timings at the router."""

    request_id: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    kept_tokens: int
    compression_ratio: float
    kv_bytes_full: int
    kv_bytes_sent: int
    wire_dtype: str  # "fp16", "bf16", "int8", "fp32", or "default" when the request left it to the server
    ttft_s: float
    tpot_s: float
    prefill_s: float
    transfer_s: float
    e2e_s: float

    @classmethod
    def from_proto(cls, final: pb.Final) -> "Summary":
        wire_names = {value: name for name, value in WIRE_DTYPES.items()}
        report, timings = final.compression, final.timings
        return cls(
            request_id=final.request_id,
            finish_reason=FINISH_REASONS.get(final.finish_reason, "unspecified"),
            prompt_tokens=final.usage.prompt_tokens,
            completion_tokens=final.usage.completion_tokens,
            kept_tokens=report.kept_tokens,
            compression_ratio=report.compression_ratio,
            kv_bytes_full=report.kv_bytes_full,
            kv_bytes_sent=report.kv_bytes_sent,
            wire_dtype=wire_names.get(report.wire_dtype, "default"),
            ttft_s=timings.ttft_s,
            tpot_s=timings.tpot_s,
            prefill_s=timings.prefill_s,
            transfer_s=timings.transfer_s,
            e2e_s=timings.e2e_s,
        )


@dataclass(frozen=True)
class Completion:
    """The whole text of a request and its summary."""

    text: str
    summary: Summary


def build_request(
    prompt: str | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    *,
    raw: bool = False,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    budget: int | None = None,
    window: int | None = None,
    kernel: int | None = None,
    pooling: str | None = None,
    gqa_reduction: str | None = None,
    no_compress: bool = False,
    wire_dtype: str | None = None,
    request_id: str | None = None,
) -> pb.GenerateRequest:
    """Build a GenerateRequest; an argument left at None takes the server's default.

    Give either `prompt` (sent as one user turn unless `raw`) or chat `messages` with "role" and
    "content" keys. `budget`, `window`, `kernel`, `pooling` ("max" or "avg") and `gqa_reduction`
    ("mean" or "max") override the server's SnapKV settings, and `no_compress` keeps the whole prompt
    cache. `wire_dtype` is one of "fp16", "bf16", "int8" or "fp32". The server validates the values.
    """
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    request = pb.GenerateRequest(raw=raw)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    if request_id is not None:
        request.request_id = request_id

    sampling = request.sampling
    sampling.stop.extend(stop)
    for name, value in (("temperature", temperature), ("top_k", top_k), ("max_tokens", max_tokens), ("top_p", top_p),
                        ("seed", seed)):
        if value is not None:
            _assign(sampling, name, value)

    overrides = dict(budget=budget, window=window, kernel=kernel, pooling=pooling, gqa_reduction=gqa_reduction)
    if no_compress or any(value is not None for value in overrides.values()):
        request.compression.CopyFrom(_compression(no_compress, **overrides))
    if wire_dtype is not None:
        request.wire_dtype = _lookup(WIRE_DTYPES, "wire_dtype", wire_dtype)
    return request


def _compression(
    no_compress: bool, pooling: str | None, gqa_reduction: str | None, **sizes: int | None
) -> pb.Compression:
    compression = pb.Compression(no_compress=no_compress)
    for name, value in sizes.items():
        if value is not None:
            _assign(compression, name, value)
    if pooling is not None:
        compression.pooling = _lookup(POOLING_TO_PROTO, "pooling", pooling)
    if gqa_reduction is not None:
        compression.gqa_reduction = _lookup(GQA_REDUCTION_TO_PROTO, "gqa_reduction", gqa_reduction)
    return compression


# The range of each unsigned integer field type of the protocol.
_UNSIGNED_BITS = {FieldDescriptor.TYPE_UINT32: 32, FieldDescriptor.TYPE_UINT64: 64}


def _assign(message, name: str, value: object) -> None:
    """Set a field; raise a ValueError that names it when the value does not fit the field's type."""
    try:
        setattr(message, name, value)
    except (ValueError, TypeError) as error:
        bits = _UNSIGNED_BITS.get(message.DESCRIPTOR.fields_by_name[name].type)
        reason = f"the request carries it as an integer from 0 to {2**bits - 1}" if bits else str(error)
        raise ValueError(f"invalid {name}={value!r}: {reason}") from None


def _lookup(values: Mapping[str, int], name: str, key: str) -> int:
    if key not in values:
        raise ValueError(f"invalid {name}={key!r}: expected one of {sorted(values)}")
    return values[key]


def _parse(response: pb.GenerateResponse) -> Delta | Summary:
    if response.WhichOneof("event") == "final":
        return Summary.from_proto(response.final)
    return Delta(response.delta.text, tuple(response.delta.token_ids))


def _incomplete_stream_error() -> SnapKVError:
    return SnapKVError(grpc.StatusCode.UNKNOWN, "the router ended the stream without a Final message")


def _join(items: Sequence[Delta | Summary]) -> Completion:
    text = "".join(item.text for item in items if isinstance(item, Delta))
    return Completion(text, items[-1])


class SnapKVClient:
    """Blocking client of the router at `address` ("host:port"), over TLS when `tls` is set."""

    def __init__(
        self,
        address: str,
        timeout_s: float | None = None,
        *,
        tls: ChannelTLS | None = None,
        auth_token: str | None = None,
    ):
        self.channel = open_channel(address, tls, CHANNEL_OPTIONS)
        self.stub = pb_grpc.RouterStub(self.channel)
        self.timeout_s = timeout_s
        self._metadata = None if auth_token is None else bearer_metadata(auth_token)

    def generate(
        self,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        *,
        timeout_s: float | None = None,
        **options,
    ) -> Iterator[Delta | Summary]:
        """Stream a completion: `Delta` items, then one `Summary`. Options are those of `build_request`.

        Closing the iterator early cancels the request. `timeout_s` (or the client's) is the deadline.
        """
        request = build_request(prompt, messages, **options)
        call = self.stub.Generate(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        finished = False
        try:
            for response in call:
                item = _parse(response)
                finished = isinstance(item, Summary)
                yield item
        except grpc.RpcError as error:
            raise SnapKVError(error.code(), error.details()) from None
        finally:
            # Reading on to the end of the stream, rather than cancelling after the Final message,
            # lets the router record the request as OK.
            if not call.done():
                call.cancel()
        if not finished:
            raise _incomplete_stream_error()

    def complete(
        self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None, **options
    ) -> Completion:
        """Generate and return the whole text with its summary. Takes the arguments of `generate`."""
        return _join(list(self.generate(prompt, messages, **options)))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SnapKVClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncSnapKVClient:
    """asyncio client of the router at `address` ("host:port"); create it inside the running loop.

    Takes the arguments of `SnapKVClient`.
    """

    def __init__(
        self,
        address: str,
        timeout_s: float | None = None,
        *,
        tls: ChannelTLS | None = None,
        auth_token: str | None = None,
    ):
        self.channel = open_aio_channel(address, tls, CHANNEL_OPTIONS)
        self.stub = pb_grpc.RouterStub(self.channel)
        self.timeout_s = timeout_s
        self._metadata = None if auth_token is None else bearer_metadata(auth_token)

    async def generate(
        self,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        *,
        timeout_s: float | None = None,
        **options,
    ) -> AsyncIterator[Delta | Summary]:
        """Stream a completion like `SnapKVClient.generate`; cancelling the consumer cancels the request."""
        request = build_request(prompt, messages, **options)
        call = self.stub.Generate(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        finished = False
        try:
            async for response in call:
                item = _parse(response)
                finished = isinstance(item, Summary)
                yield item
        except grpc.aio.AioRpcError as error:
            raise SnapKVError(error.code(), error.details()) from None
        finally:
            if not call.done():
                call.cancel()
        if not finished:
            raise _incomplete_stream_error()

    async def complete(
        self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None, **options
    ) -> Completion:
        """Generate and return the whole text with its summary. Takes the arguments of `generate`."""
        return _join([item async for item in self.generate(prompt, messages, **options)])

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncSnapKVClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
