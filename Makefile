# Two commands on a fresh machine: `make demo` (the quickstart) and `make test` (the test suite).
# Each creates .venv when it is missing, installs the CPU build of torch that lies on disk, then the project.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev,onnx,graph,text,retrieval,diffusion,detection]"
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-peers.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/distill run

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache
