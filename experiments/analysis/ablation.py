r"""Does the eigenvector matter? X-SAM arms that differ only in where v comes from (issue 20).

``python -m experiments.analysis.ablation [--dataset digits|fashion_mnist] [--study
<study>.json] [--root DIR] [--out PREFIX] [--set k=v ...]`` (``make ablation``, ``make
ablation-fashion``). Resumable like the study (:mod:`experiments.analysis.study`): every run is
one :func:`experiments.train.train` in its own directory, and a finished run is read, not rerun.

The runs are the study's test runs of one regime (``--regime``, default ``noise40``: 40%
symmetric label noise), rebuilt from the study's saved JSON (``--study``): its config, fixed
overrides, epochs, ρ warm-up and λ_max schedule, and the settings its validation runs chose
(:func:`experiments.analysis.study.choose`). Arms (``--arms``), all at X-SAM's chosen ρ and α
and on the same seeds (``--seeds``, 0-4: the same label noise, init and batches per seed):

* ``power`` (a): the papers' tracker, ``power_iters`` (q) power-iteration steps on each
  refresh step's minibatch every ``refresh_every`` (p) steps (the config's q = p = 5): the
  study's X-SAM run itself.
* ``random`` (b): ``tracker=random``: a random unit vector redrawn every p steps, no
  Hessian-vector products at all (``xsam_jax.xsam(solver="random")``).
* ``well_estimated`` (c): ``power_iters=--eig_iters`` (20) over a fixed set of
  ``eig_examples=--eig_examples`` (2,048) training images every p steps (all of them when the
  training set is smaller: digits has 1,437), eval-mode loss (``TrainConfig.eig_examples``).
* ``sam``: SAM at its chosen ρ, the baseline.

The X-SAM arms' configs differ only in :data:`ARM_FIELDS` (checked before anything runs).

Statistics (the study's functions): test accuracy as mean ± 95% t-interval over seeds; final
λ_max (the train CLI's independent Lanczos estimate) as median [min–max]; paired per-seed
differences of every arm against (a) and against SAM with t-intervals and the paired t test,
Holm-adjusted over the one family of :data:`COMPARISONS` (family-wise error 5%).

Outputs: ``<out>.md`` (tables), ``<out>.csv`` (one row per run), ``<out>.json`` (everything, for
``--from_json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.analysis import common, study

# Where v comes from, per arm: the overrides on top of the study's X-SAM test run (``sam``:
# the study's SAM test run). ``{iters}``/``{examples}`` are --eig_iters/--eig_examples.
ARMS = {
  "power": (),
  "random": ("tracker=random",),
  "well_estimated": ("power_iters={iters}", "eig_examples={examples}"),
  "sam": (),
}
ARM_LABELS = {
  "power": "(a) power, minibatch",
  "random": "(b) random v",
  "well_estimated": "(c) well-estimated v",
  "sam": "SAM",
}
# The only config fields in which the X-SAM arms may differ.
ARM_FIELDS = frozenset({"tracker", "power_iters", "eig_examples"})
# The paired comparisons (a − b), one Holm family: every arm against (a) and against SAM.
COMPARISONS = (
  ("random", "power"),
  ("well_estimated", "power"),
  ("power", "sam"),
  ("random", "sam"),
  ("well_estimated", "sam"),
)
# The per-dataset defaults of --study, --root and --out.
DATASETS = {
  "digits": ("experiments/figures/study_digits.json", "runs/ablation_digits"),
  "fashion_mnist": ("experiments/figures/study_fashion.json", "runs/ablation_fashion"),
}


def study_args(saved: dict[str, Any], args: argparse.Namespace) -> argparse.Namespace:
  """The saved study's arguments, restricted to the ablation's regime, seeds and methods."""
  ns = argparse.Namespace(**saved["args"])
  ns.regimes = [args.regime]
  ns.compute_regimes = []
  ns.methods = ["sam", "xsam"]
  ns.seeds = list(args.seeds)
  if args.epochs is not None:
    ns.epochs = args.epochs
  ns.overrides = [*ns.overrides, *args.overrides]
  return ns


def chosen(saved: dict[str, Any], regime: str) -> dict[str, tuple[str, ...]]:
  """The study's validation choice for SAM and X-SAM in ``regime`` (or the regime it borrows).

  Raises:
    ValueError: when the saved study has no choice for one of them.
  """
  ns = argparse.Namespace(**saved["args"])
  choice = study.choose(saved["tune"], study.tune_runs(ns))
  source = study.tuned_source(regime, ns)
  out = {}
  for method in ("sam", "xsam"):
    if (source, method) not in choice:
      raise ValueError(
        f"the study's JSON has no validation choice for {method} in regime {source!r} (which "
        f"{regime!r} takes its settings from): run the study's tuning first"
      )
    out[method] = choice[(source, method)]
  return out


def ablation_runs(saved: dict[str, Any], args: argparse.Namespace) -> list[study.Run]:
  """Every run of the ablation, seed-major (a partial ablation has every arm for its seeds).

  Each arm's run is the study's test run of ``args.regime`` (X-SAM's, or SAM's for ``sam``)
  with the arm's overrides last; its ``stage`` is the arm's name.
  """
  choice = chosen(saved, args.regime)
  ns = study_args(saved, args)
  base = study.test_and_compute_runs(ns, {(args.regime, m): s for m, s in choice.items()}, 0.0)
  by = {(r.method, r.seed): r for r in base if r.stage == "test"}
  runs = []
  for seed in args.seeds:
    for arm in args.arms:
      run = by[("sam" if arm == "sam" else "xsam", seed)]
      extra = tuple(o.format(iters=args.eig_iters, examples=args.eig_examples) for o in ARMS[arm])
      runs.append(
        dataclasses.replace(
          run, stage=arm, setting=(*run.setting, *extra), overrides=(*run.overrides, *extra)
        )
      )
  return runs


def check_arms(runs: Sequence[study.Run], config: str) -> None:
  """Raises ValueError unless the X-SAM arms of each seed differ only in :data:`ARM_FIELDS`."""
  for seed in sorted({r.seed for r in runs}):
    configs = {
      r.stage: json.loads(common.make_config(config, r.method, r.overrides).to_json())
      for r in runs
      if r.seed == seed and r.stage != "sam"
    }
    first = next(iter(configs.values()), {})
    for arm, values in configs.items():
      differ = {k for k in values if values[k] != first[k]} - ARM_FIELDS
      if differ:
        raise ValueError(
          f"arm {arm!r} (seed {seed}) differs from the others in {sorted(differ)}, not only in "
          f"{sorted(ARM_FIELDS)}: a --set override must not depend on the arm"
        )


def comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The paired differences of :data:`COMPARISONS` with data, Holm-adjusted as one family.

  Returns:
    One dict per comparison: ``a``, ``b`` (arm names), the fields of
    :func:`experiments.analysis.study.paired`, ``p_holm`` and ``verdict``.
  """
  by: dict[str, dict[int, float]] = {}
  for r in rows:
    by.setdefault(r["stage"], {})[r["seed"]] = r["accuracy"]
  found = [
    {"a": a, "b": b, **study.paired(by[a], by[b])} for a, b in COMPARISONS if a in by and b in by
  ]
  for c, p in zip(found, study.holm([c["p"] for c in found]), strict=True):
    c["p_holm"] = p
    c["verdict"] = study.verdict(c)
  return found


def report(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
  """The Markdown: one row per arm, then the paired differences."""
  fmt, fmt_range, fmt_p = study._fmt, study._fmt_range, study._fmt_p
  lines = [
    f"### Arms (regime {args.regime}; clean test accuracy %, mean ± 95% t-interval over seeds; "
    "final λ_max median [min–max])",
    "",
    "| arm | setting | test acc | final λ_max | cached eigval, last epoch | train acc (noisy) | "
    "n | s/epoch |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for arm in args.arms:
    group = [r for r in rows if r["stage"] == arm]
    if not group:
      continue
    acc = study.t_interval([r["accuracy"] for r in group])
    lam = study.median_range([r["final_lambda_max"] for r in group])
    eig = study.median_range([r.get("cached_eigval") for r in group])
    train = study.t_interval([r["train_accuracy"] for r in group])
    spe = float(np.median([r["seconds_per_epoch"] for r in group]))
    lines.append(
      f"| {ARM_LABELS[arm]} | {group[0]['setting']} | {fmt(*acc[:2])} | "
      f"{fmt_range(*lam[:3])} | {fmt_range(*eig[:3])} | {fmt(*train[:2])} | {acc[2]} | "
      f"{spe:.2f} |"
    )
  found = comparisons(rows)
  lines += [
    "",
    "### Paired differences (test accuracy points, same seeds)",
    "",
    f"Difference: mean ± 95% t-interval of the per-seed differences. p: two-sided paired t "
    f"test. Holm p: adjusted over these {len(found)} comparisons (one family). Verdict: win or "
    "loss when the Holm p < 0.05, else n.s. (no difference shown, which is not a proof of "
    "equality).",
    "",
    "| comparison | difference | n | wins/ties/losses | p | Holm p | verdict |",
    "|---|---|---|---|---|---|---|",
  ]
  for c in found:
    lines.append(
      f"| {ARM_LABELS[c['a']]} − {ARM_LABELS[c['b']]} | {fmt(c['mean'], c['half'])} | "
      f"{c['n']} | {c['wins']}/{c['ties']}/{c['losses']} | {fmt_p(c['p'])} | "
      f"{fmt_p(c['p_holm'])} | {c['verdict']} |"
    )
  return "\n".join(lines) + "\n"


def row_of(run: study.Run, workdir: Path, summary: dict[str, Any]) -> dict[str, Any]:
  """The study's row of a run, with the optimizer's cached eigenvalue (last epoch's mean)."""
  row = study.row_of(run, workdir, summary)
  epochs = common.read_metrics(workdir, "epoch")
  row["cached_eigval"] = epochs[-1].get("train_eigval") if epochs else None
  row["eig_examples"] = summary.get("eig_examples")
  return row


def write_outputs(rows: Sequence[dict[str, Any]], args: argparse.Namespace, out: str) -> str:
  """Writes ``<out>.md``, ``.csv`` and ``.json``; returns the Markdown."""
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  text = report(rows, args)
  Path(f"{out}.md").write_text(text)
  common.write_csv(f"{out}.csv", rows)
  saved = {k: v for k, v in vars(args).items() if k != "from_json"}
  payload = {"args": saved, "runs": list(rows), "comparisons": comparisons(rows)}
  Path(f"{out}.json").write_text(json.dumps(payload, indent=1, default=str))
  return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.analysis.ablation", description=__doc__
  )
  parser.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
  parser.add_argument("--study", default=None, help="the study's saved JSON (its <out>.json)")
  parser.add_argument("--root", default=None)
  parser.add_argument("--out", default=None)
  parser.add_argument("--regime", default="noise40")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--eig_iters", type=int, default=20, help="arm (c): power iterations")
  parser.add_argument(
    "--eig_examples", type=int, default=2048, help="arm (c): fixed training images"
  )
  parser.add_argument("--epochs", type=int, default=None, help="default: the study's")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--report_only", action="store_true")
  parser.add_argument("--from_json", default=None, metavar="FILE")
  parser.add_argument(
    "--jax_cache",
    default=common.default_cache_dir(),
    help="persistent JAX compilation cache directory ('' leaves JAX's setting alone)",
  )
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
  args = parser.parse_args(argv)
  study_json, root = DATASETS[args.dataset]
  args.study = args.study or study_json
  args.root = args.root or root
  args.out = args.out or f"experiments/figures/ablation_{args.dataset.replace('_mnist', '')}"
  args.arms = common.parse_list(args.arms)
  args.seeds = common.parse_list(args.seeds, int)
  unknown = [a for a in args.arms if a not in ARMS]
  if unknown:
    parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
  for name in ("eig_iters", "eig_examples", "workers"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.epochs is not None and args.epochs < 1:
    parser.error(f"--epochs must be >= 1 (or left out for the study's), got {args.epochs}")
  if not args.seeds:
    parser.error("--seeds must name at least one seed, e.g. 0,1,2,3,4")
  if args.from_json is None and not Path(args.study).exists():
    parser.error(
      f"--study {args.study} does not exist: the ablation takes its runs and the validation "
      "choice of rho and alpha from a finished study (make study / make study-fashion)"
    )
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.from_json is not None:
    saved = json.loads(Path(args.from_json).read_text())
    ns = argparse.Namespace(**{**saved["args"], "out": args.out})
    print(write_outputs(saved["runs"], ns, args.out))
    return 0
  common.enable_compilation_cache(args.jax_cache)
  saved = json.loads(Path(args.study).read_text())
  args.config = saved["args"]["config"]
  runs = ablation_runs(saved, args)
  check_arms(runs, args.config)
  if args.report_only:
    runs = [r for r in runs if (Path(args.root) / r.name / "summary.json").exists()]
  print(f"== ablation: {len(runs)} runs in {args.root}", flush=True)
  study.run_all(runs, args, log=lambda s: print(s, flush=True))
  rows = []
  for run in runs:
    workdir = Path(args.root) / run.name
    rows.append(row_of(run, workdir, json.loads((workdir / "summary.json").read_text())))
  print("\n" + write_outputs(rows, args, args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
