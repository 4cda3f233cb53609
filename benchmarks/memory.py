"""Resident memory of each service over many requests of different lengths.

    .venv/bin/python -m benchmarks.memory [--rounds 12]

Starts the stack as `snapkv-serve up` does (router, prefill with one Ray actor, decode) and sends
rounds of 8 requests, 4 at a time. Request i takes the first 500 + (787 i mod 3,400) tokens of the
shipped GPL-2 text, with budget 256 + 128 (i mod 4) and 8 + (i mod 24) new tokens. So prompt
lengths, budgets and batch sizes keep changing, as they do in service. After each round the table
shows each process's resident set size. A process that keeps growing over the later rounds keeps
memory that its requests no longer need.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

import psutil

from benchmarks.common import document_ids, markdown_table, progress, write_json
from router.client import SnapKVClient
from snapkv.cli_services import LocalStack
from snapkv.model import DEFAULT_MODEL, resolve_tokenizer

PER_ROUND = 8
CONCURRENCY = 4
PROCESSES = ("decode", "prefill server", "prefill actor", "router")
# Rounds left out of the growth figure: by their end each process has seen the usual sizes.
SETTLING_ROUNDS = 2


def request_settings(index: int) -> tuple[int, int, int]:
    """Return the prompt tokens, budget and new tokens of request `index`."""
    return 500 + (787 * index) % 3400, 256 + 128 * (index % 4), 8 + index % 24


def resident_mib(stack: LocalStack) -> dict[str, float]:
    """Return the resident set size of each service process, and of the prefill server's Ray actor."""
    readings = {name: psutil.Process(stack.processes[name].pid).memory_info().rss for name in ("decode", "router")}
    prefill = psutil.Process(stack.processes["prefill"].pid)
    readings["prefill server"] = prefill.memory_info().rss
    readings["prefill actor"] = sum(_actor_rss(process) for process in prefill.children(recursive=True))
    return {name: readings[name] / 2**20 for name in PROCESSES}


def _actor_rss(process: psutil.Process) -> int:
    """Return the resident set size of a prefill actor process, and 0 for any other or one that has exited."""
    # Ray titles its actor processes after the class. They run under the raylet that the prefill
    # server started, beside Ray's own processes, which may exit while the readings are taken.
    try:
        return process.memory_info().rss if process.cmdline()[:1] == ["ray::PrefillActor"] else 0
    except psutil.NoSuchProcess:
        return 0


def run(rounds: int) -> dict:
    tokenizer = resolve_tokenizer(DEFAULT_MODEL)
    ids = document_ids(tokenizer, 4000)

    def send(client: SnapKVClient, index: int) -> None:
        tokens, budget, max_tokens = request_settings(index)
        for _ in client.generate(tokenizer.decode(ids[:tokens]), max_tokens=max_tokens, budget=budget, raw=True):
            pass

    readings = []
    with LocalStack(DEFAULT_MODEL) as stack:
        stack.start()
        with SnapKVClient(stack.address("router"), timeout_s=900) as client:
            send(client, 0)
            readings.append({"requests": 1, "seconds": 0.0, **resident_mib(stack)})
            for number in range(rounds):
                started = time.perf_counter()
                first = 1 + number * PER_ROUND
                with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
                    list(pool.map(lambda index: send(client, index), range(first, first + PER_ROUND)))
                readings.append({"requests": first + PER_ROUND, "seconds": time.perf_counter() - started, **resident_mib(stack)})
                progress(f"memory: round {number + 1} of {rounds}: " + ", ".join(
                    f"{name} {readings[-1][name]:,.0f} MiB" for name in PROCESSES))
    return {"per_round": PER_ROUND, "concurrency": CONCURRENCY, "rounds": readings}


def growth_per_request(result: dict, name: str) -> float | None:
    """Return a process's mean growth in MiB per request after the settling rounds, or None with too few rounds."""
    rounds = result["rounds"]
    if len(rounds) < SETTLING_ROUNDS + 2:
        return None
    first, last = rounds[SETTLING_ROUNDS], rounds[-1]
    return (last[name] - first[name]) / (last["requests"] - first["requests"])


def summarize(result: dict) -> str:
    rows = [[r["requests"], *(round(r[name]) for name in PROCESSES)] for r in result["rounds"]]
    lines = [markdown_table(["requests", *(f"{name} MiB" for name in PROCESSES)], rows), ""]
    for name in PROCESSES:
        growth = growth_per_request(result, name)
        if growth is not None:
            start = result["rounds"][SETTLING_ROUNDS]["requests"]
            lines.append(f"- {name}: {growth:+.2f} MiB a request from request {start} on")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help=f"rounds of {PER_ROUND} requests")
    args = parser.parse_args()
    result = run(args.rounds)
    print(summarize(result))
    progress(f"wrote {write_json('memory', result)}")


if __name__ == "__main__":
    main()
