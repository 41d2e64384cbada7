"""Tests for experiments.analysis.warmup: the saddle count per (method, ρ, warm-up)."""

from __future__ import annotations

import pytest

from experiments.analysis import warmup


def _row(seed, stuck, on_saddle, acc, warm=0.0):
  return {
    "method": "sam",
    "rho": 0.1,
    "rho_warmup_epochs": warm,
    "seed": seed,
    "epochs_run": 10,
    "stuck_at_end": stuck,
    "epochs_on_saddle": on_saddle,
    "test_accuracy": acc,
    "train_loss": 2.3,
  }


def test_the_table_counts_the_runs_left_on_the_saddle_per_setting():
  rows = [_row(1, True, 9, 0.10), _row(0, False, 4, 0.58), _row(0, False, 0, 0.95, warm=3.0)]
  lines = warmup.table(rows).splitlines()
  assert lines[2] == "| sam | 0.1 | 0 | 1/2 | 4 9 | 58.0 10.0 | 34.0 |"  # seeds in order
  assert lines[3] == "| sam | 0.1 | 3 | 0/1 | 0 | 95.0 | 95.0 |"


def test_a_negative_epoch_count_is_refused_by_name(capsys):
  with pytest.raises(SystemExit):
    warmup.parse_args(["--epochs_run", "-1"])
  assert "--epochs_run must be >= 0" in capsys.readouterr().err


def test_runs_stop_after_epochs_run_and_resume_to_a_longer_count(tmp_path):
  argv = ["--root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--methods", "sam"]
  argv += ["--rhos", "0.1", "--warmups", "0", "--seeds", "0", "--jax_cache", ""]
  for extra in ("train_examples=128", "batch_size=64", "epochs=3", "lambda_max_examples=16"):
    argv += ["--set", extra]
  assert warmup.main([*argv, "--epochs_run", "1"]) == 0
  assert "| sam | 0.1 | 0 | 0/1 | 0 |" in (tmp_path / "out.md").read_text()  # epoch 1: never
  assert warmup.main([*argv, "--epochs_run", "2"]) == 0  # resumes from epoch 1's checkpoint
  metrics = (tmp_path / "runs/sam/rho0.1_warmup0.0/seed0/metrics.jsonl").read_text()
  assert metrics.count('"kind": "epoch"') == 2 and '"kind": "resume"' in metrics
  assert not (tmp_path / "runs/sam/rho0.1_warmup0.0/seed0/summary.json").exists()
