"""Prefill time and peak memory at one prompt length: plain transformers prefill vs the engine's
prefill with and without SnapKV compression, on the embedded model.

    .venv/bin/python -m benchmarks.prefill --tokens 8000 --budget 1024

Each variant runs in its own child process, so that its peak resident set size is its own; the
prompt is the shipped GPL-2 text repeated to the requested length. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

VARIANTS = ("transformers", "engine-full", "engine-snapkv")

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
    compression = CompressionConfig(budget=budget) if variant == "engine-snapkv" else None
    return engine.prefill([Request("bench", tuple(ids), SamplingParams(max_tokens=1), compression)])

engine = Engine(loaded) if variant != "transformers" else None
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8000, help="prompt length in tokens")
    parser.add_argument("--budget", type=int, default=1024, help="SnapKV budget, window included")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant (best time, worst memory)")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks/prefill.json"))
    args = parser.parse_args()

    rows = []
    for variant in VARIANTS:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        rows.append(measure(variant, args.tokens, args.budget, args.repeats))

    base = rows[0]
    print(f"{'variant':<16}{'tokens':>8}{'seconds':>10}{'x time':>8}{'peak MiB':>10}{'x memory':>10}")
    for row in rows:
        print(
            f"{row['variant']:<16}{row['tokens']:>8}{row['seconds']:>10.2f}{row['seconds'] / base['seconds']:>8.2f}"
            f"{row['peak_extra_bytes'] / 2**20:>10.1f}{row['peak_extra_bytes'] / base['peak_extra_bytes']:>10.2f}"
        )
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"budget": args.budget, "machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
