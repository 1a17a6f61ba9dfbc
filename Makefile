# Two commands set up everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench lint clean schema

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start the whole pipeline on embedded defaults (Tansu broker, Cordial simulator, demo account).
run: $(STAMP)
	$(BIN)/heapsync dev

## Run the test suite (unit, property and real-chain integration tests; the real-chain ones on Tansu and, when java and mvn are on PATH, on Apache Kafka too).
test: $(STAMP)
	$(BIN)/pytest -q

## Lint and type-check the packages (ruff, mypy with the pydantic plugin; settings in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check heapsync heapsync_ops heapsync_dev ingest processors sinks tests bench
	$(BIN)/mypy heapsync heapsync_ops heapsync_dev ingest processors sinks
	$(BIN)/lint-imports

## Run the benchmarks and print their results (see BENCHMARKS.md): on Tansu and, when java and mvn are on PATH,
## Apache Kafka too (python -m bench --help; --broker tansu|kafka|both, or HEAPSYNC_BENCH_BROKERS).
## The end-to-end one runs 1M users; 10M: make bench BENCH_ARGS="e2e --users 10000000 --broker tansu"
## (or HEAPSYNC_BENCH_E2E_USERS=10000000).
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

## Regenerate the published delta JSON Schema from the pydantic model.
schema: $(STAMP)
	$(BIN)/heapsync schema --write

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
