"""Shared pieces of the analysis scripts: configs, resumable runs, metrics files and plotting.

Every analysis script builds on :mod:`experiments.train`: a run is ``train(config, workdir)``
in its own directory, and the scripts only read what a run writes there (``config.json``,
``metrics.jsonl``, ``summary.json``). A run whose ``summary.json`` exists is not run again, so a
sweep interrupted at any point is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from experiments.configs import base as base_config
from experiments.configs.base import TrainConfig, load_config

# Prepended to the user's --set overrides: quiet, file-only runs (the user may override them).
QUIET_OVERRIDES = ("progress=false", "tensorboard=false")


def parse_list(text: str, kind: Callable[[str], Any] = str) -> list[Any]:
  """Splits ``"a,b,c"`` into ``[kind("a"), kind("b"), kind("c")]``, ignoring empty items.

  Args:
    text: comma-separated values.
    kind: converter applied to each stripped item (``str``, ``int``, ``float``).

  Returns:
    The converted items, in order.
  """
  return [kind(item.strip()) for item in text.split(",") if item.strip()]


def make_config(
  config_path: str, optimizer: str, overrides: Sequence[str] = (), *, quiet: bool = True
) -> TrainConfig:
  """The config of one run: ``config_path:optimizer`` with ``overrides`` applied in order.

  Args:
    config_path: a config file of ``experiments/configs`` (any ``:arg`` suffix is replaced by
      ``optimizer``).
    optimizer: the optimizer name handed to the file's ``get_config``.
    overrides: ``field=value`` strings; later ones win.
    quiet: prepend :data:`QUIET_OVERRIDES` (no progress bar, no TensorBoard).

  Returns:
    The validated :class:`~experiments.configs.base.TrainConfig`.
  """
  path = config_path.partition(":")[0]
  prefix = list(QUIET_OVERRIDES) if quiet else []
  return load_config(f"{path}:{optimizer}", [*prefix, *overrides])


def config_differences(config: TrainConfig, saved: dict[str, Any]) -> list[str]:
  """Names of the fields where ``config`` and a saved ``config.json`` differ.

  The comparison of :func:`experiments.configs.base.config_differences`, the one a resumed
  run makes (fields missing from ``saved`` read as their defaults; ``RESUME_FREE`` ignored).
  """
  return list(base_config.config_differences(config, saved))


def held_out_accuracy(summary: dict[str, Any]) -> float:
  """A run's accuracy on the split it was evaluated on.

  ``validation_accuracy`` for a run that held out part of its training set
  (``validation_fraction > 0``: its test set was never loaded), else ``test_accuracy``
  (``summary["eval_split"]`` says which; summaries written before it existed are test).

  Example:
    >>> held_out_accuracy({"eval_split": "validation", "validation_accuracy": 0.9})
    0.9
  """
  return summary[f"{summary.get('eval_split', 'test')}_accuracy"]


def run_or_load(
  config: TrainConfig, workdir: str | Path, *, log: Callable[[str], None] | None = print
) -> dict[str, Any]:
  """Runs ``experiments.train.train(config, workdir)`` unless its ``summary.json`` exists.

  Args:
    config: the run's config.
    workdir: the run's directory (created if needed; an unfinished run there is resumed from
      its last checkpoint by :func:`experiments.train.train`).
    log: called with one line per run (``None``: silent).

  Returns:
    The run's summary dict (``test_accuracy`` or ``validation_accuracy``,
    ``final_lambda_max``, ...).

  Raises:
    ValueError: when ``workdir`` holds a finished run of another config.
  """
  from experiments import train as train_lib

  workdir = Path(workdir)
  summary_path = workdir / train_lib.SUMMARY_FILE
  if summary_path.exists():
    saved = json.loads((workdir / train_lib.CONFIG_FILE).read_text())
    differ = config_differences(config, saved)
    if differ:
      raise ValueError(
        f"{workdir} holds a finished run of another config (fields {', '.join(differ)} "
        "differ). Use another --root, or delete that directory to rerun it."
      )
    if log is not None:
      log(f"[skip] {workdir} (summary.json exists)")
    return json.loads(summary_path.read_text())
  if log is not None:
    log(f"[run ] {workdir}")
  summary, _ = train_lib.train(config, workdir)
  if log is not None:
    log(
      f"       {summary.get('eval_split', 'test')}_accuracy={held_out_accuracy(summary):.4f} "
      f"lambda_max={summary['final_lambda_max']:.4g} wall={summary['wall_seconds_this_run']:.1f}s"
    )
  return summary


def read_metrics(workdir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
  """The records of a run's ``metrics.jsonl``, optionally only those of one ``kind``.

  A run that was restarted may have logged an epoch twice; for ``kind="epoch"`` only the last
  record of each epoch is kept, sorted by epoch.

  Args:
    workdir: the run's directory.
    kind: ``"epoch"``, ``"step"``, ``"resume"`` or ``None`` for all records.

  Returns:
    A list of dicts.
  """
  from experiments import train as train_lib

  path = Path(workdir) / train_lib.METRICS_FILE
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  if kind is not None:
    records = [r for r in records if r.get("kind") == kind]
  if kind == "epoch":
    by_epoch = {r["epoch"]: r for r in records}
    records = [by_epoch[e] for e in sorted(by_epoch)]
  return records


def seconds_per_epoch(epoch_records: Sequence[dict[str, Any]]) -> float:
  """Median training seconds per epoch, leaving out the first epoch (it includes compilation).

  Evaluation, the λ_max estimate and checkpointing are not included (``epoch_seconds`` of
  :func:`experiments.train.train` measures the training steps only).
  """
  times = [r["epoch_seconds"] for r in epoch_records if "epoch_seconds" in r]
  if len(times) > 1:
    times = times[1:]
  if not times:
    return math.nan
  times = sorted(times)
  mid = len(times) // 2
  return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
  """Mean, sample standard deviation (``ddof=1``; 0 for one value) and count, skipping NaN."""
  xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
  if not xs:
    return math.nan, math.nan, 0
  mean = sum(xs) / len(xs)
  if len(xs) == 1:
    return mean, 0.0, 1
  var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
  return mean, math.sqrt(var), len(xs)


def pyplot():
  """``matplotlib.pyplot`` on the non-interactive Agg backend (works without a display)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
  """Writes dict rows to CSV; the columns are the union of the rows' scalar keys, in order.

  List-valued fields are left out (they are in the JSONL files).
  """
  import csv

  columns: list[str] = []
  for row in rows:
    for key, value in row.items():
      if key not in columns and not isinstance(value, list | tuple | dict):
        columns.append(key)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row.get(k) for k in columns})


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
  """Writes one JSON object per line."""
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def config_summary(config: TrainConfig, fields: Sequence[str]) -> str:
  """``"name=value, ..."`` for the given fields of a config (for figure captions and logs)."""
  values = dataclasses.asdict(config)
  return ", ".join(f"{name}={values[name]}" for name in fields)


def default_cache_dir() -> str:
  """``$JAX_COMPILATION_CACHE_DIR`` when set (the Makefile and the tests set it), else
  ``runs/jax_cache``."""
  import os

  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or "runs/jax_cache"


def enable_compilation_cache(path: str | Path | None) -> None:
  """Turns on JAX's persistent compilation cache in ``path`` (``None``/``""``: no change).

  Each run of a sweep builds a new model object, so the programs that take it as a static
  argument (model init, evaluation, the λ_max HVP) are traced again; the persistent cache,
  keyed by the compiled program's text, skips their XLA compilation after the first run
  (about half a minute per run on a loaded 2-core CPU). Training steps still compile once per
  setting, because the hyperparameters are constants of the program.
  """
  if not path:
    return
  import jax

  Path(path).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def add_run_args(parser: argparse.ArgumentParser) -> None:
  """The arguments every analysis script shares: ``--config``, ``--jax_cache`` and ``--set``."""
  parser.add_argument("--config", default="experiments/configs/digits_simple_cnn.py")
  parser.add_argument(
    "--jax_cache",
    default=default_cache_dir(),
    help="persistent JAX compilation cache directory ('' leaves JAX's setting alone)",
  )
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
