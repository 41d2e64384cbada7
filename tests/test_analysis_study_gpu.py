"""Tests for experiments.analysis.study_gpu: the budget guard and its tiny CPU mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from experiments.analysis import study_gpu


def test_a_methods_first_run_is_predicted_from_another_by_gradient_cost_with_a_compile_margin():
  assert study_gpu.predict_seconds("xsam", []) == 0.0  # nothing measured: the first run starts
  assert study_gpu.predict_seconds("sgd", [("sgd", 10.0), ("sgd", 7.0)]) == 10.0  # its slowest
  margin = study_gpu.FIRST_COMPILE_MARGIN
  assert study_gpu.predict_seconds("xsam", [("sgd", 10.0), ("sam", 30.0)]) == pytest.approx(
    margin * max(10.0 * 4.1, 30.0 * 4.1 / 2.0)
  )


def test_a_run_that_would_end_past_the_budget_less_the_reserve_is_not_started():
  assert study_gpu.fits(elapsed=400.0, predicted=100.0, budget=540.0, reserve=20.0)
  assert not study_gpu.fits(elapsed=430.0, predicted=100.0, budget=540.0, reserve=20.0)
  assert not study_gpu.fits(elapsed=541.0, predicted=0.0, budget=540.0, reserve=0.0)


def test_runs_go_seed_major_so_a_partial_study_has_whole_seeds(tmp_path):
  a = study_gpu.parse_args(["--data_dir", str(tmp_path), "--seeds", "0,1"])
  runs = study_gpu.runs_of(a)
  assert [(r.seed, r.method) for r in runs[:5]] == [
    (0, "sgd"),
    (0, "sam"),
    (0, "eigen_sam"),
    (0, "xsam"),
    (1, "sgd"),
  ]
  assert all("label_noise=0.0" in r.overrides and "epochs=2" in r.overrides for r in runs)


def test_bad_flags_are_refused_by_name_before_anything_is_written(tmp_path, capsys):
  for argv, message in (
    (["--data_dir", str(tmp_path / "nowhere")], "--data_dir"),
    (["--data_dir", str(tmp_path), "--epochs", "0"], "--epochs must be >= 1"),
    (["--data_dir", str(tmp_path), "--methods", "sgd,adam"], "--methods: unknown ['adam']"),
    (["--data_dir", str(tmp_path), "--regimes", "noisy"], "--regimes: unknown regime"),
  ):
    with pytest.raises(SystemExit):
      study_gpu.parse_args(argv)
    assert message in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []


def test_the_gpu_study_imports_none_of_the_packages_an_accelerator_machine_lacks():
  code = (
    "import sys; import experiments.analysis.study_gpu, experiments.train; "
    "bad = [m for m in ('tensorflow_datasets', 'tensorflow', 'sklearn', 'tensorboardX', "
    "'matplotlib') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_the_tiny_cpu_mode_trains_every_method_and_writes_the_report(tmp_path):
  from test_data import _write_fashion_mnist

  _write_fashion_mnist(tmp_path / "idx", num_train=96, num_test=32)
  out = tmp_path / "study_gpu"
  argv = ["--tiny", "--data_dir", str(tmp_path / "idx"), "--root", str(tmp_path / "runs")]
  argv += ["--out", str(out), "--seeds", "0,1", "--budget_minutes", "5"]
  assert study_gpu.main(argv) == 0
  text = (tmp_path / "study_gpu.md").read_text()
  assert "Skipped by the budget: 0." in text and "Runs: 8, 1 epoch(s) each" in text
  assert "| clean | xsam − sam |" in text and "| clean | sam − sgd |" in text
  saved = json.loads((tmp_path / "study_gpu.json").read_text())
  assert {(r["method"], r["seed"]) for r in saved["runs"]} == {
    (m, s) for m in study_gpu.METHODS for s in (0, 1)
  }
  config = json.loads((tmp_path / "runs/test/clean/xsam/default/seed1/config.json").read_text())
  assert config["dataset"] == "fashion_mnist" and config["compute_dtype"] == "float32"
  assert config["data_dir"] == str((tmp_path / "idx").absolute())
  # A spent budget starts nothing new, reads what is done, and says what it skipped.
  argv2 = [*argv, "--seeds", "0,1,2", "--budget_minutes", "0.001", "--reserve_seconds", "0"]
  assert study_gpu.main(argv2) == 0
  text = (tmp_path / "study_gpu.md").read_text()
  assert "Skipped by the budget: 4: test/clean/sgd/default/seed2" in text
  assert len(json.loads((tmp_path / "study_gpu.json").read_text())["runs"]) == 8


def test_the_gpu_studys_resnet18_takes_28x28x1_images_unpadded_in_bfloat16():
  import jax
  import jax.numpy as jnp

  from experiments.configs.base import load_config
  from experiments.models import get_model

  config = load_config(f"{study_gpu.CONFIG}:xsam")
  assert (config.model, config.dataset, config.batch_size, config.lr) == (
    "resnet18",
    "fashion_mnist",
    256,
    0.1,
  )
  assert (config.lr_schedule, config.weight_decay, config.momentum) == ("cosine", 5e-4, 0.9)
  model = get_model("resnet18", 10, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(x.shape), train=False), variables)
  assert logits.shape == (2, 10)
  assert variables["params"]["stem_conv"]["kernel"].shape[2] == 1  # one input channel, not padded
