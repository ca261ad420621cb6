# flowmatch — `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= outputs/demo
export WANDB_MODE ?= offline

.PHONY: help install lint format demo test test-fast test-slow benchmark gpu-check clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv (if missing) and install flowmatch with its dependencies

demo: install  ## 180° rotation, sigma in {0, 0.05}: train both (parallel), figures, gradvar + metrics in $(OUT)
	rm -rf $(OUT)
	$(BIN)/python train.py --multirun experiment=rotation180 interpolant.sigma=0.0,0.05 callbacks=gradvar \
	  hydra/launcher=joblib_cpu threads=1 trainer.enable_progress_bar=false \
	  hydra.sweep.dir=$(OUT) hydra.sweep.subdir=sigma\$${interpolant.sigma}
	$(BIN)/python -m flowmatch.plots.rotation $(OUT)

lint: install  ## ruff: lint (pyflakes, pycodestyle, import order, bugbear, pyupgrade) and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install  ## ruff: fix what can be fixed and format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install lint  ## lint, then the test suite, slow (multi-process, sweep) tests included
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider

test-fast: install  ## the fast tests only
	$(BIN)/python -m pytest -q -n 2 -m "not slow" -p no:cacheprovider

test-slow: install  ## the slow tests only (DDP, sweeps)
	$(BIN)/python -m pytest -q -m slow -p no:cacheprovider

benchmark: install  ## Lightning-vs-bare-loop and gradient-variance cost ratios
	$(BIN)/python benchmarks/training_loop.py
	$(BIN)/python benchmarks/gradvar_cost.py

gpu-check: install  ## GPU: train unet_cifar on synthetic CIFAR-shaped tensors, print steps/s (scripts/gpu_check.sh)
	PY=$(BIN)/python scripts/gpu_check.sh

clean:  ## remove outputs (keeps .venv)
	rm -rf outputs multirun
