# Two commands from a fresh clone: `make demo` (install, then run the whole toolkit on the bundled default)
# and `make test` (install the test extra, then run the tests offline on the CPU).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Any torch build for your machine; CI pins TORCH="torch==2.14.1 torchvision==0.29.1".
TORCH ?= torch torchvision

.PHONY: demo install test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)

demo: $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/vitlens demo

install: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"

test: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q
