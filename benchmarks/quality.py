"""Quality of compressed caches on the embedded SmolLM2-135M-Instruct at 2x, 4x and 8x compression.

    .venv/bin/python -m benchmarks.quality [--quick] [--no-kvpress] [--output-dir docs/benchmarks]
        [--window 32] [--kernel 13] [--pooling max] [--gqa-reduction mean] [--from-json QUALITY_JSON]

Three measurements, each against the full cache of the same prompt (see `benchmarks.quality_tasks`
for how the inputs are built):

- needle retrieval: a one-line fact hidden at several depths in the GPL-2 text, prompts of several
  lengths, a chat-template question at the end, greedy answers scored by exact match of the value;
- teacher-forced negative log-likelihood (NLL) of the tokens that follow a prefix of a real document,
  with the prefix compressed and the continuation fed through the engine's decode path;
- greedy agreement: the share of the first N greedy tokens after that prefix that equal the full
  cache's before the first difference (a prefix match, so a later accidental match does not count).

Every method keeps the same budget: prompt tokens // ratio, the window included. The methods are
SnapKV (by default window 32, kernel 13, max pooling, as in the engine), sinks plus recent (StreamingLLM
style) and random positions (seeded). The options change SnapKV's settings and the baselines' window.
kvpress's `SnapKVPress` answers the needle prompts only, through kvpress's own pipeline, run by
`benchmarks/kvpress_quality.py` in kvpress's virtualenv (`--kvpress-python`). The first generated
token comes from the prefill logits, which compression does not change.

Writes quality.json, quality.md (the tables) and quality_*.png into the output folder, and prints one
line per finished prompt to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks import quality_report
from benchmarks.common import machine
from benchmarks.quality_engine import generate_texts, greedy_tokens, prefill_results, prefill_states, teacher_forced_nll
from benchmarks.quality_tasks import NeedleCase, document_cases, needle_cases
from snapkv.cli_services import engine_kv_dtype
from snapkv.config import GQA_REDUCTIONS, POOLING_KINDS, WEIGHT_CHOICES, CompressionConfig, SamplingParams
from snapkv.engine import WEIGHT_DTYPES, Engine
from snapkv.model import DEFAULT_MODEL, converted_folder, load_model

METHODS = ("snapkv", "sinks_recent", "random")
BASELINES = METHODS[1:]  # the methods SnapKV is compared with, prefix by prefix
KVPRESS_SCRIPT = Path(__file__).with_name("kvpress_quality.py")


@dataclass(frozen=True)
class Settings:
    """The prompts, lengths and settings of one run. The defaults are the full run."""

    ratios: tuple[int, ...] = (2, 4, 8)
    needle_lengths: tuple[int, ...] = (500, 1000, 2000)
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    needles_per_cell: int = 2
    max_new_tokens: int = 24
    prefix_lengths: tuple[int, ...] = (1024, 2048)
    document_offsets: int = 2
    nll_tokens: int = 64
    greedy_tokens: int = 32
    # Ways of handing kvpress the question, described in benchmarks/kvpress_quality.py.
    kvpress_modes: tuple[str, ...] = ("question_after", "question_in_context")
    quick: bool = False
    # SnapKV's settings. The baselines use the same window.
    window: int = CompressionConfig.window
    kernel: int = CompressionConfig.kernel
    pooling: str = CompressionConfig.pooling
    gqa_reduction: str = CompressionConfig.gqa_reduction
    # The dtype decoding stores keys and values in (`Engine.kv_dtype`).
    kv_dtype: str = "fp32"
    # The dtype of the decoder layers' packed weights, for prefill and decoding (`Engine.weight_dtype`).
    weights: str = "model"


QUICK = Settings(
    needle_lengths=(500, 1000), depths=(0.1, 0.5, 0.9), needles_per_cell=1,
    prefix_lengths=(768,), document_offsets=1, nll_tokens=32, greedy_tokens=16, quick=True,
    kvpress_modes=("question_after",),
)


def settings_rows(length: int, settings: Settings, seed: int) -> list[tuple[str, int, CompressionConfig | None]]:
    """Return (method, ratio, config) for the full cache and every method at every ratio of a prompt."""
    rows: list[tuple[str, int, CompressionConfig | None]] = [("full", 1, None)]
    for ratio in settings.ratios:
        for method in METHODS:
            config = CompressionConfig(
                window=settings.window, budget=length // ratio, kernel=settings.kernel, pooling=settings.pooling,
                gqa_reduction=settings.gqa_reduction, method=method, seed=seed,
            )
            rows.append((method, ratio, config))
    return rows


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_needles(engine: Engine, cases: list[NeedleCase], settings: Settings) -> list[dict]:
    """Answer every needle prompt with the full cache and each method and ratio; return one record per answer."""
    sampling = SamplingParams(max_tokens=settings.max_new_tokens)
    records = []
    for number, case in enumerate(cases, 1):
        start = time.perf_counter()
        length = len(case.prompt_ids)
        rows = settings_rows(length, settings, seed=number)
        states = prefill_states(engine, case.prompt_ids, settings.window)
        texts = generate_texts(engine, prefill_results(states, [config for _, _, config in rows], sampling))
        del states

        for (method, ratio, config), text in zip(rows, texts):
            records.append(dict(
                case=case.case_id, method=method, ratio=ratio, prompt_tokens=length,
                kept_tokens=length if config is None else config.kept_length(length),
                target_tokens=case.target_tokens, depth=case.depth, value=case.value, answer=text, hit=case.is_hit(text),
            ))
        hits = " ".join(f"{m}@{r}:{'hit' if case.is_hit(t) else 'miss'}" for (m, r, _), t in zip(rows, texts))
        log(f"needle {number}/{len(cases)} {case.case_id} ({length} tokens, {time.perf_counter() - start:.1f} s): {hits}")
    return records


def run_documents(engine: Engine, settings: Settings) -> tuple[list[dict], list[dict]]:
    """Score continuations teacher-forced and compare greedy tokens; return (NLL records, agreement records)."""
    sampling = SamplingParams(max_tokens=settings.greedy_tokens)
    cases = document_cases(engine.tokenizer, list(settings.prefix_lengths), settings.nll_tokens, settings.document_offsets)
    nll_records, agreement_records = [], []
    for number, case in enumerate(cases, 1):
        start = time.perf_counter()
        length = len(case.prefix_ids)
        rows = settings_rows(length, settings, seed=number)
        states = prefill_states(engine, case.prefix_ids, settings.window)
        results = prefill_results(states, [config for _, _, config in rows], sampling)
        del states
        nll = teacher_forced_nll(engine, results, case.continuation_ids).mean(dim=1)
        tokens = greedy_tokens(engine, results, settings.greedy_tokens)
        del results

        same = tokens == tokens[0]  # [rows, greedy_tokens]
        matched = torch.where(same.all(dim=1), settings.greedy_tokens, (~same).int().argmax(dim=1))
        for row, (method, ratio, _) in enumerate(rows):
            base = dict(case=case.case_id, method=method, ratio=ratio, prompt_tokens=length)
            nll_records.append(dict(base, nll=nll[row].item(), tokens=len(case.continuation_ids)))
            agreement_records.append(dict(
                base, prefix_match=int(matched[row]) / settings.greedy_tokens,
                positions_equal=same[row].float().mean().item(),
            ))
        summary = " ".join(f"{m}@{r}:{nll[i].item():.3f}" for i, (m, r, _) in enumerate(rows))
        log(f"document {number}/{len(cases)} {case.case_id} ({time.perf_counter() - start:.1f} s) NLL {summary}")
    return nll_records, agreement_records


def run_kvpress(python: Path, cases: list[NeedleCase], settings: Settings) -> tuple[list[dict], dict]:
    """Answer the needle prompts with kvpress in its own virtualenv; return scored records and a status."""
    if not python.exists():
        log(f"kvpress skipped: {python} not found (create kvpress's virtualenv, or pass --no-kvpress)")
        return [], {"status": f"skipped: {python} not found"}

    by_id = {case.case_id: case for case in cases}
    spec = {
        "max_new_tokens": settings.max_new_tokens,
        "ratios": list(settings.ratios),
        "modes": list(settings.kvpress_modes),
        "cases": [
            dict(id=c.case_id, document=c.document, question=c.question,
                 budgets={str(r): len(c.prompt_ids) // r for r in settings.ratios})
            for c in cases
        ],
    }
    with tempfile.TemporaryDirectory() as folder:
        cases_path, output_path = Path(folder) / "cases.json", Path(folder) / "answers.json"
        cases_path.write_text(json.dumps(spec))
        command = [str(python), str(KVPRESS_SCRIPT), "--model", str(converted_folder()),
                   "--cases", str(cases_path), "--output", str(output_path)]
        completed = subprocess.run(command, stdout=subprocess.DEVNULL)
        if completed.returncode != 0:
            log(f"kvpress failed with exit status {completed.returncode}; its stderr is above")
            return [], {"status": f"failed: exit status {completed.returncode}"}
        output = json.loads(output_path.read_text())

    records = []
    for record in output["records"]:
        case = by_id[record["case"]]
        method = record["method"] if record["mode"] == "none" else f"{record['method']}/{record['mode']}"
        records.append(dict(record, method=method, our_prompt_tokens=len(case.prompt_ids), target_tokens=case.target_tokens,
                            depth=case.depth, value=case.value, hit=case.is_hit(record["answer"])))
    # Token counts differ where kvpress tokenizes the document and the question apart, at their boundary.
    mismatched = {mode: 0 for mode in {r["mode"] for r in records}}
    for record in records:
        mismatched[record["mode"]] += record["prompt_tokens"] != record["our_prompt_tokens"]
    return records, {"status": "ran", "versions": output["versions"], "prompts_tokenized_differently": mismatched}


def summarize(needle: list[dict], nll: list[dict], agreement: list[dict]) -> dict:
    nll_summary = quality_report.mean_summary(nll, "nll")
    full_nll = nll_summary["full"]["1"]
    increase = {
        method: {ratio: value - full_nll for ratio, value in by_ratio.items()}
        for method, by_ratio in nll_summary.items()
        if method != "full"
    }
    return {
        "needle": {"summary": quality_report.needle_summary(needle), "records": needle},
        "nll": {
            "summary": nll_summary, "increase": increase, "records": nll,
            "snapkv_minus": {
                baseline: quality_report.paired_differences(nll, "nll", "snapkv", baseline)
                for baseline in BASELINES
            },
        },
        "agreement": {"summary": quality_report.mean_summary(agreement, "prefix_match"),
                      "positions_equal": quality_report.mean_summary(agreement, "positions_equal"), "records": agreement},
    }


def parse_settings() -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter prompts")
    parser.add_argument("--needles-per-cell", type=int, help="needle prompts per length and depth (full run: 2, quick: 1)")
    parser.add_argument("--no-kvpress", action="store_true", help="skip the kvpress comparison")
    parser.add_argument("--kvpress-python", type=Path, default=Path(".venv-kvpress/bin/python"),
                        help="Python of the virtualenv with kvpress installed")
    parser.add_argument("--output-dir", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--from-json", type=Path, metavar="QUALITY_JSON",
                        help="rebuild the summaries, tables and plots from a saved quality.json without running the model")
    parser.add_argument("--window", type=int, default=CompressionConfig.window, help="observation window in tokens")
    parser.add_argument("--kernel", type=int, default=CompressionConfig.kernel, help="SnapKV pooling kernel, odd")
    parser.add_argument("--pooling", choices=POOLING_KINDS, default=CompressionConfig.pooling, help="SnapKV pooling")
    parser.add_argument("--gqa-reduction", choices=GQA_REDUCTIONS, default=CompressionConfig.gqa_reduction,
                        help="how SnapKV merges the scores of the query heads that share a KV head")
    parser.add_argument("--kv-dtype", choices=("fp32", "fp16", "bf16"), default=Settings.kv_dtype,
                        help="dtype the decode cache stores keys and values in")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default=Settings.weights,
                        help="dtype of the decoder layers' packed weights, for prefill and decoding")
    args = parser.parse_args()

    settings = replace(
        QUICK if args.quick else Settings(),
        window=args.window, kernel=args.kernel, pooling=args.pooling, gqa_reduction=args.gqa_reduction,
        kv_dtype=args.kv_dtype, weights=args.weights,
    )
    if args.needles_per_cell is not None:
        if args.needles_per_cell < 1:
            parser.error(f"invalid --needles-per-cell {args.needles_per_cell}: expected an integer >= 1")
        settings = replace(settings, needles_per_cell=args.needles_per_cell)

    # Fail before loading the model, on invalid settings or a budget that the window would fill.
    try:
        CompressionConfig(window=settings.window, budget=settings.window + 1, kernel=settings.kernel)
    except ValueError as error:
        parser.error(str(error))
    shortest = min(settings.needle_lengths + settings.prefix_lengths)
    if shortest // max(settings.ratios) <= settings.window:
        parser.error(
            f"invalid --window {settings.window}: the smallest budget, {shortest} // {max(settings.ratios)} tokens, "
            "must exceed it"
        )
    return args, settings


def write_results(results: dict, output_dir: Path) -> None:
    """Print the tables and write quality.json, quality.md and the plots into `output_dir`."""
    tables = quality_report.markdown_tables(results)
    print(tables)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "quality.json").write_text(json.dumps(results, indent=1) + "\n")
    (output_dir / "quality.md").write_text(quality_report.markdown_fragment(results, tables))
    written = quality_report.plot(results, output_dir)
    log(f"wrote quality.json, quality.md and {', '.join(p.name for p in written)} to {output_dir}")


def main() -> None:
    args, settings = parse_settings()
    if args.from_json is not None:
        # Summaries and tables only: the records, settings and timings stay those of the saved run.
        results = json.loads(args.from_json.read_text())
        results.update(summarize(results["needle"]["records"], results["nll"]["records"], results["agreement"]["records"]))
        write_results(results, args.output_dir)
        return

    started = time.perf_counter()
    engine = Engine(load_model(), kv_dtype=engine_kv_dtype(settings.kv_dtype),
                    weight_dtype=WEIGHT_DTYPES[settings.weights])
    cases = needle_cases(engine.tokenizer, list(settings.needle_lengths), list(settings.depths), settings.needles_per_cell)
    needle = run_needles(engine, cases, settings)
    nll, agreement = run_documents(engine, settings)
    del engine
    if args.no_kvpress:
        kvpress_records, kvpress_status = [], {"status": "skipped: --no-kvpress"}
    else:
        kvpress_records, kvpress_status = run_kvpress(args.kvpress_python, cases, settings)

    results = {"model": DEFAULT_MODEL, "machine": machine(), "settings": asdict(settings), "kvpress": kvpress_status}
    results.update(summarize(needle + kvpress_records, nll, agreement))
    results["seconds"] = time.perf_counter() - started
    write_results(results, args.output_dir)
    log(f"ran in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
