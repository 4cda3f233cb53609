"""Bytes that prefill ships to decode per request, against the raw fp16 KV of the whole prompt.

    .venv/bin/python -m benchmarks.wire [--lengths 1024 2048 4096 8192] [--budgets 256 512 1024]

Raw fp16 KV is what a disaggregated server without compression ships: keys and values of every
layer, KV head and prompt position, 2 bytes each. The compressed streams are encoded by the real
codec and serialized message by message, with headers, chunk checksums and int8 scales. Their size
depends on the cache's shape and the prompt's token ids, not on the values. So the caches hold zeros
of the embedded model's shape, and the prompt is real text.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import document_ids, markdown_table, progress, write_json
from snapkv.config import CompressionConfig, SamplingParams, head_dim
from snapkv.kv_cache import PromptCache
from snapkv.messages import model_fingerprint
from snapkv.model import load_model
from snapkv.proto import serving_pb2 as pb
from snapkv.wire import encode_kv, load_kv_requests

WIRE_DTYPES = {"fp16": pb.WIRE_DTYPE_FP16, "int8": pb.WIRE_DTYPE_INT8}
TARGETS = {"fp16": "within 2 % of 8x at 4,096 tokens, budget 512", "int8": "at least 15x at 4,096 tokens, budget 512"}


def stream_bytes(cache: PromptCache, prompt_ids: list[int], fingerprint, wire_dtype: int, budget: int) -> int:
    """Serialize the whole LoadKV stream of `cache` and return its size in bytes."""
    header, chunks = encode_kv(
        cache, request_id="benchmark-wire", model=fingerprint, first_token_id=prompt_ids[-1], prompt_ids=prompt_ids,
        sampling=SamplingParams(), compression=CompressionConfig(budget=budget), wire_dtype=wire_dtype,
    )
    return sum(request.ByteSize() for request in load_kv_requests(header, chunks))


def run(lengths: list[int], budgets: list[int]) -> dict:
    loaded = load_model()
    config = loaded.model.config
    num_layers, num_kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_size = head_dim(config)
    fingerprint = model_fingerprint(loaded.model)
    rows = []
    for length in lengths:
        prompt_ids = document_ids(loaded.tokenizer, length)
        raw_fp16 = 2 * num_layers * num_kv_heads * length * head_size * 2
        for budget in budgets:
            if budget >= length:
                continue
            shape = (num_layers, num_kv_heads, budget, head_size)
            cache = PromptCache(torch.zeros(shape), torch.zeros(shape), length)
            for name, wire_dtype in WIRE_DTYPES.items():
                sent = stream_bytes(cache, prompt_ids, fingerprint, wire_dtype, budget)
                tensors = 2 * num_layers * num_kv_heads * budget * head_size * (2 if name == "fp16" else 1)
                rows.append({
                    "prompt_tokens": length, "budget": budget, "wire_dtype": name, "raw_fp16_bytes": raw_fp16,
                    "sent_bytes": sent, "kv_tensor_bytes": tensors, "reduction": raw_fp16 / sent,
                    "ideal_reduction": length / budget * (2 if name == "int8" else 1),
                })
                progress(f"wire: {length} tokens, budget {budget}, {name}: {sent:,} bytes ({raw_fp16 / sent:.2f}x)")
    return {"rows": rows, "targets": TARGETS, "model": loaded.name}


def summarize(result: dict) -> str:
    rows = result["rows"]
    table = markdown_table(
        ["prompt tokens", "budget", "wire", "raw fp16 KV bytes", "bytes sent", "x less", "overhead over tensors"],
        [[r["prompt_tokens"], r["budget"], r["wire_dtype"], r["raw_fp16_bytes"], r["sent_bytes"], r["reduction"],
          f"{(r['sent_bytes'] - r['kv_tensor_bytes']) / r['kv_tensor_bytes']:.2%}"] for r in rows],
    )
    checks = []
    for r in rows:
        if r["prompt_tokens"] == 4096 and r["budget"] == 512:
            if r["wire_dtype"] == "fp16":
                shortfall = 1 - r["reduction"] / 8
                checks.append(f"- fp16 at 4,096 tokens, budget 512: {r['reduction']:.3f}x, {shortfall:.2%} short of the "
                              f"ideal 8x (target: within 2 %): {'met' if shortfall <= 0.02 else 'missed'}")
            else:
                checks.append(f"- int8 at 4,096 tokens, budget 512: {r['reduction']:.2f}x (target: at least 15x): "
                              f"{'met' if r['reduction'] >= 15 else 'missed'}")
    return table + ("\n\n" + "\n".join(checks) if checks else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    args = parser.parse_args()
    result = run(args.lengths, args.budgets)
    print(summarize(result))
    progress(f"wrote {write_json('wire', result)}")


if __name__ == "__main__":
    main()
