"""`make demo`: SGD, SAM and X-SAM on the embedded digits with 40% label noise, on a CPU.

Trains the three optimizers with the config `experiments/configs/digits_simple_cnn.py`
(SimpleCNN, 30 epochs, no network needed), then prints a table of clean test accuracy, final
lambda_max (an independent Lanczos estimate, not the optimizer's cached value) and training
time, and writes `runs/demo/demo.png` with the training curves. Runs resume: a finished run is
read back, not retrained.

Usage: `python -m experiments.demo [--root runs/demo] [--optimizers sgd,sam,xsam]
[--set field=value ...]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.configs.base import load_config
from experiments.train import METRICS_FILE, train

CONFIG = "experiments/configs/digits_simple_cnn.py"


def read_epochs(workdir: Path) -> list[dict]:
  """The last record of each epoch in a run's metrics.jsonl (resumed runs may repeat one)."""
  by_epoch: dict[int, dict] = {}
  for line in (workdir / METRICS_FILE).read_text().splitlines():
    record = json.loads(line)
    if record.get("kind") == "epoch":
      by_epoch[record["epoch"]] = {**by_epoch.get(record["epoch"], {}), **record}
  return [by_epoch[e] for e in sorted(by_epoch)]


def format_table(rows: list[dict]) -> str:
  """A plain-text table of the runs' summaries."""
  header = f"{'optimizer':<12}{'test acc (clean)':>18}{'final lambda_max':>18}{'train time':>12}"
  lines = [header, "-" * len(header)]
  for r in rows:
    lines.append(
      f"{r['optimizer']:<12}{100 * r['test_accuracy']:>17.2f}%{r['final_lambda_max']:>18.3f}"
      f"{r['train_seconds_this_run']:>11.1f}s"
    )
  return "\n".join(lines)


def plot(curves: dict[str, list[dict]], path: Path) -> None:
  """Test accuracy, training loss and lambda_max against epochs, one line per optimizer."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for name, records in curves.items():
    epochs = [r["epoch"] for r in records]
    axes[0].plot(epochs, [100 * r.get("test_accuracy", float("nan")) for r in records], label=name)
    axes[1].plot(epochs, [r["train_loss"] for r in records], label=name)
    lam = [(r["epoch"], r["lambda_max"]) for r in records if "lambda_max" in r]
    if lam:
      axes[2].plot(*zip(*lam, strict=True), marker="o", label=name)
  titles = ("clean test accuracy (%)", "training loss (noisy labels)", "lambda_max (Lanczos)")
  for ax, title in zip(axes, titles, strict=True):
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("digits, SimpleCNN, 40% symmetric label noise")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__)
  parser.add_argument("--root", default="runs/demo")
  parser.add_argument("--optimizers", default="sgd,sam,xsam")
  parser.add_argument("--set", dest="overrides", action="append", default=[])
  args = parser.parse_args(argv)
  root = Path(args.root)
  rows, curves = [], {}
  for name in args.optimizers.split(","):
    config = load_config(f"{CONFIG}:{name}", args.overrides)
    print(
      f"== {name}: {config.epochs} epochs on {config.dataset} "
      f"(label noise {config.label_noise:.0%})",
      flush=True,
    )
    summary, _ = train(config, root / name)
    rows.append(summary)
    curves[name] = read_epochs(root / name)
  table = format_table(rows)
  print("\n" + table)
  (root / "table.txt").write_text(table + "\n")
  plot(curves, root / "demo.png")
  print(f"\ncurves: {root / 'demo.png'}\ntable:  {root / 'table.txt'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
