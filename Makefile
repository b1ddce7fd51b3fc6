# cdpflow — the two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PACKAGES := streams sources sinks schemas bench

.PHONY: setup demo test bench lint typecheck stack-up stack-down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Start the local Kafka + registry (downloaded once with Maven), a collector and a
## worker; send a burst through the Segment SDK and the generator; report; stop.
demo: setup
	$(BIN)/cdpflow demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

## Lint, types, then every test on a real broker and registry. With
## KAFKA_BOOTSTRAP_SERVERS + SCHEMA_REGISTRY_URL set the tests use that stack;
## otherwise they start (and stop) the local one.
test: lint typecheck
	$(BIN)/pytest

## Benchmark on a dedicated local stack (prints a markdown table, writes .bench/results.json):
## cdpflow's worker vs a bare confluent-kafka loop vs Quix Streams, scale-out, latency.
## CDP_BENCH_EVENTS sets N (default 200000).
bench: setup
	$(BIN)/python -m bench.run

stack-up: setup
	$(BIN)/cdpflow stack up

stack-down: setup
	$(BIN)/cdpflow stack down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
