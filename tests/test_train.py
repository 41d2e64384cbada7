"""End-to-end tests of the train CLI: outputs, exact resume, and clear errors for bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from launch_processes import FAST_COMPILE, read_checkpoint, xla_flags

import xsam_jax
from experiments import data as data_lib
from experiments import sharding as sharding_lib
from experiments import train as train_lib
from experiments.configs.base import load_config
from experiments.optimizers import build_optimizer

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


@pytest.fixture(scope="session")  # not "module": xdist may tear those down between tests
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
def test_run_killed_before_its_summary_writes_it_from_the_last_checkpoint_on_rerun(
  uninterrupted, tmp_path
):
  workdir, summary, state = uninterrupted
  killed = tmp_path / "killed"
  shutil.copytree(workdir, killed)
  (killed / "summary.json").unlink()  # killed after the last checkpoint, before the summary
  metrics_before = (killed / "metrics.jsonl").read_text()
  rerun, rerun_state = train_lib.train(_config(), killed)
  assert rerun is not None
  assert json.loads((killed / "summary.json").read_text()) == rerun
  for key in ("test_accuracy", "test_loss", "final_train_loss", "refresh_path", "num_params"):
    assert rerun[key] == summary[key], key
  np.testing.assert_allclose(rerun["final_lambda_max"], summary["final_lambda_max"], rtol=1e-5)
  assert (killed / "metrics.jsonl").read_text() == metrics_before  # it did not train again
  assert _tree_digest(rerun_state.params) == _tree_digest(state.params)


@pytest.mark.slow
def test_cond_and_static_refresh_paths_train_to_the_same_parameters(uninterrupted, tmp_path):
  # The reference run took the static path (host-side is_due) with refresh_every=5 over 3
  # epochs of 11 steps: refreshes at steps 0, 5, ..., 30, across epoch boundaries. The cond
  # path decides inside the step (lax.cond on the optimizer's count). Measured on XLA:CPU: the
  # two differ by 3e-5 (relative L2 over all parameters; fori_loop vs unrolled HVPs), while a
  # host step count off by one either way gives 2.6e-3.
  # The cond run is a CLI run in a subprocess with XLA's default backend optimisation: without
  # it, convolutions inside the cond's loop run ~8x slower on XLA:CPU (6 min instead of 45 s).
  _, static_summary, static_state = uninterrupted
  assert static_summary["refresh_path"] == "static"
  assert static_summary["refresh_every"] == 5
  sets = [a for s in [*TINY, "refresh_path=cond"] for a in ("--set", s)]
  env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace(FAST_COMPILE, "")}
  argv = ["--config", f"{CONFIG}:xsam", "--workdir", str(tmp_path), *sets]
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.train", *argv],
    cwd=Path(__file__).resolve().parents[1],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert json.loads((tmp_path / "summary.json").read_text())["refresh_path"] == "cond"
  cond = ravel_pytree(read_checkpoint(tmp_path, 3)["params"])[0]
  static = ravel_pytree(jax.device_get(static_state.params))[0]
  assert np.linalg.norm(cond - static) <= 3e-4 * np.linalg.norm(static)


def test_run_started_before_a_config_field_existed_can_still_be_resumed(tmp_path):
  config = _config("sgd")
  saved = json.loads(config.to_json())
  del saved["refresh_once_per_epoch"]  # a field added after the run started, at its default
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train_lib.RunDir(tmp_path, config, tensorboard=False).close()
  with pytest.raises(ValueError, match="refresh_once_per_epoch"):
    train_lib.RunDir(tmp_path, _config("sgd", "refresh_once_per_epoch=true"), tensorboard=False)


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
    ("ascent_path=host", "unknown ascent_path"),
    ("epochs=0", "epochs"),
    ("nonexistent=1", "unknown config field 'nonexistent'"),
    ("rho=abc", "rho"),
    # Out of range: refused before anything is built or written, not at the end of the run.
    ("lambda_max_iters=0", "`lambda_max_iters` must be >= 1, got 0; set it with --set"),
    ("momentum=1.5", "`momentum` must be in [0, 1), got 1.5"),
    ("seed=-1", "`seed` must be >= 0"),
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
    "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"),
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
  assert "cifar10" in err and f"--set data_dir={tmp_path}" in err  # the CLI's own spelling


FASHION_CONFIG = "experiments/configs/fashion_mnist_simple_cnn.py"


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_missing_or_corrupt_fashion_mnist_files_stop_the_cli_before_anything_is_written(
  capsys, tmp_path, problem
):
  data_dir = tmp_path / "fashion"
  if problem == "corrupt":
    data_dir.mkdir()
    for stem in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
      (data_dir / f"{stem}-ubyte.gz").write_bytes(b"an HTML error page, not gzip")
  workdir = tmp_path / "run"
  code = train_lib.main(
    [
      "--config",
      f"{FASHION_CONFIG}:sgd",
      "--workdir",
      str(workdir),
      "--set",
      f"data_dir={data_dir}",
    ]
  )
  assert code == 2
  assert not workdir.exists()
  err = capsys.readouterr().err
  assert str(data_dir) in err
  assert "apt-get install dataset-fashion-mnist" in err and "--set data_dir=DIR" in err


def test_float64_compute_holds_params_state_and_loss_in_float64_from_the_float32_init():
  config32 = _config("xsam")
  dataset = data_lib.load_dataset("digits", label_noise=0.4)
  spec32 = build_optimizer(config32, 11)
  params32 = train_lib.create_state(config32, dataset, spec32).params
  with jax.enable_x64(True):
    config = _config("xsam", "compute_dtype=float64")
    state = train_lib.create_state(config, dataset, build_optimizer(config, 11))
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))}
    # No float32 anywhere; the counters are int32 and XSAMState.ascended is a bool flag.
    assert dtypes == {np.dtype("float64"), np.dtype("int32"), np.dtype("bool")}
    # The same initial values as a float32 run, held in float64.
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params32), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float64))
    images = data_lib.normalize(dataset.train_images[:8], dataset.mean, dataset.std)
    logits = state.apply_fn({"params": state.params}, images, train=False)
    loss, _ = train_lib.cross_entropy(logits, dataset.train_labels[:8].astype(np.int32))
    assert logits.dtype == np.float64 and loss.dtype == np.float64


def test_negative_rho_with_a_warm_up_is_refused_before_anything_is_written(capsys, tmp_path):
  # The warm-up schedule hands optax a schedule, which the library's rho >= 0 check cannot see.
  argv = ["--config", f"{CONFIG}:sam", "--workdir", str(tmp_path / "run")]
  code = train_lib.main([*argv, "--set", "rho=-0.1", "--set", "rho_warmup_epochs=2"])
  assert code == 2
  assert "`rho` must be >= 0, got -0.1" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  ("mesh", "match"), [("data=\u00b2", "positive integers"), ("data=2,data=4", "'data' twice")]
)
def test_malformed_mesh_flag_is_refused_by_the_parser_naming_the_flag(
  mesh, match, capsys, tmp_path
):
  with pytest.raises(SystemExit) as info:
    train_lib.main(["--config", f"{CONFIG}:sgd", "--workdir", str(tmp_path / "r"), "--mesh", mesh])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert "argument --mesh" in err and match in err
  assert not (tmp_path / "r").exists()


def test_workdir_that_is_a_file_is_refused_by_name_and_left_alone(capsys, tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("precious\n")
  code = train_lib.main(["--config", f"{CONFIG}:sgd", "--workdir", str(path), *_sets()])
  assert code == 2
  assert f"--workdir {path} is a file, not a directory" in capsys.readouterr().err
  assert path.read_text() == "precious\n" and sorted(tmp_path.iterdir()) == [path]


def _sets(*extra):
  return [a for o in [*TINY, *extra] for a in ("--set", o)]


@pytest.mark.slow
def test_validation_runs_name_their_accuracy_validation_and_have_no_test_accuracy(tmp_path):
  config = _config("sgd", "epochs=1", "train_examples=512", "validation_fraction=0.25")
  summary, _ = train_lib.train(config, tmp_path)
  assert summary["eval_split"] == "validation"
  assert 0 <= summary["validation_accuracy"] <= 1 and "validation_loss" in summary
  assert "test_accuracy" not in summary and "test_loss" not in summary
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  epoch = next(r for r in records if r["kind"] == "epoch")
  assert "validation_accuracy" in epoch and "test_accuracy" not in epoch


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_75_and_the_rerun_ends_bit_identical(
  uninterrupted, tmp_path
):
  # A preemption (SLURM, TPU, a `kill`) sends SIGTERM: the run stops after the step it is in,
  # saves the state and the epoch's running sums, says how to resume and exits with 75.
  _, summary, state = uninterrupted
  cmd = [sys.executable, "-m", "experiments.train", "--config", f"{CONFIG}:xsam"]
  cmd += ["--workdir", str(tmp_path), *_sets()]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.stat().st_size:  # the first step record: mid-epoch 1
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == train_lib.EXIT_PREEMPTED, stderr[-3000:]
  records = [json.loads(x) for x in metrics.read_text().splitlines()]
  stopped = next(r for r in records if r["kind"] == "preempted")
  assert 0 < stopped["step"] < 33  # within the run, not at its end
  assert f"preempted at step {stopped['step']}" in stderr
  assert "rerun the same command to resume" in stderr
  resumed, resumed_state = train_lib.train(_config(), tmp_path)
  records = [json.loads(x) for x in metrics.read_text().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "resume"] == [stopped["step"]]
  assert _tree_digest(resumed_state.params) == _tree_digest(state.params)
  assert _tree_digest(resumed_state.opt_state) == _tree_digest(state.opt_state)
  for key in ("test_accuracy", "test_loss", "final_train_loss", "final_lambda_max"):
    assert resumed[key] == summary[key], key


def test_eig_examples_takes_the_eigenvector_from_the_fixed_training_examples(tmp_path):
  # One epoch of 2 steps with refresh_every=100: only step 0 refreshes, at the initial
  # parameters, so the final state's eigval is that refresh's. The reference runs the library's
  # refresh_eigenvector from the same initial state with the eval-mode loss of the first 40
  # training images, independently of the train step; step 0's minibatch gives another value,
  # so the test tells the fixed set from the minibatch (the old behaviour).
  extra = ("epochs=1", "train_examples=64", "batch_size=32", "refresh_every=100", "power_iters=3")
  config = _config("xsam", *extra, "eig_examples=40")
  summary, state = train_lib.train(config, tmp_path)
  assert summary["eig_examples"] == 40
  dataset = data_lib.load_dataset(
    config.dataset, label_noise=config.label_noise, seed=config.seed, train_examples=64
  )
  spec = build_optimizer(config, data_lib.steps_per_epoch(dataset.num_train, config.batch_size))
  state0 = train_lib.create_state(config, dataset, spec)

  def reference(images, labels):
    def loss(p):
      variables = {"params": p}
      if state0.batch_stats:
        variables["batch_stats"] = state0.batch_stats
      logits = state0.apply_fn(variables, images, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    refreshed = xsam_jax.refresh_eigenvector(state0.opt_state, state0.params, jax.grad(loss))
    return float(optax.tree.get(refreshed, "eigval"))

  images = data_lib.normalize(dataset.train_images[:40], dataset.mean, dataset.std)
  labels = np.asarray(dataset.train_labels[:40], np.int32)
  got = float(optax.tree.get(state.opt_state, "eigval"))
  np.testing.assert_allclose(got, reference(images, labels), rtol=1e-4)
  # The old source, step 0's minibatch (eig_examples=0), gives another eigenvalue there.
  batch = next(data_lib.train_batches(dataset, 32, config.seed, 0, augment=config.augment))
  minibatch = reference(batch["image"], np.asarray(batch["label"], np.int32))
  assert abs(minibatch - got) > 1e-3 * abs(got)


@pytest.mark.parametrize(
  ("override", "match"),
  [
    ("eig_examples=-1", "`eig_examples` must be >= 0 (0: each step's minibatch), got -1"),
    ("eig_examples=64 eig_eval_mode=false", "`eig_examples` 64 needs eig_eval_mode=true"),
  ],
)
def test_bad_eig_examples_is_refused_before_anything_is_written(override, match, capsys, tmp_path):
  sets = [a for o in override.split() for a in ("--set", o)]
  code = train_lib.main(["--config", f"{CONFIG}:xsam", "--workdir", str(tmp_path / "run"), *sets])
  assert code == 2
  assert match in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sam_every_two_steps_counts_n_plus_half_n_gradient_evaluations(tmp_path):
  # 512 examples at batch 128: 4 steps per epoch, 8 in all; SAM's ascent on steps 0, 2, 4, 6.
  config = _config("sam_every", "epochs=2", "train_examples=512", "sam_every_k=2")
  summary, _ = train_lib.train(config, tmp_path)
  steps = 2 * 512 // 128
  assert summary["steps"] == steps
  assert summary["grad_evals_clean"] == steps and summary["hvps"] == 0
  assert summary["grad_evals_ascent"] == math.ceil(steps / 2)
  assert summary["grad_evals"] == steps + math.ceil(steps / 2)
  assert summary["grad_evals_per_step"] == pytest.approx(1.5)
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  epochs = [r for r in records if r["kind"] == "epoch"]
  assert [r["grad_evals"] for r in epochs] == [4 + 2, 8 + 4]  # running counts per epoch
  assert summary["ascent_path"] == "static"  # XLA:CPU picks the host-decided ascent


@pytest.mark.parametrize("optimizer", ["sam_every", "rst", "looksam"])
def test_cond_and_static_ascent_paths_make_the_same_steps(optimizer):
  # The static path passes ascend=ascent_due(step, **spec.ascent_policy): the same choices
  # (checked on the states' `ascended`) and the same parameters as the lax.cond path.
  config = _config(optimizer, "train_examples=128", "batch_size=32", "sam_every_k=2")
  dataset = data_lib.load_dataset("digits", label_noise=0.4, train_examples=128)
  spec = build_optimizer(config, 4)
  assert spec.ascent_policy is not None
  mesh = sharding_lib.make_mesh(config.mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  results = {}
  for path in ("cond", "static"):
    # The CLI's layout (init_state, pinned shardings): the step compiles once per `ascend`.
    state, state_sharding = train_lib.init_state(config, dataset, spec, mesh)
    step = train_lib.make_train_step(config, spec, state_sharding, batch_sharding)
    flags = []
    for epoch in range(2):
      for i, batch in enumerate(data_lib.train_batches(dataset, 32, 0, epoch, augment=False)):
        t = 4 * epoch + i
        ascend = xsam_jax.ascent_due(t, **spec.ascent_policy) if path == "static" else None
        batch = data_lib.make_global_batch(batch, batch_sharding, 32)
        state, _ = step(state, batch, ascend=ascend)
        flags.append(bool(state.opt_state[0].ascended))
    assert step.jitted._cache_size() == (2 if path == "static" else 1)
    results[path] = (flags, ravel_pytree(jax.device_get(state.params))[0])
  assert results["static"][0] == results["cond"][0]
  assert 0 < sum(results["cond"][0]) < 8  # both kinds of step occur
  cond, static = results["cond"][1], results["static"][1]
  assert np.linalg.norm(cond - static) <= 1e-5 * np.linalg.norm(cond)


@pytest.mark.slow
def test_xsam_counts_one_ascent_per_step_and_q_hvps_per_refresh(uninterrupted):
  workdir, summary, _ = uninterrupted
  config = _config()
  steps = summary["steps"]
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [r for r in records if r["kind"] == "epoch"][-1]["step"]
  refreshes = len([t for t in range(steps) if t % config.refresh_every == 0])
  assert summary["grad_evals_ascent"] == steps
  assert summary["hvps"] == refreshes * config.power_iters
  assert summary["grad_evals"] == 2 * steps + refreshes * config.power_iters


MESA_TINY = ("train_examples=128", "batch_size=32", "mesa_decay=0.5", "log_every=1")


def test_mesa_step_is_sgd_bit_for_bit_before_its_start_step_and_not_after():
  # mesa_start_epoch=1 at 4 steps per epoch: steps 0-3 have weight 0, step 4 has the term.
  sgd, mesa = (_config(name, *MESA_TINY, "mesa_start_epoch=1") for name in ("sgd", "mesa"))
  dataset = data_lib.load_dataset("digits", label_noise=0.4, train_examples=128)
  states, kls = {}, []
  for config in (sgd, mesa):
    spec = build_optimizer(config, 4)
    state = train_lib.create_state(config, dataset, spec)
    step = train_lib.make_train_step(config, spec)
    history = []
    for batch in data_lib.train_batches(dataset, 32, 0, 0, augment=False):
      state, metrics = step(state, {k: jax.numpy.asarray(v) for k, v in batch.items()})
      history.append(jax.device_get(state.params))
      kls.append(metrics.get("mesa_kl"))
    last = next(data_lib.train_batches(dataset, 32, 0, 1, augment=False))
    state, _ = step(state, {k: jax.numpy.asarray(v) for k, v in last.items()})
    states[config.optimizer] = (history, jax.device_get(state.params))
  assert isinstance(state, xsam_jax.training.MESATrainState) and int(state.mesa.count) == 5
  for i, (a, b) in enumerate(zip(states["sgd"][0], states["mesa"][0], strict=True)):
    assert _tree_digest(a) == _tree_digest(b), f"step {i}"
  assert _tree_digest(states["sgd"][1]) != _tree_digest(states["mesa"][1])  # step 4: the term
  assert all(kl > 0 for kl in kls[5:8])  # the teacher (decay 0.5) lags the student


@pytest.mark.slow
def test_mesa_run_resumes_bit_identically_with_its_ema_teacher(tmp_path):
  config = _config("mesa", *MESA_TINY, "epochs=2", "mesa_start_epoch=1")
  summary, state = train_lib.train(config, tmp_path / "full")
  first, _ = train_lib.train(config, tmp_path / "split", max_epochs_this_run=1)
  assert first is None
  resumed, resumed_state = train_lib.train(config, tmp_path / "split")
  assert int(state.mesa.count) == int(state.step) == 8
  for name in ("params", "opt_state", "batch_stats", "mesa"):
    assert _tree_digest(getattr(resumed_state, name)) == _tree_digest(getattr(state, name)), name
  assert _tree_digest(state.mesa.ema["params"]) != _tree_digest(state.params)
  assert resumed["test_accuracy"] == summary["test_accuracy"]


def test_esam_data_selection_takes_the_second_gradient_on_the_examples_whose_loss_rose_most():
  # One CLI train step of esam with beta = 1 (every tensor perturbed: SAM's ascent) and
  # gamma = 0.5, against the chain applied by hand with an independent selection: per-example
  # losses at w and at w + eps, the 16 of 32 examples with the largest rise (argsort), the
  # gradient of their mean loss at w + eps. The SimpleCNN has no BatchNorm or dropout.
  config = _config("esam", "train_examples=128", "batch_size=32", "esam_beta=1.0", "esam_gamma=0.5")
  dataset = data_lib.load_dataset("digits", label_noise=0.4, train_examples=128)
  spec = build_optimizer(config, 4)
  assert spec.esam_fraction == 0.5
  state = train_lib.create_state(config, dataset, spec)
  batch = next(data_lib.train_batches(dataset, 32, 0, 0, augment=False))
  images, labels = jax.numpy.asarray(batch["image"]), jax.numpy.asarray(batch["label"])

  def losses(params, x, y):
    logits = state.apply_fn({"params": params}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  w = state.params
  grads = jax.grad(lambda p: losses(p, images, labels).mean())(w)
  norm = optax.tree.norm(grads)
  w_adv = jax.tree.map(lambda p, g: p + config.rho * g / (norm + 1e-12), w, grads)
  rise = np.asarray(losses(w_adv, images, labels) - losses(w, images, labels))
  keep = np.argsort(-rise, kind="stable")[:16]
  selected = jax.grad(lambda p: losses(p, images[keep], labels[keep]).mean())(w_adv)
  # The transform hands on grad_fn's output; the base optimizer then steps with it.
  updates, _ = spec.tx.update(selected, state.opt_state, w, grad_fn=lambda p: selected)
  want = ravel_pytree(optax.apply_updates(w, updates))[0]
  whole = jax.grad(lambda p: losses(p, images, labels).mean())(w_adv)
  updates, _ = spec.tx.update(whole, state.opt_state, w, grad_fn=lambda p: whole)
  whole_batch = ravel_pytree(optax.apply_updates(w, updates))[0]
  # The step donates its state: run it after the reference.
  new_state, _ = train_lib.make_train_step(config, spec)(
    state, {k: jax.numpy.asarray(v) for k, v in batch.items()}
  )
  got = ravel_pytree(new_state.params)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert not np.allclose(whole_batch, got, atol=1e-5)  # not the whole batch's (can fail)
