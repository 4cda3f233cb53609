"""Inputs and summaries of the quality benchmark, on the byte-level test tokenizer (one token per byte)."""

from benchmarks.quality_report import markdown_tables, needle_summary, paired_differences, rerun_command, target_checks
from benchmarks.quality_tasks import NEEDLE, document_cases, insert_line, needle_case
from snapkv.config import CompressionConfig
from snapkv.tiny_models import byte_tokenizer


def test_needle_hit_needs_exact_value():
    case = needle_case(byte_tokenizer(), 600, 0.5, index=0)
    value = case.value
    assert case.is_hit(f"The access code is {value}.")
    assert case.is_hit(value)
    assert not case.is_hit(value.lower())
    assert not case.is_hit(f"{value}0")
    assert not case.is_hit(f"X{value}")
    assert not case.is_hit(value.split("-")[0])


def test_needle_case_places_line_at_depth():
    tokenizer = byte_tokenizer()
    for depth in (0.1, 0.5, 0.9):
        case = needle_case(tokenizer, 2000, depth, index=1)
        line = NEEDLE.format(name=case.name, value=case.value)
        at = case.document.index(line)
        assert case.document[at - 1] == "\n"
        assert case.document[at + len(line)] == "\n"
        # The line starts within one GPL-2 line (at most about 80 characters) before the depth.
        target = int(depth * (len(case.document) - len(line) - 1))
        assert 0 <= target - at <= 90
        assert case.question == f"What is the access code for vault {case.name}?"
        assert 1850 <= len(case.prompt_ids) <= 2000


def test_needle_cases_repeat():
    tokenizer = byte_tokenizer()
    assert needle_case(tokenizer, 800, 0.3, index=2) == needle_case(tokenizer, 800, 0.3, index=2)
    values = {needle_case(tokenizer, 800, 0.3, index=i).value for i in range(8)}
    assert len(values) > 4


def test_insert_line_at_line_start():
    assert insert_line("aa\nbb\ncc\n", "X", 0.5) == "aa\nX\nbb\ncc\n"
    assert insert_line("aa\nbb\ncc\n", "X", 0.0) == "X\naa\nbb\ncc\n"


def test_document_cases_lengths():
    cases = document_cases(byte_tokenizer(), [300, 500], continuation_tokens=40, offsets=2)
    assert len(cases) == 8
    for case in cases:
        assert len(case.prefix_ids) in (300, 500)
        assert len(case.continuation_ids) == 40


def records(method, ratio, hits):
    return [dict(method=method, ratio=ratio, hit=i < hits) for i in range(10)]


def test_targets_and_tables():
    needle = needle_summary(
        records("full", 1, 8) + records("snapkv", 2, 7) + records("snapkv", 4, 6) + records("snapkv", 8, 3)
        + records("sinks_recent", 2, 5) + records("sinks_recent", 4, 6) + records("sinks_recent", 8, 1)
        + records("random", 2, 1) + records("random", 4, 0) + records("random", 8, 0)
    )
    assert needle["snapkv"]["4"] == {"hits": 6, "total": 10, "accuracy": 0.6}
    assert target_checks(needle, [2, 4, 8]) == [
        "- 2x within one prompt of the full cache: met (7 vs 8 hits)",
        "- 4x at least 80 % of the full cache's hits: missed (6 vs 6.4 needed)",
        "- 2x more hits than sinks + recent and random: met (7 vs 5 and 1)",
        "- 4x more hits than sinks + recent and random: missed (6 vs 6 and 0)",
        "- 8x more hits than sinks + recent and random: met (3 vs 1 and 0)",
    ]

    per_method = {"full": {"1": 2.0}, **{m: {str(r): 2.1 for r in (2, 4, 8)} for m in ("snapkv", "sinks_recent", "random")}}
    results = {
        "settings": {"ratios": [2, 4, 8], "greedy_tokens": 32},
        "needle": {"summary": needle},
        "nll": {"summary": per_method, "increase": {m: {str(r): 0.1 for r in (2, 4, 8)} for m in ("snapkv", "sinks_recent", "random")}},
        "agreement": {"summary": per_method},
    }
    tables = markdown_tables(results)
    assert "| SnapKV (this engine) | 7/10 | 6/10 | 3/10 |" in tables
    assert "| random | +0.100 | +0.100 | +0.100 |" in tables
    assert "minus" not in tables

    cell = {"mean": -0.0125, "stderr": 0.02, "lower": 5, "cases": 8}
    results["nll"]["snapkv_minus"] = {"sinks_recent": {"2": cell}}
    tables = markdown_tables(results)
    assert "| SnapKV minus sinks + recent | -0.013 ± 0.020 (5/8 lower) | - | - |" in tables


def test_paired_differences_per_case():
    nll = [
        dict(case="a", method="snapkv", ratio=2, nll=1.0), dict(case="a", method="sinks_recent", ratio=2, nll=1.5),
        dict(case="b", method="snapkv", ratio=2, nll=2.0), dict(case="b", method="sinks_recent", ratio=2, nll=1.5),
        dict(case="c", method="snapkv", ratio=2, nll=3.0), dict(case="c", method="sinks_recent", ratio=2, nll=2.0),
        dict(case="a", method="snapkv", ratio=4, nll=1.0), dict(case="a", method="random", ratio=4, nll=2.0),
        dict(case="a", method="full", ratio=1, nll=0.5),
    ]
    paired = paired_differences(nll, "nll", "snapkv", "sinks_recent")

    # Differences -0.5, +0.5 and +1.0: mean 1/3, sample variance 7/12, standard error sqrt(7/36).
    assert set(paired) == {"2"}
    assert paired["2"]["cases"] == 3
    assert paired["2"]["lower"] == 1
    assert abs(paired["2"]["mean"] - 1 / 3) < 1e-12
    assert abs(paired["2"]["stderr"] - (7 / 36) ** 0.5) < 1e-12
    assert paired_differences(nll, "nll", "snapkv", "random") == {"4": {"mean": -1.0, "stderr": 0.0, "lower": 1, "cases": 1}}


def test_nll_spread_tables():
    from benchmarks.nll_spread import tables
    from benchmarks.quality import summarize

    nll, agreement = [], []
    for case, offset in (("a", 0.0), ("b", 0.2)):
        nll.append(dict(case=case, method="full", ratio=1, nll=2.0 + offset))
        agreement.append(dict(case=case, method="full", ratio=1, prefix_match=1.0, positions_equal=1.0))
        for method, extra in (("snapkv", 0.1), ("sinks_recent", 0.2), ("random", 0.9)):
            nll.append(dict(case=case, method=method, ratio=2, nll=2.0 + offset + extra))
            agreement.append(dict(case=case, method=method, ratio=2, prefix_match=1 - extra, positions_equal=1.0))
    results = {"settings": {"ratios": [2]}, **summarize([], nll, agreement)}

    text = tables(results)
    assert "| snapkv | +0.100 |" in text
    assert "| snapkv minus sinks_recent | -0.100 ± 0.000 (2/2 lower) |" in text
    assert "| random | 0.10 |" in text


def test_rerun_command_lists_changed_settings():
    defaults = {"quick": False, "window": CompressionConfig.window, "kernel": CompressionConfig.kernel,
                "pooling": CompressionConfig.pooling, "gqa_reduction": CompressionConfig.gqa_reduction}
    assert rerun_command(defaults) == ".venv/bin/python -m benchmarks.quality"
    changed = {**defaults, "quick": True, "window": CompressionConfig.window + 32, "gqa_reduction": "max"}
    expected = f".venv/bin/python -m benchmarks.quality --quick --window {CompressionConfig.window + 32} --gqa-reduction max"
    assert rerun_command(changed) == expected
