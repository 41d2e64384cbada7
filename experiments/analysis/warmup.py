r"""Does the SAM family need a ρ warm-up by default? Counts the runs left on the initial saddle.

``python -m experiments.analysis.warmup [--methods sam,xsam] [--rhos 0.1,0.2] [--warmups 0,3]
[--seeds 0,1,2,3,4] [--epochs_run K] [--root runs/warmup_digits] [--out
experiments/figures/warmup_digits]``

Every run is the config (digits by default) with ``rho``, ``rho_warmup_epochs`` and ``seed``
set, trained for its first ``--epochs_run`` epochs of the config's schedule (the learning-rate
and ρ schedules are those of the full run; ``--epochs_run 0``: the whole run). A run is *on the
saddle* at an epoch when :func:`experiments.saddle.at_initial_saddle` says so (applied to the
epoch's training loss and accuracy in ``metrics.jsonl``). Per (method, ρ, warm-up) the table
gives the runs still on the saddle at the last epoch run, the epochs they spent there, and the
test accuracy at that epoch. Resumable: a run directory that already reached ``--epochs_run`` is
read, not trained again.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import saddle
from experiments.analysis import common


def run_one(config_path, method, rho, warmup, seed, args) -> dict[str, Any]:
  """Trains (or reads) one run up to ``args.epochs_run`` epochs; returns its table row."""
  from experiments import train as train_lib

  overrides = [f"rho={rho}", f"rho_warmup_epochs={warmup}", f"seed={seed}", "lambda_max_every=0"]
  config = common.make_config(config_path, method, [*overrides, *args.overrides])
  stop = args.epochs_run or config.epochs
  workdir = Path(args.root) / f"{method}/rho{rho}_warmup{warmup}/seed{seed}"
  has_metrics = (workdir / train_lib.METRICS_FILE).exists()
  done = common.read_metrics(workdir, "epoch") if has_metrics else []
  reached = done[-1]["epoch"] if done else 0
  if reached < stop:
    train_lib.train(config, workdir, max_epochs_this_run=stop - reached)
    done = common.read_metrics(workdir, "epoch")
  done = [r for r in done if r["epoch"] <= stop]
  # The rule of experiments.saddle as it is now (not the flags the run wrote, which may be
  # those of an older rule).
  classes = num_classes(config.dataset, config.data_dir)
  flags = [
    saddle.at_initial_saddle(r["epoch"], r["train_loss"], r["train_accuracy"], classes)
    for r in done
  ]
  last = done[-1]
  return {
    "method": method,
    "rho": rho,
    "rho_warmup_epochs": warmup,
    "seed": seed,
    "epochs_run": last["epoch"],
    "stuck_at_end": flags[-1],
    "epochs_on_saddle": sum(flags),
    "test_accuracy": last.get("test_accuracy"),
    "train_loss": last["train_loss"],
  }


@functools.cache
def num_classes(dataset: str, data_dir: str | None) -> int:
  from experiments import data as data_lib

  return data_lib.load_dataset(dataset, data_dir=data_dir).num_classes


def table(rows: Sequence[dict[str, Any]]) -> str:
  """One Markdown line per (method, ρ, warm-up)."""
  lines = [
    "| method | ρ | warm-up (epochs) | runs on the saddle at the end | epochs on the saddle, per "
    "seed | test acc % at the end, per seed | mean |",
    "|---|---|---|---|---|---|---|",
  ]
  keys = sorted({(r["method"], r["rho"], r["rho_warmup_epochs"]) for r in rows})
  for key in keys:
    group = sorted(
      (r for r in rows if (r["method"], r["rho"], r["rho_warmup_epochs"]) == key),
      key=lambda r: r["seed"],
    )
    accs = [100 * r["test_accuracy"] for r in group]
    lines.append(
      f"| {key[0]} | {key[1]:g} | {key[2]:g} | {sum(r['stuck_at_end'] for r in group)}/"
      f"{len(group)} | {' '.join(str(r['epochs_on_saddle']) for r in group)} | "
      f"{' '.join(f'{a:.1f}' for a in accs)} | {np.mean(accs):.1f} |"
    )
  return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.analysis.warmup", description=__doc__.split("\n\n")[0]
  )
  common.add_run_args(parser)
  parser.add_argument("--root", default="runs/warmup_digits")
  parser.add_argument("--out", default="experiments/figures/warmup_digits")
  parser.add_argument("--methods", default="sam,xsam")
  parser.add_argument("--rhos", default="0.1,0.2")
  parser.add_argument("--warmups", default="0,3", help="rho_warmup_epochs values")
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--epochs_run", type=int, default=0, help="0: the config's epochs")
  args = parser.parse_args(argv)
  if args.epochs_run < 0:
    parser.error(f"--epochs_run must be >= 0 (0: the whole run), got {args.epochs_run}")
  args.methods = common.parse_list(args.methods)
  args.rhos = common.parse_list(args.rhos, float)
  args.warmups = common.parse_list(args.warmups, float)
  args.seeds = common.parse_list(args.seeds, int)
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  common.enable_compilation_cache(args.jax_cache)
  rows = []
  for method in args.methods:
    for rho in args.rhos:
      for warmup in args.warmups:
        for seed in args.seeds:
          rows.append(run_one(args.config, method, rho, warmup, seed, args))
          r = rows[-1]
          print(
            f"{method} rho={rho:g} warmup={warmup:g} seed={seed}: epochs on saddle "
            f"{r['epochs_on_saddle']}/{r['epochs_run']}, test acc {r['test_accuracy']:.4f}",
            flush=True,
          )
  text = table(rows)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(f"{args.out}.md").write_text(text)
  common.write_csv(f"{args.out}.csv", rows)
  print("\n" + text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
