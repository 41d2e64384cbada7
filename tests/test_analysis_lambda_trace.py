"""experiments.analysis.lambda_trace: per-epoch λ_max runs, table and figure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.analysis import common, lambda_trace

CONFIG = "experiments/configs/digits_simple_cnn.py"


def _rows():
  rows = []
  for opt, seeds in (("sgd", {0: [4.0, 6.0], 1: [2.0, 8.0]}), ("xsam", {0: [3.0, 1.0]})):
    for seed, lams in seeds.items():
      for epoch, lam in enumerate(lams, start=1):
        rows.append(
          {
            "optimizer": opt,
            "seed": seed,
            "epoch": epoch,
            "lambda_max": lam,
            "test_accuracy": 0.5 + 0.1 * epoch,
            "train_loss": 1.0 / epoch,
            "cached_eigval": lam / 2 if opt == "xsam" else float("nan"),
            "epoch_seconds": 3.0 if epoch == 1 else 1.0,
          }
        )
  return rows


def test_final_table_and_curves_from_rows(tmp_path):
  rows = _rows()
  epochs, mean, lo, hi = lambda_trace._curve(rows, "sgd", "lambda_max")
  np.testing.assert_array_equal(epochs, [1, 2])
  np.testing.assert_allclose(mean, [3.0, 7.0])
  np.testing.assert_allclose(lo, [2.0, 6.0])
  np.testing.assert_allclose(hi, [4.0, 8.0])
  table = lambda_trace.final_table(rows)
  # sgd final lambda: 6 and 8 -> 7 ± 1.41; mean of the last (two) epochs: 5 and 5 -> 5 ± 0.
  assert "| sgd | 2 | 7 ± 1.4 | 5 ± 0 | 70.0 ± 0.0 | 1.00 |" in table
  assert "| xsam | 1 | 1 ± 0 | 2 ± 0 |" in table
  lambda_trace.plot(rows, tmp_path / "trace.png")
  assert (tmp_path / "trace.png").stat().st_size > 10_000


@pytest.mark.slow
def test_cli_logs_lambda_max_every_epoch_and_plots(tmp_path):
  root, out = tmp_path / "runs", tmp_path / "trace.png"
  argv = [
    "--config",
    CONFIG,
    "--optimizers",
    "sgd",
    "--seeds",
    "0",
    "--root",
    str(root),
    "--out",
    str(out),
  ]
  for item in ("epochs=2", "batch_size=128", "lambda_max_examples=32", "lambda_max_iters=3"):
    argv += ["--set", item]
  assert lambda_trace.main(argv) == 0
  workdir = root / "sgd" / "seed0"
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["lambda_max_every"] == 1 and saved["epochs"] == 2
  epochs = common.read_metrics(workdir, "epoch")
  assert [r["epoch"] for r in epochs] == [1, 2]
  assert all(np.isfinite(r["lambda_max"]) for r in epochs)
  summary = json.loads((workdir / "summary.json").read_text())
  assert epochs[-1]["lambda_max"] == summary["final_lambda_max"]
  lines = out.with_suffix(".csv").read_text().splitlines()
  assert lines[0].startswith("optimizer,seed,epoch,lambda_max") and len(lines) == 3
  assert float(lines[-1].split(",")[3]) == summary["final_lambda_max"]
  assert out.stat().st_size > 10_000 and "| sgd | 1 |" in out.with_suffix(".md").read_text()
