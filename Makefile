# One command each: `make run` (the quickstart), `make test` (the whole suite), `make lint` (style, layers, types).
# The virtual environment is created on first use and refreshed when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= all,dev

.PHONY: install run test test-fast lint format proto clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fsl run quickstart

# two pytest workers: most of the slow tier waits on processes it started; the Flower simulation
# (Ray) tests form one group that runs in one worker (xdist_group "ray")
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# the layer contract ([tool.importlinter] in pyproject.toml): no package imports one above it;
# mypy ([tool.mypy]): fsl, server, clients and fsl_cli, strict
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-logo
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

proto: $(STAMP)
	PYTHON=$(PY) scripts/gen_proto.sh

bench: $(STAMP)  # every benchmark: tables on stdout, JSON in benchmarks/results/ (about 8 min on 2 cores)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
