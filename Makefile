# The two commands that matter: `make run` (set up, then serve) and `make test` (set up, then test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine's CPU build of torch; on a GPU host: make TORCH_SPEC='torch' (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
CHECKPOINT ?= checkpoints/default
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: venv run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[train,dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/samdiffsr serve --checkpoint $(CHECKPOINT) --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/model_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
