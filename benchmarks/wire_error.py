"""How much each KV wire dtype changes the cache and the next-token logits, on the embedded model.

    .venv/bin/python -m benchmarks.wire_error [--chars 2500] [--prompts 4] [--budget 256] [--steps 24]

Each of `--prompts` parts of the shipped GPL-2 text is prefilled, then `--steps` tokens are decoded
greedily from the fp32 cache. The same tokens are then teacher-forced from each variant of the cache.
The report gives the relative (Frobenius) error of keys and values, the largest logit difference and
the mean KL divergence of the next-token distribution. The variants are the codec's round trips
(fp16, bf16, and int8 with per-channel key and per-token value scales) plus int8 with per-token scales
for keys too, the alternative that the codec's int8 layout was chosen against.
"""

from __future__ import annotations

import argparse
from importlib.resources import files

import torch

from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Engine, Request
from snapkv.kv_cache import BatchCache, PromptCache
from snapkv.messages import model_fingerprint
from snapkv.model import load_model
from snapkv.proto import serving_pb2 as pb
from snapkv.wire import KVAssembler, encode_kv

WIRE_DTYPES = {"fp16": pb.WIRE_DTYPE_FP16, "bf16": pb.WIRE_DTYPE_BF16, "int8": pb.WIRE_DTYPE_INT8}


def wire_round_trip(engine: Engine, cache: PromptCache, wire_dtype: int) -> PromptCache:
    fingerprint = model_fingerprint(engine.model)
    header, chunks = encode_kv(
        cache,
        request_id="benchmark",
        model=fingerprint,
        first_token_id=0,
        prompt_ids=(),
        sampling=SamplingParams(),
        compression=None,
        wire_dtype=wire_dtype,
    )
    assembler = KVAssembler(header, fingerprint, dtype=cache.keys.dtype)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish().cache


def per_token_keys(cache: PromptCache) -> PromptCache:
    """Round-trip keys and values through int8 with one scale per (layer, KV head, token) for both."""

    def round_trip(x: torch.Tensor) -> torch.Tensor:
        scales = x.abs().amax(dim=-1, keepdim=True) / 127
        divisor = torch.where(scales == 0, torch.ones_like(scales), scales)
        return torch.round(x / divisor).clamp(-127, 127) * scales

    return PromptCache(round_trip(cache.keys), round_trip(cache.values), cache.prompt_length)


def teacher_forced_logits(engine: Engine, cache: PromptCache, tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), vocab_size] of each step when `tokens` are fed one by one from `cache`."""
    batch_cache = BatchCache([cache], max_new_tokens=len(tokens) + 1)
    return torch.stack([engine.decode_step(batch_cache, torch.tensor([token]))[0] for token in tokens])


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return float((approximation - reference).norm() / reference.norm())


def logit_errors(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Return the largest absolute logit difference and the mean KL divergence (nats) over the steps."""
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none")
    return float((logits - reference).abs().max()), float(kl.sum(-1).mean())


def measure(engine: Engine, prompt_ids: tuple[int, ...], budget: int, steps: int) -> dict[str, tuple[float, ...]]:
    """Return, per variant: key error, value error, max logit difference, mean KL divergence."""
    compression = CompressionConfig(budget=budget) if budget else None
    result = engine.prefill([Request("benchmark", prompt_ids, SamplingParams(max_tokens=steps), compression)])[0]
    tokens = [event.token_id for event in engine.decode([result])][:-1]
    reference = teacher_forced_logits(engine, result.cache, tokens)

    variants = {name: wire_round_trip(engine, result.cache, dtype) for name, dtype in WIRE_DTYPES.items()}
    variants["int8, per-token keys"] = per_token_keys(result.cache)
    errors = {}
    for name, cache in variants.items():
        logits = teacher_forced_logits(engine, cache, tokens)
        key_error = relative_error(result.cache.keys, cache.keys)
        value_error = relative_error(result.cache.values, cache.values)
        errors[name] = (key_error, value_error, *logit_errors(reference, logits))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=2500, help="characters of the GPL-2 text in each prompt")
    parser.add_argument("--prompts", type=int, default=4, help="prompts, taken from consecutive parts of the text")
    parser.add_argument("--budget", type=int, default=0, help="SnapKV budget in tokens; 0 keeps the whole cache")
    parser.add_argument("--steps", type=int, default=24, help="decoded tokens per prompt")
    arguments = parser.parse_args()

    engine = Engine(load_model())
    text = files("snapkv").joinpath("data/gpl-2.0.txt").read_text()
    for index in range(arguments.prompts):
        part = text[index * arguments.chars : (index + 1) * arguments.chars]
        prompt_ids = tuple(engine.tokenizer(part).input_ids)
        print(f"prompt {index}: {len(prompt_ids)} tokens, budget {arguments.budget or 'none'}")
        for name, (key_error, value_error, max_diff, kl) in measure(
            engine, prompt_ids, arguments.budget, arguments.steps
        ).items():
            print(
                f"  {name:24s} keys {key_error:.3%}  values {value_error:.3%}  "
                f"max |logit diff| {max_diff:.3f}  mean KL {kl:.2e}"
            )


if __name__ == "__main__":
    main()
