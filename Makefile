# Two entry points (README): `make demo` and `make test`. Both build .venv from scratch when
# pyproject.toml changed, so they work from a fresh clone with only Python 3.11 present.
# torch is installed first and pinned, so no requirement pulls a CUDA build onto a CPU box;
# momentfm goes in without its stale pins and runs on the modern stack pyproject chooses.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps momentfm==0.1.4
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	PATH="$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: setup
	PATH="$(BIN):$$PATH" $(BIN)/python benchmarks/prepare_throughput.py
	PATH="$(BIN):$$PATH" $(BIN)/python benchmarks/extract_throughput.py
	PATH="$(BIN):$$PATH" $(BIN)/python benchmarks/fit_throughput.py
	PATH="$(BIN):$$PATH" $(BIN)/python benchmarks/fit_phases.py --all --extract
	PATH="$(BIN):$$PATH" $(BIN)/python benchmarks/fit_scale.py --rows 200000
	PATH="$(BIN):$$PATH" $(BIN)/python benchmarks/rr_accuracy.py
	PATH="$(BIN):$$PATH" $(BIN)/python benchmarks/synthetic_calibration.py
	PATH="$(BIN):$$PATH" $(BIN)/python benchmarks/backbone_cost.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data/raw data/prepared cache/*.zarr cache/.*.partial cache/weights cache/heads \
		metrics models predictions reports
