# carsam — `make help` lists the targets. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.carsam-installed
TRIALS ?= 8
WORKERS ?= 2
SWEEP_STORAGE ?= journal:runs/optuna.journal
export PYTHONHASHSEED := 0

.DEFAULT_GOAL := help
.PHONY: help setup system-packages lint test test-fast sweep report dashboard testbed data bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt setuptools wheel
	# sam2 ships as an sdist whose setup.py imports torch: build it against the venv's torch, without its CUDA op
	SAM2_BUILD_CUDA=0 $(BIN)/pip install --quiet --no-build-isolation -c constraints.txt sam2
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

setup: $(STAMP) ## create .venv and install carsam with pinned dependencies (skipped when up to date)

system-packages: ## install the Debian packages some tests drive (chromium, postgresql) when root
	bash tools/system-packages.sh

lint: $(STAMP) ## ruff (pyflakes, pycodestyle, import order, 120 columns) on the tree; mypy on carsam/ (pyproject.toml)
	$(BIN)/ruff check carsam tests bench tools analysis sweeps
	$(BIN)/mypy

test: $(STAMP) system-packages ## run the test suite (CPU only, no network), slowest 15 listed
	$(BIN)/pytest -q --durations=15

test-fast: $(STAMP) ## the test suite without tests marked slow
	$(BIN)/pytest -q -m "not slow" --durations=15

sweep: $(STAMP) ## the default study: quick decoder-only CAR-SAM on the testbed (resumable; TRIALS=8 WORKERS=2), then tables + dashboard
	$(BIN)/carsam sweep sweeps/carsam_quick.py --trials $(TRIALS) --workers $(WORKERS) --storage $(SWEEP_STORAGE)
	$(BIN)/carsam report --runs runs
	$(BIN)/carsam dashboard --runs runs

report: $(STAMP) ## ablation tables (Markdown, LaTeX, CSV) and figures of every run under runs/ -> runs/report/
	$(BIN)/carsam report --figures

dashboard: $(STAMP) ## offline HTML page of every run under runs/ -> runs/dashboard.html
	$(BIN)/carsam dashboard

data: $(STAMP) ## generate the synthetic testbed dataset (seed 0) under data/
	$(BIN)/carsam testbed data

testbed: $(STAMP) ## regenerate the data and retrain the testbed SAM (about an hour on 2 cores)
	$(BIN)/carsam testbed build

bench: $(STAMP) ## benchmarks: Lightning vs plain-loop overhead of one reconstruction unit; cold vs warm stage cache; the knob-free work a warm trial has left; saved/packed model sizes; FP vs fake-quant vs ONNX speed; per-step cost, block I/O bytes and step memory at vit_b shapes
	OMP_NUM_THREADS=1 $(BIN)/python bench/recon_overhead.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/stage_cache.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/knob_free_work.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/export_sizes.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/onnx_speed.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/vit_b_steps.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/fake_quant_compile.py

clean: ## remove runs/, data/ and build/ (keeps .venv)
	rm -rf runs data build
