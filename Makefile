# The few verbs a newcomer needs. Each sets up its own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Reuse XLA compilations across processes and runs (the CPU demo and tests compile a lot).
export JAX_COMPILATION_CACHE_DIR ?= $(abspath $(VENV))/xla-cache

.PHONY: setup fashion-mnist test test-floors test-multiprocess demo lint format bench variant-bench tracker tracking tracking-resnet18 gpu-bench angles lambda-trace sweep study study-fashion study-fashion-variants study-gpu ablation ablation-fashion start transformer clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST's four IDX files (30 MB), the dataset of `--set dataset=fashion_mnist`: Debian's
# package puts them in $(FASHION_MNIST_DIR), the default data_dir. As root with apt-get this
# installs it (about 10 s: apt-get update 4 s, download and unpack 6 s); elsewhere it prints how
# to get the files by hand and fails. Needs no virtual environment.
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
FASHION_MNIST_URL := http://fashion-mnist.s3-website.eu-central-1.amazonaws.com
FASHION_MNIST_FILES := train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte
fashion-mnist:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST is in $(FASHION_MNIST_DIR), the default data_dir."; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist && \
	  echo "Fashion-MNIST is in $(FASHION_MNIST_DIR), the default data_dir."; \
	else \
	  echo "Fashion-MNIST is not in $(FASHION_MNIST_DIR) and this shell cannot install it (needs root and apt-get). Either:"; \
	  echo "  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist   (then the default data_dir works), or"; \
	  echo "  - any machine: download the four files into a directory DIR:"; \
	  echo "      mkdir -p DIR && cd DIR && for f in $(FASHION_MNIST_FILES); do curl -fLO $(FASHION_MNIST_URL)/\$$f.gz; done"; \
	  echo "    (listed at https://github.com/zalandoresearch/fashion-mnist) and train with --set data_dir=DIR."; \
	  exit 1; \
	fi

# Everything, the multi-process launches included (`make test-multiprocess` runs those alone).
# `--dist loadfile`: one worker per test file, so session fixtures (reference runs) run once.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# The declared minimum versions work: fresh venvs at exactly the floors of pyproject.toml
# (tests/floors/*.txt, installed from the package index) run the README's blocks and the
# doctests, first after a plain `pip install .` (which must not install flax), then with the
# [flax] extra (whose floor, flax 0.12.7, lifts jax to 0.10.0). It takes minutes, most of them
# installing, so it is not part of `make test`.
FLOORS ?= .venv-floors
FLOOR_TESTS := tests/test_readme.py tests/test_doctests.py
test-floors:
	rm -rf $(FLOORS)
	$(PYTHON) -m venv $(FLOORS)/core
	$(FLOORS)/core/bin/pip install -q --upgrade pip
	$(FLOORS)/core/bin/pip install -q -c tests/floors/core.txt . pytest
	$(FLOORS)/core/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('flax') is not None and 'pip install . installed flax')"
	$(FLOORS)/core/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS) \
	  tests/test_wheel_installs_the_library_alone.py::test_xsam_jax_imports_without_flax_and_training_names_the_extra
	$(PYTHON) -m venv $(FLOORS)/flax
	$(FLOORS)/flax/bin/pip install -q --upgrade pip
	$(FLOORS)/flax/bin/pip install -q -c tests/floors/flax.txt '.[flax]' pytest
	$(FLOORS)/flax/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

# Only the multi-process tests (local processes joined by jax.distributed; gloo on CPU).
test-multiprocess: $(STAMP)
	$(BIN)/python -m pytest -q -m multiprocess --durations=10

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

# Cost per step of the cheaper-SAM variants (sometimes_sam, looksam, ESAM, Eigen-SAM, X-SAM; the
# lax.cond path and the host-decided static path) against SGD and SAM, gradient evaluations
# counted; writes its section of benchmarks/RESULTS.md. Meant for a GPU or a quiet machine: on
# XLA:CPU a gradient inside lax.cond is ~20x slower, and the Eigen-SAM/X-SAM windows alone take
# many minutes on the 2-core CPU (ResNet-18: hours).
variant-bench: $(STAMP)
	$(BIN)/python -m benchmarks.variant_cost --models mlp,simple_cnn --batch 32

tracker: $(STAMP)
	$(BIN)/python -m benchmarks.tracker --out benchmarks/RESULTS.md

# Tracking quality along training: the full grid on the digits SimpleCNN, and the
# cost-goal candidates (power iteration, p >= 5) on a CIFAR-shaped ResNet-18 (12-25 s a step
# on the 2-core CPU, so about an hour: meant for a quiet machine or a GPU); both write
# benchmarks/RESULTS.md.
tracking: $(STAMP)
	$(BIN)/python -m benchmarks.tracking --steps 400 --every 20 --ref-iters 30 --full-examples 1437 --trackers power,lanczos,averaged --repeats 5 --out benchmarks/RESULTS.md

tracking-resnet18: $(STAMP)
	$(BIN)/python -m benchmarks.tracking --model resnet18 --batch 16 --steps 200 --every 20 --ref-iters 20 --trackers power --qs 1,2,3,5 --ps 5,20 --repeats 3 --out benchmarks/RESULTS.md

# Accelerator benchmark (< 8 min on one GPU), report in benchmarks/GPU_RESULTS.md. Runs with the
# machine's own Python and packages (JAX, Flax, optax; PyTorch optional), offline: no venv.
gpu-bench:
	$(PYTHON) -m benchmarks.gpu

angles: $(STAMP)
	$(BIN)/python -m experiments.analysis.angles --set epochs=20 --out experiments/figures/angles_digits.png

lambda-trace: $(STAMP)
	$(BIN)/python -m experiments.analysis.lambda_trace --optimizers sgd,sam,eigen_sam,xsam --set epochs=20 --out experiments/figures/lambda_trace_digits.png

sweep: $(STAMP)
	$(BIN)/python -m experiments.analysis.sweep --root runs/sweep_digits --seeds 0,1,2 --groups sgd,sam_rho,xsam_alpha,xsam_pq,xsam_variants --set epochs=20 --set lambda_max_every=0 --out experiments/figures/sweep_digits.png

# Issue 9's benchmark protocol (validation-tuned, 5 seeds, paired 95% CIs); resumable: rerun to
# continue. See experiments/RESULTS.md for its wall time.
study: $(STAMP)
	$(BIN)/python -m experiments.analysis.study --root runs/study_digits --out experiments/figures/study_digits

# The same protocol on Fashion-MNIST: SimpleCNN on 4,000 of the 60,000 training images, 3
# epochs, clean and 40% label noise, ρ grid {0.05, 0.1, 0.2}, tested on all 10,000 test images; 70 runs on
# the 2-core CPU (experiments/RESULTS.md, "Fashion-MNIST study: design"). Needs the IDX files
# (`make fashion-mnist`; another directory: add --set data_dir=DIR). Resumable.
study-fashion: $(STAMP)
	$(BIN)/python -m experiments.analysis.study --dataset fashion_mnist --root runs/study_fashion --out experiments/figures/study_fashion

# Issue 21's cheaper SAM variants on Fashion-MNIST at 40% noise (LookSAM, SAM every 5 steps, RST,
# ESAM, MESA against SGD and SAM, SGD also at SAM's gradient budget), ρ grid {0.02, 0.05, 0.1}
# (the study's SAM chose 0.05, its lower edge). See experiments/RESULTS.md for its wall time.
study-fashion-variants: $(STAMP)
	$(BIN)/python -m experiments.analysis.study --dataset fashion_mnist --regimes noise40 --tune_regimes noise40 --tune_from noise40 --methods sgd,sam,looksam,sam_every,rst,esam,mesa --rhos 0.02,0.05,0.1 --compute_regimes noise40 --compute_match sam --root runs/study_fashion_variants --out experiments/figures/study_fashion_variants

# The Fashion-MNIST comparison at GPU scale (ResNet-18, all 60,000 images, 3 seeds) within 9
# minutes: the machine's own Python and packages (no venv, no network), the IDX files from
# FASHION_MNIST_DATA (default: Debian's directory). Resumable; see experiments/RESULTS.md.
FASHION_MNIST_DATA ?= $(FASHION_MNIST_DIR)
study-gpu:
	$(PYTHON) -m experiments.analysis.study_gpu --data_dir $(FASHION_MNIST_DATA) --root runs/study_gpu --out experiments/figures/study_gpu

# Does the eigenvector matter? X-SAM with v from power iteration (the papers), a random unit
# vector, or 20 power iterations over the whole training set, and SAM, at the study's
# validation choice, 40% noise, its 5 seeds (reads experiments/figures/study_digits.json);
# resumable. See experiments/RESULTS.md for its wall time.
ablation: $(STAMP)
	$(BIN)/python -m experiments.analysis.ablation --dataset digits --root runs/ablation_digits --out experiments/figures/ablation_digits

# The same on Fashion-MNIST, from the Fashion-MNIST study's JSON (make study-fashion first).
# Arm (c) at q = 10 over 256 fixed images (not 20 over 2,048) to fit the 2-core CPU: 236-785 s
# a run measured here; the full setting does 16x the HVP work per refresh (experiments/RESULTS.md).
ablation-fashion: $(STAMP)
	$(BIN)/python -m experiments.analysis.ablation --dataset fashion_mnist --study experiments/figures/study_fashion.json --eig_iters 10 --eig_examples 256 --root runs/ablation_fashion --out experiments/figures/ablation_fashion

# The first epochs: PyTorch-default init (before) against LeCun normal, and rho warm-up.
start: $(STAMP)
	$(BIN)/python -m experiments.analysis.start --out experiments/figures/start_digits.png

transformer: $(STAMP)
	$(BIN)/python -m experiments.transformer --optimizers adamw,sam_adamw,xsam_adamw --seeds 0,1,2 --steps 1500 --out experiments/figures/transformer.png

clean:
	rm -rf $(VENV) $(FLOORS) build *.egg-info .pytest_cache
