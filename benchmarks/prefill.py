"""Prefill time and peak memory at several prompt lengths: plain transformers prefill vs the engine's
prefill with and without SnapKV compression, on the embedded model. A last variant compresses with the
engine's layers packed in bf16 (`Engine(weight_dtype=torch.bfloat16)`, `prefill --prefill-weights bf16`).

    .venv/bin/python -m benchmarks.prefill --tokens 2048 4096 8000 --budget 1024

Each variant runs in its own child process, so that its peak resident set size is its own; the
prompt is the shipped GPL-2 text repeated to the requested length. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import markdown_table, progress, write_json

VARIANTS = ("transformers", "engine-full", "engine-snapkv", "engine-snapkv-bf16")

CHILD = """
import json, sys, time, torch
from importlib.resources import files
from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Engine, Request
from snapkv.memory import peak_resident_bytes, reset_peak, resident_bytes
from snapkv.model import load_model

variant, num_tokens, budget, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
loaded = load_model()
text = files("snapkv").joinpath("data/gpl-2.0.txt").read_text()
ids = loaded.tokenizer(text * (num_tokens // 1000 + 1)).input_ids[:num_tokens]

def run():
    if variant == "transformers":
        with torch.inference_mode():
            output = loaded.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        return output
    compression = CompressionConfig(budget=budget) if variant.startswith("engine-snapkv") else None
    return engine.prefill([Request("bench", tuple(ids), SamplingParams(max_tokens=1), compression)])

weight_dtype = torch.bfloat16 if variant.endswith("-bf16") else None
engine = Engine(loaded, weight_dtype=weight_dtype) if variant != "transformers" else None
seconds = []
peaks = []
for _ in range(repeats):
    reset_peak()
    before = resident_bytes()
    start = time.perf_counter()
    result = run()
    seconds.append(time.perf_counter() - start)
    peaks.append(peak_resident_bytes() - before)
    del result
print(json.dumps({"variant": variant, "tokens": len(ids), "seconds": min(seconds), "peak_extra_bytes": max(peaks)}))
"""


def measure(variant: str, num_tokens: int, budget: int, repeats: int) -> dict:
    command = [sys.executable, "-c", CHILD, variant, str(num_tokens), str(budget), str(repeats)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    output = subprocess.run(command, capture_output=True, text=True, env=env)
    if output.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{output.stderr[-2000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def run(lengths: list[int], budget: int, repeats: int = 1) -> dict:
    rows = []
    for num_tokens in lengths:
        for variant in VARIANTS:
            progress(f"prefill: {variant} at {num_tokens} tokens ...")
            rows.append(measure(variant, num_tokens, budget, repeats))
            progress(f"prefill: {variant} at {num_tokens} tokens: {rows[-1]['seconds']:.2f} s, "
                     f"peak extra {rows[-1]['peak_extra_bytes'] / 2**20:.1f} MiB")
    return {"budget": budget, "rows": rows}


def summarize(result: dict) -> str:
    table_rows, checks = [], []
    for row in result["rows"]:
        base = next(r for r in result["rows"] if r["tokens"] == row["tokens"] and r["variant"] == "engine-full")
        time_ratio = row["seconds"] / base["seconds"]
        memory_ratio = row["peak_extra_bytes"] / base["peak_extra_bytes"]
        table_rows.append([row["variant"], row["tokens"], row["seconds"], time_ratio,
                           row["peak_extra_bytes"] / 2**20, memory_ratio])
        if row["variant"] == "engine-snapkv" and row["tokens"] == max(r["tokens"] for r in result["rows"]):
            checks.append(
                f"- SnapKV prefill at {row['tokens']} tokens: {time_ratio:.2f}x the time (target: at most 1.05x): "
                f"{'met' if time_ratio <= 1.05 else 'missed'}; {memory_ratio:.2f}x the peak memory (target: at most "
                f"1.10x): {'met' if memory_ratio <= 1.10 else 'missed'}"
            )
    table = markdown_table(["variant", "tokens", "seconds", "x time", "peak extra MiB", "x memory"], table_rows)
    return table + "\n\n" + "\n".join(checks) + "\n\nRatios are against the engine's prefill without compression."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The embedded model's context is 8,192 tokens, and the engine keeps room for one output token.
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8000], help="prompt lengths in tokens")
    parser.add_argument("--budget", type=int, default=1024, help="SnapKV budget, window included")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant (best time, worst memory)")
    args = parser.parse_args()
    result = run(args.tokens, args.budget, args.repeats)
    print(summarize(result))
    progress(f"wrote {write_json('prefill', result)}")


if __name__ == "__main__":
    main()
