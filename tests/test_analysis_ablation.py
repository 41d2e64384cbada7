"""Tests for experiments.analysis.ablation: arms that differ only in where v comes from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from experiments.analysis import ablation, study

STUDY_JSON = "experiments/figures/study_digits.json"


def test_the_arms_are_the_studys_test_runs_at_its_validation_choice_and_differ_only_in_v():
  saved = json.loads(Path(STUDY_JSON).read_text())
  args = ablation.parse_args(["--seeds", "0,3"])
  runs = ablation.ablation_runs(saved, args)
  assert [(r.stage, r.seed) for r in runs] == [(a, s) for s in (0, 3) for a in ablation.ARMS]
  # The study chose rho=0.2 alpha=0.2 for X-SAM and rho=0.2 for SAM at 40% noise (its .md).
  by = {(r.stage, r.seed): r for r in runs}
  assert by[("power", 0)].setting == ("rho=0.2", "alpha=0.2")
  assert by[("sam", 0)].setting == ("rho=0.2",) and by[("sam", 0)].method == "sam"
  configs = {
    k: json.loads(
      study.common.make_config(saved["args"]["config"], r.method, r.overrides).to_json()
    )
    for k, r in by.items()
  }
  power = configs[("power", 0)]
  assert power["label_noise"] == 0.4 and power["epochs"] == 30 and power["seed"] == 0
  assert (power["tracker"], power["power_iters"], power["eig_examples"]) == ("power", 5, 0)
  for arm, fields in (
    ("random", {"tracker": "random"}),
    ("well_estimated", {"power_iters": 20, "eig_examples": 2048}),
  ):
    differ = {k: v for k, v in configs[(arm, 0)].items() if v != power[k]}
    assert differ == fields, arm
  ablation.check_arms(runs, saved["args"]["config"])  # accepts them


def test_an_override_that_makes_the_arms_differ_elsewhere_is_refused():
  saved = json.loads(Path(STUDY_JSON).read_text())
  runs = ablation.ablation_runs(saved, ablation.parse_args(["--seeds", "0"]))
  runs[1] = study.dataclasses.replace(runs[1], overrides=(*runs[1].overrides, "alpha=0.5"))
  with pytest.raises(ValueError, match=r"arm 'random' \(seed 0\) differs .* \['alpha'\]"):
    ablation.check_arms(runs, saved["args"]["config"])


def test_comparisons_are_one_holm_family_against_a_and_against_sam():
  acc = {"power": 0.90, "random": 0.91, "well_estimated": 0.93, "sam": 0.92}
  noise = [0.0, 0.01, -0.01, 0.02, -0.005]
  rows = [
    {"stage": arm, "seed": s, "accuracy": a + noise[s] + (0.001 * s if arm == "random" else 0)}
    for arm, a in acc.items()
    for s in range(5)
  ]
  found = ablation.comparisons(rows)
  assert [(c["a"], c["b"]) for c in found] == list(ablation.COMPARISONS)
  raw = [c["p"] for c in found]
  assert [c["p_holm"] for c in found] == pytest.approx(study.holm(raw))
  wells = next(c for c in found if (c["a"], c["b"]) == ("well_estimated", "power"))
  assert wells["mean"] == pytest.approx(0.03) and wells["half"] == pytest.approx(0.0, abs=1e-12)
  assert wells["verdict"] == "win"


@pytest.mark.slow
def test_a_tiny_ablation_runs_every_arm_and_reports_paired_rows(tmp_path):
  out = tmp_path / "fig" / "ablation"
  argv = [
    *("--root", str(tmp_path / "runs"), "--out", str(out), "--seeds", "0,1", "--epochs", "1"),
    *("--workers", "1", "--eig_examples", "48"),
    *("--set", "train_examples=96", "--set", "batch_size=32"),
    *("--set", "lambda_max_examples=16", "--set", "lambda_max_iters=3"),
  ]
  assert ablation.main(argv) == 0
  text = (out.with_suffix(".md")).read_text()
  for label in ablation.ARM_LABELS.values():
    assert f"| {label} |" in text
  for a, b in ablation.COMPARISONS:
    assert f"| {ablation.ARM_LABELS[a]} − {ablation.ARM_LABELS[b]} |" in text
  saved = json.loads(out.with_suffix(".json").read_text())
  assert len(saved["runs"]) == 8 and len(saved["comparisons"]) == 5
  assert all(c["n"] == 2 for c in saved["comparisons"])
  # The run directories: the X-SAM arms' configs differ only in the solver/examples fields.
  configs = {}
  for r in saved["runs"]:
    workdir = tmp_path / "runs" / r["stage"] / "noise40"
    (path,) = workdir.glob(f"*/*/seed{r['seed']}/config.json")
    configs[(r["stage"], r["seed"])] = json.loads(path.read_text())
  for seed in (0, 1):
    power = configs[("power", seed)]
    for arm in ("random", "well_estimated"):
      differ = {k for k, v in configs[(arm, seed)].items() if v != power[k]}
      assert differ <= ablation.ARM_FIELDS and differ, arm
    assert configs[("sam", seed)]["optimizer"] == "sam"
  summaries = {(r["stage"], r["seed"]): r for r in saved["runs"]}
  assert summaries[("well_estimated", 0)]["eig_examples"] == 48
  assert summaries[("power", 0)]["eig_examples"] is None
  assert summaries[("random", 0)]["cached_eigval"] == 0.0  # no HVPs: eigval stays 0
  assert math.isfinite(summaries[("power", 0)]["cached_eigval"])
  # The report is written again from the JSON alone.
  again = tmp_path / "again"
  assert ablation.main(["--from_json", str(out.with_suffix(".json")), "--out", str(again)]) == 0
  assert again.with_suffix(".md").read_text() == text


def test_a_missing_study_json_is_refused_by_name(capsys, tmp_path):
  with pytest.raises(SystemExit):
    ablation.parse_args(["--study", str(tmp_path / "none.json")])
  assert "--study" in capsys.readouterr().err
