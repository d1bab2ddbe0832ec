# The two commands of the README: `make demo` and `make test`.
# VENV, TEST_EXTRAS and CONSTRAINTS pick the environment `make test` installs and runs in; .ci/run
# uses them for its runs on the newest releases and on the lower bounds (see README, Dependencies).
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/smollm2-135m.yaml
OUT ?= out/smollm2-135m
TEST_EXTRAS ?= dev,peers
CONSTRAINTS ?=

.PHONY: setup demo test lint bench

setup:
	VENV=$(VENV) bash scripts/setup.sh

## Install, then quantize the embedded SmolLM2-135M-Instruct to 6.0 bpp and write the report.
demo: setup
	$(VENV)/bin/pq-lightning quantize --config $(CONFIG) --output_dir $(OUT)

## Install (with the peers extra: the llm-compressor interoperability test), then run the test suite.
test:
	VENV=$(VENV) EXTRAS=$(TEST_EXTRAS) CONSTRAINTS=$(CONSTRAINTS) bash scripts/setup.sh
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check pq_lightning callbacks tests scripts

bench: setup
	$(PY) scripts/bench_formats.py
	$(PY) scripts/bench_allocate.py
