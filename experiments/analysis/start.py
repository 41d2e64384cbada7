"""The start of training on digits: PyTorch's default init against LeCun normal, and ρ warm-up.

``python -m experiments.analysis.start [--epochs 6] [--out experiments/figures/start_digits.png]``
(``make start``). Trains the first ``--epochs`` epochs of the default 30-epoch digits config
(40% label noise, lr 0.1 cosine over 30 epochs, so the schedule is the default one) for each
case below, then plots clean test accuracy and training loss per epoch, and prints the test
accuracy after 3 epochs. Runs resume like every analysis script (``--root``).

Cases: ``before`` is the SimpleCNN with PyTorch's default init (model
``simple_cnn_torch_init``), ``after`` the LeCun-normal default; SAM at ρ = 0.05 and 0.1,
Eigen-SAM at its config ρ = 0.05 and at 0.1, and ρ = 0.1 with a linear ρ warm-up over 5 epochs
(``rho_warmup_epochs=5``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.analysis import common

# (label, optimizer, overrides)
CASES = (
  ("SGD, before", "sgd", ("model=simple_cnn_torch_init",)),
  ("SAM ρ=0.05, before", "sam", ("model=simple_cnn_torch_init",)),
  ("SGD", "sgd", ()),
  ("SAM ρ=0.05", "sam", ()),
  ("SAM ρ=0.1", "sam", ("rho=0.1",)),
  ("SAM ρ=0.1, ρ warm-up 5 ep", "sam", ("rho=0.1", "rho_warmup_epochs=5")),
  ("Eigen-SAM ρ=0.05", "eigen_sam", ()),
  ("Eigen-SAM ρ=0.1", "eigen_sam", ("rho=0.1",)),
  ("Eigen-SAM ρ=0.1, ρ warm-up 5 ep", "eigen_sam", ("rho=0.1", "rho_warmup_epochs=5")),
)


def run_case(args: argparse.Namespace, label: str, optimizer: str, overrides: Sequence[str]):
  """Trains (or reads) the first ``args.epochs`` epochs of one case; returns its epoch records."""
  from experiments import train as train_lib

  config = common.make_config(
    args.config, optimizer, ["lambda_max_every=0", *overrides, *args.overrides]
  )
  name = "__".join([optimizer, *[o.replace("=", "") for o in overrides]])
  workdir = Path(args.root) / name
  done = [r for r in common.read_metrics(workdir, "epoch")] if workdir.exists() else []
  if len(done) < args.epochs:
    train_lib.train(config, workdir, max_epochs_this_run=args.epochs - len(done))
  records = common.read_metrics(workdir, "epoch")[: args.epochs]
  print(
    f"{label:<34} test acc per epoch: "
    + " ".join(f"{100 * r['test_accuracy']:.0f}%" for r in records),
    flush=True,
  )
  return records


def plot(curves: dict[str, list[dict]], out: str) -> None:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for label, records in curves.items():
    style = "--" if "before" in label else ("-." if "warm-up" in label else "-")
    epochs = [r["epoch"] for r in records]
    acc = [100 * r["test_accuracy"] for r in records]
    axes[0].plot(epochs, acc, style, marker="o", label=label)
    axes[1].plot(epochs, [r["train_loss"] for r in records], style, marker="o", label=label)
  axes[0].set_title("clean test accuracy (%)")
  axes[1].set_title("training loss (40% noisy labels)")
  for ax in axes:
    ax.set_xlabel("epoch (of 30)")
    ax.grid(alpha=0.3)
  axes[0].axhline(50, color="grey", lw=0.8)
  axes[1].legend(fontsize=8)
  fig.suptitle("digits, SimpleCNN: the first epochs (before = PyTorch default init)")
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.analysis.start", description=__doc__)
  common.add_run_args(parser)
  parser.add_argument("--root", default="runs/start_digits")
  parser.add_argument("--epochs", type=int, default=6)
  parser.add_argument("--out", default="experiments/figures/start_digits.png")
  args = parser.parse_args(argv)
  common.enable_compilation_cache(args.jax_cache)
  curves = {label: run_case(args, label, opt, ov) for label, opt, ov in CASES}
  plot(curves, args.out)
  print(f"figure: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
