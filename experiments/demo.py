"""`make demo`: SGD, SAM and X-SAM on the embedded digits with 40% label noise, on a CPU.

Trains the three optimizers with the config `experiments/configs/digits_simple_cnn.py`
(SimpleCNN, 30 epochs, no network needed) in the regime where they differ: no augmentation and
batch 128 (:data:`DEMO_OVERRIDES`), so that SGD memorises the wrong labels (its training
accuracy on the noisy labels reaches 100%) and its clean test accuracy falls from its peak. The
table shows, per optimizer, the best and the final clean test accuracy, the final training
accuracy on the noisy labels, the final lambda_max (an independent Lanczos estimate, not the
optimizer's cached value) and the training time; `runs/demo/demo.png` has the curves. Runs
resume: a finished run is read back, not retrained.

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
# Before the user's --set: the 40%-noise regime of the benchmark protocol (experiments/analysis/
# study.py: no augmentation, batch 128) with the rho its validation split chose for SAM, Eigen-SAM
# and X-SAM alike (0.2; X-SAM's alpha 0.2 is the config's), ramped up linearly over the first 3
# epochs (RESULTS.md, "The start"). So the demo's runs are the study's seed-0 test runs.
DEMO_OVERRIDES = (
  "augment=false",
  "batch_size=128",
  "rho=0.2",
  "rho_warmup_epochs=3",
  "checkpoint_every=10",
)


def read_epochs(workdir: Path) -> list[dict]:
  """The last record of each epoch in a run's metrics.jsonl (resumed runs may repeat one)."""
  by_epoch: dict[int, dict] = {}
  for line in (workdir / METRICS_FILE).read_text().splitlines():
    record = json.loads(line)
    if record.get("kind") == "epoch":
      by_epoch[record["epoch"]] = {**by_epoch.get(record["epoch"], {}), **record}
  return [by_epoch[e] for e in sorted(by_epoch)]


def format_table(rows: list[dict]) -> str:
  """A plain-text table of the runs' summaries (``best_test_accuracy``, ``train_accuracy`` and
  ``best_epoch`` come from the epoch records, see :func:`main`)."""
  header = (
    f"{'optimizer':<12}{'best test acc':>15}{'final test acc':>16}{'train acc (noisy)':>19}"
    f"{'final lambda_max':>18}{'train time':>12}"
  )
  lines = [header, "-" * len(header)]
  for r in rows:
    best = f"{100 * r['best_test_accuracy']:.2f}% (ep {r['best_epoch']})"
    lines.append(
      f"{r['optimizer']:<12}{best:>15}{100 * r['test_accuracy']:>15.2f}%"
      f"{100 * r['train_accuracy']:>18.2f}%{r['final_lambda_max']:>18.3f}"
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
  titles = ("clean test accuracy (%)", "training loss (40% noisy labels)", "lambda_max (Lanczos)")
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
    config = load_config(f"{CONFIG}:{name}", [*DEMO_OVERRIDES, *args.overrides])
    print(
      f"== {name}: {config.epochs} epochs on {config.dataset} "
      f"(label noise {config.label_noise:.0%})",
      flush=True,
    )
    summary, _ = train(config, root / name)
    curves[name] = read_epochs(root / name)
    best = max(curves[name], key=lambda r: r.get("test_accuracy", -1.0))
    rows.append(
      {
        **summary,
        "best_test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "train_accuracy": curves[name][-1]["train_accuracy"],
      }
    )
  table = format_table(rows)
  print("\n" + table)
  (root / "table.txt").write_text(table + "\n")
  plot(curves, root / "demo.png")
  print(f"\ncurves: {root / 'demo.png'}\ntable:  {root / 'table.txt'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
