"""Shared parts of the benchmarks: the machine description, progress lines, tables and result files."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

RESULTS = Path("docs/benchmarks")


def machine() -> dict:
    """Describe where the figures were measured: CPU model, cores, memory and library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    memory_gib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass  # not Linux: keep the platform module's value
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        # The widest vector instructions PyTorch uses here ("AVX2", "AVX512"): it sets the matmul rate.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "date": time.strftime("%Y-%m-%d"),
    }


def progress(message: str) -> None:
    """Print one progress line to stderr, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """Return a markdown table; numbers are right-aligned."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" if is_number else "---" for is_number in numeric) + " |",
    ]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, data: dict, folder: Path = RESULTS) -> Path:
    """Write `data` with the machine description to `folder/name.json`; return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


def document_ids(tokenizer, num_tokens: int) -> list[int]:
    """Return `num_tokens` token ids of the shipped GPL-2 text, repeated as often as needed."""
    text = files("snapkv").joinpath("data/gpl-2.0.txt").read_text(encoding="utf-8")
    ids = tokenizer(text).input_ids
    repeats = num_tokens // len(ids) + 1
    return (ids * repeats)[:num_tokens]
