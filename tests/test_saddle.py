"""Tests for experiments.saddle: the initial-saddle rule, its remedy, and its report by train."""

from __future__ import annotations

import json
import math

import pytest

from experiments import saddle
from experiments import train as train_lib
from experiments.configs.base import load_config

LN10 = math.log(10)
# Measured (experiments/RESULTS.md, "The initial saddle"): digits config, SAM, rho=0.1, no
# warm-up, seed 1; (epoch, mean training loss, training accuracy) of epochs 1-5 and 26-30. Test
# accuracy 10.0% at every epoch.
STUCK = [
  (1, 2.31249, 0.1058),
  (2, 2.30415, 0.1143),
  (3, 2.30392, 0.1001),
  (4, 2.30276, 0.1030),
  (5, 2.30466, 0.1065),
  (26, 2.29964, 0.1158),
  (27, 2.29980, 0.1151),
  (28, 2.29978, 0.1129),
  (29, 2.30011, 0.1115),
  (30, 2.29993, 0.1136),
]


def test_a_run_measured_on_the_saddle_is_flagged_from_its_third_epoch_to_its_last():
  flags = [saddle.at_initial_saddle(e, loss, acc, 10) for e, loss, acc in STUCK]
  assert flags == [False, False] + [True] * (len(STUCK) - 2)
  # Its loss drifts below ln 10 by more than 1e-3 relative (the bias learns the class
  # frequencies), so a tighter tolerance would lose it at the end of the run.
  assert (LN10 - STUCK[-1][1]) / LN10 > 1e-3


def test_learning_runs_are_not_flagged_even_under_heavy_label_noise_or_on_a_small_set():
  learning = [(2, 1.85, 0.42), (3, 1.60, 0.51), (10, 1.20, 0.64)]  # 40% noise, seed 0 like
  assert not any(saddle.at_initial_saddle(e, loss, acc, 10) for e, loss, acc in learning)
  # 80% symmetric noise (a wrong label drawn from the 9 others): a perfect clean classifier's
  # loss is the noisy labels' entropy, -0.2 ln 0.2 - 0.8 ln (0.8 / 9) = 2.258 (1.9% below
  # ln 10), at accuracy 0.2.
  noisy = -0.2 * math.log(0.2) - 0.8 * math.log(0.8 / 9)
  assert noisy == pytest.approx(2.258, abs=1e-3)
  assert not saddle.at_initial_saddle(5, noisy, 0.20, 10)
  # A healthy run at the default rho = 0.05 (measured: still at ln C after epoch 2, gone after
  # epoch 3) gets no warning.
  assert not saddle.at_initial_saddle(2, 2.2982, 0.11, 10)
  # Loss at ln C but accuracy well above chance is not the constant predictor.
  assert not saddle.at_initial_saddle(5, LN10, 0.30, 10)
  # The rule's edges: loss 1% off ln C, accuracy 1/C + 0.05.
  assert saddle.at_initial_saddle(5, LN10 * 0.991, 0.149, 10)
  assert not saddle.at_initial_saddle(5, LN10 * 0.989, 0.149, 10)
  assert not saddle.at_initial_saddle(5, LN10, 0.151, 10)
  assert saddle.at_initial_saddle(3, math.log(100), 0.01, 100)


def test_a_diverged_loss_and_the_first_epoch_are_not_a_saddle_and_one_class_is_refused():
  assert not saddle.at_initial_saddle(5, math.nan, 0.1, 10)
  assert not saddle.at_initial_saddle(5, math.inf, 0.1, 10)
  assert not saddle.at_initial_saddle(1, LN10, 0.1, 10)
  assert not saddle.at_initial_saddle(2, LN10, 0.1, 10)
  with pytest.raises(ValueError, match="`num_classes` must be >= 2"):
    saddle.at_initial_saddle(5, 0.0, 1.0, 1)


def test_the_remedy_names_the_warm_up_override_for_the_sam_family_only():
  assert "--set rho_warmup_epochs=3" in saddle.remedy("xsam", 30, 0.0)
  assert "--set rho_warmup_epochs=1" in saddle.remedy("sam", 2, 0.0)
  assert "--set rho_warmup_epochs=6" in saddle.remedy("eigen_sam_adamw", 30, 3.0)  # longer
  assert "rho_warmup_epochs" not in saddle.remedy("sgd", 30, 0.0)
  assert "learning rate" in saddle.remedy("adamw", 30, 0.0)


def test_a_run_held_on_the_saddle_says_so_in_its_metrics_summary_and_on_stderr(tmp_path, capsys):
  # lr = 0 holds the net where it starts; the PyTorch-default init starts it on the saddle
  # (loss 2.304, logits ~100x too small: RESULTS.md, "The start"). So a cheap run that is
  # certainly stuck.
  config = load_config(
    "experiments/configs/digits_simple_cnn.py:sam",
    [
      "model=simple_cnn_torch_init",
      "lr=0.0",
      "epochs=3",
      "train_examples=128",
      "batch_size=64",
      "lambda_max_examples=16",
      "lambda_max_iters=2",
      "progress=false",
      "tensorboard=false",
    ],
  )
  summary, _ = train_lib.train(config, tmp_path)
  epochs = [
    json.loads(line)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    if '"kind": "epoch"' in line
  ]
  assert [r["stuck_at_initial_saddle"] for r in epochs] == [False, False, True]
  assert abs(epochs[2]["train_loss"] - LN10) < 1e-2 * LN10
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["stuck_at_initial_saddle"] is True and summary["stuck_at_initial_saddle"]
  assert "--set rho_warmup_epochs=1" in on_disk["initial_saddle_remedy"]
  err = capsys.readouterr().err
  assert err.count("still on the initial saddle") == 1  # once per run, not once per epoch
  assert "epoch 3:" in err and "rho_warmup_epochs=1" in err
