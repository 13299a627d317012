# `make run` and `make test` set everything up on first use: a virtualenv in .venv with the
# CPU build of torch and this package.
VENV ?= .venv
BIN := $(VENV)/bin
READY := $(VENV)/.installed
# torch from PyTorch's own CPU-only index: on Linux the public package index's torch is the CUDA build,
# with gigabytes of nvidia-* packages. Where that index cannot be reached (a machine with a local wheel
# folder and no internet), the CPU build (+cpu) comes from pip's configured sources, or pip says it
# cannot find it; never the CUDA build. A GPU machine names its CUDA index instead, for example
# make run TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH := torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
REACHABLE := python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)'

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
	@echo "==> first run: setting up $(VENV) (a few minutes; later runs start at once)"
	python3 -m venv $(VENV)
	@if $(REACHABLE) $(TORCH_INDEX)/torch/ 2>/dev/null; then \
		echo "==> installing $(TORCH) from $(TORCH_INDEX) (about 200 MB for the CPU build)"; \
		$(BIN)/python -m pip install --quiet --index-url $(TORCH_INDEX) $(TORCH); \
	else \
		echo "==> $(TORCH_INDEX) cannot be reached: installing $(TORCH)+cpu from pip's configured sources"; \
		$(BIN)/python -m pip install --quiet '$(TORCH)+cpu'; \
	fi
	@echo "==> installing t2i and its dependencies (constraints.txt)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[orchestrator,test]'
	touch $@
	@echo "==> $(VENV) is ready"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
