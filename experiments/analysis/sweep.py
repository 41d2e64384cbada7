r"""Hyperparameter sweeps over seeds: SAM's ρ, X-SAM's α and (p, q); Markdown table and figure.

``python -m experiments.analysis.sweep --config experiments/configs/digits_simple_cnn.py
--root runs/sweep_digits --seeds 0,1,2 --out experiments/figures/sweep.png [--set k=v ...]``

Groups of settings (``--groups``, comma-separated):

* ``sgd``: the base optimizer alone (reference line);
* ``sam_rho``: SAM with ρ in ``--rhos`` (default 0.02, 0.05, 0.1, 0.2), to find the best ρ;
* ``xsam_alpha``: X-SAM with α in ``--alphas`` (default 0 ... 0.5; α = 0 is normalised SAM,
  X-SAM without its correction), other hyperparameters from the config;
* ``xsam_pq``: X-SAM with refresh period p in ``--ps`` (default 1, 5, 20) and power
  iterations q in ``--qs`` (default 1, 5);
* ``eigen_sam``: Eigen-SAM with the config's hyperparameters;
* ``xsam_variants``: X-SAM with ``normalize=false`` (the operator of its Theorem 5.1,
  :math:`(I-\alpha vv^\top)g_{adv}`), ``normalize=true`` (the paper's Eq. 11: a unit vector
  is handed to SGD) at the config's lr and at lr 0.02, and ``correction=official`` (the
  authors' code); a variant equal to the config's X-SAM is run once (see below).

Every (setting, seed) is one ``experiments.train.train`` run in
``ROOT/<optimizer>[__<overrides>]/seed<S>``, where ``<overrides>`` lists only the fields that
differ from the config, so a setting reached by two groups (X-SAM α = 0.2 and (p, q) = (5, 5)
with the digits config) runs once. A run whose ``summary.json`` exists is read, not rerun:
run the same command again to resume an interrupted sweep, or with more seeds to extend it.
The same script runs the papers' settings on a GPU, e.g. ``--config
experiments/configs/cifar10_resnet18.py --set data_dir=/data/tfds``.

Reported per setting (mean ± sample std over seeds): the test accuracy after the last epoch
(the test labels are never noisy, so with ``label_noise > 0`` this is the *clean* accuracy),
the final λ_max (``experiments.train``'s independent Lanczos estimate on a fixed training
subset), the final training loss (on the noisy labels) and the median training seconds per
epoch (first epoch, with compilation, left out; evaluation and λ_max estimates not included).
Outputs: the PNG, ``<out>.md`` (the table) and ``<out>.csv`` (one row per run).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.analysis import common
from experiments.configs.base import TrainConfig

GROUPS = ("sgd", "sam_rho", "xsam_alpha", "xsam_pq", "eigen_sam", "xsam_variants")
DEFAULT_GROUPS = "sgd,sam_rho,xsam_alpha,xsam_pq"
DEFAULT_RHOS = "0.02,0.05,0.1,0.2"
DEFAULT_ALPHAS = "0,0.1,0.2,0.3,0.4,0.5"
DEFAULT_PS = "1,5,20"
DEFAULT_QS = "1,5"


@dataclasses.dataclass(frozen=True)
class Setting:
  """One point of a sweep.

  Attributes:
    group: the sweep group (one of :data:`GROUPS`).
    optimizer: optimizer name for ``get_config``.
    overrides: ``field=value`` overrides of this setting.
    label: short text for tables and figures.
    x: the swept value on the figure's x axis (ρ, α or p), or None.
    series: the line it belongs to within its group's panel (e.g. ``"q=5"``).
  """

  group: str
  optimizer: str
  overrides: tuple[str, ...]
  label: str
  x: float | None = None
  series: str = ""


def build_settings(
  groups: Sequence[str],
  *,
  rhos: Sequence[float],
  alphas: Sequence[float],
  ps: Sequence[int],
  qs: Sequence[int],
) -> list[Setting]:
  """The settings of the requested groups, in order.

  Raises:
    ValueError: for an unknown group.
  """
  settings = []
  for group in groups:
    if group not in GROUPS:
      raise ValueError(f"unknown sweep group {group!r}; choose from {list(GROUPS)}")
    if group == "sgd":
      settings.append(Setting(group, "sgd", (), "SGD"))
    elif group == "sam_rho":
      settings += [Setting(group, "sam", (f"rho={r}",), f"SAM ρ={r}", r) for r in rhos]
    elif group == "xsam_alpha":
      settings += [Setting(group, "xsam", (f"alpha={a}",), f"X-SAM α={a}", a) for a in alphas]
    elif group == "xsam_pq":
      settings += [
        Setting(
          group,
          "xsam",
          (f"refresh_every={p}", f"power_iters={q}"),
          f"X-SAM p={p} q={q}",
          p,
          f"q={q}",
        )
        for p in ps
        for q in qs
      ]
    elif group == "eigen_sam":
      settings.append(Setting(group, "eigen_sam", (), "Eigen-SAM"))
    elif group == "xsam_variants":
      settings += [
        Setting(group, "xsam", ("normalize=false",), "X-SAM normalize=false"),
        Setting(group, "xsam", ("normalize=true",), "X-SAM normalize=true"),
        Setting(group, "xsam", ("normalize=true", "lr=0.02"), "X-SAM normalize=true lr=0.02"),
        Setting(group, "xsam", ("correction=official",), "X-SAM correction=official"),
      ]
  return settings


def _changed_fields(config: TrainConfig, base: TrainConfig, overrides: Sequence[str]) -> list[str]:
  """``field=value`` for the overridden fields whose value differs from ``base``."""
  names = sorted({item.partition("=")[0] for item in overrides})
  return [f"{n}={getattr(config, n)}" for n in names if getattr(config, n) != getattr(base, n)]


def run_name(config_path: str, setting: Setting, overrides: Sequence[str]) -> str:
  """The run directory name of a setting: the optimizer and the fields it changes."""
  base = common.make_config(config_path, setting.optimizer, overrides)
  config = common.make_config(config_path, setting.optimizer, [*overrides, *setting.overrides])
  changed = _changed_fields(config, base, setting.overrides)
  return setting.optimizer + ("__" + ",".join(changed) if changed else "")


def run_sweep(
  config_path: str,
  settings: Sequence[Setting],
  seeds: Sequence[int],
  root: str | Path,
  overrides: Sequence[str] = (),
  *,
  dry_run: bool = False,
) -> list[dict[str, Any]]:
  """Runs (or reads) every (setting, seed); one row per (setting, seed).

  Args:
    config_path: a config file of ``experiments/configs``.
    settings: from :func:`build_settings`.
    seeds: the seeds (``seed=`` override).
    root: directory of the runs.
    overrides: ``field=value`` overrides for every run (e.g. ``epochs=20``), applied before the
      setting's own.
    dry_run: only list the runs (rows without results).

  Returns:
    Rows with ``group``, ``setting``, ``optimizer``, ``run``, ``seed``, ``workdir`` and, unless
    ``dry_run``, ``test_accuracy``, ``final_lambda_max``, ``final_train_loss``,
    ``seconds_per_epoch``, ``wall_seconds``.
  """
  names = [run_name(config_path, setting, overrides) for setting in settings]
  done: dict[str, dict[str, Any]] = {}
  if not dry_run:
    # Seed by seed, so that an interrupted sweep has every setting at the first seeds.
    for seed in seeds:
      for setting, name in zip(settings, names, strict=True):
        workdir = Path(root) / name / f"seed{seed}"
        if str(workdir) in done:
          continue
        config = common.make_config(
          config_path, setting.optimizer, [*overrides, *setting.overrides, f"seed={seed}"]
        )
        summary = common.run_or_load(config, workdir)
        epochs = common.read_metrics(workdir, "epoch")
        done[str(workdir)] = {
          "test_accuracy": summary["test_accuracy"],
          "final_lambda_max": summary["final_lambda_max"],
          "final_train_loss": summary["final_train_loss"],
          "seconds_per_epoch": common.seconds_per_epoch(epochs),
          "wall_seconds": summary["wall_seconds_this_run"],
        }
  rows = []
  for setting, name in zip(settings, names, strict=True):
    for seed in seeds:
      workdir = Path(root) / name / f"seed{seed}"
      rows.append(
        {
          "group": setting.group,
          "setting": setting.label,
          "optimizer": setting.optimizer,
          "run": name,
          "x": setting.x,
          "series": setting.series,
          "seed": seed,
          "workdir": str(workdir),
          **done.get(str(workdir), {}),
        }
      )
  return rows


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean, std and count over seeds per (group, setting), in order of appearance."""
  out = []
  keys = list(dict.fromkeys((r["group"], r["setting"]) for r in rows))
  for group, setting in keys:
    rs = [r for r in rows if r["group"] == group and r["setting"] == setting]
    agg: dict[str, Any] = {
      "group": group,
      "setting": setting,
      "run": rs[0]["run"],
      "x": rs[0]["x"],
      "series": rs[0]["series"],
    }
    for field in ("test_accuracy", "final_lambda_max", "final_train_loss", "seconds_per_epoch"):
      mean, std, n = common.mean_std(r.get(field) for r in rs)
      agg[field] = mean
      agg[f"{field}_std"] = std
      agg["n"] = n
    out.append(agg)
  return out


def best(aggs: Sequence[dict[str, Any]], group: str) -> dict[str, Any] | None:
  """The setting of ``group`` with the highest mean test accuracy (None if the group is empty)."""
  candidates = [a for a in aggs if a["group"] == group and not math.isnan(a["test_accuracy"])]
  return max(candidates, key=lambda a: a["test_accuracy"]) if candidates else None


def markdown_table(aggs: Sequence[dict[str, Any]]) -> str:
  """The sweep as a Markdown table, best SAM ρ and best X-SAM marked, with a comparison line."""
  best_sam = best(aggs, "sam_rho")
  best_marks = {id(b) for b in (best_sam, best(aggs, "xsam_alpha"), best(aggs, "xsam_pq")) if b}
  lines = [
    "| group | setting | seeds | test acc (clean) % | final λ_max | final train loss | s/epoch |",
    "|---|---|---|---|---|---|---|",
  ]
  for a in aggs:
    mark = " **(best)**" if id(a) in best_marks else ""
    lines.append(
      f"| {a['group']} | {a['setting']}{mark} | {a['n']} "
      f"| {100 * a['test_accuracy']:.2f} ± {100 * a['test_accuracy_std']:.2f} "
      f"| {a['final_lambda_max']:.3g} ± {a['final_lambda_max_std']:.2g} "
      f"| {a['final_train_loss']:.3f} ± {a['final_train_loss_std']:.3f} "
      f"| {a['seconds_per_epoch']:.2f} |"
    )
  if best_sam is not None:
    lines.append("")
    lines.append(
      f"Best SAM: {best_sam['setting']} ({100 * best_sam['test_accuracy']:.2f}%, "
      f"λ_max {best_sam['final_lambda_max']:.3g})."
    )
    for a in aggs:
      if a["group"] in ("xsam_alpha", "xsam_pq") and id(a) in best_marks:
        d_acc = 100 * (a["test_accuracy"] - best_sam["test_accuracy"])
        ratio = a["final_lambda_max"] / best_sam["final_lambda_max"]
        lines.append(
          f"Best of {a['group']}: {a['setting']}: {d_acc:+.2f} points of accuracy and "
          f"{ratio:.2f}x the λ_max of the best SAM."
        )
  return "\n".join(lines) + "\n"


def _errorbar(ax, xs, aggs, field, scale, **kwargs):
  ys = np.array([scale * a[field] for a in aggs])
  es = np.array([scale * a[f"{field}_std"] for a in aggs])
  ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, **kwargs)


def plot(aggs: Sequence[dict[str, Any]], out: str | Path, title: str = "") -> None:
  """Columns: SAM ρ, X-SAM α, X-SAM (p, q); rows: clean test accuracy, final λ_max.

  SGD is a dashed grey line and the best SAM ρ a dotted red line with a ±std band.
  """
  plt = common.pyplot()
  fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), squeeze=False)
  rows = (
    ("test_accuracy", "test accuracy (clean) %", 100.0),
    ("final_lambda_max", "final λ_max", 1.0),
  )
  sgd = next((a for a in aggs if a["group"] == "sgd"), None)
  best_sam = best(aggs, "sam_rho")
  for r, (field, ylabel, scale) in enumerate(rows):
    for c, group in enumerate(("sam_rho", "xsam_alpha", "xsam_pq")):
      ax = axes[r][c]
      group_aggs = [a for a in aggs if a["group"] == group]
      if not group_aggs:
        ax.text(0.5, 0.5, f"{group}: not run", ha="center", va="center", transform=ax.transAxes)
      else:
        for i, series in enumerate(dict.fromkeys(a["series"] for a in group_aggs)):
          items = sorted((a for a in group_aggs if a["series"] == series), key=lambda a: a["x"])
          name = {"sam_rho": "SAM", "xsam_alpha": "X-SAM"}.get(group, "X-SAM")
          _errorbar(
            ax,
            [a["x"] for a in items],
            items,
            field,
            scale,
            color=f"C{i}" if group == "xsam_pq" else ("C0" if group == "sam_rho" else "C2"),
            label=f"{name} {series}".strip(),
          )
        ax.set_xlabel(
          {"sam_rho": "ρ", "xsam_alpha": "α", "xsam_pq": "refresh period p (steps)"}[group]
        )
        if group != "xsam_alpha":
          ax.set_xscale("log")
        ticks = sorted({a["x"] for a in group_aggs})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
      if group_aggs:
        if sgd is not None:
          ax.axhline(scale * sgd[field], color="0.5", ls="--", label="SGD")
        if best_sam is not None and group != "sam_rho":
          y, e = scale * best_sam[field], scale * best_sam[f"{field}_std"]
          ax.axhline(y, color="C3", ls=":", label=f"best {best_sam['setting']}")
          ax.axhspan(y - e, y + e, color="C3", alpha=0.1)
        ax.legend(fontsize=8)
      ax.set_ylabel(ylabel)
      if r == 0:
        ax.set_title(
          {"sam_rho": "SAM: ρ", "xsam_alpha": "X-SAM: α", "xsam_pq": "X-SAM: (p, q)"}[group]
        )
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.analysis.sweep", description=__doc__.split("\n\n")[0]
  )
  common.add_run_args(parser)
  parser.add_argument("--groups", default=DEFAULT_GROUPS, help=f"comma-separated of {GROUPS}")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  parser.add_argument("--rhos", default=DEFAULT_RHOS, help="SAM ρ values")
  parser.add_argument("--alphas", default=DEFAULT_ALPHAS, help="X-SAM α values")
  parser.add_argument("--ps", default=DEFAULT_PS, help="X-SAM refresh periods p")
  parser.add_argument("--qs", default=DEFAULT_QS, help="X-SAM power iterations q")
  parser.add_argument("--root", default="runs/sweep", help="directory of the runs")
  parser.add_argument("--out", default="experiments/figures/sweep.png")
  parser.add_argument("--dry_run", action="store_true", help="list the runs and exit")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  common.enable_compilation_cache(None if args.dry_run else args.jax_cache)
  try:
    settings = build_settings(
      common.parse_list(args.groups),
      rhos=common.parse_list(args.rhos, float),
      alphas=common.parse_list(args.alphas, float),
      ps=common.parse_list(args.ps, int),
      qs=common.parse_list(args.qs, int),
    )
    rows = run_sweep(
      args.config,
      settings,
      common.parse_list(args.seeds, int),
      args.root,
      args.overrides,
      dry_run=args.dry_run,
    )
  except (ValueError, FileNotFoundError) as exc:
    print(f"error: {exc}", file=sys.stderr)
    return 2
  if args.dry_run:
    runs = list(dict.fromkeys(r["workdir"] for r in rows))
    for r in rows:
      print(f"{r['group']:>13}  {r['setting']:<24} {r['workdir']}")
    print(f"{len(runs)} distinct runs")
    return 0
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  common.write_csv(out.with_suffix(".csv"), rows)
  aggs = aggregate(rows)
  table = markdown_table(aggs)
  out.with_suffix(".md").write_text(table)
  title = f"{Path(args.config).stem}: {', '.join(args.overrides) or 'config defaults'}"
  plot(aggs, out, title=title)
  print(table)
  print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.csv')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
