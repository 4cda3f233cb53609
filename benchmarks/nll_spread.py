"""NLL and greedy agreement on more document prefixes than the quality benchmark's full run, with the spread.

    .venv/bin/python -m benchmarks.nll_spread [--offsets 8] [--window 32] [--kernel 13]

The quality benchmark's full run scores 8 prefixes, too few to tell SnapKV and sinks + recent apart on
NLL. This scores `--offsets` evenly spaced prefixes of 1,024 and 2,048 tokens from each of its two
documents (4 x offsets prefixes), with the same methods, budgets and settings as
`benchmarks.quality`. It prints the mean NLL increase over the full cache, SnapKV's NLL minus each
baseline's per prefix (mean, standard error, prefixes where SnapKV is lower) and the greedy agreement,
and writes nll_spread.json into the output folder. Progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table, progress, write_json
from benchmarks.quality import BASELINES, Settings, run_documents, summarize
from benchmarks.quality_report import paired_cell
from snapkv.config import CompressionConfig
from snapkv.engine import Engine
from snapkv.model import DEFAULT_MODEL, load_model


def tables(results: dict) -> str:
    """Return the markdown tables of NLL increase, paired differences and greedy agreement."""
    ratios = [str(ratio) for ratio in results["settings"]["ratios"]]
    headers = ["method"] + [f"{ratio}x" for ratio in ratios]
    increase = results["nll"]["increase"]
    agreement = results["agreement"]["summary"]
    nll_rows = [[method] + [f"{increase[method][ratio]:+.3f}" for ratio in ratios] for method in ("snapkv", *BASELINES)]
    paired_rows = []
    for baseline in BASELINES:
        cells = results["nll"]["snapkv_minus"][baseline]
        paired_rows.append([f"snapkv minus {baseline}"] + [paired_cell(cells[ratio]) for ratio in ratios])
    agreement_rows = [[method] + [f"{agreement[method][ratio]:.2f}" for ratio in ratios] for method in ("snapkv", *BASELINES)]
    return "\n\n".join([
        "NLL increase over the full cache (mean nats per token):\n\n" + markdown_table(headers, nll_rows),
        "SnapKV's NLL minus each baseline's on the same prefix:\n\n" + markdown_table(headers, paired_rows),
        "Greedy agreement with the full cache:\n\n" + markdown_table(headers, agreement_rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offsets", type=int, default=8, help="prefixes per document and length (full quality run: 2)")
    parser.add_argument("--window", type=int, default=CompressionConfig.window, help="observation window in tokens")
    parser.add_argument("--kernel", type=int, default=CompressionConfig.kernel, help="SnapKV pooling kernel, odd")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.offsets < 1:
        parser.error(f"invalid --offsets {args.offsets}: expected an integer >= 1")

    started = time.perf_counter()
    settings = replace(Settings(), document_offsets=args.offsets, window=args.window, kernel=args.kernel)
    engine = Engine(load_model())
    nll, agreement = run_documents(engine, settings)
    results = {"model": DEFAULT_MODEL, "settings": asdict(settings), **summarize([], nll, agreement)}
    del results["needle"]
    results["seconds"] = time.perf_counter() - started

    print(tables(results), flush=True)
    path = write_json("nll_spread", results, args.output_dir)
    progress(f"wrote {path} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
