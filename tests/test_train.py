"""End-to-end tests of the train CLI: outputs, exact resume, and clear errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import train as train_lib
from experiments.configs.base import load_config

CONFIG = "experiments/configs/digits_simple_cnn.py"
TINY = [
  "epochs=3",
  "batch_size=128",
  "lambda_max_examples=64",
  "lambda_max_iters=4",
  "lambda_max_every=0",
  "progress=false",
  "log_every=5",
]


def _config(optimizer="xsam", *extra):
  return load_config(f"{CONFIG}:{optimizer}", [*TINY, *extra])


def _tree_digest(tree) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def _dir_digest(path: Path) -> dict[str, str]:
  return {
    str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(path.rglob("*"))
    if p.is_file()
  }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A 3-epoch X-SAM run that nobody interrupts (the reference for resume tests)."""
  workdir = tmp_path_factory.mktemp("full")
  summary, state = train_lib.train(_config(), workdir)
  return workdir, summary, state


@pytest.mark.slow
def test_run_writes_config_metrics_tensorboard_checkpoints_and_summary(uninterrupted):
  workdir, summary, _ = uninterrupted
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["optimizer"] == "xsam" and saved["epochs"] == 3
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  epochs = [r for r in records if r["kind"] == "epoch"]
  assert [r["epoch"] for r in epochs] == [1, 2, 3]
  assert all(np.isfinite(r["test_accuracy"]) for r in epochs)
  assert any(r["kind"] == "step" and "eigval" in r for r in records)
  assert list((workdir / "tb").iterdir())
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  on_disk = json.loads((workdir / "summary.json").read_text())
  assert on_disk["test_accuracy"] == summary["test_accuracy"]
  assert np.isfinite(on_disk["final_lambda_max"]) and on_disk["final_lambda_max"] > 0
  assert on_disk["refresh_path"] == "static"  # XLA:CPU picks the host-decided refresh


@pytest.mark.slow
def test_resumed_run_gives_bit_identical_parameters(uninterrupted, tmp_path):
  _, summary, state = uninterrupted
  config = _config()
  first, _ = train_lib.train(config, tmp_path, max_epochs_this_run=1)
  assert first is None  # stopped after epoch 1, like a preempted job
  resumed, resumed_state = train_lib.train(config, tmp_path)
  assert _tree_digest(resumed_state.params) == _tree_digest(state.params)
  assert _tree_digest(resumed_state.opt_state) == _tree_digest(state.opt_state)
  assert _tree_digest(resumed_state.batch_stats) == _tree_digest(state.batch_stats)
  assert resumed["test_accuracy"] == summary["test_accuracy"]
  kinds = [json.loads(x)["kind"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert "resume" in kinds


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_parameters(uninterrupted, tmp_path):
  _, _, state = uninterrupted
  cmd = [
    sys.executable,
    "-m",
    "experiments.train",
    "--config",
    f"{CONFIG}:xsam",
    "--workdir",
    str(tmp_path),
  ] + [a for o in TINY for a in ("--set", o)]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (tmp_path / "checkpoints" / "1").exists():
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait()
  resumed, resumed_state = train_lib.train(_config(), tmp_path)
  assert resumed is not None
  assert _tree_digest(resumed_state.params) == _tree_digest(state.params)


@pytest.mark.slow
def test_other_config_in_the_same_workdir_is_refused_and_nothing_is_touched(uninterrupted):
  workdir, _, _ = uninterrupted
  before = _dir_digest(workdir)
  with pytest.raises(ValueError, match="rho"):
    train_lib.train(_config("xsam", "rho=0.2"), workdir)
  assert _dir_digest(workdir) == before


def test_non_empty_workdir_without_config_is_refused(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("precious\n")
  with pytest.raises(ValueError, match="not empty"):
    train_lib.train(_config("sgd"), tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == "precious\n"


@pytest.mark.slow
def test_corrupt_checkpoint_gives_a_clear_error_and_is_left_untouched(tmp_path):
  config = _config("sgd", "epochs=2")
  train_lib.train(config, tmp_path, max_epochs_this_run=1)
  ckpt = tmp_path / "checkpoints" / "1"
  for f in ckpt.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\x00garbage" * 4)
  before = _dir_digest(tmp_path)
  with pytest.raises(RuntimeError, match="could not be read"):
    train_lib.train(config, tmp_path)
  assert _dir_digest(tmp_path) == before


@pytest.mark.parametrize(
  ("override", "match"),
  [
    ("optimizer=adam", "unknown optimizer 'adam'"),
    ("model=vgg", "unknown model 'vgg'"),
    ("dataset=mnist", "unknown dataset 'mnist'"),
    ("refresh_path=sometimes", "unknown refresh_path"),
    ("epochs=0", "epochs"),
    ("nonexistent=1", "unknown config field 'nonexistent'"),
    ("rho=abc", "rho"),
  ],
)
def test_cli_rejects_bad_settings_with_a_message_naming_the_fix(override, match, capsys, tmp_path):
  code = train_lib.main(
    ["--config", f"{CONFIG}:sgd", "--workdir", str(tmp_path / "run"), "--set", override]
  )
  assert code == 2
  assert match in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def test_batch_size_larger_than_the_dataset_is_refused(capsys, tmp_path):
  code = train_lib.main(
    [
      "--config",
      f"{CONFIG}:sgd",
      "--workdir",
      str(tmp_path / "r"),
      "--set",
      "batch_size=5000",
      "--set",
      "progress=false",
    ]
  )
  assert code == 2
  assert "batch_size" in capsys.readouterr().err


def test_batch_size_not_divisible_by_device_count_is_refused(tmp_path):
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    "JAX_PLATFORMS": "cpu",
  }
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--config",
      f"{CONFIG}:sgd",
      "--workdir",
      str(tmp_path / "r"),
      "--set",
      "batch_size=33",
      "--set",
      "progress=false",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2
  assert "batch_size" in proc.stderr and "device" in proc.stderr


def test_missing_tfds_dataset_error_says_how_to_prepare_it(capsys, tmp_path):
  code = train_lib.main(
    [
      "--config",
      "experiments/configs/cifar10_resnet18.py:sgd",
      "--workdir",
      str(tmp_path / "r"),
      "--set",
      f"data_dir={tmp_path}",
    ]
  )
  assert code == 2
  err = capsys.readouterr().err
  assert "cifar10" in err and "data_dir" in err
