"""Tests for experiments.analysis.study: the protocol's run lists, statistics and a tiny study."""

from __future__ import annotations

import math

import pytest

from experiments.analysis import study


def args(*extra: str):
  return study.parse_args(list(extra))


def test_t_interval_matches_the_t_table_for_five_seeds():
  mean, half, n = study.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  # t_{0.975, 4} = 2.776; sample std sqrt(2.5).
  assert (mean, n) == (3.0, 5)
  assert half == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), rel=1e-4)
  assert math.isnan(study.t_interval([0.7])[1])


def test_paired_difference_uses_only_the_common_seeds_and_counts_wins():
  p = study.paired({0: 0.9, 1: 0.8, 2: 0.7, 3: 0.5}, {0: 0.8, 1: 0.8, 2: 0.6})
  assert p["n"] == 3 and (p["wins"], p["ties"], p["losses"]) == (2, 1, 0)
  assert p["mean"] == pytest.approx(0.2 / 3)
  assert study.verdict({"n": 5, "mean": 0.02, "half": 0.01}) == "win"
  assert study.verdict({"n": 5, "mean": -0.02, "half": 0.01}) == "loss"
  assert study.verdict({"n": 5, "mean": 0.02, "half": 0.03}) == "tie"


def test_tuning_runs_hold_out_a_validation_split_and_test_runs_do_not():
  a = args("--regimes", "noise40,noise20")
  tuning = study.tune_runs(a)
  assert tuning and all("validation_fraction=0.2" in r.overrides for r in tuning)
  assert {r.regime for r in tuning} == {"noise40"}  # noise20 reuses the 40% choice
  assert {r.method for r in tuning} == {"sam", "eigen_sam", "xsam"}
  assert len([r for r in tuning if r.method == "xsam"]) == 3 * 2 * 2  # rho x alpha x seeds
  # One rho grid for every method: a difference between methods is not one between grids.
  rhos = {m: {r.setting[0] for r in tuning if r.method == m} for m in ("sam", "eigen_sam", "xsam")}
  assert rhos["sam"] == rhos["eigen_sam"] == rhos["xsam"] == {"rho=0.05", "rho=0.1", "rho=0.2"}
  choice = {("noise40", "sam"): ("rho=0.1",), ("noise40", "xsam"): ("rho=0.05", "alpha=0.5")}
  runs = study.test_and_compute_runs(a, choice, xsam_cost=3.0)
  assert not any("validation_fraction" in o for r in runs for o in r.overrides)
  sam20 = [r for r in runs if (r.stage, r.regime, r.method) == ("test", "noise20", "sam")]
  assert len(sam20) == 5 and all("rho=0.1" in r.overrides for r in sam20)
  # Same seed, same label-noise draw: paired runs differ only in the method's own settings.
  x, s = (
    next(r for r in runs if (r.stage, r.regime, r.method, r.seed) == ("test", "noise40", m, 3))
    for m in ("xsam", "sam")
  )
  assert "seed=3" in x.overrides and "seed=3" in s.overrides and "label_noise=0.4" in s.overrides


def test_a_regime_run_alone_still_takes_the_choice_of_the_regime_it_borrows_from(tmp_path):
  # `--regimes noise60` alone once trained SAM and Eigen-SAM at their config defaults, silently.
  a = args("--regimes", "noise60")
  assert a.tune_regimes == ["noise40"]  # its tuning runs are read from disk if they exist
  assert {r.regime for r in study.tune_runs(a)} == {"noise40"}
  assert study.tuned_source("noise60", a) == "noise40"
  assert args("--regimes", "small").tune_regimes == ["small"]  # tuned itself, borrows nothing
  with pytest.raises(ValueError, match="--tune_from 'noise20' must be one of --tune_regimes"):
    args("--regimes", "noise60", "--tune_from", "noise20")
  # Without a finished tuning of the borrowed regime, the test stage refuses to start.
  argv = ["--root", str(tmp_path), "--out", str(tmp_path / "out"), "--regimes", "noise60"]
  argv += ["--methods", "sgd,sam", "--rhos", "0.05", "--tune_seeds", "", "--seeds", "0"]
  with pytest.raises(ValueError, match="no validation choice for sam in regime 'noise40'"):
    study.main(argv)
  assert not (tmp_path / "test").exists()


def test_equal_compute_runs_get_xsams_gradient_budget_in_epochs():
  a = args("--regimes", "noise40", "--epochs", "30")
  runs = study.test_and_compute_runs(a, {}, xsam_cost=3.0)
  compute = {r.method: r for r in runs if r.stage == "compute" and r.seed == 0}
  assert "epochs=90" in compute["sgd"].overrides and "epochs=45" in compute["sam"].overrides
  config = study.common.make_config("experiments/configs/digits_simple_cnn.py", "xsam")
  assert study.xsam_grads_per_step(config) == 2 + config.power_iters / config.refresh_every


def test_choice_is_the_best_mean_validation_accuracy_with_ties_to_the_earlier_setting():
  a = args("--regimes", "noise40", "--methods", "sam", "--rhos", "0.05,0.1,0.2")
  tuning = study.tune_runs(a)
  acc = {"rho=0.05": [0.5, 0.6], "rho=0.1": [0.6, 0.5], "rho=0.2": [0.7, 0.3]}
  rows = [
    {
      "regime": r.regime,
      "method": r.method,
      "setting": " ".join(r.setting),
      "accuracy": acc[" ".join(r.setting)][r.seed],
    }
    for r in tuning
  ]
  assert study.choose(rows, tuning) == {("noise40", "sam"): ("rho=0.05",)}


@pytest.mark.slow
def test_a_tiny_study_tunes_tests_and_writes_its_tables_and_figures(tmp_path):
  out = tmp_path / "out"
  argv = [
    "--root",
    str(tmp_path / "runs"),
    "--out",
    str(out),
    "--regimes",
    "small",
    "--methods",
    "sgd,sam",
    "--seeds",
    "0,1",
    "--tune_seeds",
    "0",
    "--rhos",
    "0.05",
    "--small_examples",
    "160",
    "--small_epochs",
    "1",
    "--compute_regimes",
    "small",
    "--set",
    "lambda_max_iters=2",
    "--set",
    "lambda_max_examples=16",
    "--set",
    "batch_size=64",
    "--workers",
    "1",
  ]
  assert study.main(argv) == 0
  text = (tmp_path / "out.md").read_text()
  assert "| small | sam | rho=0.05 |" in text  # the tuning table marks the choice
  assert "sam − sgd" in text and "equal compute" in text and "without SGD" in text
  assert (tmp_path / "out_acc.png").stat().st_size > 5_000
  assert (tmp_path / "out_lambda.png").exists() and (tmp_path / "out.csv").exists()
  runs = sorted(
    p.parent.relative_to(tmp_path / "runs").as_posix()
    for p in (tmp_path / "runs").rglob("summary.json")
  )
  assert runs == [
    "compute/small/sam/rho0.05/seed0",
    "compute/small/sam/rho0.05/seed1",
    "compute/small/sgd/default/seed0",
    "compute/small/sgd/default/seed1",
    "test/small/sam/rho0.05/seed0",
    "test/small/sam/rho0.05/seed1",
    "test/small/sgd/default/seed0",
    "test/small/sgd/default/seed1",
    "tune/small/sam/rho0.05/seed0",
  ]
  # Resuming reads every run instead of training again.
  (tmp_path / "out.md").unlink()
  assert study.main([*argv, "--report_only"]) == 0
  assert (tmp_path / "out.md").read_text() == text


def test_a_run_that_fails_in_a_worker_process_stops_the_study_with_its_error(tmp_path):
  a = args("--root", str(tmp_path), "--workers", "2", "--jax_cache", "")
  bad = ("label_noise=0.0", "epochs=1", "train_examples=160", "rho=-0.1")
  runs = [study.Run("test", "small", "sam", ("rho=-0.1",), s, (*bad, f"seed={s}")) for s in (0, 1)]
  with pytest.raises(ValueError, match="rho"):
    study.run_all(runs, a, log=lambda _: None)
  assert not list(tmp_path.rglob("summary.json"))


def test_a_worker_count_below_one_is_refused_by_name(capsys):
  with pytest.raises(SystemExit):
    args("--workers", "0")
  assert "--workers must be >= 1" in capsys.readouterr().err
