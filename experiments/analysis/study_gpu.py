r"""The Fashion-MNIST study at GPU scale, in one command with a wall-clock budget.

``python -m experiments.analysis.study_gpu --data_dir DIR [--epochs 2] [--seeds 0,1,2]
[--budget_minutes 8.5] [--root runs/study_gpu] [--out experiments/figures/study_gpu] [--tiny]``
(``make study-gpu``).

ResNet-18 (the CIFAR variant, 28x28x1 as it is) on all 60,000 Fashion-MNIST training images
with the papers' recipe (``experiments/configs/fashion_mnist_resnet18.py``: batch 256, lr 0.1
cosine, momentum 0.9, weight decay 5e-4), SGD, SAM, Eigen-SAM and X-SAM at ρ = 0.05 (SAM's
Fashion-MNIST value), α = 0.2, p = q = 5, ``--seeds`` (3) seeds, tested on all 10,000 test
images, in bfloat16 on an accelerator (``--dtype auto``: float32 parameters, bfloat16
computation; float32 on a CPU, where bfloat16 is slower). The statistics and the report are
:mod:`experiments.analysis.study`'s: accuracy as mean ± 95% t-interval, final λ_max as median
[range], paired differences per seed with Holm-adjusted verdicts. What it does not do, to fit
the budget: no tuning on a validation split (the settings are the papers'), and few epochs.

**The budget.** The command must end within 9 minutes: ``--budget_minutes`` (8.5) counts from
the start of :func:`main`, leaving half a minute for Python and JAX to start. Runs go
seed-major (every method of seed 0, then of seed 1, ...), so an interrupted study has whole
seeds, and before each run :func:`predict_seconds` estimates its length from the runs already
done (the same method's slowest run, else another method's scaled by the ratio of their
gradient evaluations per step, :data:`COST`, with a first-compile margin; a run read from an
earlier slot counts with its own wall time); a run that would end
past the budget less ``--reserve_seconds`` (for the report) is not started. The report lists
the skipped runs and the wall time. The epochs are a flag (``--epochs``, default 2): no GPU has
measured this study yet (experiments/RESULTS.md, "GPU-scale Fashion-MNIST study", has the
estimate behind the default). The study is resumable like the CPU study: a finished run's
directory is read, not trained again, so a second 9-minute slot continues the seeds.

**Offline, the machine's own Python.** It imports JAX, Flax, optax, NumPy, SciPy (a JAX
dependency) and orbax (a Flax dependency) only: no tensorflow-datasets, no scikit-learn, no
tensorboardX (runs are quiet), and matplotlib only if present (else no figures). The IDX files
come from ``--data_dir`` (``make fashion-mnist`` says how to get them; 30 MB, small enough to
travel with the working tree).

``--tiny``: the CPU check of the whole path that the test suite runs (SimpleCNN, 1 epoch,
64 training images, batch 16; the data directory may hold any small IDX files).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.analysis import common, study

CONFIG = "experiments/configs/fashion_mnist_resnet18.py"
METHODS = ("sgd", "sam", "eigen_sam", "xsam")
# Relative cost of one step in gradient evaluations, for predicting a method's first run from
# another's: SAM 2 gradients; Eigen-SAM and X-SAM 2 gradients + q/p = 1 HVP per step at
# p = q = 5, an HVP measured at 2.1 gradients on ResNet-18 (benchmarks/RESULTS.md, "HVP /
# gradient"), so 4.1.
COST = {"sgd": 1.0, "sam": 2.0, "eigen_sam": 4.1, "xsam": 4.1}
# A method's first run compiles its programs (the later ones read the persistent compilation
# cache): predicted from another method's runs, it gets this factor on top.
FIRST_COMPILE_MARGIN = 1.5
# --tiny: the CPU mode of the test suite.
TINY_OVERRIDES = (
  "model=simple_cnn",
  "train_examples=64",
  "batch_size=16",
  "lambda_max_examples=16",
  "lambda_max_iters=2",
  "log_every=1000",
)


def predict_seconds(method: str, done: Sequence[tuple[str, float]]) -> float:
  """The predicted wall time of a run of ``method`` from the runs ``done`` so far.

  Args:
    method: the next run's method.
    done: ``(method, wall_seconds)`` of every finished run.

  Returns:
    The slowest finished run of ``method``; else the slowest finished run of any method,
    scaled by :data:`COST` and :data:`FIRST_COMPILE_MARGIN`; 0 when nothing is done (the first
    run always starts, unless the budget is already spent).

  Example:
    >>> predict_seconds("sam", [("sgd", 10.0)])
    30.0
  """
  same = [s for m, s in done if m == method]
  if same:
    return max(same)
  if not done:
    return 0.0
  return FIRST_COMPILE_MARGIN * max(s * COST[method] / COST[m] for m, s in done)


def fits(elapsed: float, predicted: float, budget: float, reserve: float) -> bool:
  """Whether a run predicted to take ``predicted`` s, starting ``elapsed`` s into a budget of
  ``budget`` s, ends before ``budget - reserve``."""
  return elapsed + predicted <= budget - reserve


def runs_of(args: argparse.Namespace) -> list[study.Run]:
  """The study's runs, seed-major, with every override (the study's, then the user's)."""
  runs = []
  for seed in args.seeds:
    for regime in args.regimes:
      for method in args.methods:
        extra = [*study.regime_overrides(regime, args), f"seed={seed}"]
        runs.append(study.Run("test", regime, method, (), seed, (*extra, *args.overrides)))
  return runs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.analysis.study_gpu", description=__doc__
  )
  common.add_run_args(parser)
  parser.set_defaults(config=CONFIG)
  parser.add_argument(
    "--data_dir", required=True, help="the directory of Fashion-MNIST's four IDX files"
  )
  parser.add_argument("--root", default="runs/study_gpu")
  parser.add_argument("--out", default="experiments/figures/study_gpu")
  parser.add_argument("--regimes", default="clean", help="clean and/or noiseNN")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--epochs", type=int, default=2, help="the length of every run")
  parser.add_argument(
    "--train_examples", type=int, default=0, help="training images (0: all 60,000)"
  )
  parser.add_argument(
    "--dtype",
    default="auto",
    choices=("auto", "float32", "bfloat16"),
    help="computation dtype (auto: bfloat16 on an accelerator, float32 on a CPU)",
  )
  parser.add_argument(
    "--budget_minutes",
    type=float,
    default=8.5,
    help="no run starts that would end later (counted from main; 9 min for the whole command)",
  )
  parser.add_argument(
    "--reserve_seconds",
    type=float,
    default=20.0,
    help="of the budget, kept for the report after the last run",
  )
  parser.add_argument("--tiny", action="store_true", help="the test suite's CPU mode")
  args = parser.parse_args(argv)
  for name in ("regimes", "methods"):
    setattr(args, name, common.parse_list(getattr(args, name)))
  args.seeds = common.parse_list(args.seeds, int)
  if args.epochs < 1:
    parser.error(f"--epochs must be >= 1, got {args.epochs}")
  if args.budget_minutes <= 0:
    parser.error(f"--budget_minutes must be > 0, got {args.budget_minutes}")
  unknown = [m for m in args.methods if m not in COST]
  if unknown:
    parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
  if not Path(args.data_dir).is_dir():
    parser.error(
      f"--data_dir {args.data_dir} is not a directory. It must hold Fashion-MNIST's four IDX "
      "files (train-images-idx3-ubyte[.gz], ...): `make fashion-mnist` says how to get them."
    )
  if args.tiny:
    args.epochs = 1
  for regime in args.regimes:
    try:
      study.regime_overrides(regime, args)
    except ValueError as exc:
      parser.error(f"--regimes: {exc}")
  return args


def dtype_of(args: argparse.Namespace) -> str:
  if args.dtype != "auto":
    return args.dtype
  import jax

  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def main(argv: Sequence[str] | None = None) -> int:
  start = time.time()
  args = parse_args(argv)
  budget = 60.0 * args.budget_minutes
  common.enable_compilation_cache(args.jax_cache)
  import jax

  args.overrides = [
    f"data_dir={Path(args.data_dir).absolute()}",
    f"compute_dtype={dtype_of(args)}",
    f"checkpoint_every={args.epochs}",
    "lambda_max_every=0",
    *(TINY_OVERRIDES if args.tiny else ()),
    *args.overrides,
  ]
  runs = runs_of(args)
  print(
    f"study_gpu: {len(runs)} runs of {args.epochs} epochs on {jax.default_backend()} "
    f"({jax.devices()[0].device_kind}), budget {args.budget_minutes} min",
    flush=True,
  )
  root = Path(args.root)
  rows, done, skipped = [], [], []
  for i, run in enumerate(runs):
    workdir = root / run.name
    config = common.make_config(args.config, run.method, run.overrides)
    finished = (workdir / "summary.json").exists()
    elapsed = time.time() - start
    predicted = predict_seconds(run.method, done)
    if not finished and not fits(elapsed, predicted, budget, args.reserve_seconds):
      skipped.append(f"{run.name} (predicted {predicted:.0f} s at {elapsed:.0f} s)")
      print(f"[{i + 1}/{len(runs)}] skip {run.name}: budget", flush=True)
      continue
    run_start = time.time()
    summary = common.run_or_load(config, workdir, log=None)
    # A run read from an earlier slot predicts by its own wall time, as one trained now does.
    took = time.time() - run_start if not finished else summary.get("wall_seconds_this_run")
    if took is not None:
      done.append((run.method, float(took)))
    rows.append(study.row_of(run, workdir, summary))
    print(
      f"[{i + 1}/{len(runs)}] {'read' if finished else 'ran '} {run.name}: "
      f"acc={summary['test_accuracy']:.4f} lambda={summary['final_lambda_max']:.3g} "
      f"({time.time() - run_start:.0f} s; {time.time() - start:.0f} s of {budget:.0f})",
      flush=True,
    )
  text = report(rows, skipped, args, time.time() - start, jax.devices()[0].device_kind)
  print("\n" + text)
  return 0


def report(
  rows: Sequence[dict[str, Any]],
  skipped: Sequence[str],
  args: argparse.Namespace,
  wall: float,
  device: str,
) -> str:
  """Writes the study's tables (:func:`experiments.analysis.study.write_outputs`) with a header
  of what ran, on what, in how long, and what the budget skipped; returns the Markdown."""
  report_args = argparse.Namespace(**vars(args), compute_regimes=[], tune_regimes=[])
  tables = study.write_outputs([], rows, {}, report_args, args.out)
  epochs = [r["seconds_per_epoch"] for r in rows if not math.isnan(r["seconds_per_epoch"])]
  head = [
    f"## GPU-scale Fashion-MNIST study ({device})",
    "",
    f"- Runs: {len(rows)}, {args.epochs} epoch(s) each ({', '.join(args.methods)}; seeds "
    f"{', '.join(map(str, args.seeds))}; regimes {', '.join(args.regimes)}), no tuning; "
    f"overrides: {' '.join(args.overrides)}.",
    f"- Wall time of the command: {wall / 60:.1f} min (budget {args.budget_minutes} min).",
  ]
  if epochs:
    head.append(f"- Training seconds per epoch: {min(epochs):.1f}–{max(epochs):.1f}.")
  head.append(
    f"- Skipped by the budget: {len(skipped)}" + (": " + "; ".join(skipped) if skipped else ".")
  )
  text = "\n".join(head) + "\n\n" + tables
  Path(f"{args.out}.md").write_text(text)
  return text


if __name__ == "__main__":
  sys.exit(main())
