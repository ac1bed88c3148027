# One command to see it work, one to prove it works. CI runs `make test` through .ci/run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-lowest promtool schema lock container-test clean

# The stamp files re-install only when pyproject.toml changes.
$(VENV)/.stamp-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.stamp-run

demo: $(VENV)/.stamp-run
	$(BIN)/yeastar-archiver demo

test: $(VENV)/.stamp-test promtool
	$(BIN)/ruff check .
	$(BIN)/mypy --strict daemon yeastar_archiver.py
	$(BIN)/pytest

# The suite again with the lowest version of every direct dependency that pyproject.toml allows,
# in a venv of its own: proves the floors. CI runs it after `make test`.
LOWEST := .venv-lowest
test-lowest: $(VENV)/.stamp-test promtool
	rm -rf $(LOWEST)
	$(BIN)/uv venv --quiet --python $(PYTHON) $(LOWEST)
	VIRTUAL_ENV=$(CURDIR)/$(LOWEST) $(BIN)/uv pip install --quiet --resolution lowest-direct -e '.[test]'
	VIRTUAL_ENV=$(CURDIR)/$(LOWEST) $(BIN)/uv pip list | grep -E -i '^(aiohttp|aiofiles|pyyaml|structlog|prometheus-client|uvloop) '
	PATH=$(CURDIR)/$(LOWEST)/bin:$$PATH $(LOWEST)/bin/pytest -p no:cacheprovider

# The container's lock: pyproject.toml's dependencies with the s3 extra (the image makes off-box copies)
# and deploy/image-requirements.in, pinned with the hashes of every file of each release (any platform,
# Python >= 3.11). The Dockerfile installs
# it with --require-hashes. Rerun to take newer releases; test-lowest keeps the floors honest.
lock: $(VENV)/.stamp-test
	$(BIN)/uv pip compile --quiet --generate-hashes --universal --python-version 3.11 --extra s3 \
	    --output-file requirements.lock pyproject.toml deploy/image-requirements.in

# The config's JSON Schema, generated from the dataclasses in daemon/config.py (descriptions from
# config.example.yaml); a test fails when the shipped copy is stale.
schema: $(VENV)/.stamp-run
	$(BIN)/python -m daemon.schema config.example.yaml

# promtool checks and unit-tests deploy/prometheus/alerts.yml (inside pytest); Debian's prometheus
# package provides it, installed here when missing (as root) with its server neither started nor enabled.
promtool:
	@bash deploy/prometheus/install-promtool.sh

# Builds the real image with podman and runs it against the simulator (needs root; minutes
# on a fresh machine, so it is not part of `make test`; CI runs it after `make test`).
container-test: $(VENV)/.stamp-test
	bash tests/container/container-test.sh

clean:
	rm -rf $(VENV) $(LOWEST) .pytest_cache .mypy_cache .ruff_cache yeastar-archiver-demo dist build
