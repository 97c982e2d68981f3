# The two contract commands (README): `make run` and `make test`. Everything else is a helper.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYTHONUNBUFFERED := 1
# glibc backs large allocations (training's softmax logits, ~60 MB a step) with huge
# pages: 1.27x more training steps per minute here (docs/deployment.md)
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
GRANK := .venv/bin/grank
PY := .venv/bin/python

.PHONY: setup data run test test-full lint typecheck unit

setup:            ## create/update both pinned environments (idempotent, seconds when unchanged)
	scripts/setup.sh

data: setup       ## fetch and verify ML-1M and ML-100K, land the full ML-1M raw lake
	$(GRANK) data fetch ml-1m ml-100k
	$(GRANK) data land --all

run: setup        ## the main job end to end on embedded defaults
	scripts/run_main.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck: setup
	.venv/bin/mypy

unit: setup      ## the fast tests (tests/unit: no Spark, no servers; under a minute)
	$(PY) -m pytest tests/unit

test: setup lint typecheck  ## everything CI runs (under 20 minutes on two cores)
	$(GRANK) data fetch ml-1m ml-100k
	# two workers, one test file each at a time: the long DAG runs (tests/e2e, collected
	# first) overlap the rest, whose process and Spark start-ups leave a core idle
	$(PY) -m pytest -n 2 --dist loadfile

test-full: setup lint typecheck  ## make test plus the DAG's re-run and backfill runs (+10 min)
	$(GRANK) data fetch ml-1m ml-100k
	GRANK_E2E_FULL=1 $(PY) -m pytest -n 2 --dist loadfile
