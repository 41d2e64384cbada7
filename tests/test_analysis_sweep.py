"""experiments.analysis.sweep: settings, run names, aggregation, and a tiny resumable sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments.analysis import common, sweep

CONFIG = "experiments/configs/digits_simple_cnn.py"
TINY = [
  "epochs=1",
  "batch_size=128",
  "lambda_max_examples=32",
  "lambda_max_iters=3",
  "lambda_max_every=0",
  "log_every=100",
]


def _settings(groups):
  return sweep.build_settings(groups, rhos=[0.05, 0.1], alphas=[0.0, 0.2], ps=[1, 5], qs=[5])


def test_settings_reached_twice_share_one_run_directory():
  settings = _settings(["sgd", "sam_rho", "xsam_alpha", "xsam_pq"])
  names = {s.label: sweep.run_name(CONFIG, s, []) for s in settings}
  # The digits config's SAM has rho 0.05 and its X-SAM alpha 0.2, p 5, q 5.
  assert names["SGD"] == "sgd"
  assert names["SAM ρ=0.05"] == "sam"
  assert names["SAM ρ=0.1"] == "sam__rho=0.1"
  assert names["X-SAM α=0.0"] == "xsam__alpha=0.0"
  assert names["X-SAM α=0.2"] == names["X-SAM p=5 q=5"] == "xsam"
  assert names["X-SAM p=1 q=5"] == "xsam__refresh_every=1"
  # A global override moves the reference: with rho=0.1 everywhere, SAM rho=0.1 is the base.
  sam_01 = next(s for s in settings if s.label == "SAM ρ=0.1")
  assert sweep.run_name(CONFIG, sam_01, ["rho=0.1"]) == "sam"
  with pytest.raises(ValueError, match="unknown sweep group"):
    _settings(["adam_lr"])


def test_dry_run_lists_each_run_once(tmp_path, capsys):
  code = sweep.main(
    [
      "--groups",
      "xsam_alpha,xsam_pq",
      "--alphas",
      "0.2",
      "--ps",
      "5",
      "--qs",
      "5",
      "--seeds",
      "0,1",
      "--root",
      str(tmp_path),
      "--dry_run",
    ]
  )
  assert code == 0
  out = capsys.readouterr().out
  assert "2 distinct runs" in out and str(tmp_path / "xsam" / "seed1") in out
  assert not list(tmp_path.iterdir())  # nothing was run


def _rows():
  rows = []
  for group, label, x, accs, lams in (
    ("sgd", "SGD", None, [0.80, 0.82], [10.0, 12.0]),
    ("sam_rho", "SAM ρ=0.05", 0.05, [0.85, 0.87], [5.0, 7.0]),
    ("sam_rho", "SAM ρ=0.1", 0.1, [0.90, 0.86], [4.0, 4.0]),
    ("xsam_alpha", "X-SAM α=0.2", 0.2, [0.91, 0.89], [3.0, 5.0]),
    ("xsam_pq", "X-SAM p=5 q=5", 5, [0.91, 0.89], [3.0, 5.0]),
  ):
    for seed, (acc, lam) in enumerate(zip(accs, lams, strict=True)):
      rows.append(
        {
          "group": group,
          "setting": label,
          "optimizer": "x",
          "run": label,
          "x": x,
          "series": "q=5" if group == "xsam_pq" else "",
          "seed": seed,
          "test_accuracy": acc,
          "final_lambda_max": lam,
          "final_train_loss": 1.0,
          "seconds_per_epoch": 2.0,
        }
      )
  return rows


def test_aggregate_table_and_figure_from_rows(tmp_path):
  aggs = sweep.aggregate(_rows())
  sam = next(a for a in aggs if a["setting"] == "SAM ρ=0.1")
  assert sam["n"] == 2
  np.testing.assert_allclose(sam["test_accuracy"], 0.88)
  np.testing.assert_allclose(sam["test_accuracy_std"], np.std([0.90, 0.86], ddof=1))
  assert sweep.best(aggs, "sam_rho")["setting"] == "SAM ρ=0.1"
  table = sweep.markdown_table(aggs)
  assert "| sam_rho | SAM ρ=0.1 **(best)** | 2 | 88.00 ± 2.83 | 4 ± 0 |" in table
  assert "Best SAM: SAM ρ=0.1 (88.00%, λ_max 4)." in table
  assert "X-SAM α=0.2: +2.00 points of accuracy and 1.00x the λ_max" in table
  sweep.plot(aggs, tmp_path / "sweep.png")
  assert (tmp_path / "sweep.png").stat().st_size > 10_000


@pytest.mark.slow
def test_tiny_sweep_runs_reads_back_and_resumes(tmp_path):
  root, out = tmp_path / "runs", tmp_path / "fig" / "sweep.png"
  argv = [
    "--config",
    CONFIG,
    "--groups",
    "sgd",
    "--seeds",
    "0",
    "--root",
    str(root),
    "--out",
    str(out),
  ]
  for item in TINY:
    argv += ["--set", item]
  assert sweep.main(argv) == 0
  assert sorted(p.name for p in root.iterdir()) == ["sgd"]
  assert (root / "sgd" / "seed0" / "summary.json").exists()
  table = out.with_suffix(".md").read_text()
  summary = json.loads((root / "sgd" / "seed0" / "summary.json").read_text())
  assert f"| sgd | SGD | 1 | {100 * summary['test_accuracy']:.2f} ± 0.00 |" in table
  csv_rows = out.with_suffix(".csv").read_text().splitlines()
  assert len(csv_rows) == 2 and out.stat().st_size > 10_000
  # Resume: nothing is rerun (metrics files untouched), and the outputs are the same.
  before = {p: p.stat().st_mtime_ns for p in root.rglob("metrics.jsonl")}
  assert sweep.main(argv) == 0
  assert before == {p: p.stat().st_mtime_ns for p in root.rglob("metrics.jsonl")}
  assert out.with_suffix(".md").read_text() == table
  # A finished run of another config in the same place is refused, not overwritten.
  with pytest.raises(ValueError, match="another config"):
    common.run_or_load(
      common.make_config(CONFIG, "sgd", [*TINY, "lr=0.5"]), root / "sgd" / "seed0", log=None
    )
  assert not math.isnan(
    common.seconds_per_epoch(common.read_metrics(root / "sgd" / "seed0", "epoch"))
  )
  assert Path(root / "sgd" / "seed0" / "config.json").exists()


def test_finished_run_saved_before_a_config_field_existed_is_loaded_not_refused(tmp_path):
  # The same rule as a resumed run (RunDir): a field missing from config.json is its default.
  config = common.make_config(CONFIG, "sgd", TINY)
  saved = json.loads(config.to_json())
  del saved["refresh_once_per_epoch"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  (tmp_path / "summary.json").write_text(json.dumps({"test_accuracy": 0.5}))
  assert common.config_differences(config, saved) == []
  assert common.run_or_load(config, tmp_path, log=None) == {"test_accuracy": 0.5}
  assert common.held_out_accuracy({"test_accuracy": 0.5}) == 0.5
  split = {"eval_split": "validation", "validation_accuracy": 0.7}
  assert common.held_out_accuracy(split) == 0.7
