# The few verbs a newcomer needs. Each sets up its own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Reuse XLA compilations across processes and runs (the CPU demo and tests compile a lot).
export JAX_COMPILATION_CACHE_DIR ?= $(abspath $(VENV))/xla-cache

.PHONY: setup test demo lint format bench tracker angles lambda-trace sweep transformer clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.step_cost

tracker: $(STAMP)
	$(BIN)/python -m benchmarks.tracker

angles: $(STAMP)
	$(BIN)/python -m experiments.analysis.angles --set epochs=20 --out experiments/figures/angles_digits.png

lambda-trace: $(STAMP)
	$(BIN)/python -m experiments.analysis.lambda_trace --optimizers sgd,sam,eigen_sam,xsam --set epochs=20 --out experiments/figures/lambda_trace_digits.png

sweep: $(STAMP)
	$(BIN)/python -m experiments.analysis.sweep --root runs/sweep_digits --seeds 0,1,2 --groups sgd,sam_rho,xsam_alpha,xsam_pq,xsam_variants --set epochs=20 --set lambda_max_every=0 --out experiments/figures/sweep_digits.png

transformer: $(STAMP)
	$(BIN)/python -m experiments.transformer --optimizers adamw,sam_adamw,xsam_adamw --seeds 0,1,2 --steps 1500 --out experiments/figures/transformer.png

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
