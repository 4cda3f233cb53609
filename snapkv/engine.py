"""The in-process engine: batched prefill with SnapKV compression, then batched decode steps.

`Engine.prefill` runs left-padded prompts through the model once, compresses every layer as the
forward pass reaches it, and samples each first token from the prefill logits. `Engine.generate`
continues those sequences together, one batched forward step per token, from a `BatchCache` built
from the compressed prompt caches. Each decoded token is fed at position prompt_length + step (the
original positions), while it is written right after the kept entries in the cache.

Limitations: models whose layers use sliding-window attention are rejected, because a compressed
cache does not preserve the window's positions. Prompts are prefilled whole (no chunking), so the
longest prompt is bounded by the memory of one full forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from snapkv import attention
from snapkv.config import CompressionConfig, SamplingParams, head_dim
from snapkv.kv_cache import BatchCache, PromptCache
from snapkv.llama_decode import LlamaDecodeStep, unsupported_reason
from snapkv.model import LoadedModel
from snapkv.packed_linear import pack_linears, packed_linear_available
from snapkv.sampling import make_generator, sample_token
from snapkv.sequence import SequenceState
from snapkv.text import stop_token_ids

logger = logging.getLogger(__name__)

# `Engine(kv_dtype=AUTO_KV_DTYPE)`: fp16 decode caches for fp32 models on the Llama decode step.
AUTO_KV_DTYPE = "auto"
# The `weight_dtype` argument for each choice of the services' --decode-weights and --prefill-weights.
# Its keys are snapkv.config.WEIGHT_CHOICES, which the command line and PrefillConfig accept.
WEIGHT_DTYPES = {"model": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Request:
    """One generation request, already tokenized."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    compression: CompressionConfig | None = CompressionConfig()


@dataclass
class PrefillResult:
    """The output of prefill for one request, the input of decoding."""

    request: Request
    cache: PromptCache
    first_token: int
    logits: torch.Tensor  # [vocab_size], fp32, at the last prompt position
    generator: torch.Generator | None
    kept_positions: list[torch.Tensor | None]  # per layer [num_kv_heads, kept_len], None when uncompressed


@dataclass
class TokenEvent:
    """One generated token of one request, with the text it completed and, on the last one, why it ended."""

    index: int  # position of the request in the batch given to `generate`
    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the request's last event


class Engine:
    """Prefill, SnapKV compression and batched decoding on one loaded model."""

    def __init__(
        self,
        loaded: LoadedModel,
        pack_weights: bool | None = None,
        llama_decode: bool | None = None,
        compile_decode: bool = False,
        kv_dtype: torch.dtype | str | None = None,
        weight_dtype: torch.dtype | None = None,
    ):
        """`pack_weights` None packs the linear layers' weights for oneDNN when the model is fp32 on a
        CPU and PyTorch has the operators (see `snapkv.packed_linear`); False keeps `nn.Linear`.

        `llama_decode` None decodes through `LlamaDecodeStep` for Llama, Mistral and Qwen2 models, and
        through the model's generic forward otherwise. False always takes the generic forward.

        `compile_decode` compiles `LlamaDecodeStep` with torch.compile (see its `compile_step`). Call
        `warm_up_decode` before serving, or the first steps of each kind wait for the compiler.

        `kv_dtype` is the dtype decoding stores keys and values in; None keeps the model's. A
        narrower one (fp16 or bf16 for an fp32 model) halves the decode cache's memory and the bytes
        attention reads each step, and attention runs in that dtype. Only `LlamaDecodeStep` supports
        a dtype other than the model's. "auto" (`AUTO_KV_DTYPE`, the decode worker's default) takes
        fp16 for an fp32 model that `LlamaDecodeStep` decodes, and the model's dtype otherwise.

        `weight_dtype` torch.bfloat16 packs the weights of the decoder layers' linear products in bf16,
        for prefill and decoding alike (`snapkv.packed_linear`): faster on CPUs with bf16
        instructions, with weights, inputs and outputs of those products rounded to bf16 (in the
        decode step, the weights of the RMSNorms before the joined products are folded into them
        first). The vocabulary projection, the normalization, RoPE and the residual stream keep the
        model's dtype; attention runs in the model's dtype in prefill and in `kv_dtype` when
        decoding. It needs packed weights (an fp32 model on a CPU with oneDNN). None keeps the
        model's dtype. NOTE: measured only on a CPU with AMX; on CPUs without bf16 instructions
        oneDNN emulates bf16, which may be slower than fp32.
        """
        config = loaded.model.config
        if getattr(config, "sliding_window", None) is not None:
            raise ValueError(
                f"{loaded.name} uses sliding-window attention (sliding_window={config.sliding_window}), "
                "which compressed caches do not support"
            )
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.attention = attention.install(self.model)
        self.device = self.model.device
        if pack_weights is None:
            pack_weights = self.device.type == "cpu" and self.model.dtype == torch.float32 and packed_linear_available()
        if weight_dtype not in (None, self.model.dtype) and not pack_weights:
            raise ValueError(
                f"invalid weight_dtype={weight_dtype}: only packed weights take another dtype than the model's "
                f"({self.model.dtype}), and this engine packs none (they need an fp32 model on a CPU with oneDNN, "
                "and pack_weights not False). Pass weight_dtype=None."
            )
        self.weight_dtype = weight_dtype or self.model.dtype
        self.packed_layers = pack_linears(self.model, self.weight_dtype) if pack_weights else 0
        if llama_decode is None:
            llama_decode = unsupported_reason(self.model) is None
        # With packed weights, the decode step also packs q/k/v and gate/up as one product each.
        joined = self.packed_layers > 0
        if compile_decode and not llama_decode:
            reason = unsupported_reason(self.model) or "llama_decode=False was given"
            raise ValueError(
                f"invalid compile_decode=True: it compiles the Llama decode step, which is off ({reason}). "
                "Use a Llama, Mistral or Qwen2 model with llama_decode left at None, or compile_decode=False."
            )
        self._llama_step = (
            LlamaDecodeStep(
                self.model,
                join_projections=joined,
                compile_step=compile_decode,
                # The dtype of the joined products, which exist only with packed weights.
                weight_dtype=self.weight_dtype if joined else torch.float32,
            )
            if llama_decode else None
        )
        self.compile_decode = compile_decode
        if kv_dtype == AUTO_KV_DTYPE:
            narrow = self.model.dtype == torch.float32 and self._llama_step is not None
            kv_dtype = torch.float16 if narrow else None
        self.kv_dtype = kv_dtype or self.model.dtype
        if not isinstance(self.kv_dtype, torch.dtype):
            raise ValueError(f"invalid kv_dtype={kv_dtype!r}: expected a torch dtype, None or {AUTO_KV_DTYPE!r}")
        if not self.kv_dtype.is_floating_point:
            raise ValueError(f"invalid kv_dtype={kv_dtype}: expected a floating-point dtype such as torch.float16")
        if self.kv_dtype != self.model.dtype and self._llama_step is None:
            reason = unsupported_reason(self.model) or "llama_decode=False was given"
            raise ValueError(
                f"invalid kv_dtype={kv_dtype}: a cache dtype other than the model's ({self.model.dtype}) needs "
                f"the Llama decode step, which is off ({reason}). Pass kv_dtype=None to keep the model's dtype."
            )
        self.num_layers = config.num_hidden_layers
        self.max_context = getattr(config, "max_position_embeddings", None)
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        generation_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos += generation_eos if isinstance(generation_eos, list) else [generation_eos]
        self.stop_ids = stop_token_ids(self.tokenizer, eos)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.stop_ids)

    def check_request(self, request: Request) -> None:
        """Raise ValueError when the request cannot be served by this model."""
        length = len(request.prompt_ids)
        if length == 0:
            raise ValueError("invalid prompt: it is empty")
        if self.max_context is not None and length + request.sampling.max_tokens > self.max_context:
            raise ValueError(
                f"invalid request: prompt of {length} tokens plus max_tokens={request.sampling.max_tokens} exceeds "
                f"the model's context of {self.max_context} tokens"
            )

    @torch.inference_mode()
    def prefill(self, requests: list[Request]) -> list[PrefillResult]:
        """Run the prompts as one left-padded batch; compress each layer; sample each first token."""
        for request in requests:
            self.check_request(request)
        lengths = [len(r.prompt_ids) for r in requests]
        input_ids, attention_mask, position_ids = self._left_pad([r.prompt_ids for r in requests])

        # A batch shares one capture, so requests in it share compression settings; see `_group`.
        capture = attention.PrefillCapture(lengths, requests[0].compression, self.num_layers)
        with attention.capturing(capture):
            output = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=1,
            )
        logits = output.logits[:, -1].float()  # [B, vocab_size]

        results = []
        for b, request in enumerate(requests):
            generator = make_generator(request.sampling, self.device)
            cache = PromptCache(capture.keys[b], capture.values[b], lengths[b])
            first = sample_token(logits[b], request.sampling, generator)
            results.append(PrefillResult(request, cache, first, logits[b], generator, capture.positions[b]))
        return results

    def prefill_grouped(self, requests: list[Request]) -> list[PrefillResult]:
        """Prefill requests in batches of identical compression settings; keep the input order."""
        results: list[PrefillResult | None] = [None] * len(requests)
        for indices in _group(requests):
            for index, result in zip(indices, self.prefill([requests[i] for i in indices])):
                results[index] = result
        return results

    def _left_pad(self, prompts: list[tuple[int, ...]]):
        max_len = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), max_len), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), max_len), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            input_ids[b, max_len - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[b, max_len - len(prompt) :] = 1
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        if all(len(p) == max_len for p in prompts):
            # Without padding no mask is needed, and sdpa can then run its faster causal kernel.
            return input_ids.to(self.device), None, position_ids.to(self.device)
        return input_ids.to(self.device), attention_mask.to(self.device), position_ids.to(self.device)

    @property
    def decode_path(self) -> str:
        """The implementation of `decode_step`: "llama" (`LlamaDecodeStep`) or "generic" (the model's forward)."""
        return "generic" if self._llama_step is None else "llama"

    @torch.inference_mode()
    def decode_step(self, cache: BatchCache, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [batch] at its original position; return next-token logits [batch, vocab_size]."""
        tokens = tokens.to(self.device)
        logits = self.forward_step(cache, tokens) if self._llama_step is None else self._llama_step(cache, tokens)
        cache.advance()
        return logits.float()

    def warm_up_decode(self, batch_size: int = 8, kept_positions: int = 512) -> None:
        """Run one decode step of each kind, so that a compiled step compiles them now and not while a
        request waits. The kinds: one row, `batch_size` rows of one length, and rows of different lengths.

        The compiler tunes its kernels for the first sizes it compiles for. Pass typical ones: the
        batch size the worker runs at, and the positions a compressed prompt keeps.

        NOTE: a step that writes the last position of its cache (`step_kv_len` equal to the capacity)
        compiles once more. `decode` and the decode worker never get there: a sequence's first token
        comes from prefill, so its cache keeps one of `max_tokens` positions free.
        """
        config = self.model.config

        def prompt(kept_length: int) -> PromptCache:
            shape = (self.num_layers, config.num_key_value_heads, kept_length, head_dim(config))
            keys = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            return PromptCache(keys, keys.clone(), kept_length)

        batch_size = max(2, batch_size)
        kept_positions = max(2, kept_positions)
        for kept_per_row in (
            [kept_positions],
            [kept_positions] * batch_size,
            [kept_positions - row % 2 for row in range(batch_size)],
        ):
            cache = BatchCache([prompt(k) for k in kept_per_row], max_new_tokens=2)
            self.decode_step(cache, torch.zeros(len(kept_per_row), dtype=torch.long))

    @torch.inference_mode()
    def forward_step(self, cache: BatchCache, tokens: torch.Tensor) -> torch.Tensor:
        """Run one decode step through the model's generic forward without advancing the cache; return the logits.

        The reference `LlamaDecodeStep` is tested against.
        """
        output = self.model(
            input_ids=tokens.unsqueeze(1).to(self.device),
            attention_mask=cache.attention_mask(self.attention, self.model.dtype),
            position_ids=cache.position_ids(),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1]

    def generate(self, requests: list[Request]) -> Iterator[TokenEvent]:
        """Prefill then decode every request together, yielding each token as it is chosen."""
        results = self.prefill_grouped(requests)
        yield from self.decode(results)

    def start_sequence(self, result: PrefillResult) -> SequenceState:
        """Create the generation state of one prefilled request (its first token not yet accepted)."""
        request = result.request
        return SequenceState.start(self.tokenizer, request.sampling, self.stop_ids, request.prompt_ids, result.generator)

    def decode(self, results: list[PrefillResult]) -> Iterator[TokenEvent]:
        """Decode from prefill results, batching every unfinished sequence into each step."""
        sequences = [self.start_sequence(r) for r in results]
        active = []
        for index, (sequence, result) in enumerate(zip(sequences, results)):
            text = sequence.accept(result.first_token)
            yield TokenEvent(index, result.first_token, text, sequence.finish_reason)
            if not sequence.finished:
                active.append(index)
        if not active:
            return

        cache = BatchCache(
            [results[i].cache for i in active], max(sequences[i].sampling.max_tokens for i in active), self.kv_dtype
        )
        while active:
            logits = self.decode_step(cache, torch.tensor([sequences[i].last_token for i in active]))
            still_active = []
            for row, index in enumerate(active):
                sequence = sequences[index]
                token = sequence.sample(logits[row])
                text = sequence.accept(token)
                yield TokenEvent(index, token, text, sequence.finish_reason)
                if not sequence.finished:
                    still_active.append(row)
            if len(still_active) < len(active):
                active = [active[row] for row in still_active]
                if active:
                    cache.select_rows(still_active)


def _group(requests: list[Request]) -> list[list[int]]:
    groups: dict[CompressionConfig | None, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.compression, []).append(index)
    return list(groups.values())
