"""The header and version lines of results.md, built from JSON files written here."""

import json

from benchmarks.report import machine_header, measured, write_report

MACHINE = {"cpu": "Test CPU", "cores": 2, "memory_gib": 23.5, "gpu": None, "torch_threads": 2, "cpu_capability": "AVX512",
           "python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.25.0", "date": "2026-12-05"}


def test_measured_names_version_date_and_cpu():
    assert measured({"machine": MACHINE, "version": "full"}) == "(full version, measured 2026-12-05 on Test CPU with AVX512)"
    quality = {"machine": MACHINE, "settings": {"quick": True}}
    assert measured(quality) == "(quick version, measured 2026-12-05 on Test CPU with AVX512)"
    older = {"machine": {"cpu": "x86_64"}, "settings": {"quick": False}}
    assert measured(older) == "(full version, measured on an unrecorded date on x86_64)"


def test_machine_header_counts_machines():
    assert machine_header([MACHINE, dict(MACHINE)]).startswith("Machine of every section: Test CPU with AVX512,")
    other = {**MACHINE, "cpu_capability": "AVX2"}
    assert machine_header([MACHINE, other]) == "Sections come from 2 machines, and each section below names its own."


def test_report_puts_version_under_quality_heading(tmp_path):
    (tmp_path / "quality.json").write_text(json.dumps({"machine": MACHINE, "settings": {"quick": False}}))
    (tmp_path / "quality.md").write_text("## Quality at 2x, 4x and 8x compression\n\nthe tables\n")
    lines = write_report(tmp_path).read_text().splitlines()
    assert lines[4].startswith("Machine of every section: Test CPU with AVX512, 2 cores, 23.5 GiB, GPU: none;")
    heading = lines.index("## Quality at 2x, 4x and 8x compression")
    assert lines[heading + 1 : heading + 5] == ["", "(full version, measured 2026-12-05 on Test CPU with AVX512)", "", "the tables"]
