# `make run` and `make test` set everything up on first use: a virtualenv in .venv with the
# CPU build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build) and this package.
VENV ?= .venv
BIN := $(VENV)/bin
READY := $(VENV)/.installed

.PHONY: run test lint clean

run: $(READY)
	$(BIN)/t2i-gateway --local-orchestrator

test: $(READY)
	$(BIN)/pytest

# ruff (ruff.toml) and mypy ([mypy] in setup.cfg) over the packages, bench/ and tests/.
lint: $(READY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy t2i_common t2i_gateway t2i_orchestrator t2i_cli discovery metrics bench tests

$(READY): setup.cfg setup.py constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[orchestrator,test]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
