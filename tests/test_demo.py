"""Tests for experiments.demo: the table, the curves reader, and a tiny end-to-end demo."""

from __future__ import annotations

import json

import pytest

from experiments import demo


def test_read_epochs_keeps_the_last_record_of_each_epoch(tmp_path):
  records = [
    {"kind": "epoch", "epoch": 1, "train_loss": 2.0},
    {"kind": "step", "step": 3},
    {"kind": "epoch", "epoch": 2, "train_loss": 1.5},
    {"kind": "resume", "epoch": 1},
    {"kind": "epoch", "epoch": 2, "train_loss": 1.4, "lambda_max": 3.0},
  ]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
  out = demo.read_epochs(tmp_path)
  assert [r["epoch"] for r in out] == [1, 2]
  assert out[1]["train_loss"] == 1.4 and out[1]["lambda_max"] == 3.0


def test_format_table_shows_best_and_final_accuracy_memorisation_lambda_and_time():
  table = demo.format_table(
    [
      {
        "optimizer": "sgd",
        "best_test_accuracy": 0.92,
        "best_epoch": 6,
        "test_accuracy": 0.71,
        "train_accuracy": 1.0,
        "final_lambda_max": 4.36,
        "train_seconds_this_run": 12.5,
      }
    ]
  )
  row = table.splitlines()[2]
  assert "sgd" in row and "92.00% (ep 6)" in row and "71.00%" in row and "100.00%" in row
  assert "4.360" in row and "12.5s" in row


def test_demo_runs_in_the_memorising_regime_before_the_users_overrides():
  # No augmentation and batch 128: SGD memorises the 40% wrong labels within 30 epochs.
  assert "augment=false" in demo.DEMO_OVERRIDES and "batch_size=128" in demo.DEMO_OVERRIDES
  config = demo.load_config(f"{demo.CONFIG}:sam", [*demo.DEMO_OVERRIDES, "batch_size=64"])
  assert config.label_noise == 0.4 and not config.augment and config.batch_size == 64
  assert config.rho_warmup_epochs > 0


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_table_and_png(tmp_path, capsys):
  code = demo.main(
    [
      "--root",
      str(tmp_path),
      "--optimizers",
      "sgd,xsam",
      "--set",
      "epochs=1",
      "--set",
      "batch_size=256",
      "--set",
      "progress=false",
      "--set",
      "lambda_max_iters=3",
      "--set",
      "lambda_max_examples=32",
    ]
  )
  assert code == 0
  out = capsys.readouterr().out
  assert "sgd" in out and "xsam" in out and "train acc (noisy)" in out
  assert (tmp_path / "demo.png").stat().st_size > 10_000
  assert (tmp_path / "table.txt").exists()
