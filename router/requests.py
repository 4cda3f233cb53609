"""The router's view of one request: validation and tokenization on arrival, timings, the Final message.

Every check here raises ValueError with a message for the client, which the servicer sends back as
INVALID_ARGUMENT. Sampling and compression are validated with the core's own configs, so a request the
router accepts is one the workers accept too, as long as they use the default SnapKV settings.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from snapkv.config import SamplingParams
from snapkv.messages import compression_from_proto, sampling_from_proto
from snapkv.proto import serving_pb2 as pb
from snapkv.text import prompt_ids

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
# Server limits for what one request may ask for. max_tokens is reserved in full on a decode worker
# before decoding starts, and the budget (which bounds the window) sets the KV kept per request and
# the size of the attention scores that prefill computes for the window.
DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_BUDGET_LIMIT = 8192
# Max pooling costs time in proportion to the kernel: a kernel near 2**31 held a prefill actor for
# 33 s on a 300-token prompt (tiny test model, 2-core CPU), where the usual kernels (5 to 7) take milliseconds.
DEFAULT_KERNEL_LIMIT = 127


@dataclass(frozen=True)
class RequestLimits:
    """Upper limits on what one request may ask for; None disables a limit.

    `max_context` bounds prompt tokens plus `max_tokens`; without it, the prefill workers check the
    model's own context. `max_tokens`, `budget` and `kernel` bound the request fields of those names.
    The `max_tokens` limit also applies to the default that an unset field takes. The `budget` and
    `kernel` limits apply only to values a request sets, because the prefill server picks the defaults.
    """

    max_context: int | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS_LIMIT
    budget: int | None = DEFAULT_BUDGET_LIMIT
    kernel: int | None = DEFAULT_KERNEL_LIMIT

    def __post_init__(self) -> None:
        for name, smallest in (("max_context", 2), ("max_tokens", 1), ("budget", 2), ("kernel", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < smallest):
                raise ValueError(f"invalid {name} limit {value!r}: expected an integer >= {smallest} or None")


@dataclass(frozen=True)
class RoutedRequest:
    """A validated GenerateRequest, tokenized."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    compression: pb.Compression | None  # forwarded as sent, or None for the prefill server's defaults
    wire_dtype: int  # a pb.WireDtype value


def parse_request(
    request: pb.GenerateRequest, tokenizer: PreTrainedTokenizerBase, limits: RequestLimits
) -> RoutedRequest:
    """Validate and tokenize a GenerateRequest; raise ValueError with a message for the client."""
    sampling = sampling_from_proto(request.sampling)
    compression = request.compression if request.HasField("compression") else None
    if compression is not None:
        compression_from_proto(compression)
    _check_limits(request, sampling, limits)
    if request.wire_dtype not in pb.WireDtype.values():
        raise ValueError(f"invalid wire_dtype={request.wire_dtype!r}: expected one of {pb.WireDtype.keys()}")

    # NOTE: tokenization runs on the event loop thread, so a very long prompt delays the other
    # requests while it is tokenized.
    ids = _tokenize(request, tokenizer)
    max_context = limits.max_context
    if max_context is not None and len(ids) + sampling.max_tokens > max_context:
        raise ValueError(
            f"the prompt has {len(ids)} tokens and max_tokens={sampling.max_tokens}, {len(ids) + sampling.max_tokens} "
            f"in all, more than the maximum context of {max_context} tokens; shorten the prompt or lower max_tokens"
        )

    request_id = request.request_id if request.request_id else uuid.uuid4().hex
    return RoutedRequest(request_id, ids, sampling, compression, request.wire_dtype)


def _check_limits(request: pb.GenerateRequest, sampling: SamplingParams, limits: RequestLimits) -> None:
    # The fields are unsigned, so a client that encodes a negative number sends a value of 2**31 or
    # more, which these checks reject.
    compression = request.compression
    if sampling.top_k >= 2**31:
        raise ValueError(f"invalid top_k={sampling.top_k}: expected 0 (no filter) up to {2**31 - 1}; it cannot be negative")
    if limits.max_tokens is not None and sampling.max_tokens > limits.max_tokens:
        unset = "" if request.sampling.HasField("max_tokens") else " (the default for an unset max_tokens)"
        raise ValueError(
            f"invalid max_tokens={sampling.max_tokens}{unset}: this server allows at most {limits.max_tokens} "
            "generated tokens"
        )
    if limits.budget is not None and compression.HasField("budget") and compression.budget > limits.budget:
        raise ValueError(
            f"invalid budget={compression.budget}: this server keeps at most {limits.budget} positions per KV head"
        )
    if limits.kernel is not None and compression.HasField("kernel") and compression.kernel > limits.kernel:
        raise ValueError(f"invalid kernel={compression.kernel}: this server allows pooling kernels up to {limits.kernel}")


def _tokenize(request: pb.GenerateRequest, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise ValueError("missing input: set either prompt or chat")
    if kind == "prompt" and not request.prompt:
        raise ValueError("invalid prompt: it is empty")
    if kind == "prompt":
        ids = prompt_ids(tokenizer, prompt=request.prompt, raw=request.raw)
    else:
        ids = prompt_ids(tokenizer, messages=_chat_messages(request.chat))
    if not ids:
        raise ValueError("invalid input: it tokenizes to no tokens")
    return ids


def _chat_messages(chat: pb.Chat) -> list[dict[str, str]]:
    if not chat.messages:
        raise ValueError("invalid chat: it has no messages")
    for index, message in enumerate(chat.messages):
        if message.role not in CHAT_ROLES:
            raise ValueError(f"invalid chat.messages[{index}].role={message.role!r}: expected one of {CHAT_ROLES}")
    return [{"role": message.role, "content": message.content} for message in chat.messages]


@dataclass
class RequestTrace:
    """Progress record of one request, for its Final message and its log line."""

    arrival: float = field(default_factory=time.perf_counter)
    request_id: str = "-"
    prompt_tokens: int = 0
    prefill: pb.PrefillResponse | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: int = 0
    finish_reason: int = pb.FINISH_REASON_UNSPECIFIED
    status: str = "UNKNOWN"  # a grpc.StatusCode name once the request ends
    error: str = ""  # the message the client received with a failed status

    def add_tokens(self, num_tokens: int) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.completion_tokens += num_tokens

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def compression_ratio(self) -> float:
        kept = self.prefill.kept_tokens if self.prefill is not None else 0
        return max(1.0, self.prompt_tokens / kept) if kept else 1.0


def final_message(trace: RequestTrace, wire_dtype: int) -> pb.Final:
    """Build the Final message of a request whose last token has been sent."""
    prefill = trace.prefill or pb.PrefillResponse()
    decoded_tokens = trace.completion_tokens - 1
    tpot_s = (trace.last_token_at - trace.first_token_at) / decoded_tokens if decoded_tokens > 0 else 0.0
    return pb.Final(
        request_id=trace.request_id,
        finish_reason=trace.finish_reason,
        usage=pb.Usage(prompt_tokens=trace.prompt_tokens, completion_tokens=trace.completion_tokens),
        compression=pb.CompressionReport(
            kept_tokens=prefill.kept_tokens,
            compression_ratio=trace.compression_ratio,
            kv_bytes_full=prefill.kv_bytes_full,
            kv_bytes_sent=prefill.kv_bytes_sent,
            # NOTE: this is the requested wire dtype. WIRE_DTYPE_UNSPECIFIED means the prefill server's
            # default, which PrefillResponse does not report.
            wire_dtype=wire_dtype,
        ),
        timings=pb.Timings(
            ttft_s=trace.ttft_s or 0.0,
            tpot_s=tpot_s,
            prefill_s=prefill.prefill_s,
            transfer_s=prefill.transfer_s,
            e2e_s=time.perf_counter() - trace.arrival,
        ),
    )


def log_finished(trace: RequestTrace) -> None:
    """Log the one line of a finished request: INFO when it succeeded, WARNING with the error otherwise."""
    level = logging.INFO if trace.status == "OK" else logging.WARNING
    error = f": {trace.error}" if trace.error else ""
    elapsed_s = time.perf_counter() - trace.arrival
    # A request rejected while it was parsed has no id yet.
    request_id = trace.request_id if trace.request_id != RequestTrace.request_id else "(unparsed)"
    if trace.prefill is None:
        # Nothing was prefilled, so there are no compression figures to report.
        logger.log(level, "request %s finished with %s before prefill after %.3f s%s",
                   request_id, trace.status, elapsed_s, error)
        return
    ttft = f"{trace.ttft_s:.3f} s" if trace.ttft_s is not None else "-"
    logger.log(
        level,
        "request %s finished with %s: %d prompt tokens, %d kept, ratio %.2f, ttft %s, %d tokens, e2e %.3f s%s",
        request_id, trace.status, trace.prompt_tokens, trace.prefill.kept_tokens, trace.compression_ratio, ttft,
        trace.completion_tokens, elapsed_s, error,
    )
