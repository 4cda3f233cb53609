"""Summaries, markdown tables and plots of the quality benchmark's records."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

from snapkv.config import CompressionConfig

# Row order and labels of tables and plots. kvpress rows appear only when kvpress ran.
METHOD_LABELS = {
    "full": "full cache",
    "snapkv": "SnapKV (this engine)",
    "sinks_recent": "sinks + recent",
    "random": "random",
    "kvpress_full": "kvpress pipeline, no press",
    "kvpress_snapkv/question_in_context": "kvpress SnapKVPress, question in context",
    "kvpress_snapkv/question_after": "kvpress SnapKVPress, question after (its default)",
}


def needle_summary(records: list[dict]) -> dict:
    """Return {method: {ratio: {"hits", "total", "accuracy"}}} over needle answer records."""
    counts: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for record in records:
        cell = counts[record["method"]][str(record["ratio"])]
        cell[0] += int(record["hit"])
        cell[1] += 1
    return {
        method: {ratio: {"hits": h, "total": n, "accuracy": h / n} for ratio, (h, n) in by_ratio.items()}
        for method, by_ratio in counts.items()
    }


def mean_summary(records: list[dict], field: str) -> dict:
    """Return {method: {ratio: mean of `field`}} over records."""
    sums: dict = defaultdict(lambda: defaultdict(list))
    for record in records:
        sums[record["method"]][str(record["ratio"])].append(record[field])
    return {method: {ratio: sum(v) / len(v) for ratio, v in by_ratio.items()} for method, by_ratio in sums.items()}


def paired_differences(records: list[dict], field: str, method: str, baseline: str) -> dict:
    """Return {ratio: {"mean", "stderr", "lower", "cases"}} of `method` minus `baseline` on the same cases.

    "stderr" is the standard error of the mean difference (0 with one case), and "lower" counts the
    cases where `method` scored lower than `baseline`.
    """
    values: dict = defaultdict(dict)
    for record in records:
        values[(record["method"], str(record["ratio"]))][record["case"]] = record[field]
    result = {}
    for (name, ratio), by_case in values.items():
        if name != method or (baseline, ratio) not in values:
            continue
        other = values[(baseline, ratio)]
        differences = [value - other[case] for case, value in by_case.items() if case in other]
        count = len(differences)
        mean = sum(differences) / count
        variance = sum((d - mean) ** 2 for d in differences) / (count - 1) if count > 1 else 0.0
        result[ratio] = {
            "mean": mean, "stderr": (variance / count) ** 0.5, "lower": sum(d < 0 for d in differences), "cases": count,
        }
    return result


def paired_cell(cell: dict) -> str:
    """Return one `paired_differences` entry as "+0.020 ± 0.025 (3/8 lower)"."""
    return f"{cell['mean']:+.3f} ± {cell['stderr']:.3f} ({cell['lower']}/{cell['cases']} lower)"


def _cell(summary: dict, method: str, ratio: int, fmt: str) -> str:
    value = summary.get(method, {}).get(str(ratio))
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"{value['hits']}/{value['total']}"
    return format(value, fmt)


def markdown_tables(results: dict) -> str:
    """Return the markdown tables: needle hits, NLL increase and greedy agreement, by method and ratio."""
    ratios = results["settings"]["ratios"]
    header = "| method | " + " | ".join(f"{r}x" for r in ratios) + " |\n| --- |" + " ---: |" * len(ratios) + "\n"
    needle = results["needle"]["summary"]
    full = needle["full"]["1"]
    lines = [f"Needle retrieval, prompts answered exactly (full cache: {full['hits']}/{full['total']}):", "", header.rstrip()]
    for method in METHOD_LABELS:
        if method in needle and not method.endswith("full"):
            lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(_cell(needle, method, r, "") for r in ratios) + " |")
    if "kvpress_full" in needle:
        kv_full = needle["kvpress_full"]["1"]
        lines.append(f"\nkvpress's pipeline without a press answered {kv_full['hits']}/{kv_full['total']}.")
    lines += ["", "SnapKV against the needle targets:", ""] + target_checks(needle, ratios)

    nll = results["nll"]["summary"]
    lines += ["", f"Teacher-forced NLL of the continuation, mean nats per token, increase over the full cache "
              f"(full cache: {nll['full']['1']:.3f}):", "", header.rstrip()]
    for method in ("snapkv", "sinks_recent", "random"):
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(_cell(results['nll']['increase'], method, r, '+.3f') for r in ratios) + " |")
    paired = results["nll"].get("snapkv_minus")
    if paired:
        lines += ["", "SnapKV's NLL minus each baseline's on the same prefix: mean, its standard error, and the prefixes "
                  "where SnapKV's NLL is lower (a negative mean favours SnapKV):", "", header.rstrip()]
        for baseline, by_ratio in paired.items():
            cells = []
            for ratio in ratios:
                cell = by_ratio.get(str(ratio))
                if cell is None:
                    cells.append("-")
                else:
                    cells.append(paired_cell(cell))
            lines.append(f"| SnapKV minus {METHOD_LABELS[baseline]} | " + " | ".join(cells) + " |")

    agreement = results["agreement"]["summary"]
    tokens = results["settings"]["greedy_tokens"]
    lines += ["", f"Greedy agreement with the full cache: mean share of the first {tokens} tokens before the first "
              "difference:", "", header.rstrip()]
    for method in ("snapkv", "sinks_recent", "random"):
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(_cell(agreement, method, r, '.2f') for r in ratios) + " |")
    return "\n".join(lines) + "\n"


def target_checks(needle: dict, ratios: list[int]) -> list[str]:
    """Return one line per needle target, each saying whether SnapKV met it, with the counts behind it."""
    full = needle["full"]["1"]["hits"]
    snapkv = {r: needle["snapkv"][str(r)]["hits"] for r in ratios}
    lines = []
    if 2 in snapkv:
        verdict = "met" if full - snapkv[2] <= 1 else "missed"
        lines.append(f"- 2x within one prompt of the full cache: {verdict} ({snapkv[2]} vs {full} hits)")
    if 4 in snapkv:
        verdict = "met" if snapkv[4] >= 0.8 * full else "missed"
        lines.append(f"- 4x at least 80 % of the full cache's hits: {verdict} ({snapkv[4]} vs {0.8 * full:.1f} needed)")
    for ratio in ratios:
        baselines = {m: needle[m][str(ratio)]["hits"] for m in ("sinks_recent", "random")}
        verdict = "met" if all(snapkv[ratio] > hits for hits in baselines.values()) else "missed"
        lines.append(
            f"- {ratio}x more hits than sinks + recent and random: {verdict} "
            f"({snapkv[ratio]} vs {baselines['sinks_recent']} and {baselines['random']})"
        )
    return lines


def plot(results: dict, folder: Path) -> list[Path]:
    """Draw needle accuracy, NLL increase and greedy agreement against the compression ratio; return the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = results["settings"]["ratios"]
    needle = {m: {r: v["accuracy"] for r, v in s.items()} for m, s in results["needle"]["summary"].items()}
    charts = [
        ("quality_needle.png", "share of needle prompts answered exactly", needle, needle["full"]["1"]),
        ("quality_nll.png", "NLL increase over the full cache (nats/token)", results["nll"]["increase"], 0.0),
        ("quality_agreement.png", "share of greedy tokens equal to the full cache's\nbefore the first difference",
         results["agreement"]["summary"], 1.0),
    ]
    written = []
    for name, ylabel, summary, reference in charts:
        figure, axes = plt.subplots(figsize=(6.5, 4.5))
        axes.axhline(reference, color="grey", linestyle="--", label="full cache")
        if "kvpress_full" in summary:
            axes.axhline(summary["kvpress_full"]["1"], color="grey", linestyle=":", label=METHOD_LABELS["kvpress_full"])
        for method, label in METHOD_LABELS.items():
            if method in summary and not method.endswith("full"):
                axes.plot(ratios, [summary[method].get(str(r), float("nan")) for r in ratios], marker="o", label=label)
        axes.set_xscale("log", base=2)
        axes.set_xticks(ratios, [f"{r}x" for r in ratios])
        axes.minorticks_off()
        axes.set_xlabel("compression ratio (prompt tokens / kept tokens)")
        axes.set_ylabel(ylabel)
        if name == "quality_needle.png":
            axes.set_ylim(-0.03, 1.03)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
        path = folder / name
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def rerun_command(settings: dict) -> str:
    """Return the command line that reruns the benchmark with these settings."""
    command = ".venv/bin/python -m benchmarks.quality" + (" --quick" if settings["quick"] else "")
    for name in ("window", "kernel", "pooling", "gqa_reduction"):
        if settings[name] != getattr(CompressionConfig, name):  # the engine's defaults
            command += f" --{name.replace('_', '-')} {settings[name]}"
    return command


def _kvpress_paragraph(kvpress: dict, modes: list[str]) -> str:
    if kvpress["status"] != "ran":
        return f"kvpress was not run ({kvpress['status']})."
    versions = kvpress["versions"]
    in_context = (
        "The \"question in context\" rows append the question to the context, as kvpress's evaluation option "
        "`compress_questions` and this engine do. "
    )
    return (
        f"kvpress {versions['kvpress']} (with transformers {versions['transformers']}, in its own virtualenv) answers "
        "the same needle prompts through its `kv-press-text-generation` pipeline, with `SnapKVPress` at its defaults "
        "(window 64, kernel 5, average pooling). Its compression ratio is set so that the kept context plus the "
        "uncompressed tokens after it match the same budget. By default that pipeline compresses the document alone "
        "and feeds the question afterwards, so its window never sees the question. "
        + (in_context if "question_in_context" in modes else "")
        + "kvpress's rows compare best with its own pipeline's full cache, given below the table."
    )


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(" ".join(text.split()), width=104, initial_indent=indent, subsequent_indent=" " * len(indent))


def markdown_fragment(results: dict, tables: str) -> str:
    """Return the benchmark page's section: what was measured, how to rerun it, the tables and the plots."""
    settings = results["settings"]
    needle_count = len({r["case"] for r in results["needle"]["records"] if r["method"] == "full"})
    document_count = len({r["case"] for r in results["nll"]["records"]})
    quick = " This is the quick run: fewer and shorter prompts, so each figure rests on few samples." if settings["quick"] else ""
    ratios = " and ".join(", ".join(f"{r}x" for r in settings["ratios"]).rsplit(", ", 1))
    # Runs from before these settings existed used fp32 throughout.
    precision = "fp32"
    if settings.get("weights", "model") == "bf16":
        precision += " with its decoder layers' weights packed in bf16 (`--weights bf16`)"
    if settings.get("kv_dtype", "fp32") != "fp32":
        precision += f", decode caches in {settings['kv_dtype']}"
    intro = f"""The embedded SmolLM2-135M-Instruct, {precision}, greedy. Every method keeps the same number of positions per
KV head: prompt tokens // ratio, the {settings["window"]}-token observation window included. SnapKV runs
with window {settings["window"]}, kernel {settings["kernel"]}, {settings["pooling"]} pooling and the
{settings["gqa_reduction"]} of the scores of the query heads that share a KV head. "Sinks + recent" keeps
the first 4 positions and the most recent ones (StreamingLLM style). "Random" keeps a seeded uniform
sample of the positions before the window, different per layer and KV head. Each prompt is prefilled
once, and every setting decodes from a cache compressed by the engine's own code. The first output
token comes from the prefill logits, so it is the same with every method.{quick}"""
    needle = f"""Needle retrieval: {needle_count} prompts of about {_join(settings["needle_lengths"])} tokens.
The line "The access code for vault <Name> is <WORD-NN>." is placed on its own at depth
{_join(settings["depths"])} of a stretch of the GPL-2 text, and the question "What is the access code for
vault <Name>?" ends the user turn (chat template). A hit is an answer of up to
{settings["max_new_tokens"]} tokens that contains the code exactly."""
    nll = f"""NLL: {document_count} prefixes of {_join(settings["prefix_lengths"])} tokens from the GPL-2 text and
from the Python language reference shipped with CPython (`pydoc_data`). The next {settings["nll_tokens"]}
tokens are fed one at a time through the engine's decode step, and their negative log-likelihood is
averaged."""
    agreement = f"""Greedy agreement: {settings["greedy_tokens"]} greedy tokens after the same prefixes. The score
is the share of them before the first token that differs from the full cache's output."""
    items = "\n".join(_wrap(text, "- ") for text in (needle, nll, agreement, _kvpress_paragraph(results["kvpress"], settings["kvpress_modes"])))
    return f"""## Quality at {ratios} compression (`quality.json`)

```
{rerun_command(settings)}
```

{_wrap(intro)}

{items}

{tables}
![needle retrieval](quality_needle.png) ![NLL increase](quality_nll.png) ![greedy agreement](quality_agreement.png)
"""


def _join(values) -> str:
    """Return "a, b and c" for a list of values."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
