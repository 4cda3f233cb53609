"""PNG plots of the benchmark results in docs/benchmarks/."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)

from benchmarks.memory import PROCESSES  # noqa: E402


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def wire(result: dict, folder: Path) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4))
    for (budget, dtype), marker in zip(
        sorted({(r["budget"], r["wire_dtype"]) for r in result["rows"]}), "os^vD<>ph*"
    ):
        rows = [r for r in result["rows"] if r["budget"] == budget and r["wire_dtype"] == dtype]
        axis.plot([r["prompt_tokens"] for r in rows], [r["reduction"] for r in rows], marker=marker,
                  label=f"budget {budget}, {dtype}")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log", base=2)
    for scale in (axis.xaxis, axis.yaxis):
        scale.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.set_xlabel("prompt tokens")
    axis.set_ylabel("raw fp16 KV bytes / bytes sent")
    axis.set_title("KV bytes shipped from prefill to decode")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, folder / "wire.png")


def decode(result: dict, folder: Path) -> Path:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for cache in ("snapkv", "full"):
        rows = [r for r in result["tpot"] if r["cache"] == cache]
        label = f"SnapKV, budget {result['budget']}" if cache == "snapkv" else "full cache"
        left.plot([r["prompt_tokens"] for r in rows], [r["seconds"] * 1e3 for r in rows], marker="o", label=label)
    left.set_xlabel("prompt tokens")
    left.set_ylabel("ms per output token (batch 1)")
    left.set_title("Time per output token")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)

    variants = list(dict.fromkeys(r["variant"] for r in result["throughput"]))
    batches = sorted({r["batch"] for r in result["throughput"]})
    width = 0.8 / len(variants)
    for index, variant in enumerate(variants):
        values = [next(r["tokens_per_second"] for r in result["throughput"] if r["batch"] == b and r["variant"] == variant)
                  for b in batches]
        right.bar([i + index * width for i in range(len(batches))], values, width, label=variant)
    right.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    right.set_ylabel("tokens per second")
    right.set_title(f"Decode throughput, {result['throughput_prompt_tokens']}-token prompts")
    right.legend(fontsize=7)
    right.grid(True, axis="y", alpha=0.3)
    return _save(figure, folder / "decode.png")


def prefill(result: dict, folder: Path) -> Path:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in dict.fromkeys(r["variant"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["variant"] == variant]
        tokens = [r["tokens"] for r in rows]
        left.plot(tokens, [r["seconds"] for r in rows], marker="o", label=variant)
        right.plot(tokens, [r["peak_extra_bytes"] / 2**20 for r in rows], marker="o", label=variant)
    left.set_ylabel("seconds")
    left.set_title("Prefill time")
    right.set_ylabel("peak extra MiB")
    right.set_title(f"Prefill peak memory (SnapKV budget {result['budget']})")
    for axis in (left, right):
        axis.set_xlabel("prompt tokens")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    return _save(figure, folder / "prefill.png")


def service(result: dict, folder: Path) -> Path:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["variant"] for r in result["rows"]]
    left.barh(labels, [r["ttft_s"] for r in result["rows"]])
    left.set_xlabel("seconds")
    left.set_title(f"Time to first token ({result['prompt_tokens']}-token prompt)")
    right.barh(labels, [r["tpot_s"] * 1e3 for r in result["rows"]])
    right.set_xlabel("ms")
    right.set_title("Time per output token")
    for axis in (left, right):
        axis.grid(True, axis="x", alpha=0.3)
        axis.tick_params(axis="y", labelsize=8)
    return _save(figure, folder / "service.png")


def memory(result: dict, folder: Path) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4))
    requests = [r["requests"] for r in result["rounds"]]
    for name in PROCESSES:
        axis.plot(requests, [r[name] for r in result["rounds"]], marker="o", label=name)
    axis.set_xlabel("requests sent")
    axis.set_ylabel("resident MiB")
    axis.set_title("Resident memory of each process")
    axis.grid(True, alpha=0.3)
    axis.legend()
    return _save(figure, folder / "memory.png")
