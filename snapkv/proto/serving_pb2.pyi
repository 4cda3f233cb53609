from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_MAX: _ClassVar[Pooling]
    POOLING_AVG: _ClassVar[Pooling]

class GqaReduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GQA_REDUCTION_UNSPECIFIED: _ClassVar[GqaReduction]
    GQA_REDUCTION_MEAN: _ClassVar[GqaReduction]
    GQA_REDUCTION_MAX: _ClassVar[GqaReduction]

class WireDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_DTYPE_UNSPECIFIED: _ClassVar[WireDtype]
    WIRE_DTYPE_FP16: _ClassVar[WireDtype]
    WIRE_DTYPE_BF16: _ClassVar[WireDtype]
    WIRE_DTYPE_INT8: _ClassVar[WireDtype]
    WIRE_DTYPE_FP32: _ClassVar[WireDtype]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]

class ChecksumAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKSUM_ALGORITHM_UNSPECIFIED: _ClassVar[ChecksumAlgorithm]
    CHECKSUM_ALGORITHM_CRC32C: _ClassVar[ChecksumAlgorithm]

class ScaleLayout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCALE_LAYOUT_NONE: _ClassVar[ScaleLayout]
    SCALE_LAYOUT_KEY_CHANNEL_VALUE_TOKEN_FP32: _ClassVar[ScaleLayout]
POOLING_UNSPECIFIED: Pooling
POOLING_MAX: Pooling
POOLING_AVG: Pooling
GQA_REDUCTION_UNSPECIFIED: GqaReduction
GQA_REDUCTION_MEAN: GqaReduction
GQA_REDUCTION_MAX: GqaReduction
WIRE_DTYPE_UNSPECIFIED: WireDtype
WIRE_DTYPE_FP16: WireDtype
WIRE_DTYPE_BF16: WireDtype
WIRE_DTYPE_INT8: WireDtype
WIRE_DTYPE_FP32: WireDtype
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
CHECKSUM_ALGORITHM_UNSPECIFIED: ChecksumAlgorithm
CHECKSUM_ALGORITHM_CRC32C: ChecksumAlgorithm
SCALE_LAYOUT_NONE: ScaleLayout
SCALE_LAYOUT_KEY_CHANNEL_VALUE_TOKEN_FP32: ScaleLayout

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class Compression(_message.Message):
    __slots__ = ("budget", "window", "kernel", "pooling", "gqa_reduction", "no_compress")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    GQA_REDUCTION_FIELD_NUMBER: _ClassVar[int]
    NO_COMPRESS_FIELD_NUMBER: _ClassVar[int]
    budget: int
    window: int
    kernel: int
    pooling: Pooling
    gqa_reduction: GqaReduction
    no_compress: bool
    def __init__(self, budget: _Optional[int] = ..., window: _Optional[int] = ..., kernel: _Optional[int] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., gqa_reduction: _Optional[_Union[GqaReduction, str]] = ..., no_compress: _Optional[bool] = ...) -> None: ...

class ModelFingerprint(_message.Message):
    __slots__ = ("architecture", "num_layers", "num_kv_heads", "head_dim", "rope", "weights_dtype", "vocab_size")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    ROPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: str
    weights_dtype: str
    vocab_size: int
    def __init__(self, architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., rope: _Optional[str] = ..., weights_dtype: _Optional[str] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "chat", "raw", "sampling", "compression", "wire_dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    chat: Chat
    raw: bool
    sampling: SamplingParams
    compression: Compression
    wire_dtype: WireDtype
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ..., raw: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., compression: _Optional[_Union[Compression, _Mapping]] = ..., wire_dtype: _Optional[_Union[WireDtype, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: TextDelta
    final: Final
    def __init__(self, delta: _Optional[_Union[TextDelta, _Mapping]] = ..., final: _Optional[_Union[Final, _Mapping]] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class CompressionReport(_message.Message):
    __slots__ = ("kept_tokens", "compression_ratio", "kv_bytes_full", "kv_bytes_sent", "wire_dtype")
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FULL_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    kept_tokens: int
    compression_ratio: float
    kv_bytes_full: int
    kv_bytes_sent: int
    wire_dtype: WireDtype
    def __init__(self, kept_tokens: _Optional[int] = ..., compression_ratio: _Optional[float] = ..., kv_bytes_full: _Optional[int] = ..., kv_bytes_sent: _Optional[int] = ..., wire_dtype: _Optional[_Union[WireDtype, str]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("ttft_s", "tpot_s", "prefill_s", "transfer_s", "e2e_s")
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    E2E_S_FIELD_NUMBER: _ClassVar[int]
    ttft_s: float
    tpot_s: float
    prefill_s: float
    transfer_s: float
    e2e_s: float
    def __init__(self, ttft_s: _Optional[float] = ..., tpot_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., e2e_s: _Optional[float] = ...) -> None: ...

class Final(_message.Message):
    __slots__ = ("request_id", "finish_reason", "usage", "compression", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    finish_reason: FinishReason
    usage: Usage
    compression: CompressionReport
    timings: Timings
    def __init__(self, request_id: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., compression: _Optional[_Union[CompressionReport, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "compression", "decode_address", "wire_dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    compression: Compression
    decode_address: str
    wire_dtype: WireDtype
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., compression: _Optional[_Union[Compression, _Mapping]] = ..., decode_address: _Optional[str] = ..., wire_dtype: _Optional[_Union[WireDtype, str]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("handle", "first_token_id", "prompt_tokens", "kept_tokens", "kv_bytes_full", "kv_bytes_sent", "queue_s", "prefill_s", "transfer_s", "finish_reason", "actor_resident_bytes")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FULL_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    handle: str
    first_token_id: int
    prompt_tokens: int
    kept_tokens: int
    kv_bytes_full: int
    kv_bytes_sent: int
    queue_s: float
    prefill_s: float
    transfer_s: float
    finish_reason: FinishReason
    actor_resident_bytes: int
    def __init__(self, handle: _Optional[str] = ..., first_token_id: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., kept_tokens: _Optional[int] = ..., kv_bytes_full: _Optional[int] = ..., kv_bytes_sent: _Optional[int] = ..., queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., actor_resident_bytes: _Optional[int] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("format_version", "model", "request_id", "prompt_length", "kept_lengths", "wire_dtype", "scale_layout", "compression", "payload_bytes", "checksum_algorithm", "num_chunks", "chunk_bytes", "first_token_id", "sampling", "context_token_ids")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    KEPT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    model: ModelFingerprint
    request_id: str
    prompt_length: int
    kept_lengths: _containers.RepeatedScalarFieldContainer[int]
    wire_dtype: WireDtype
    scale_layout: ScaleLayout
    compression: Compression
    payload_bytes: int
    checksum_algorithm: ChecksumAlgorithm
    num_chunks: int
    chunk_bytes: int
    first_token_id: int
    sampling: SamplingParams
    context_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, format_version: _Optional[int] = ..., model: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., request_id: _Optional[str] = ..., prompt_length: _Optional[int] = ..., kept_lengths: _Optional[_Iterable[int]] = ..., wire_dtype: _Optional[_Union[WireDtype, str]] = ..., scale_layout: _Optional[_Union[ScaleLayout, str]] = ..., compression: _Optional[_Union[Compression, _Mapping]] = ..., payload_bytes: _Optional[int] = ..., checksum_algorithm: _Optional[_Union[ChecksumAlgorithm, str]] = ..., num_chunks: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., first_token_id: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., context_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("index", "payload", "checksum")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    index: int
    payload: bytes
    checksum: int
    def __init__(self, index: _Optional[int] = ..., payload: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class LoadKVRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    chunk: KVChunk
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., chunk: _Optional[_Union[KVChunk, _Mapping]] = ...) -> None: ...

class LoadKVResponse(_message.Message):
    __slots__ = ("handle", "lease_s")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    handle: str
    lease_s: float
    def __init__(self, handle: _Optional[str] = ..., lease_s: _Optional[float] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("active_sequences", "kv_resident_bytes", "kv_budget_bytes", "queue_depth", "model")
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KV_RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    active_sequences: int
    kv_resident_bytes: int
    kv_budget_bytes: int
    queue_depth: int
    model: ModelFingerprint
    def __init__(self, active_sequences: _Optional[int] = ..., kv_resident_bytes: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., queue_depth: _Optional[int] = ..., model: _Optional[_Union[ModelFingerprint, _Mapping]] = ...) -> None: ...
