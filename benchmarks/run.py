"""Run the benchmarks and write JSON, PNG plots and `results.md` into docs/benchmarks/.

    .venv/bin/python -m benchmarks.run            # quick version, a few minutes (`make bench`)
    .venv/bin/python -m benchmarks.run --full     # every length, batch and case (33 minutes on a 2-core AVX-512 CPU)
    .venv/bin/python -m benchmarks.run --only wire decode

Each section can also run on its own (`python -m benchmarks.decode --help`). `results.md` is rebuilt
from every section's JSON, so a section run alone still updates it. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks import decode, plots
from benchmarks.common import RESULTS, progress, write_json
from benchmarks.report import MODULES, TITLES, write_report

# Section: (quick arguments, full arguments) of its run().
SECTIONS = {
    "wire": (dict(lengths=[1024, 2048, 4096, 8192], budgets=[256, 512, 1024]),
             dict(lengths=[1024, 2048, 4096, 8192], budgets=[256, 512, 1024])),
    "decode": (decode.QUICK, decode.FULL),
    "prefill": (dict(lengths=[2048], budget=1024), dict(lengths=[2048, 4096, 8000], budget=1024)),
    "service": (dict(num_tokens=1024, budget=256, max_tokens=16, repeats=1),
                dict(num_tokens=4096, budget=1024, max_tokens=64, repeats=5)),
    "memory": (dict(rounds=3), dict(rounds=12)),
}
PLOTS = {"wire": plots.wire, "decode": plots.decode, "prefill": plots.prefill, "service": plots.service,
         "memory": plots.memory}


def run_quality(full: bool) -> None:
    """Quality runs in its own process: it may call kvpress's virtualenv as well."""
    command = [sys.executable, "-m", "benchmarks.quality"] + ([] if full else ["--quick"])
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full version instead of the quick one")
    parser.add_argument("--only", nargs="+", choices=[*SECTIONS, "quality"], help="run only these sections")
    args = parser.parse_args()
    names = args.only or [*SECTIONS, "quality"]
    started = time.perf_counter()
    for name in names:
        progress(f"== {name} ({'full' if args.full else 'quick'}) ==")
        if name == "quality":
            run_quality(args.full)
            continue
        result = MODULES[name].run(**SECTIONS[name][args.full])
        result["version"] = "full" if args.full else "quick"
        write_json(name, result)
        PLOTS[name](result, RESULTS)
        print(f"\n## {TITLES[name]}\n\n{MODULES[name].summarize(result)}\n", flush=True)
    progress(f"wrote {write_report()} in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
