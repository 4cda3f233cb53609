"""Answer the quality benchmark's needle prompts with kvpress's `SnapKVPress`, through kvpress's own pipeline.

    .venv-kvpress/bin/python benchmarks/kvpress_quality.py --model FOLDER --cases CASES.json --output OUT.json

This script runs inside kvpress's virtualenv, not ours: kvpress 0.5.5 requires transformers < 5.3
(pip picks 5.2.0), while this project needs 5.25. So it imports nothing from this repository and
talks to `benchmarks.quality` through two JSON files. CASES.json contains `max_new_tokens`, `ratios`,
`modes` and `cases`, each case with an `id`, the `document` (haystack with the needle), the
`question`, and the `budgets` by ratio that our engine keeps for the same prompt. OUT.json gets one
record per answer, which `benchmarks.quality` scores.

kvpress's pipeline ("kv-press-text-generation") compresses the context only, then feeds the question
after the compressed cache at the original positions. The kvpress README recommends it over a plain
`model.generate`, which cannot keep the question out of the compression. Each case runs in the modes
that CASES.json lists:

- `question_after`: the pipeline's default. SnapKV's window sees the end of the document, not the
  question.
- `question_in_context`: the question is appended to the context, as kvpress's own evaluation script
  does with `compress_questions` and as our engine does, so the window contains the question.

In each mode the compression ratio handed to kvpress is set so that the kept context tokens plus the
uncompressed tokens after the context equal our engine's budget for the same prompt. SnapKVPress keeps
its defaults (window 64, kernel 5, average pooling), where our engine uses window 32, kernel 13, max.
When fewer context tokens are kept than its window holds (500-token prompts at 8x), SnapKVPress keeps
only part of its window; such answers are flagged `kept_context_below_window`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, pipeline

import kvpress

MODES = ("question_after", "question_in_context")


def split_prompt(case: dict, mode: str) -> tuple[str, str]:
    """Return the (context, question) strings the pipeline gets in this mode. Joined, they are the same in every mode."""
    question = "\n\n" + case["question"]
    if mode == "question_after":
        return case["document"], question
    return case["document"] + question, ""


def token_counts(pipe, context: str, question: str) -> tuple[int, int]:
    """Return how many tokens the pipeline compresses (context) and feeds after the cache (question)."""
    inputs = pipe.preprocess(context, questions=[question], answer_prefix="", max_context_length=10**9)
    return inputs["context_ids"].shape[1], inputs["questions_ids"][0].shape[1]


def compression_ratio_for(budget: int, context_tokens: int, question_tokens: int) -> float:
    """Return kvpress's `compression_ratio` (fraction removed) that keeps `budget - question_tokens` context tokens.

    kvpress keeps int(context_tokens * (1 - ratio)), so the extra half token keeps float rounding from losing one.
    """
    return 1.0 - (budget - question_tokens + 0.5) / context_tokens


def answer(pipe, context: str, question: str, press, max_new_tokens: int) -> tuple[str, int, float]:
    """Run the pipeline once; return the answer, the kept context tokens per layer and head, and the seconds."""
    cache = DynamicCache()
    start = time.perf_counter()
    output = pipe(context, question=question, press=press, max_new_tokens=max_new_tokens, cache=cache)
    seconds = time.perf_counter() - start

    # The pipeline trims the question and answer off the cache afterwards, so it now contains the kept context.
    return output["answer"], cache.get_seq_length(0), seconds


def run_case(pipe, case: dict, ratios: list[int], modes: list[str], max_new_tokens: int) -> list[dict]:
    """Answer one needle prompt with the full cache and with SnapKVPress at each ratio and mode."""
    records = []
    context, question = split_prompt(case, "question_in_context")
    text, kept, seconds = answer(pipe, context, question, None, max_new_tokens)
    records.append(dict(case=case["id"], method="kvpress_full", mode="none", ratio=1, answer=text,
                        prompt_tokens=sum(token_counts(pipe, context, question)), kept_tokens=None, seconds=seconds))

    for mode in modes:
        context, question = split_prompt(case, mode)
        context_tokens, question_tokens = token_counts(pipe, context, question)
        for ratio in ratios:
            budget = case["budgets"][str(ratio)]
            fraction_removed = compression_ratio_for(budget, context_tokens, question_tokens)
            press = kvpress.SnapKVPress(compression_ratio=fraction_removed)
            text, kept_context, seconds = answer(pipe, context, question, press, max_new_tokens)
            records.append(dict(case=case["id"], method="kvpress_snapkv", mode=mode, ratio=ratio, answer=text,
                                prompt_tokens=context_tokens + question_tokens,
                                kept_tokens=kept_context + question_tokens, budget=budget,
                                compression_ratio_arg=fraction_removed, seconds=seconds,
                                kept_context_below_window=kept_context < press.window_size))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="folder of a Hugging Face checkpoint (the converted embedded model)")
    parser.add_argument("--cases", type=Path, required=True, help="JSON written by benchmarks.quality")
    parser.add_argument("--output", type=Path, required=True, help="where to write the answers as JSON")
    args = parser.parse_args()

    spec = json.loads(args.cases.read_text())
    unknown = set(spec["modes"]) - set(MODES)
    if unknown:
        raise SystemExit(f"invalid modes {sorted(unknown)} in {args.cases}: expected some of {MODES}")
    transformers.utils.logging.disable_progress_bar()
    pipe = pipeline("kv-press-text-generation", model=str(args.model), device="cpu", dtype=torch.float32)
    versions = {"kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__}
    print(f"kvpress pipeline loaded {args.model} ({versions})", file=sys.stderr, flush=True)

    records = []
    for number, case in enumerate(spec["cases"], 1):
        case_records = run_case(pipe, case, spec["ratios"], spec["modes"], spec["max_new_tokens"])
        records.extend(case_records)
        seconds = sum(r["seconds"] for r in case_records)
        print(f"kvpress case {number}/{len(spec['cases'])} {case['id']}: {len(case_records)} answers in {seconds:.1f} s",
              file=sys.stderr, flush=True)

    args.output.write_text(json.dumps({"versions": versions, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
