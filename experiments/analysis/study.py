r"""The benchmark protocol of issue 9: tuned on validation, tested once, 5 seeds, paired CIs.

``python -m experiments.analysis.study [--dataset digits|fashion_mnist] [--root DIR] [--out
PREFIX] [--set k=v ...]`` (``make study``, ``make study-fashion``). Resumable: every run is
one :func:`experiments.train.train` in its own directory, and a finished run is read, not rerun,
so an interrupted study continues where it stopped when the same command is run again.
``--report_only`` writes the tables and figures from the runs that exist; ``--from_json
<out>.json`` writes them again from a study's saved per-run numbers, without its run
directories. ``--workers`` (2) runs train at once, each in its own process.

Protocol (defaults; every grid and count is a flag). ``--dataset`` picks the defaults of the
config, the regimes, the epochs, the training subset, the tuning seeds, ``--root`` and ``--out``
(:data:`PRESETS`); the protocol is the same. ``fashion_mnist``: the SimpleCNN for 3 epochs on
a random ``--train_examples`` (4,000) of Fashion-MNIST's 60,000 training images, regimes
``clean`` and ``noise40``, both tuned on their own validation split over the ρ grid {0.05, 0.1,
0.2} (ρ ≥ 0.3 stays at chance in 3 epochs), tested on all 10,000 test images (the files:
``make fashion-mnist``; another directory: ``--set data_dir=DIR``).
``digits``:

* **Regimes.** Digits (SimpleCNN, the config's lr 0.1 cosine, momentum 0.9, wd 5e-4, X-SAM
  p = q = 5) with no augmentation and batch 128 (:data:`STUDY_OVERRIDES`), with 20%, 40% and
  60% symmetric label noise trained for ``--epochs`` (30: long enough that SGD memorises, its
  training accuracy on the 40%-noisy labels reaches 100%), and ``small``: a clean training set
  of ``--small_examples`` (300) images trained for ``--small_epochs`` (150).
* **Tuning on validation only.** ``validation_fraction`` (0.2) of each training set is held out
  (``experiments.data.subset_and_holdout``: its labels are the noisy ones a user would have)
  and the model trains on the rest. SAM's ρ over ``--rhos`` (0.05, 0.1, 0.2, 0.3, 0.5);
  Eigen-SAM's and X-SAM's (ρ, α) over the same ``--rhos`` × ``--alphas`` (one ρ grid for every
  method, so that a difference between methods is not a difference between their grids). The
  setting with the best mean validation accuracy over ``--tune_seeds`` wins (ties: the earlier
  in grid order). Only
  ``--tune_regimes`` are tuned; the other regimes take the choice of the regime ``--tune_from``
  names (by default the 20% and 60% regimes use the 40% choice), which saves two thirds of the
  tuning.
* **Test once.** With the chosen settings, every method trains on the full training set for
  ``--seeds`` (5) seeds and is evaluated on the test set (clean labels). The same seed gives
  every method the same label-noise draw, the same training subset and the same init, so
  X-SAM − SAM and X-SAM − Eigen-SAM are *paired* per seed.
* **Statistics** (``scipy.stats``). Accuracy: mean ± half-width of the 95% t-interval
  (n − 1 degrees of freedom) over seeds. Final λ_max: median and range (it has outliers). Paired
  differences: the t-interval of the per-seed differences and the two-sided paired t test;
  the verdict (win/loss/n.s.) uses Holm-adjusted p-values over each family of comparisons
  (:data:`FAMILIES`: X-SAM against SAM and Eigen-SAM in every regime; SAM against SGD in every
  regime), so that the chance of any false verdict within a family stays at 5%. The
  equal-compute rows are descriptive: no test, no verdict.
* **Equal compute** (``--compute_regimes``): SGD and the tuned SAM again, with their epochs
  multiplied so that they spend the gradient evaluations of ``--compute_match`` (X-SAM by
  default; :func:`grads_per_step`): X-SAM costs 2 gradients + q/p Hessian-vector products per
  step (one HVP counted as one gradient evaluation; it is ~1.5-3× a gradient in wall time),
  SAM 2, SGD 1, ``sam_every``/``looksam`` 1 + 1/k, ``rst`` 1 + p (SAM is left out when it
  costs as much as the matched method or more).
* **Cheaper SAM variants** (issue 21; ``--methods`` takes ``sam_every``, ``rst``, ``ae_sam``,
  ``looksam``, ``esam``, ``mesa``, and ``asam``): each tunes the shared ρ grid and a small grid
  of its own field (:data:`SAM_EVERY_KS`, :data:`SAM_PROBS`, :data:`LOOKSAM_ALPHAS`,
  :data:`ESAM_BETAS` × :data:`ESAM_GAMMAS`; AE-SAM at its paper's defaults), small because each
  value multiplies the method's tuning runs. MESA has no ρ: it tunes its EMA decay
  (:data:`MESA_DECAYS`) at the paper's KL weight, its term switched on after
  :data:`MESA_START_FRACTION` of the epochs.
* **Compute, counted.** Every run's ``summary.json`` holds the gradient evaluations it made,
  counted from the optimizer state (``experiments.optimizers.gradient_evaluations``); the
  report tabulates them per step against the expectation, and ``<out>_compute.png`` plots
  test accuracy against them (runs saved before the count use the expectation).
* **Sharpness.** ``final λ_max`` is the train CLI's independent Lanczos estimate (never the
  optimizer's cached value), and the test runs estimate it every ``--lambda_every`` epochs for
  the λ_max-over-training figure.
* **ρ warm-up.** Every SAM-family run ramps ρ linearly from 0 over ``--rho_warmup`` of its
  epochs (10%, the same for every method): without it, ρ ≥ 0.1 holds the net on its initial
  saddle (see RESULTS.md, "The start"), and the ρ grid would only measure that.

The user's ``--set`` overrides come last and apply to every run (tuning, test and equal
compute alike). Outputs: ``<out>.md`` (tables), ``<out>.csv`` (one row per run),
``<out>_acc.png`` (test accuracy with intervals), ``<out>_lambda.png`` (λ_max over training and
final λ_max against accuracy), ``<out>_compute.png`` (test accuracy against gradient
evaluations, SGD with more epochs as the baseline).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

from experiments.analysis import common

REGIMES = ("noise20", "noise40", "noise60", "small")
# Every regime a study can run: the digits defaults above, and ``clean`` (the clean labels).
ALL_REGIMES = (*REGIMES, "clean")
# The study's fixed changes to the digits config (before the user's --set): no augmentation
# and batch 128, so that SGD memorises the noisy labels within 30 epochs (100% training
# accuracy at 40% noise, measured) on a CPU budget; a checkpoint every 10 epochs.
STUDY_OVERRIDES = ("augment=false", "batch_size=128", "checkpoint_every=10")
METHODS = ("sgd", "sam", "eigen_sam", "xsam")
# Every method the study can run (``--methods``): the default four, ASAM, and the cheaper SAM
# variants of issue 21 (xsam_jax.sometimes_sam as sam_every/rst/ae_sam, xsam_jax.looksam).
CHEAP_METHODS = ("sam_every", "rst", "ae_sam", "looksam", "esam", "mesa")
ALL_METHODS = (*METHODS, "asam", *CHEAP_METHODS)
# The variants' own validation grids (flags), on top of the shared ρ grid, kept small because
# every value multiplies that method's tuning runs by len(--rhos) x len(--tune_seeds):
# * sam_every: k = 5 only, LookSAM's k, so the two are compared at the same 1 + 1/5 gradients
#   per step (the LookSAM paper's own baseline, and under issue 21's 1.25x goal).
# * rst: p = 0.5 only, RST's setting (1.5 gradients per step on average).
# * ae_sam: the paper's δ = 0.9, c_t from -1 to 1 (config defaults), no grid: its rule sets its
#   own ascent fraction.
# * looksam: α over {0.5, 0.7} (0.7 the paper's; 0.5 a weaker reuse), k = 5 (the config's).
# * esam: the whole of ESAM at the official scripts' settings, no grid: beta = 0.5 (half the
#   tensors perturbed, scaled by 2: the official code's 1/beta) and gamma = 0.5 (the second
#   gradient on the half of the batch whose loss rose most, the train step's data selection).
# * mesa: the EMA decay over {0.9, 0.99} (the paper's 0.9998 averages ~5,000 steps, longer than
#   a whole study run), KL weight 0.8 and temperature 5 (the official code's), the KL term from
#   a tenth of the epochs on (the paper's 6 of 200 epochs, rounded up for short runs).
SAM_EVERY_KS = (5,)
SAM_PROBS = (0.5,)
LOOKSAM_ALPHAS = (0.5, 0.7)
ESAM_BETAS = (0.5,)
ESAM_GAMMAS = (0.5,)
MESA_DECAYS = (0.9, 0.99)
MESA_START_FRACTION = 0.1
# The ρ grid of every method (a flag). 0.3 and 0.5 extend the first study's {0.05, 0.1, 0.2},
# whose largest value validation chose for every method under label noise (issue 20, item 4).
RHOS = (0.05, 0.1, 0.2, 0.3, 0.5)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A dataset's defaults for the flags that ``--dataset`` sets (each flag still wins).

  Attributes:
    config: the config file of every run.
    overrides: the study's fixed changes to that config (before the user's ``--set``).
    regimes: the regimes run.
    tune_regimes: the regimes tuned on validation.
    tune_from: the tuned regime whose choice the untuned ones take.
    compute_regimes: the regimes with equal-compute runs.
    epochs: the length of the non-``small`` regimes.
    train_examples: the training subset of the non-``small`` regimes (0: all).
    tune_seeds: the tuning seeds.
    root: the run directories.
    out: the output prefix.
    lambda_points: λ_max estimates per test run.
    rhos: the ρ grid of every method (``--rhos``).
    tune_overrides: the tuning runs' own overrides (their λ_max is not reported).
  """

  config: str
  overrides: tuple[str, ...]
  regimes: tuple[str, ...]
  tune_regimes: tuple[str, ...]
  tune_from: str
  compute_regimes: tuple[str, ...]
  epochs: int
  train_examples: int
  tune_seeds: tuple[int, ...]
  root: str
  out: str
  lambda_points: int = 6
  rhos: tuple[float, ...] = RHOS
  tune_overrides: tuple[str, ...] = ()


PRESETS = {
  "digits": Preset(
    config="experiments/configs/digits_simple_cnn.py",
    overrides=STUDY_OVERRIDES,
    regimes=REGIMES,
    tune_regimes=("noise40", "small"),
    tune_from="noise40",
    compute_regimes=("noise40",),
    epochs=30,
    train_examples=0,
    tune_seeds=(0, 1),
    root="runs/study_digits",
    out="experiments/figures/study_digits",
  ),
  # Fashion-MNIST on the 2-core CPU in <= 2 h (experiments/RESULTS.md, "Fashion-MNIST study:
  # design", has the measured per-run times and the run count): the SimpleCNN on a random 4,000
  # of the 60,000 training images (3,200 + 800 validation when tuning), 3 epochs, the config's
  # augmentation, one tuning seed, both regimes tuned, no equal-compute runs, λ_max at the end
  # only; the test set is all 10,000 test images.
  "fashion_mnist": Preset(
    config="experiments/configs/fashion_mnist_simple_cnn.py",
    overrides=("batch_size=128", "checkpoint_every=5"),
    regimes=("clean", "noise40"),
    tune_regimes=("clean", "noise40"),
    tune_from="noise40",
    compute_regimes=(),
    epochs=3,
    train_examples=4_000,
    tune_seeds=(0,),
    root="runs/study_fashion",
    out="experiments/figures/study_fashion",
    lambda_points=1,  # λ_max at the end only: one estimate costs ~40 HVPs per 8 images
    # ρ ≥ 0.3 left every method at or near chance after 3 epochs in the clean regime's tuning
    # (validation 10.9-41.6%, experiments/RESULTS.md), so the grid stops at 0.2.
    rhos=(0.05, 0.1, 0.2),
    tune_overrides=("lambda_max_examples=32", "lambda_max_iters=5"),
  ),
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the study.

  Attributes:
    stage: ``"tune"`` (validation), ``"test"`` (the final table) or ``"compute"`` (equal
      gradient-evaluation budget).
    regime: one of :data:`REGIMES`.
    method: the optimizer name.
    setting: the hyperparameters that vary, as ``field=value`` overrides (may be empty).
    seed: the run's seed.
    overrides: every override of the run, in order (regime, stage, setting, user).
  """

  stage: str
  regime: str
  method: str
  setting: tuple[str, ...]
  seed: int
  overrides: tuple[str, ...]

  @property
  def name(self) -> str:
    """The run's directory below the study root."""
    label = "__".join(s.replace("=", "") for s in self.setting) or "default"
    return f"{self.stage}/{self.regime}/{self.method}/{label}/seed{self.seed}"


def regime_overrides(regime: str, args: argparse.Namespace) -> list[str]:
  """The config overrides that define a regime (its data and its length).

  ``noiseNN``: NN% symmetric label noise; ``clean``: the clean labels; both train for
  ``args.epochs`` on ``args.train_examples`` training images (0 or absent: all of them).
  ``small``: ``args.small_examples`` clean images for ``args.small_epochs``.
  """
  if regime == "small":
    return [
      "label_noise=0.0",
      f"train_examples={args.small_examples}",
      f"epochs={args.small_epochs}",
    ]
  subset = getattr(args, "train_examples", 0) or 0  # absent in studies saved before it existed
  data = [f"train_examples={subset}"] if subset else []
  if regime == "clean":
    return ["label_noise=0.0", *data, f"epochs={args.epochs}"]
  if regime.startswith("noise") and regime[5:].isdigit() and 0 < int(regime[5:]) < 100:
    return [f"label_noise={int(regime[5:]) / 100}", *data, f"epochs={args.epochs}"]
  raise ValueError(
    f"unknown regime {regime!r}; choose from {list(ALL_REGIMES)} (or noiseNN, NN% label noise)"
  )


def regime_epochs(regime: str, args: argparse.Namespace) -> int:
  return args.small_epochs if regime == "small" else args.epochs


def grid(method: str, args: argparse.Namespace) -> list[tuple[str, ...]]:
  """The hyperparameter settings tuned for ``method`` (SGD: one, nothing to tune).

  Every SAM-type method tunes ρ over ``--rhos``; Eigen-SAM and X-SAM also α over
  ``--alphas``; the cheaper variants their own field over a small grid (:data:`SAM_EVERY_KS`,
  :data:`SAM_PROBS`, :data:`LOOKSAM_ALPHAS`; AE-SAM none). Studies saved before a grid flag
  existed read it as its default.
  """
  own = {
    "sam_every": ("sam_every_k", getattr(args, "sam_every_ks", SAM_EVERY_KS)),
    "rst": ("sam_prob", getattr(args, "sam_probs", SAM_PROBS)),
    "looksam": ("looksam_alpha", getattr(args, "looksam_alphas", LOOKSAM_ALPHAS)),
  }
  if method == "esam":
    return [
      (f"rho={r}", f"esam_beta={b}", f"esam_gamma={g}")
      for r in args.rhos
      for b in getattr(args, "esam_betas", ESAM_BETAS)
      for g in getattr(args, "esam_gammas", ESAM_GAMMAS)
    ]
  if method == "mesa":  # no ascent, no ρ
    return [(f"mesa_decay={d}",) for d in getattr(args, "mesa_decays", MESA_DECAYS)]
  if method in ("sam", "asam", "ae_sam"):
    return [(f"rho={r}",) for r in args.rhos]
  if method in ("eigen_sam", "xsam"):
    return [(f"rho={r}", f"alpha={a}") for r in args.rhos for a in args.alphas]
  if method in own:
    field, values = own[method]
    return [(f"rho={r}", f"{field}={v}") for r in args.rhos for v in values]
  return [()]


def warmup(method: str, regime: str, args: argparse.Namespace, epochs: int | None = None) -> list:
  epochs = epochs or regime_epochs(regime, args)
  if method == "mesa":  # no ρ to warm up; the KL term starts a tenth of the way in
    return [f"mesa_start_epoch={math.ceil(MESA_START_FRACTION * epochs)}"]
  if method == "sgd" or not args.rho_warmup:
    return []
  return [f"rho_warmup_epochs={round(args.rho_warmup * epochs, 3)}"]


def grads_per_step(config: Any) -> float:
  r"""The expected gradient evaluations per step of ``config.optimizer`` (one HVP = one).

  SGD/AdamW 1; SAM/ASAM 2; Eigen-SAM/X-SAM 2 + q/p (q HVPs every p steps; 2 with
  ``tracker="random"``, no HVPs); ``sam_every`` and ``looksam`` :math:`1 + 1/k`; ``rst``
  :math:`1 + p`; ``ae_sam`` 1.5, the documented expectation only (its ascent fraction follows
  the gradient norms; the runs count the real one: ``grad_evals_per_step`` in their
  ``summary.json``, which the report and the compute figure use where it exists).
  """
  method = config.optimizer.removesuffix("_adamw")
  if method in ("sgd", "adamw"):
    return 1.0
  if method in ("eigen_sam", "xsam"):
    hvps = 0.0 if config.tracker == "random" else config.power_iters / config.refresh_every
    return 2.0 + hvps
  if method == "sam_every":
    return 1.0 + 1.0 / config.sam_every_k
  if method == "looksam":
    return 1.0 + 1.0 / config.looksam_k
  if method == "rst":
    return 1.0 + config.sam_prob
  if method == "ae_sam":
    return 1.5
  if method == "mesa":
    return 1.0  # one gradient; the EMA teacher's extra forward pass is not a gradient
  return 2.0  # sam, asam, esam (its half-perturbed ascent still costs a full gradient)


def xsam_grads_per_step(config: Any) -> float:
  """Gradient evaluations per X-SAM step: 2 gradients + q HVPs every p steps (HVP = 1)."""
  return 2.0 + config.power_iters / config.refresh_every


def tune_runs(args: argparse.Namespace) -> list[Run]:
  runs = []
  for regime in args.tune_regimes:
    base = [*regime_overrides(regime, args), f"validation_fraction={args.validation_fraction}"]
    base.append("lambda_max_every=0")
    base += getattr(args, "tune_overrides", [])  # absent in studies saved before it existed
    for method in args.methods:
      if method == "sgd":
        continue
      for setting in grid(method, args):
        for seed in args.tune_seeds:
          extra = [*base, *warmup(method, regime, args), *setting, f"seed={seed}"]
          runs.append(Run("tune", regime, method, setting, seed, (*extra, *args.overrides)))
  return runs


def tuned_source(regime: str, args: argparse.Namespace) -> str:
  """The regime whose validation choice ``regime`` uses."""
  if regime in args.tune_regimes:
    return regime
  return args.tune_from


def test_and_compute_runs(
  args: argparse.Namespace, choice: dict[tuple[str, str], tuple[str, ...]], xsam_cost: float
) -> list[Run]:
  """Seed-major: a partial study has every regime and method for its first seeds.

  ``xsam_cost``: the gradient evaluations per step of the method the equal-compute runs match
  (``--compute_match``, X-SAM by default: :func:`grads_per_step`). SGD (1) and SAM (2) train
  ``epochs x xsam_cost / cost`` epochs; a method that costs as much or more is left out (SAM
  cannot match LookSAM's 1.2 by training longer).
  """
  runs = []
  for seed in args.seeds:
    for regime in args.regimes:
      epochs = regime_epochs(regime, args)
      lam = f"lambda_max_every={max(1, epochs // args.lambda_points)}"
      for method in args.methods:
        setting = choice.get((tuned_source(regime, args), method), ())
        extra = [*regime_overrides(regime, args), lam, *warmup(method, regime, args), *setting]
        runs.append(
          Run("test", regime, method, setting, seed, (*extra, f"seed={seed}", *args.overrides))
        )
      if regime not in args.compute_regimes:
        continue
      for method, cost in (("sgd", 1.0), ("sam", 2.0)):
        if method not in args.methods or cost >= xsam_cost:
          continue
        setting = choice.get((tuned_source(regime, args), method), ())
        long = round(epochs * xsam_cost / cost)
        extra = [
          *regime_overrides(regime, args),
          f"epochs={long}",
          f"lambda_max_every={max(1, long // args.lambda_points)}",
          *warmup(method, regime, args, long),
          *setting,
        ]
        runs.append(
          Run("compute", regime, method, setting, seed, (*extra, f"seed={seed}", *args.overrides))
        )
  return runs


# --------------------------------------------------------------------------------------------
# Statistics.


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
  """Mean and half-width of the two-sided t confidence interval (``scipy.stats.t``).

  Args:
    values: the samples (``None`` and NaN are left out).
    level: the interval's coverage.

  Returns:
    ``(mean, half_width, n)``; the half-width is NaN for n < 2, the mean NaN for n = 0.
  """
  xs = _finite(values)
  n = len(xs)
  if n == 0:
    return math.nan, math.nan, 0
  mean = float(np.mean(xs))
  if n < 2:
    return mean, math.nan, n
  from scipy import stats

  # (Not stats.t.interval: it gives NaN for identical values, whose interval is [mean, mean].)
  return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(stats.sem(xs)), n


def median_range(values: Sequence[float]) -> tuple[float, float, float, int]:
  """``(median, min, max, n)`` of the finite ``values`` (NaNs for none).

  For a quantity with outliers, such as λ_max: one SAM run at 4.7 among 0.02–0.13 makes a
  mean ± t-interval of 1.00 ± 2.60, which describes no run; the median and range do.
  """
  xs = _finite(values)
  if not xs:
    return math.nan, math.nan, math.nan, 0
  return float(np.median(xs)), min(xs), max(xs), len(xs)


def _finite(values: Sequence[float]) -> list[float]:
  return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
  """The per-seed differences a − b over the seeds both have.

  Returns:
    ``mean``, ``half`` (95% t-interval of the differences), ``n``, ``p`` (two-sided paired t
    test, ``scipy.stats.ttest_rel``; 1 when every difference is 0, NaN for n < 2) and the
    counts ``wins``/``ties``/``losses``.
  """
  from scipy import stats

  seeds = sorted(set(a) & set(b))
  diffs = [a[s] - b[s] for s in seeds]
  mean, half, n = t_interval(diffs)
  if n < 2:
    p = math.nan
  elif all(abs(d) <= 1e-12 for d in diffs):
    p = 1.0
  else:
    with warnings.catch_warnings():  # "nearly identical data": the test is still defined
      warnings.simplefilter("ignore", RuntimeWarning)
      p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
  return {
    "mean": mean,
    "half": half,
    "n": n,
    "p": p,
    "wins": sum(d > 1e-9 for d in diffs),
    "ties": sum(abs(d) <= 1e-9 for d in diffs),
    "losses": sum(d < -1e-9 for d in diffs),
  }


def holm(pvalues: Sequence[float]) -> list[float]:
  r"""Holm's step-down adjusted p-values of one family of tests (NaNs stay NaN, uncounted).

  With the :math:`m` finite p-values sorted, :math:`p_{(1)} \le \dots \le p_{(m)}`:
  :math:`\tilde p_{(i)} = \max_{j \le i} \min(1, (m - j + 1)\, p_{(j)})`. Rejecting where
  :math:`\tilde p < 0.05` keeps the family-wise error rate at 5% (Holm, "A simple sequentially
  rejective multiple test procedure", 1979).

  Args:
    pvalues: the family's raw p-values, in any order.

  Returns:
    The adjusted p-values, in the order of ``pvalues``.
  """
  finite = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
  m = len(finite)
  adjusted = [math.nan] * len(pvalues)
  running = 0.0
  for j, (p, i) in enumerate(finite):
    running = max(running, min(1.0, (m - j) * p))
    adjusted[i] = running
  return adjusted


def verdict(p: dict[str, Any], level: float = 0.05) -> str:
  """``win``/``loss`` when the Holm-adjusted p (``p["p_holm"]``) is below ``level``, else
  ``n.s.`` (no difference shown; not a proof of equality); ``n/a`` without a test."""
  adjusted = p.get("p_holm", math.nan)
  if p["n"] < 2 or math.isnan(adjusted):
    return "n/a"
  if adjusted >= level:
    return "n.s."
  return "win" if p["mean"] > 0 else "loss"


# The paired comparisons with a verdict, by family: Holm's adjustment runs over each family's
# comparisons in every regime. X-SAM is the method under study, so its comparisons with the
# other sharpness-aware methods form one family; SAM against SGD (the size of the effect all of
# them build on) is another. The equal-compute rows get no verdict: they compare schedules of
# different lengths, not methods.
FAMILIES = {
  "X-SAM against SAM and Eigen-SAM": (
    ("test", "xsam", "test", "sam"),
    ("test", "xsam", "test", "eigen_sam"),
  ),
  "SAM against SGD": (("test", "sam", "test", "sgd"),),
  # Issue 21: each cheaper variant against the SAM it approximates and the SGD it should beat.
  # Only the variants a study ran appear, so a study without them keeps its Holm p-values.
  "Cheaper SAM variants against SAM and SGD": tuple(
    ("test", variant, "test", baseline) for variant in CHEAP_METHODS for baseline in ("sam", "sgd")
  ),
}
EQUAL_COMPUTE = (("test", "xsam", "compute", "sam"), ("test", "xsam", "compute", "sgd"))


def comparisons(
  rows: Sequence[dict[str, Any]], regimes: Sequence[str], match: str = "xsam"
) -> list[dict[str, Any]]:
  """Every paired comparison of the report, with its family's Holm-adjusted p and verdict.

  ``match``: the method whose gradient budget the equal-compute runs were given
  (``--compute_match``); its test runs are compared with them.

  Returns:
    One dict per (family, regime, comparison) with data, in report order: ``family``
    (``None`` for the equal-compute rows, which get no test), ``regime``, ``a``, ``b`` (labels),
    the fields of :func:`paired`, ``p_holm`` and ``verdict``.
  """
  by: dict[tuple[str, str, str], dict[int, float]] = {}
  for r in rows:
    by.setdefault((r["stage"], r["regime"], r["method"]), {})[r["seed"]] = r["accuracy"]
  out = []
  equal = tuple(("test", match, sb, mb) for _, _, sb, mb in EQUAL_COMPUTE)
  groups = [*FAMILIES.items(), (None, equal)]
  for family, pairs in groups:
    members = []
    for regime in regimes:
      for sa, ma, sb, mb in pairs:
        a, b = by.get((sa, regime, ma)), by.get((sb, regime, mb))
        if not a or not b:
          continue
        label_b = mb if sb == "test" else f"{mb} (equal compute)"
        members.append({"family": family, "regime": regime, "a": ma, "b": label_b, **paired(a, b)})
    if family is not None:
      for c, adjusted in zip(members, holm([c["p"] for c in members]), strict=True):
        c["p_holm"] = adjusted
        c["verdict"] = verdict(c)
    else:
      for c in members:
        c["p"], c["p_holm"], c["verdict"] = math.nan, math.nan, "–"
    out += members
  return out


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
  """Spearman's rank correlation (average ranks for ties) and its two-sided p-value
  (``scipy.stats.spearmanr``); NaNs for fewer than 3 points."""
  if len(x) < 3:
    return math.nan, math.nan
  from scipy import stats

  rho, p = stats.spearmanr(x, y)
  return float(rho), float(p)


# --------------------------------------------------------------------------------------------
# Running.


def _train_one(config_path: str, method: str, overrides: Sequence[str], workdir: str, cache: str):
  """One run, in a worker process of :func:`run_all`; returns its summary."""
  common.enable_compilation_cache(cache)
  config = common.make_config(config_path, method, overrides)
  return common.run_or_load(config, workdir, log=None)


def run_all(runs: Sequence[Run], args: argparse.Namespace, log=print) -> list[dict[str, Any]]:
  """Runs (or reads) ``runs``, ``args.workers`` at a time, logging progress with an ETA.

  Finished runs are read first (and checked against their saved config). The others train in
  ``args.workers`` processes (``1``: in this process, in order); each writes only its own
  directory, so the study can be interrupted and resumed at any point.

  Returns:
    One row per run, in the order of ``runs``.
  """
  root = Path(args.root)
  summaries: dict[Run, dict[str, Any]] = {}
  todo = []
  for run in runs:
    if (root / run.name / "summary.json").exists():
      config = common.make_config(args.config, run.method, run.overrides)
      summaries[run] = common.run_or_load(config, root / run.name, log=None)
      log(f"[{len(summaries)}/{len(runs)}] read {run.name}: {_brief(summaries[run])}")
    else:
      todo.append(run)
  start = time.time()

  def finished(run: Run, summary: dict[str, Any]) -> None:
    summaries[run] = summary
    done = len(summaries) - (len(runs) - len(todo))
    elapsed = time.time() - start
    eta = elapsed / done * (len(todo) - done)
    log(
      f"[{len(summaries)}/{len(runs)}] ran  {run.name}: {_brief(summary)} "
      f"elapsed={elapsed / 60:.1f} min eta={eta / 60:.1f} min"
    )

  def job(run: Run) -> tuple:
    return (args.config, run.method, run.overrides, str(root / run.name), args.jax_cache)

  if args.workers <= 1 or len(todo) <= 1:
    for run in todo:
      finished(run, _train_one(*job(run)))
  else:
    context = multiprocessing.get_context("spawn")  # JAX's threads do not survive a fork
    with futures.ProcessPoolExecutor(min(args.workers, len(todo)), mp_context=context) as pool:
      pending = {pool.submit(_train_one, *job(run)): run for run in todo}
      try:
        for future in futures.as_completed(pending):
          finished(pending[future], future.result())
      except BaseException:  # a failed run (or Ctrl-C): start no further runs
        pool.shutdown(wait=False, cancel_futures=True)
        raise
  return [row_of(run, root / run.name, summaries[run]) for run in runs]


def _brief(summary: dict[str, Any]) -> str:
  return f"acc={common.held_out_accuracy(summary):.4f} lambda={summary['final_lambda_max']:.3g}"


def row_of(run: Run, workdir: Path, summary: dict[str, Any]) -> dict[str, Any]:
  epochs = common.read_metrics(workdir, "epoch")
  last = epochs[-1] if epochs else {}
  return {
    "stage": run.stage,
    "regime": run.regime,
    "method": run.method,
    "setting": " ".join(run.setting),
    "seed": run.seed,
    "accuracy": common.held_out_accuracy(summary),  # validation in the tuning stage
    "final_lambda_max": summary["final_lambda_max"],
    "train_accuracy": last.get("train_accuracy"),
    "train_loss": last.get("train_loss"),
    "epochs": summary["epochs"],
    "wall_seconds": summary.get("wall_seconds_this_run"),
    "seconds_per_epoch": common.seconds_per_epoch(epochs),
    "lambda_curve": [(r["epoch"], r["lambda_max"]) for r in epochs if "lambda_max" in r],
    # Counted by the train CLI (None for runs made before it counted them).
    "grad_evals": summary.get("grad_evals"),
    "grads_per_step": summary.get("grad_evals_per_step"),
  }


def choose(tune_rows: Sequence[dict[str, Any]], runs: Sequence[Run]) -> dict:
  """The best setting per (regime, method) by mean validation accuracy (ties: grid order)."""
  order = {}
  for run in runs:
    order.setdefault((run.regime, run.method), [])
    if " ".join(run.setting) not in order[(run.regime, run.method)]:
      order[(run.regime, run.method)].append(" ".join(run.setting))
  choice = {}
  for key, settings in order.items():
    best, best_acc = None, -math.inf
    for setting in settings:
      accs = [
        r["accuracy"]
        for r in tune_rows
        if (r["regime"], r["method"]) == key and r["setting"] == setting
      ]
      acc = float(np.mean(accs)) if accs else -math.inf
      if acc > best_acc + 1e-12:
        best, best_acc = setting, acc
    if best is not None:
      choice[key] = tuple(best.split()) if best else ()
  return choice


# --------------------------------------------------------------------------------------------
# Report.


def _fmt(mean: float, half: float, scale: float = 100.0, digits: int = 1) -> str:
  if math.isnan(mean):
    return "–"
  if math.isnan(half):
    return f"{scale * mean:.{digits}f}"
  return f"{scale * mean:.{digits}f} ± {scale * half:.{digits}f}"


def _fmt_range(median: float, low: float, high: float) -> str:
  if math.isnan(median):
    return "–"
  return f"{median:.2f} [{low:.2f}–{high:.2f}]"


def _fmt_p(p: float) -> str:
  if math.isnan(p):
    return "–"
  return f"{p:.3f}" if p >= 0.01 else f"{p:.1e}"


def report(
  tune_rows: Sequence[dict[str, Any]],
  rows: Sequence[dict[str, Any]],
  choice: dict,
  args: argparse.Namespace,
) -> str:
  """The Markdown tables: tuning, final, paired differences, equal compute, λ_max vs accuracy."""
  lines = ["### Tuning (validation accuracy, %, mean over tuning seeds)", ""]
  lines += ["| regime | method | setting | val acc | seeds | chosen |", "|---|---|---|---|---|---|"]
  keys = sorted({(r["regime"], r["method"], r["setting"]) for r in tune_rows})
  for regime, method, setting in keys:
    accs = [
      r["accuracy"]
      for r in tune_rows
      if (r["regime"], r["method"], r["setting"]) == (regime, method, setting)
    ]
    chosen = "**yes**" if " ".join(choice.get((regime, method), ("?",))) == setting else ""
    lines.append(
      f"| {regime} | {method} | {setting} | {100 * np.mean(accs):.1f} | {len(accs)} | {chosen} |"
    )
  lines += [
    "",
    "### Test (clean test accuracy %, mean ± 95% t-interval over seeds; final λ_max median "
    "[min–max])",
    "",
  ]
  lines += [
    "| regime | method | setting | test acc | final λ_max | train acc (noisy labels) | n "
    "| s/epoch |",
    "|---|---|---|---|---|---|---|---|",
  ]
  by = {}
  for r in rows:
    by.setdefault((r["stage"], r["regime"], r["method"]), []).append(r)
  for stage in ("test", "compute"):
    for regime in args.regimes:
      for method in args.methods:
        group = by.get((stage, regime, method))
        if not group:
          continue
        acc = t_interval([r["accuracy"] for r in group])
        lam = median_range([r["final_lambda_max"] for r in group])
        tr = t_interval([r["train_accuracy"] for r in group])
        spe = float(np.median([r["seconds_per_epoch"] for r in group]))
        name = method if stage == "test" else f"{method}, equal compute ({group[0]['epochs']} ep)"
        lines.append(
          f"| {regime} | {name} | {group[0]['setting'] or '–'} | {_fmt(*acc[:2])} | "
          f"{_fmt_range(*lam[:3])} | {_fmt(*tr[:2])} | {acc[2]} | {spe:.2f} |"
        )
  lines += compute_table(rows, args)
  found = comparisons(rows, args.regimes, getattr(args, "compute_match", "xsam"))
  lines += [
    "",
    "### Paired differences (test accuracy points, same seeds)",
    "",
    "Difference: mean ± 95% t-interval of the per-seed differences (not adjusted). p: two-sided "
    "paired t test. Holm p: adjusted by Holm's method over the comparisons of the same family, "
    "in every regime (family-wise error 5%). Verdict: win or loss when the Holm p < 0.05, "
    "else n.s. (no difference shown, which is not a proof of equality).",
  ]
  for family in FAMILIES:
    members = [c for c in found if c["family"] == family]
    if not members:
      continue
    lines += ["", f"Family: **{family}** ({len(members)} comparisons).", ""]
    lines += ["| regime | comparison | difference | n | wins/ties/losses | p | Holm p | verdict |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for c in members:
      lines.append(
        f"| {c['regime']} | {c['a']} − {c['b']} | {_fmt(c['mean'], c['half'])} | {c['n']} | "
        f"{c['wins']}/{c['ties']}/{c['losses']} | {_fmt_p(c['p'])} | {_fmt_p(c['p_holm'])} | "
        f"{c['verdict']} |"
      )
  compute = [c for c in found if c["family"] is None]
  if compute:
    lines += [
      "",
      "Equal compute (descriptive, no test and no verdict: the other side trains a longer "
      "schedule, so the difference measures schedules, not methods).",
      "",
      "| regime | comparison | difference | n | wins/ties/losses |",
      "|---|---|---|---|---|",
    ]
    for c in compute:
      lines.append(
        f"| {c['regime']} | {c['a']} − {c['b']} | {_fmt(c['mean'], c['half'])} | {c['n']} | "
        f"{c['wins']}/{c['ties']}/{c['losses']} |"
      )
  lines += ["", "### Does lower final λ_max go with higher test accuracy? (test runs)", ""]
  lines += [
    "SGD usually ends far sharper than every SAM-type method, so the correlation over all runs "
    "can mostly contrast SGD with the rest; the last columns leave SGD out. p: the two-sided "
    "test of no correlation (not adjusted).",
    "",
    "| regime | Spearman(λ_max, acc), all runs | p | runs | without SGD | p | runs |",
    "|---|---|---|---|---|---|---|",
  ]
  for regime in args.regimes:
    group = [r for r in rows if r["stage"] == "test" and r["regime"] == regime]
    family = [r for r in group if r["method"] != "sgd"]
    cells = []
    for runs in (group, family):
      rho_s, p = spearman([r["final_lambda_max"] for r in runs], [r["accuracy"] for r in runs])
      cells.append(f"{rho_s:.2f} | {_fmt_p(p)} | {len(runs)}")
    lines.append(f"| {regime} | {' | '.join(cells)} |")
  return "\n".join(lines) + "\n"


def expected_grads_per_step(method: str, setting: str, args: argparse.Namespace) -> float:
  """:func:`grads_per_step` of ``method`` with the study's config, overrides and ``setting``
  (NaN when that config cannot be built, e.g. a saved study's config file is gone)."""
  overrides = [*getattr(args, "overrides", []), *setting.split()]
  try:
    return grads_per_step(common.make_config(args.config, method, overrides))
  except (ValueError, OSError):
    return math.nan


def run_compute(row: dict[str, Any], args: argparse.Namespace, cache: dict | None = None) -> float:
  """A run's gradient evaluations in SGD epochs (its evaluations / steps per epoch).

  ``epochs x`` the run's counted ``grads_per_step``, or, for a run saved before the train CLI
  counted them (no such field, or None), the expected :func:`expected_grads_per_step`.
  """
  per_step = row.get("grads_per_step")
  if per_step is None:
    key = (row["method"], row.get("setting", ""))
    if cache is None or key not in cache:
      value = expected_grads_per_step(row["method"], row.get("setting", ""), args)
      if cache is None:
        return row["epochs"] * value
      cache[key] = value
    per_step = cache[key]
  return row["epochs"] * per_step


def compute_table(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> list[str]:
  """The report's table of gradient evaluations per step: counted and expected, per group."""
  lines = [
    "",
    "### Gradient evaluations (counted by the train CLI from the optimizer state)",
    "",
    "Per step: clean gradient + ascent gradients + Hessian-vector products (one HVP counted as "
    "one evaluation), mean [min–max] over the runs that counted them (runs made before the "
    "count show –); expected: the rule's value (`grads_per_step`). Compute: the run's "
    "evaluations in SGD epochs (epochs × per step; expected where not counted).",
    "",
    "| regime | method | counted per step | expected | runs counted | compute (SGD epochs) |",
    "|---|---|---|---|---|---|",
  ]
  cache: dict = {}
  for stage in ("test", "compute"):
    for regime in args.regimes:
      for method in args.methods:
        group = [
          r for r in rows if (r["stage"], r["regime"], r["method"]) == (stage, regime, method)
        ]
        if not group:
          continue
        counted = _finite([r.get("grads_per_step") for r in group])
        cell = "–"
        if counted:
          cell = f"{np.mean(counted):.3f} [{min(counted):.3f}–{max(counted):.3f}]"
        expected = expected_grads_per_step(method, group[0].get("setting", ""), args)
        spent = float(np.mean([run_compute(r, args, cache) for r in group]))
        name = method if stage == "test" else f"{method}, equal compute ({group[0]['epochs']} ep)"
        lines.append(
          f"| {regime} | {name} | {cell} | {expected:.3f} | {len(counted)}/{len(group)} | "
          f"{spent:.1f} |"
        )
  return lines


def plot_compute(rows: Sequence[dict[str, Any]], args: argparse.Namespace, out: str) -> None:
  """``<out>_compute.png``: test accuracy (mean ± 95% CI) against gradient evaluations.

  One panel per regime, one point per method at its runs' mean compute (SGD epochs, counted
  where the runs counted it); the equal-compute runs are drawn as squares, and SGD's test and
  equal-compute points are joined: the baseline of SGD given more compute.
  """
  plt = common.pyplot()
  regimes = [g for g in args.regimes if any(r["regime"] == g for r in rows)]
  if not regimes:
    return
  cache: dict = {}
  fig, axes = plt.subplots(1, len(regimes), figsize=(4.2 * len(regimes), 3.8), squeeze=False)
  for ax, regime in zip(axes[0], regimes, strict=True):
    sgd_line = []
    for stage in ("test", "compute"):
      for method in args.methods:
        group = [
          r for r in rows if (r["stage"], r["regime"], r["method"]) == (stage, regime, method)
        ]
        if not group:
          continue
        mean, half, _ = t_interval([r["accuracy"] for r in group])
        x = float(np.mean([run_compute(r, args, cache) for r in group]))
        label = method if stage == "test" else f"{method} (eq. compute)"
        ax.errorbar(
          [x],
          [100 * mean],
          yerr=[0.0 if math.isnan(half) else 100 * half],
          fmt="o" if stage == "test" else "s",
          color=f"C{list(args.methods).index(method) % 10}",  # one colour per method
          capsize=3,
          label=label,
        )
        if method == "sgd":
          sgd_line.append((x, 100 * mean))
    if len(sgd_line) > 1:
      xs, ys = zip(*sorted(sgd_line), strict=True)
      ax.plot(xs, ys, "--", color="gray", lw=1, label="SGD, more epochs")
    ax.set_title(regime)
    ax.set_xlabel("gradient evaluations per run (SGD epochs)")
    ax.set_ylabel("clean test accuracy (%), mean ± 95% CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(f"{out}_compute.png", dpi=120)
  plt.close(fig)


def plot(rows: Sequence[dict[str, Any]], args: argparse.Namespace, out: str) -> None:
  plt = common.pyplot()
  regimes = [g for g in args.regimes if any(r["regime"] == g for r in rows)]
  if not regimes:
    return
  labels = [*args.methods, *[f"{m} (eq. compute)" for m in ("sgd", "sam")]]
  fig, ax = plt.subplots(figsize=(2.6 * len(regimes) + 2, 4))
  width = 0.8 / len(labels)
  for j, label in enumerate(labels):
    stage, method = ("compute", label.split()[0]) if "eq." in label else ("test", label)
    means, halves, xs = [], [], []
    for i, regime in enumerate(regimes):
      group = [
        r["accuracy"]
        for r in rows
        if (r["stage"], r["regime"], r["method"]) == (stage, regime, method)
      ]
      if group:
        m, h, _ = t_interval(group)
        means.append(100 * m)
        halves.append(0.0 if math.isnan(h) else 100 * h)
        xs.append(i + (j - len(labels) / 2 + 0.5) * width)
    if xs:
      ax.errorbar(xs, means, yerr=halves, fmt="o", capsize=3, label=label)
  ax.set_xticks(range(len(regimes)), regimes)
  ax.set_ylabel("clean test accuracy (%), mean ± 95% CI")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(f"{out}_acc.png", dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(2, len(regimes), figsize=(3.6 * len(regimes), 7), squeeze=False)
  for i, regime in enumerate(regimes):
    ax = axes[0][i]
    for method in args.methods:
      curves = [
        r["lambda_curve"]
        for r in rows
        if (r["stage"], r["regime"], r["method"]) == ("test", regime, method) and r["lambda_curve"]
      ]
      if curves:
        n = min(len(c) for c in curves)
        epochs = [e for e, _ in curves[0][:n]]
        ax.plot(epochs, np.mean([[v for _, v in c[:n]] for c in curves], axis=0), label=method)
    ax.set_title(f"{regime}: λ_max over training")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1][i]
    for method in args.methods:
      group = [
        r for r in rows if (r["stage"], r["regime"], r["method"]) == ("test", regime, method)
      ]
      ax.scatter(
        [r["final_lambda_max"] for r in group],
        [100 * r["accuracy"] for r in group],
        label=method,
        s=18,
      )
    ax.set_xlabel("final λ_max")
    ax.set_ylabel("test acc (%)")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(f"{out}_lambda.png", dpi=120)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.analysis.study", description=__doc__)
  common.add_run_args(parser)
  # --config, --root, --out and the regime flags default to the --dataset's PRESETS entry.
  parser.set_defaults(config=None)
  parser.add_argument(
    "--dataset",
    default="digits",
    choices=sorted(PRESETS),
    help="the study's dataset: its config, regimes, epochs, subset, root and out (PRESETS)",
  )
  parser.add_argument("--root", default=None, help="run directories (default: the dataset's)")
  parser.add_argument("--out", default=None, help="output prefix (default: the dataset's)")
  parser.add_argument("--regimes", default=None)
  parser.add_argument(
    "--methods",
    default=",".join(METHODS),
    help=f"comma-separated, from {', '.join(ALL_METHODS)} (default: {','.join(METHODS)})",
  )
  parser.add_argument(
    "--compute_match",
    default="xsam",
    help="the method whose gradient evaluations per step the equal-compute SGD/SAM runs match",
  )
  parser.add_argument(
    "--sam_every_ks", default=",".join(map(str, SAM_EVERY_KS)), help="sam_every's k grid"
  )
  parser.add_argument("--sam_probs", default=",".join(map(str, SAM_PROBS)), help="rst's p grid")
  parser.add_argument(
    "--looksam_alphas", default=",".join(map(str, LOOKSAM_ALPHAS)), help="looksam's α grid"
  )
  parser.add_argument("--esam_betas", default=",".join(map(str, ESAM_BETAS)), help="esam's β grid")
  parser.add_argument(
    "--esam_gammas", default=",".join(map(str, ESAM_GAMMAS)), help="esam's data-selection γ grid"
  )
  parser.add_argument(
    "--mesa_decays", default=",".join(map(str, MESA_DECAYS)), help="mesa's EMA-decay grid"
  )
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--tune_seeds", default=None)
  parser.add_argument("--tune_regimes", default=None)
  parser.add_argument("--tune_from", default=None)
  parser.add_argument("--compute_regimes", default=None)
  parser.add_argument(
    "--rhos", default=None, help="the ρ grid of every method (default: the dataset's)"
  )
  parser.add_argument("--alphas", default="0.2,0.5")
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument(
    "--train_examples",
    type=int,
    default=None,
    help="training images of the non-small regimes, a random subset (0: all; the test set is "
    "always whole)",
  )
  parser.add_argument("--small_examples", type=int, default=300)
  parser.add_argument("--small_epochs", type=int, default=150)
  parser.add_argument("--validation_fraction", type=float, default=0.2)
  parser.add_argument("--rho_warmup", type=float, default=0.1, help="fraction of the epochs")
  parser.add_argument(
    "--lambda_points", type=int, default=None, help="λ_max estimates per test run"
  )
  parser.add_argument(
    "--workers", type=int, default=2, help="runs trained at once, each in its own process"
  )
  parser.add_argument("--report_only", action="store_true")
  parser.add_argument(
    "--tune_only", action="store_true", help="run the tuning stage only (no test runs)"
  )
  parser.add_argument(
    "--from_json",
    default=None,
    metavar="FILE",
    help="write the report again from a study's saved <out>.json (no run directories needed)",
  )
  args = parser.parse_args(argv)
  preset = PRESETS[args.dataset]
  for name in ("config", "root", "out", "tune_from", "epochs", "train_examples", "lambda_points"):
    if getattr(args, name) is None:
      setattr(args, name, getattr(preset, name))
  for name in ("regimes", "tune_regimes", "compute_regimes", "tune_seeds", "rhos"):
    if getattr(args, name) is None:
      setattr(args, name, ",".join(map(str, getattr(preset, name))))
  args.study_overrides = list(preset.overrides)
  args.tune_overrides = list(preset.tune_overrides)
  if args.train_examples < 0:
    parser.error(
      f"--train_examples must be >= 0 (0: the whole training set), got {args.train_examples}"
    )
  if args.workers < 1:
    parser.error(f"--workers must be >= 1 (1 trains in this process), got {args.workers}")
  if not 0.0 < args.validation_fraction < 1.0:
    parser.error(
      f"--validation_fraction must be in (0, 1), got {args.validation_fraction}: the tuning "
      "runs hold out this fraction of the training set and are scored on it; with 0 they "
      "would be scored on the test set, so the test set would choose the settings. Use, e.g., "
      "the default 0.2"
    )
  for name in ("regimes", "methods", "tune_regimes", "compute_regimes"):
    setattr(args, name, common.parse_list(getattr(args, name)))
  for name in ("seeds", "tune_seeds"):
    setattr(args, name, common.parse_list(getattr(args, name), int))
  for name in (
    "rhos",
    "alphas",
    "sam_probs",
    "looksam_alphas",
    "esam_betas",
    "esam_gammas",
    "mesa_decays",
  ):
    setattr(args, name, common.parse_list(getattr(args, name), float))
  args.sam_every_ks = common.parse_list(args.sam_every_ks, int)
  unknown = [m for m in [*args.methods, args.compute_match] if m not in ALL_METHODS]
  if unknown:
    parser.error(
      f"--methods/--compute_match: unknown method {', '.join(unknown)}; choose from "
      f"{', '.join(ALL_METHODS)}"
    )
  bad = {
    "--sam_every_ks": [k for k in args.sam_every_ks if k < 1],
    "--sam_probs": [p for p in args.sam_probs if not 0 <= p <= 1],
    "--looksam_alphas": [a for a in args.looksam_alphas if a < 0],
    "--esam_betas": [b for b in args.esam_betas if not 0 < b <= 1],
    "--esam_gammas": [g for g in args.esam_gammas if not 0 < g <= 1],
    "--mesa_decays": [d for d in args.mesa_decays if not 0 <= d < 1],
  }
  for flag, values in bad.items():
    if values:
      parser.error(
        f"{flag}: {values} out of range (k >= 1, p in [0, 1], alpha >= 0, beta in (0, 1], "
        "decay in [0, 1)); e.g. the defaults"
      )
  # Tune the regimes asked for, and the one whose choice the untuned ones borrow (its tuning
  # runs are read if they exist): `--regimes noise60` alone still uses noise40's choice.
  borrows = any(g not in args.tune_regimes for g in args.regimes)
  if borrows and args.tune_from not in args.tune_regimes:
    raise ValueError(
      f"--tune_from {args.tune_from!r} must be one of --tune_regimes {args.tune_regimes}: the "
      "regimes that are not tuned take their settings from it"
    )
  args.tune_regimes = [
    g for g in args.tune_regimes if g in args.regimes or (borrows and g == args.tune_from)
  ]
  for regime in args.regimes:
    regime_overrides(regime, args)  # raises for an unknown regime
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.from_json is not None:
    print(render_from_json(args.from_json, args.out))
    return 0
  common.enable_compilation_cache(args.jax_cache)
  args.overrides = [*args.study_overrides, *args.overrides]
  # Regime by regime (tuned regimes first), so that a partial study has whole regimes.
  order = [g for g in args.tune_regimes if g not in args.regimes]  # tuned only, for a choice
  order += sorted(args.regimes, key=lambda g: g not in args.tune_regimes)
  all_tuning = tune_runs(args)
  tune_rows, rows, choice = [], [], {}
  for regime in order:
    tuning = [r for r in all_tuning if r.regime == regime]
    if args.report_only:
      tuning = [r for r in tuning if (Path(args.root) / r.name / "summary.json").exists()]
    print(f"== {regime}: tuning, {len(tuning)} runs on validation splits", flush=True)
    tune_rows += run_all(tuning, args, log=lambda s: print(s, flush=True))
    choice.update(choose(tune_rows, all_tuning))
    for (g, method), setting in sorted(choice.items()):
      if g == regime:
        print(f"chosen on validation: {g} {method} {' '.join(setting) or '(default)'}")
    if regime not in args.regimes or args.tune_only:
      continue
    source = tuned_source(regime, args)
    missing = [m for m in args.methods if grid(m, args) != [()] and (source, m) not in choice]
    if missing and not args.report_only:
      raise ValueError(
        f"no validation choice for {', '.join(missing)} in regime {source!r} (which {regime!r} "
        "takes its settings from): its tuning runs did not finish; rerun to complete them"
      )
    # The equal-compute budget: the matched method's expected cost with its chosen setting.
    matched = [*args.overrides, *choice.get((source, args.compute_match), ())]
    match_cost = grads_per_step(common.make_config(args.config, args.compute_match, matched))
    runs = test_and_compute_runs(_only(args, regime), choice, match_cost)
    if args.report_only:
      runs = [r for r in runs if (Path(args.root) / r.name / "summary.json").exists()]
    print(f"== {regime}: test and equal-compute, {len(runs)} runs", flush=True)
    rows += run_all(runs, args, log=lambda s: print(s, flush=True))
  print("\n" + write_outputs(tune_rows, rows, choice, args, args.out))
  return 0


def write_outputs(
  tune_rows: Sequence[dict[str, Any]],
  rows: Sequence[dict[str, Any]],
  choice: dict,
  args: argparse.Namespace,
  out: str,
) -> str:
  """Writes ``<out>.md``, ``.csv``, ``.json`` and the three figures; returns the Markdown.

  The JSON holds everything the report is made of (``args``, the ``tune`` and ``runs`` rows
  with their per-seed numbers) and, for reading, the ``comparisons`` with their p-values, so
  :func:`render_from_json` can write the report again without the run directories.
  """
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  text = report(tune_rows, rows, choice, args)
  Path(f"{out}.md").write_text(text)
  common.write_csv(f"{out}.csv", [*tune_rows, *rows])
  saved = {k: v for k, v in vars(args).items() if k != "from_json"}
  found = comparisons(rows, args.regimes, getattr(args, "compute_match", "xsam"))
  Path(f"{out}.json").write_text(
    json.dumps(
      {"args": saved, "tune": list(tune_rows), "runs": list(rows), "comparisons": found},
      indent=1,
      default=str,
    )
  )
  try:
    plot(rows, args, out)
    plot_compute(rows, args, out)
  except ImportError as exc:  # an accelerator machine's own Python may lack matplotlib
    print(f"figures not written ({exc}); the tables, CSV and JSON are", file=sys.stderr)
  return text


def render_from_json(path: str | Path, out: str) -> str:
  """Writes the report of a saved study (its ``<out>.json``) again, training nothing.

  The tables, CSV, JSON and figures come from the per-run rows the JSON holds, with the
  study's saved arguments (regimes, methods, grids); the tuning choice is recomputed from the
  tuning rows by :func:`choose`, as the study made it.

  Args:
    path: a JSON file written by this script.
    out: the output prefix (may be the JSON's own: it is read before anything is written).

  Returns:
    The Markdown report.
  """
  saved = json.loads(Path(path).read_text())
  args = argparse.Namespace(**saved["args"])
  args.out = out
  choice = choose(saved["tune"], tune_runs(args))
  return write_outputs(saved["tune"], saved["runs"], choice, args, out)


def _only(args: argparse.Namespace, regime: str) -> argparse.Namespace:
  """``args`` restricted to one regime."""
  return argparse.Namespace(**{**vars(args), "regimes": [regime]})


if __name__ == "__main__":
  sys.exit(main())
