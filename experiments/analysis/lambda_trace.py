r"""λ_max over training for SGD, SAM, Eigen-SAM and X-SAM.

``python -m experiments.analysis.lambda_trace --config experiments/configs/digits_simple_cnn.py
--optimizers sgd,sam,eigen_sam,xsam --seeds 0 --root runs/lambda_trace
--out experiments/figures/lambda_trace.png [--set k=v ...]``

Each (optimizer, seed) is one ``experiments.train.train`` run in ``ROOT/OPTIMIZER/seedS`` with
``lambda_max_every=1`` (put first, so ``--set lambda_max_every=k`` changes it). The train loop
then logs, at the end of every epoch, an *independent* estimate of

.. math:: \lambda_{\max}\big(\nabla^2 L_S(w)\big)

where :math:`S` is a fixed set of ``lambda_max_examples`` training examples (the first ones,
the same for every optimizer and epoch), the loss is in eval mode, and the estimate is
``lambda_max_iters`` Lanczos steps from a fixed random start: it never reads the optimizer's
cached eigenvector. The figure shows it per epoch (mean over seeds, min-max band), with the
clean test accuracy and the training loss; for Eigen-SAM and X-SAM the epoch mean of the
optimizer's own Rayleigh quotient (on its minibatches, ``q`` warm-started power steps) is
drawn dotted, as a check of what the optimizer believes.

Finished runs (``summary.json`` present) are read, not rerun. Outputs: the PNG, and next to it
``lambda_trace.csv`` (one row per optimizer, seed and epoch) and ``lambda_trace.md`` (final
values and the mean of the last 5 epochs, mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.analysis import common

DEFAULT_OPTIMIZERS = "sgd,sam,eigen_sam,xsam"
TRACE_OVERRIDES = ("lambda_max_every=1",)


def run_traces(
  config_path: str,
  optimizers: Sequence[str],
  seeds: Sequence[int],
  root: str | Path,
  overrides: Sequence[str] = (),
) -> list[dict[str, Any]]:
  """Runs (or reads) every (optimizer, seed) and returns one row per epoch.

  Args:
    config_path: a config file of ``experiments/configs``.
    optimizers: optimizer names.
    seeds: seeds (``seed=`` override of each run).
    root: directory of the runs (``ROOT/OPTIMIZER/seedS``).
    overrides: ``field=value`` overrides applied after ``lambda_max_every=1``.

  Returns:
    Rows with ``optimizer``, ``seed``, ``epoch``, ``lambda_max``, ``test_accuracy``,
    ``train_loss``, ``cached_eigval`` (Eigen-SAM/X-SAM: epoch mean of the optimizer's
    Rayleigh quotient) and ``epoch_seconds``.
  """
  rows = []
  for optimizer in optimizers:
    for seed in seeds:
      config = common.make_config(
        config_path, optimizer, [*TRACE_OVERRIDES, *overrides, f"seed={seed}"]
      )
      workdir = Path(root) / optimizer / f"seed{seed}"
      common.run_or_load(config, workdir)
      for r in common.read_metrics(workdir, "epoch"):
        rows.append(
          {
            "optimizer": optimizer,
            "seed": seed,
            "epoch": r["epoch"],
            "lambda_max": r.get("lambda_max", float("nan")),
            "test_accuracy": r.get("test_accuracy", float("nan")),
            "train_loss": r.get("train_loss", float("nan")),
            "cached_eigval": r.get("train_eigval", float("nan")),
            "epoch_seconds": r.get("epoch_seconds", float("nan")),
          }
        )
  return rows


def _curve(rows: Sequence[dict[str, Any]], optimizer: str, field: str):
  """Epochs, and mean/min/max over seeds of ``field`` (NaNs skipped)."""
  epochs = sorted({r["epoch"] for r in rows if r["optimizer"] == optimizer})
  mean, lo, hi = [], [], []
  for e in epochs:
    xs = np.array([r[field] for r in rows if r["optimizer"] == optimizer and r["epoch"] == e])
    xs = xs[~np.isnan(xs)]
    mean.append(xs.mean() if xs.size else np.nan)
    lo.append(xs.min() if xs.size else np.nan)
    hi.append(xs.max() if xs.size else np.nan)
  return np.array(epochs), np.array(mean), np.array(lo), np.array(hi)


def plot(rows: Sequence[dict[str, Any]], out: str | Path, title: str = "") -> None:
  """Three panels over epochs: λ_max (log scale), clean test accuracy, training loss."""
  plt = common.pyplot()
  optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  panels = (
    ("lambda_max", "λ_max (independent Lanczos, fixed batch)", True),
    ("test_accuracy", "test accuracy (clean labels)", False),
    ("train_loss", "training loss (noisy labels)", False),
  )
  for ax, (field, label, log) in zip(axes, panels, strict=True):
    for i, opt in enumerate(optimizers):
      epochs, mean, lo, hi = _curve(rows, opt, field)
      ok = ~np.isnan(mean)
      ax.plot(epochs[ok], mean[ok], "-", color=f"C{i}", label=opt)
      if np.any(hi[ok] > lo[ok]):
        ax.fill_between(epochs[ok], lo[ok], hi[ok], color=f"C{i}", alpha=0.15)
      if field == "lambda_max":
        e2, cached, _, _ = _curve(rows, opt, "cached_eigval")
        ok2 = ~np.isnan(cached) & (cached > 0)
        if ok2.any():
          ax.plot(e2[ok2], cached[ok2], ":", color=f"C{i}", label=f"{opt}: cached eigval")
    ax.set_xlabel("epoch")
    ax.set_title(label, fontsize=10)
    if log:
      ax.set_yscale("log")
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def final_table(rows: Sequence[dict[str, Any]], last: int = 5) -> str:
  """Markdown: final λ_max, mean λ_max over the last ``last`` epochs, final clean test
  accuracy and training seconds per epoch; mean ± std over seeds."""
  head = (
    f"| optimizer | seeds | final λ_max | λ_max, mean of last {last} epochs "
    "| test acc (clean) % | s/epoch |"
  )
  lines = [head, "|---|---|---|---|---|---|"]
  for opt in dict.fromkeys(r["optimizer"] for r in rows):
    rs = [r for r in rows if r["optimizer"] == opt]
    seeds = sorted({r["seed"] for r in rs})
    per_seed = [sorted((r for r in rs if r["seed"] == s), key=lambda r: r["epoch"]) for s in seeds]
    lam = common.mean_std(runs[-1]["lambda_max"] for runs in per_seed)
    tail = common.mean_std(np.nanmean([r["lambda_max"] for r in runs[-last:]]) for runs in per_seed)
    acc = common.mean_std(100 * runs[-1]["test_accuracy"] for runs in per_seed)
    secs = common.mean_std(common.seconds_per_epoch(runs) for runs in per_seed)
    lines.append(
      f"| {opt} | {len(seeds)} | {lam[0]:.3g} ± {lam[1]:.2g} | {tail[0]:.3g} ± {tail[1]:.2g} "
      f"| {acc[0]:.1f} ± {acc[1]:.1f} | {secs[0]:.2f} |"
    )
  return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.analysis.lambda_trace", description=__doc__.split("\n\n")[0]
  )
  common.add_run_args(parser)
  parser.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, help="comma-separated")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  parser.add_argument("--root", default="runs/lambda_trace", help="directory of the runs")
  parser.add_argument("--out", default="experiments/figures/lambda_trace.png")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  common.enable_compilation_cache(args.jax_cache)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  try:
    rows = run_traces(
      args.config,
      common.parse_list(args.optimizers),
      common.parse_list(args.seeds, int),
      args.root,
      args.overrides,
    )
  except (ValueError, FileNotFoundError) as exc:
    print(f"error: {exc}", file=sys.stderr)
    return 2
  common.write_csv(out.with_suffix(".csv"), rows)
  table = final_table(rows)
  out.with_suffix(".md").write_text(table)
  title = f"{Path(args.config).stem}: {', '.join(args.overrides) or 'config defaults'}"
  plot(rows, out, title=title)
  print(table)
  print(f"wrote {out}, {out.with_suffix('.csv')}, {out.with_suffix('.md')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
