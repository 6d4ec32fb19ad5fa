# msam: `make demo` runs a real sweep on the embedded defaults; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install test test-slow test-all lint format demo bench-cpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# test: lint and the default set (under 5 minutes on 2 cores); test-slow: the end-to-end runs
# marked slow (see tests/README.md); test-all: lint and both.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

demo: $(STAMP)
	$(BIN)/msam sweep configs/sweeps/demo.yaml

clean:
	rm -rf $(VENV) runs
