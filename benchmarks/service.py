"""Service overhead: time to first token and time per output token through router, prefill (Ray)
and decode on loopback, against the same request run in this process.

    .venv/bin/python -m benchmarks.service [--tokens 4096] [--budget 1024] [--max-tokens 32]

Both sides run one greedy request on the embedded model with the same prompt (the shipped GPL-2 text
cut to `--tokens` tokens) and produce the same tokens. Times are taken where the client sees them:
first token from the start of the call, then the mean interval per token after the first. The stack is
measured twice: with `snapkv-serve up`'s split of the cores (decode gets a quarter, prefill all), and
with decode given as many threads as the in-process run has.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import document_ids, markdown_table, progress, write_json
from router.client import Delta, SnapKVClient, Summary
from snapkv.cli_services import LocalStack, split_cores
from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Engine, Request
from snapkv.model import DEFAULT_MODEL, load_model


def timings(arrivals: list[tuple[float, int]], start: float) -> tuple[float, float, int]:
    """Return (TTFT, TPOT, tokens) from (time, tokens arrived) pairs."""
    tokens = sum(count for _, count in arrivals)
    ttft = arrivals[0][0] - start
    tpot = (arrivals[-1][0] - arrivals[0][0]) / max(1, tokens - arrivals[0][1])
    return ttft, tpot, tokens


def in_process(engine: Engine, ids: list[int], budget: int, max_tokens: int) -> dict:
    request = Request("bench", tuple(ids), SamplingParams(max_tokens=max_tokens), CompressionConfig(budget=budget))
    start = time.perf_counter()
    arrivals = [(time.perf_counter(), 1) for _ in engine.generate([request])]
    ttft, tpot, tokens = timings(arrivals, start)
    return {"ttft_s": ttft, "tpot_s": tpot, "tokens": tokens}


def through_services(text: str, budget: int, max_tokens: int, decode_threads: int) -> dict:
    with LocalStack(DEFAULT_MODEL, decode_options=("--threads", str(decode_threads))) as stack:
        stack.start()
        with SnapKVClient(stack.address("router"), timeout_s=900) as client:
            start = time.perf_counter()
            arrivals = []
            summary = None
            for item in client.generate(text, max_tokens=max_tokens, budget=budget, raw=True, wire_dtype="fp16"):
                if isinstance(item, Delta):
                    arrivals.append((time.perf_counter(), len(item.token_ids)))
                elif isinstance(item, Summary):
                    summary = item
    ttft, tpot, tokens = timings(arrivals, start)
    return {"ttft_s": ttft, "tpot_s": tpot, "tokens": tokens, "decode_threads": decode_threads,
            "router_ttft_s": summary.ttft_s, "router_tpot_s": summary.tpot_s, "prefill_s": summary.prefill_s}


def run(num_tokens: int, budget: int, max_tokens: int) -> dict:
    loaded = load_model()
    ids = document_ids(loaded.tokenizer, num_tokens)
    # The services tokenize text, so the prompt is the text of these ids; re-encoding may change the count.
    text = loaded.tokenizer.decode(ids)
    ids = loaded.tokenizer(text).input_ids
    engine = Engine(loaded)
    threads = torch.get_num_threads()
    progress(f"service: in process, {len(ids)} tokens, {threads} threads ...")
    rows = [{"variant": "in process", **in_process(engine, ids, budget, max_tokens), "decode_threads": threads}]
    del engine, loaded
    for label, decode_threads in (("services, cores split as by `up`", split_cores(threads)[0]),
                                  ("services, decode with all threads", threads)):
        progress(f"service: {label} ({decode_threads} decode threads) ...")
        rows.append({"variant": label, **through_services(text, budget, max_tokens, decode_threads)})
    for row in rows:
        progress(f"service: {row['variant']}: TTFT {row['ttft_s']:.2f} s, TPOT {row['tpot_s'] * 1e3:.1f} ms")
    return {"prompt_tokens": len(ids), "budget": budget, "max_tokens": max_tokens, "rows": rows}


def summarize(result: dict) -> str:
    base = result["rows"][0]
    table = markdown_table(
        ["variant", "decode threads", "TTFT s", "x TTFT", "TPOT ms", "x TPOT", "tokens"],
        [[r["variant"], r["decode_threads"], r["ttft_s"], r["ttft_s"] / base["ttft_s"], r["tpot_s"] * 1e3,
          r["tpot_s"] / base["tpot_s"], r["tokens"]] for r in result["rows"]],
    )
    best = min(result["rows"][1:], key=lambda r: r["tpot_s"])
    ratio = best["tpot_s"] / base["tpot_s"]
    return table + (f"\n\n- service TPOT / in-process TPOT: {ratio:.2f}x ({best['variant']}; target: at most 1.05x): "
                    f"{'met' if ratio <= 1.05 else 'missed'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    result = run(args.tokens, args.budget, args.max_tokens)
    print(summarize(result))
    progress(f"wrote {write_json('service', result)}")


if __name__ == "__main__":
    main()
