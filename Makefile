# The two commands of the README: `make demo` and `make test`.
PY := .venv/bin/python
CONFIG ?= configs/smollm2-135m.yaml
OUT ?= out/smollm2-135m

.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

## Install, then quantize the embedded SmolLM2-135M-Instruct to 6.0 bpp and write the report.
demo: setup
	.venv/bin/pq-lightning quantize --config $(CONFIG) --output_dir $(OUT)

## Install (with the peers extra: the llm-compressor interoperability test), then run the test suite.
test:
	EXTRAS=dev,peers bash scripts/setup.sh
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check pq_lightning callbacks tests scripts

bench: setup
	$(PY) scripts/bench_formats.py
	$(PY) scripts/bench_allocate.py
