"""Service overhead: time to first token and time per output token through router, prefill (Ray)
and decode on loopback, against the same request run in this process.

    .venv/bin/python -m benchmarks.service [--tokens 4096] [--budget 1024] [--max-tokens 32] [--repeats 3]
        [--kv-dtype auto]

Both sides run one greedy request on the embedded model with the same prompt (the shipped GPL-2 text
cut to `--tokens` tokens) and produce the same tokens. Times are taken where the client sees them:
first token from the start of the call, then the mean interval per token after the first.

The stack runs with decode given as many threads as this process has, first with the eager decode
step, then with the compiled one (`Engine(compile_decode=True)`, `snapkv-serve decode
--compile-decode`, both compiled before the requests). For each, the in-process request and the
request through the services alternate `--repeats` times, and the table shows the medians. While the
in-process request runs, every process of the stack (Ray's included) is stopped with SIGSTOP, so the
in-process side has the machine to itself, as it would without the stack, and a drift in the
machine's speed reaches both sides alike. A last stack uses `snapkv-serve up`'s split of the cores
(decode gets a quarter, prefill all) and is compared with the eager in-process requests.
"""


from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import psutil
import torch

from benchmarks.common import document_ids, markdown_table, progress, write_json
from router.client import Delta, SnapKVClient
from snapkv.cli import KV_DTYPES
from snapkv.cli_services import LocalStack, engine_kv_dtype, split_cores
from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Engine, Request
from snapkv.model import DEFAULT_MODEL, load_model


def timings(arrivals: list[tuple[float, int]], start: float) -> tuple[float, float, int]:
    """Return (TTFT, TPOT, tokens) from (time, tokens arrived) pairs."""
    tokens = sum(count for _, count in arrivals)
    ttft = arrivals[0][0] - start
    tpot = (arrivals[-1][0] - arrivals[0][0]) / max(1, tokens - arrivals[0][1])
    return ttft, tpot, tokens


def medians(runs: list[tuple[float, float, int]]) -> dict:
    """Return the median TTFT and TPOT of several runs' (TTFT, TPOT, tokens), with every run's values."""
    return {"ttft_s": statistics.median(run[0] for run in runs), "tpot_s": statistics.median(run[1] for run in runs),
            "tokens": runs[0][2], "run_ttft_s": [run[0] for run in runs], "run_tpot_s": [run[1] for run in runs]}


@contextlib.contextmanager
def stopped(stack: LocalStack) -> Iterator[None]:
    """Stop every process of `stack` and their descendants (SIGSTOP) for the block; continue them after."""
    processes = []
    for child in stack.processes.values():
        parent = psutil.Process(child.pid)
        processes += [parent, *parent.children(recursive=True)]
    for process in processes:
        process.suspend()
    try:
        yield
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()


def in_process_once(engine: Engine, ids: list[int], budget: int, max_tokens: int) -> tuple[float, float, int]:
    request = Request("bench", tuple(ids), SamplingParams(max_tokens=max_tokens), CompressionConfig(budget=budget))
    start = time.perf_counter()
    arrivals = [(time.perf_counter(), 1) for _ in engine.generate([request])]
    return timings(arrivals, start)


def through_services_once(client: SnapKVClient, text: str, budget: int, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    arrivals = []
    for item in client.generate(text, max_tokens=max_tokens, budget=budget, raw=True, wire_dtype="fp16"):
        if isinstance(item, Delta):
            arrivals.append((time.perf_counter(), len(item.token_ids)))
    return timings(arrivals, start)


def stack_options(decode_threads: int, compiled: bool, kv_dtype: str) -> tuple[str, ...]:
    return ("--threads", str(decode_threads), "--kv-dtype", kv_dtype) + (("--compile-decode",) if compiled else ())


def measure_alternately(
    engine: Engine, ids: list[int], text: str, budget: int, max_tokens: int, repeats: int, kv_dtype: str
) -> tuple[dict, dict]:
    """Start a stack like the engine (threads, step, cache dtype) and alternate the two sides' requests.

    Return the in-process and the services' medians.
    """
    threads = torch.get_num_threads()
    local, served = [], []
    options = stack_options(threads, engine.compile_decode, kv_dtype)
    with LocalStack(DEFAULT_MODEL, decode_options=options) as stack:
        stack.start()
        with SnapKVClient(stack.address("router"), timeout_s=900) as client:
            for repeat in range(1, repeats + 1):
                progress(f"service: request {repeat} of {repeats} in process, then through the services ...")
                with stopped(stack):
                    local.append(in_process_once(engine, ids, budget, max_tokens))
                served.append(through_services_once(client, text, budget, max_tokens))
    return medians(local), medians(served)


def measure_split_stack(text: str, budget: int, max_tokens: int, repeats: int, kv_dtype: str) -> dict:
    """Measure the services alone with `up`'s split of the cores: `repeats` requests one after another."""
    decode_threads = split_cores(torch.get_num_threads())[0]
    with LocalStack(DEFAULT_MODEL, decode_options=stack_options(decode_threads, False, kv_dtype)) as stack:
        stack.start()
        with SnapKVClient(stack.address("router"), timeout_s=900) as client:
            runs = [through_services_once(client, text, budget, max_tokens) for _ in range(repeats)]
    return {**medians(runs), "decode_threads": decode_threads, "compiled": False}


def run(num_tokens: int, budget: int, max_tokens: int, repeats: int, kv_dtype: str = "auto") -> dict:
    """Measure every variant; `kv_dtype` is the decode worker's --kv-dtype, which the in-process engine follows."""
    loaded = load_model()
    ids = document_ids(loaded.tokenizer, num_tokens)
    # The services tokenize text, so the prompt is the text of these ids; re-encoding may change the count.
    text = loaded.tokenizer.decode(ids)
    ids = loaded.tokenizer(text).input_ids
    threads = torch.get_num_threads()
    rows = []
    for compiled in (False, True):
        step = ", compiled step" if compiled else ""
        # The compiled engine gets a copy of its own: the first engine packed the linear layers of `loaded`.
        engine = Engine(load_model() if compiled else loaded, compile_decode=compiled, kv_dtype=engine_kv_dtype(kv_dtype))
        if compiled:
            progress("service: compiling the in-process decode step ...")
            engine.warm_up_decode()
        progress(f"service: {len(ids)} tokens, {threads} threads{step}: starting the stack ...")
        local, served = measure_alternately(engine, ids, text, budget, max_tokens, repeats, kv_dtype)
        del engine
        rows.append({"variant": f"in process{step}", **local, "decode_threads": threads, "compiled": compiled})
        rows.append({"variant": f"services, decode with all threads{step}", **served, "decode_threads": threads,
                     "compiled": compiled})
    progress("service: services with the cores split as by `up` ...")
    rows.insert(2, {"variant": "services, cores split as by `up`",
                    **measure_split_stack(text, budget, max_tokens, repeats, kv_dtype)})
    for row in rows:
        progress(f"service: {row['variant']}: TTFT {row['ttft_s']:.2f} s, TPOT {row['tpot_s'] * 1e3:.1f} ms")
    return {"prompt_tokens": len(ids), "budget": budget, "max_tokens": max_tokens, "repeats": repeats,
            "kv_dtype": kv_dtype, "alternating": True, "rows": rows}


def summarize(result: dict) -> str:
    # Each row against the in-process row with the same kind of decode step (results from before the
    # compiled step have no "compiled" field).
    bases = {r.get("compiled", False): r for r in result["rows"] if r["variant"].startswith("in process")}

    def base(row: dict) -> dict:
        return bases[row.get("compiled", False)]

    table = markdown_table(
        ["variant", "decode threads", "TTFT s", "x TTFT", "TPOT ms", "x TPOT", "tokens"],
        [[r["variant"], r["decode_threads"], r["ttft_s"], r["ttft_s"] / base(r)["ttft_s"], r["tpot_s"] * 1e3,
          r["tpot_s"] / base(r)["tpot_s"], r["tokens"]] for r in result["rows"]],
    )
    # Results from before the option have no "kv_dtype": their caches were in the model's dtype.
    lines = [table, "", f"- decode caches: --kv-dtype {result.get('kv_dtype', 'model')}, in process and through the services"]
    if result.get("alternating"):
        lines.append(f"- medians of {result['repeats']} requests a variant; in-process and service requests alternated, "
                     "with the stack stopped during the in-process ones")
    for compiled, in_process_row in bases.items():
        services = [r for r in result["rows"] if r.get("compiled", False) == compiled and r is not in_process_row]
        best = min(services, key=lambda r: r["tpot_s"])
        ratio = best["tpot_s"] / in_process_row["tpot_s"]
        lines.append(f"- service TPOT / in-process TPOT: {ratio:.3f}x ({best['variant']}; target: at most 1.05x): "
                     f"{'met' if ratio <= 1.05 else 'missed'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="requests per variant; the table shows medians")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto",
                        help="the decode worker's --kv-dtype; the in-process engine stores its cache alike")
    args = parser.parse_args()
    result = run(args.tokens, args.budget, args.max_tokens, args.repeats, args.kv_dtype)
    print(summarize(result))
    progress(f"wrote {write_json('service', result)}")


if __name__ == "__main__":
    main()
