"""Tests for experiments.analysis.study: the protocol's run lists, statistics and a tiny study."""

from __future__ import annotations

import json
import math

import numpy as np
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
  assert study.t_interval([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.0, 3), abs=1e-12)  # not NaN


def test_paired_difference_uses_only_the_common_seeds_and_counts_wins():
  p = study.paired({0: 0.9, 1: 0.8, 2: 0.7, 3: 0.5}, {0: 0.8, 1: 0.8, 2: 0.6})
  assert p["n"] == 3 and (p["wins"], p["ties"], p["losses"]) == (2, 1, 0)
  assert p["mean"] == pytest.approx(0.2 / 3)
  # The paired t test on the common seeds: differences 0.1, 0, 0.1 (mean 1/15, sd 1/sqrt(300)).
  t = (0.2 / 3) / (math.sqrt(1 / 300) / math.sqrt(3))
  assert t == pytest.approx(2.0)
  assert p["p"] == pytest.approx(1 - 2.0 / math.sqrt(2.0**2 + 2))  # closed form for 2 dof
  assert study.paired({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})["p"] == 1.0  # identical: no difference


def test_the_verdict_follows_the_holm_adjusted_p_not_the_raw_one():
  assert study.verdict({"n": 5, "mean": 0.02, "p": 0.001, "p_holm": 0.008}) == "win"
  assert study.verdict({"n": 5, "mean": -0.02, "p": 0.001, "p_holm": 0.008}) == "loss"
  # The old report's one "loss": raw p 0.021 is below 0.05, its Holm p over 8 is not.
  assert study.verdict({"n": 5, "mean": -0.025, "p": 0.021, "p_holm": 0.17}) == "n.s."
  assert study.verdict({"n": 1, "mean": 0.02, "p": math.nan, "p_holm": math.nan}) == "n/a"


def test_holm_adjustment_matches_a_hand_computation():
  # Sorted: 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1), each a running maximum, capped at 1.
  assert study.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
  assert study.holm([0.5, 0.3]) == pytest.approx([0.6, 0.6])
  assert study.holm([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])
  adjusted = study.holm([0.02, math.nan, 0.04])  # a NaN is neither adjusted nor counted
  assert adjusted[0] == pytest.approx(0.04) and adjusted[2] == pytest.approx(0.04)
  assert math.isnan(adjusted[1])
  assert study.holm([]) == []


def test_lambda_max_is_summarised_by_median_and_range_not_by_a_mean():
  # The small regime's SAM values had one run at 4.7: mean ± CI 1.00 ± 2.60 described no run.
  median, low, high, n = study.median_range([0.05, 4.7, 0.02, 0.13, 0.09])
  assert (median, low, high, n) == (0.09, 0.02, 4.7, 5)
  assert study.median_range([1.0, math.nan, 3.0])[:3] == (2.0, 1.0, 3.0)
  assert math.isnan(study.median_range([])[0])


def _rows(stage, regime, method, accuracies, lam=1.0):
  return [
    {
      "stage": stage,
      "regime": regime,
      "method": method,
      "setting": "",
      "seed": seed,
      "accuracy": acc,
      "final_lambda_max": lam + seed,
      "train_accuracy": 1.0,
      "train_loss": 0.1,
      "epochs": 30,
      "wall_seconds": 1.0,
      "seconds_per_epoch": 1.0,
      "lambda_curve": [[30, lam + seed]],
    }
    for seed, acc in enumerate(accuracies)
  ]


def test_comparisons_adjust_within_each_family_and_give_equal_compute_no_verdict():
  rows = [
    *_rows("test", "noise40", "sgd", [0.70, 0.71, 0.72, 0.69, 0.70]),
    *_rows("test", "noise40", "sam", [0.90, 0.91, 0.93, 0.92, 0.90]),
    *_rows("test", "noise40", "eigen_sam", [0.90, 0.91, 0.92, 0.92, 0.91]),
    *_rows("test", "noise40", "xsam", [0.91, 0.90, 0.93, 0.93, 0.90]),
    *_rows("compute", "noise40", "sam", [0.77, 0.78, 0.76, 0.79, 0.77]),
  ]
  found = study.comparisons(rows, ["noise40"])
  xsam = [c for c in found if c["family"] == "X-SAM against SAM and Eigen-SAM"]
  assert [c["b"] for c in xsam] == ["sam", "eigen_sam"]
  assert [c["p_holm"] for c in xsam] == pytest.approx(study.holm([c["p"] for c in xsam]))
  (sam_sgd,) = [c for c in found if c["family"] == "SAM against SGD"]
  assert sam_sgd["p_holm"] == pytest.approx(sam_sgd["p"]) and sam_sgd["verdict"] == "win"
  (compute,) = [c for c in found if c["family"] is None]
  assert compute["b"] == "sam (equal compute)" and compute["verdict"] == "–"
  assert compute["mean"] == pytest.approx(np.mean([0.14, 0.12, 0.17, 0.14, 0.13]))


def test_cheaper_variants_are_compared_with_sam_and_sgd_in_their_own_holm_family():
  rows = [
    *_rows("test", "noise40", "sgd", [0.70, 0.71, 0.72, 0.69, 0.70]),
    *_rows("test", "noise40", "sam", [0.90, 0.91, 0.93, 0.92, 0.90]),
    *_rows("test", "noise40", "xsam", [0.91, 0.90, 0.93, 0.93, 0.90]),
    *_rows("test", "noise40", "looksam", [0.89, 0.92, 0.92, 0.91, 0.90]),
    *_rows("test", "noise40", "rst", [0.85, 0.86, 0.88, 0.86, 0.84]),
  ]
  found = study.comparisons(rows, ["noise40"])
  family = [c for c in found if c["family"] == "Cheaper SAM variants against SAM and SGD"]
  assert [(c["a"], c["b"]) for c in family] == [
    ("rst", "sam"),
    ("rst", "sgd"),
    ("looksam", "sam"),
    ("looksam", "sgd"),
  ]
  assert [c["p_holm"] for c in family] == pytest.approx(study.holm([c["p"] for c in family]))
  assert family[0]["mean"] == pytest.approx(np.mean([-0.05, -0.05, -0.05, -0.06, -0.06]))
  # The variants' family does not change the Holm p-values of the X-SAM family.
  xsam = [c for c in found if c["family"] == "X-SAM against SAM and Eigen-SAM"]
  assert [c["p_holm"] for c in xsam] == pytest.approx([c["p"] for c in xsam])


def test_the_saved_study_report_renders_again_from_its_json_with_holm_verdicts(tmp_path):
  # The committed study (150 runs) is re-rendered from its per-run numbers, training nothing.
  out = tmp_path / "study"
  assert (
    study.main(["--from_json", "experiments/figures/study_digits.json", "--out", str(out)]) == 0
  )
  text = (tmp_path / "study.md").read_text()
  # 60% noise, X-SAM - Eigen-SAM: paired p 0.021, x8 after Holm over X-SAM's 8 comparisons.
  assert "| noise60 | xsam − eigen_sam | -2.5 ± 1.9 | 5 | 0/0/5 | 0.021 | 0.170 | n.s. |" in text
  assert "| noise40 | sam − sgd | 22.9 ± 1.2 | 5 | 5/0/0 |" in text and "| win |" in text
  assert "| loss |" not in text  # no loss survives the adjustment
  # λ_max as median [range]: SAM's small-set outlier no longer makes a 1.00 ± 2.60.
  assert "1.00 ± 2.60" not in text
  assert "| small | sam | rho=0.05 | 90.9 ± 3.9 |" in text
  saved = json.loads((tmp_path / "study.json").read_text())
  assert len(saved["runs"]) == 90 and len(saved["tune"]) == 60
  assert {c["family"] for c in saved["comparisons"]} == {
    "X-SAM against SAM and Eigen-SAM",
    "SAM against SGD",
    None,
  }
  assert (tmp_path / "study_acc.png").exists() and (tmp_path / "study.csv").exists()


def test_a_validation_fraction_of_zero_is_refused_since_it_would_tune_on_the_test_set(capsys):
  for bad in ("0", "0.0", "1", "-0.1"):
    with pytest.raises(SystemExit):
      args("--validation_fraction", bad)
    err = capsys.readouterr().err
    assert "--validation_fraction must be in (0, 1)" in err and "test set" in err
  assert args("--validation_fraction", "0.1").validation_fraction == 0.1


def test_tuning_runs_hold_out_a_validation_split_and_test_runs_do_not():
  a = args("--regimes", "noise40,noise20")
  tuning = study.tune_runs(a)
  assert tuning and all("validation_fraction=0.2" in r.overrides for r in tuning)
  assert {r.regime for r in tuning} == {"noise40"}  # noise20 reuses the 40% choice
  assert {r.method for r in tuning} == {"sam", "eigen_sam", "xsam"}
  assert len([r for r in tuning if r.method == "xsam"]) == 5 * 2 * 2  # rho x alpha x seeds
  # One rho grid for every method: a difference between methods is not one between grids.
  rhos = {m: {r.setting[0] for r in tuning if r.method == m} for m in ("sam", "eigen_sam", "xsam")}
  grid = {"rho=0.05", "rho=0.1", "rho=0.2", "rho=0.3", "rho=0.5"}
  assert rhos["sam"] == rhos["eigen_sam"] == rhos["xsam"] == grid
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
  assert (tmp_path / "out_compute.png").exists()
  # The runs counted their gradient evaluations: SGD one per step, SAM two.
  assert "| small | sgd | 1.000 [1.000–1.000] | 1.000 | 2/2 |" in text
  assert "| small | sam | 2.000 [2.000–2.000] | 2.000 | 2/2 |" in text
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


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (issue 20, item 2) and the ρ grid's edge (item 4).


def test_the_default_rho_grid_extends_past_the_edge_that_validation_chose_on_digits():
  # The first study offered rho <= 0.2 and validation chose 0.2 for every method at 40% noise.
  a = args("--regimes", "noise40")
  assert a.rhos == [0.05, 0.1, 0.2, 0.3, 0.5]
  tuning = study.tune_runs(a)
  rhos = {m: {r.setting[0] for r in tuning if r.method == m} for m in ("sam", "eigen_sam", "xsam")}
  assert rhos["sam"] == rhos["eigen_sam"] == rhos["xsam"] >= {"rho=0.3", "rho=0.5"}


def test_the_fashion_mnist_study_tunes_both_regimes_on_a_subset_and_tests_on_the_whole_set():
  a = args("--dataset", "fashion_mnist")
  assert a.config == "experiments/configs/fashion_mnist_simple_cnn.py"
  assert a.regimes == ["clean", "noise40"] and a.tune_regimes == ["clean", "noise40"]
  assert (a.root, a.out) == ("runs/study_fashion", "experiments/figures/study_fashion")
  tuning = study.tune_runs(a)
  assert {r.regime for r in tuning} == {"clean", "noise40"}
  clean = next(r for r in tuning if r.regime == "clean")
  assert "label_noise=0.0" in clean.overrides and "validation_fraction=0.2" in clean.overrides
  assert f"train_examples={a.train_examples}" in clean.overrides and a.train_examples > 0
  runs = study.test_and_compute_runs(a, {}, xsam_cost=3.0)
  assert {r.stage for r in runs} == {"test"} and len(runs) == 2 * 4 * 5
  assert all(f"train_examples={a.train_examples}" in r.overrides for r in runs)
  noisy = next(r for r in runs if r.regime == "noise40")
  assert "label_noise=0.4" in noisy.overrides
  # Every flag still wins over the preset; a bad subset size is refused by name.
  assert args("--dataset", "fashion_mnist", "--train_examples", "0").train_examples == 0
  assert args("--dataset", "fashion_mnist", "--epochs", "3").epochs == 3
  with pytest.raises(SystemExit):
    args("--dataset", "fashion_mnist", "--train_examples", "-1")
  with pytest.raises(ValueError, match="unknown regime 'nois40'"):
    args("--dataset", "fashion_mnist", "--regimes", "nois40")


def test_the_digits_defaults_are_unchanged_by_the_dataset_presets():
  a = args()
  assert a.config == "experiments/configs/digits_simple_cnn.py" and a.epochs == 30
  assert a.regimes == list(study.REGIMES) and a.tune_seeds == [0, 1]
  assert a.compute_regimes == ["noise40"] and a.train_examples == 0
  assert a.study_overrides == list(study.STUDY_OVERRIDES)
  run = next(r for r in study.tune_runs(a) if r.regime == "noise40")
  assert not any(o.startswith("train_examples") for o in run.overrides)  # as the saved study


@pytest.mark.slow
def test_a_tiny_fashion_mnist_study_reads_idx_files_and_tests_on_every_test_image(tmp_path):
  from test_data import _write_fashion_mnist

  _write_fashion_mnist(tmp_path / "idx", num_train=120, num_test=40)
  out = tmp_path / "out"
  argv = ["--dataset", "fashion_mnist", "--root", str(tmp_path / "runs"), "--out", str(out)]
  argv += ["--methods", "sgd,sam", "--rhos", "0.05", "--seeds", "0,1", "--tune_seeds", "0"]
  argv += ["--epochs", "1", "--train_examples", "80", "--workers", "1"]
  argv += ["--set", f"data_dir={tmp_path / 'idx'}", "--set", "batch_size=16"]
  argv += ["--set", "lambda_max_examples=8", "--set", "lambda_max_iters=2"]
  assert study.main(argv) == 0
  text = (tmp_path / "out.md").read_text()
  assert "| clean | sam | rho=0.05 |" in text and "| noise40 | sam − sgd |" in text
  saved = json.loads((tmp_path / "out.json").read_text())
  assert len(saved["tune"]) == 2 and len(saved["runs"]) == 2 * 2 * 2
  config = json.loads((tmp_path / "runs/test/noise40/sam/rho0.05/seed1/config.json").read_text())
  assert config["dataset"] == "fashion_mnist" and config["train_examples"] == 80
  assert config["label_noise"] == 0.4 and config["validation_fraction"] == 0.0
  summary = json.loads((tmp_path / "runs/test/clean/sgd/default/seed0/summary.json").read_text())
  assert summary["eval_split"] == "test" and math.isfinite(summary["final_lambda_max"])


def test_tune_only_stops_after_the_tuning_stage_and_trains_no_test_run(tmp_path):
  # Extending the grid needs only the new tuning runs to see whether the choice moves.
  argv = ["--root", str(tmp_path), "--out", str(tmp_path / "out"), "--regimes", "noise40"]
  argv += ["--methods", "sgd,sam", "--rhos", "0.3", "--tune_seeds", "", "--tune_only"]
  assert study.main(argv) == 0  # without --tune_only: "no validation choice for sam"
  assert not (tmp_path / "test").exists() and (tmp_path / "out.md").exists()


def test_the_cheaper_variants_tune_the_shared_rho_grid_and_their_own_small_grid():
  a = args("--regimes", "noise40", "--methods", "sgd,sam_every,rst,ae_sam,looksam,esam,mesa,asam")
  tuning = study.tune_runs(a)
  settings = {m: {r.setting for r in tuning if r.method == m} for m in a.methods}
  rhos = [f"rho={r}" for r in study.RHOS]
  assert settings["sgd"] == set()
  assert settings["sam_every"] == {(r, "sam_every_k=5") for r in rhos}
  assert settings["rst"] == {(r, "sam_prob=0.5") for r in rhos}
  assert settings["ae_sam"] == settings["asam"] == {(r,) for r in rhos}
  assert settings["looksam"] == {(r, f"looksam_alpha={x}") for r in rhos for x in (0.5, 0.7)}
  assert settings["esam"] == {(r, "esam_beta=0.5", "esam_gamma=0.5") for r in rhos}
  # MESA has no rho: its EMA decay, the KL term from a tenth of the 30 epochs on.
  assert settings["mesa"] == {("mesa_decay=0.9",), ("mesa_decay=0.99",)}
  for run in tuning:
    assert ("mesa_start_epoch=3" in run.overrides) == (run.method == "mesa"), run
    assert any(o.startswith("rho_warmup_epochs=") for o in run.overrides) != (run.method == "mesa")
  config = study.common.make_config(a.config, "mesa", ["mesa_decay=0.9", "mesa_start_epoch=3"])
  assert (config.mesa_decay, config.mesa_start_epoch) == (0.9, 3)
  config = study.common.make_config(
    a.config, "esam", ["rho=0.1", "esam_beta=0.5", "esam_gamma=0.5"]
  )
  assert (config.rho, config.esam_beta, config.esam_gamma) == (0.1, 0.5, 0.5)
  # Each setting names real config fields: the runs' configs build, with the grid's values.
  config = study.common.make_config(a.config, "looksam", ["rho=0.1", "looksam_alpha=0.5"])
  assert (config.rho, config.looksam_alpha, config.looksam_k) == (0.1, 0.5, 5)
  b = args("--methods", "looksam", "--looksam_alphas", "0.3", "--rhos", "0.1")
  assert study.grid("looksam", b) == [("rho=0.1", "looksam_alpha=0.3")]


def test_an_unknown_method_or_a_bad_variant_grid_is_refused_by_flag(capsys):
  for bad in (["--methods", "sam,lookssam"], ["--compute_match", "esam2"]):
    with pytest.raises(SystemExit):
      args(*bad)
    assert "unknown method" in capsys.readouterr().err
  for flag, value in (
    ("--sam_every_ks", "0"),
    ("--sam_probs", "1.5"),
    ("--looksam_alphas", "-1"),
    ("--esam_betas", "0"),
    ("--esam_gammas", "1.5"),
    ("--mesa_decays", "1"),
  ):
    with pytest.raises(SystemExit):
      args(flag, value)
    assert flag in capsys.readouterr().err


def test_expected_gradient_evaluations_per_step_follow_each_rule():
  make = study.common.make_config
  path = "experiments/configs/digits_simple_cnn.py"
  assert study.grads_per_step(make(path, "sgd")) == 1.0
  assert study.grads_per_step(make(path, "sam")) == 2.0
  assert study.grads_per_step(make(path, "xsam", ["refresh_every=4", "power_iters=2"])) == 2.5
  assert study.grads_per_step(make(path, "xsam", ["tracker=random"])) == 2.0
  assert study.grads_per_step(make(path, "sam_every", ["sam_every_k=4"])) == 1.25
  assert study.grads_per_step(make(path, "looksam_adamw", ["looksam_k=2"])) == 1.5
  assert study.grads_per_step(make(path, "rst", ["sam_prob=0.3"])) == pytest.approx(1.3)
  assert study.grads_per_step(make(path, "esam")) == 2.0
  assert study.grads_per_step(make(path, "mesa")) == 1.0


def test_equal_compute_for_a_cheap_method_gives_sgd_its_budget_and_leaves_sam_out():
  a = args("--regimes", "noise40", "--epochs", "30", "--methods", "sgd,sam,looksam")
  runs = study.test_and_compute_runs(a, {}, xsam_cost=1.2)
  compute = {r.method: r for r in runs if r.stage == "compute" and r.seed == 0}
  assert set(compute) == {"sgd"} and "epochs=36" in compute["sgd"].overrides


def _counted(rows, per_step):
  return [{**r, "grads_per_step": per_step, "grad_evals": None} for r in rows]


def test_the_compute_table_and_figure_use_counted_evaluations_and_old_rows_the_expectation(
  tmp_path,
):
  a = args("--regimes", "noise40", "--methods", "sgd,sam,looksam", "--compute_match", "looksam")
  rows = [
    *_rows("test", "noise40", "sgd", [0.70, 0.71, 0.72]),  # saved before counting: expected 1
    *_counted(_rows("test", "noise40", "sam", [0.90, 0.91, 0.93]), 2.0),
    *_counted(_rows("test", "noise40", "looksam", [0.89, 0.90, 0.92]), 1.2),
    *_counted(_rows("compute", "noise40", "sgd", [0.71, 0.70, 0.72]), 1.0),
  ]
  for r in rows[-3:]:
    r["epochs"] = 36
  text = "\n".join(study.compute_table(rows, a))
  assert "| noise40 | sgd | – | 1.000 | 0/3 | 30.0 |" in text
  assert "| noise40 | looksam | 1.200 [1.200–1.200] | 1.200 | 3/3 | 36.0 |" in text
  assert "| noise40 | sam | 2.000 [2.000–2.000] | 2.000 | 3/3 | 60.0 |" in text
  assert (
    "| noise40 | sgd, equal compute (36 ep) | 1.000 [1.000–1.000] | 1.000 | 3/3 | 36.0 |" in text
  )
  assert study.run_compute(rows[0], a) == 30.0  # 30 epochs x the expected 1 gradient per step
  found = study.comparisons(rows, a.regimes, "looksam")
  assert [(c["a"], c["b"]) for c in found if c["family"] is None] == [
    ("looksam", "sgd (equal compute)")
  ]
  study.plot_compute(rows, a, str(tmp_path / "out"))
  assert (tmp_path / "out_compute.png").stat().st_size > 5_000
