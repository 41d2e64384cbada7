"""Tests for experiments/transformer.py on a tiny setting (p = 7 or 11, d_model = 16)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import transformer as tfm

TINY = tfm.Config(
  modulus=7,
  train_fraction=0.5,
  d_model=16,
  num_heads=4,
  num_layers=1,
  d_mlp=32,
  steps=12,
  lr=1e-2,
  warmup_steps=1,
  weight_decay=0.1,
  rho=0.05,
  refresh_every=3,
  power_iters=1,
  eval_every=4,
  lambda_max_iters=0,  # skipped: compiling Lanczos/power around an HVP costs ~9 s of CPU
)


@pytest.mark.parametrize("operation", tfm.OPERATIONS)
def test_split_is_deterministic_disjoint_and_complete(operation):
  p = 11
  split = tfm.make_split(p, operation, 0.4, seed=3)
  again = tfm.make_split(p, operation, 0.4, seed=3)
  for a, b in zip(split, again, strict=True):
    np.testing.assert_array_equal(a, b)
  assert split.x_train.shape == (round(0.4 * p * p), 4)
  assert split.x_test.shape == (p * p - round(0.4 * p * p), 4)
  assert split.x_train.dtype == np.int32 and split.y_train.dtype == np.int32
  pairs = lambda x: {(int(a), int(b)) for a, _, b, _ in x}
  train, test = pairs(split.x_train), pairs(split.x_test)
  assert len(train) == len(split.x_train) and not train & test
  assert train | test == {(a, b) for a in range(p) for b in range(p)}
  # Tokens [a, op, b, =] and the right answers.
  x = np.concatenate([split.x_train, split.x_test])
  y = np.concatenate([split.y_train, split.y_test])
  np.testing.assert_array_equal(x[:, 1], p)
  np.testing.assert_array_equal(x[:, 3], p + 1)
  op = {"add": np.add, "sub": np.subtract, "mul": np.multiply}[operation]
  np.testing.assert_array_equal(y, op(x[:, 0], x[:, 2]) % p)
  # Another seed gives another split.
  other = tfm.make_split(p, operation, 0.4, seed=4)
  assert pairs(other.x_train) != train


def test_bad_split_arguments_raise():
  with pytest.raises(ValueError, match="operation"):
    tfm.make_split(7, "div", 0.5, 0)
  with pytest.raises(ValueError, match="train_fraction"):
    tfm.make_split(7, "add", 1.0, 0)


def test_model_shapes():
  model = tfm.Transformer(
    modulus=7, d_model=16, num_heads=4, num_layers=2, d_mlp=32, layer_norm=True
  )
  tokens = jnp.asarray(tfm.make_split(7, "add", 0.5, 0).x_train[:5])
  # Shapes only: traced, not compiled.
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  assert jax.eval_shape(model.apply, {"params": params}, tokens).shape == (5, 7)
  assert params["embed"]["embedding"].shape == (tfm.vocab_size(7), 16)
  assert params["pos_embed"].shape == (tfm.SEQ_LEN, 16)
  assert params["block_0"]["query"]["kernel"].shape == (16, 4, 4)
  assert params["block_1"]["mlp_in"]["kernel"].shape == (16, 32)
  assert params["unembed"]["kernel"].shape == (16, 7)


def test_last_only_block_equals_causal_block_at_last_position():
  x = jax.random.normal(jax.random.key(1), (3, tfm.SEQ_LEN, 16))
  full = tfm.Block(16, 4, 32, layer_norm=True, last_only=False)
  last = tfm.Block(16, 4, 32, layer_norm=True, last_only=True)
  params = jax.jit(full.init)(jax.random.key(0), x)

  @jax.jit
  def outputs(x):
    x_masked = x.at[:, 1:].set(0.0)
    return last.apply(params, x), full.apply(params, x), full.apply(params, x_masked)

  out_last, out_full, out_masked = outputs(x)
  np.testing.assert_allclose(out_last[:, 0], out_full[:, -1], rtol=1e-5, atol=1e-5)
  # Causality: the first position does not see the later ones.
  np.testing.assert_allclose(out_masked[:, 0], out_full[:, 0], atol=1e-6)


@pytest.mark.parametrize("name", tfm.OPTIMIZERS)
def test_a_few_steps_decrease_the_loss(name):
  split = tfm.make_split(TINY.modulus, TINY.operation, TINY.train_fraction, 0)
  model = tfm.make_model(TINY)
  params = tfm.init_params(TINY, 0)
  spec = tfm.build_optimizer(name, TINY, seed=0)
  opt_state = spec.tx.init(params)
  step = tfm._cached_train_step(name, TINY)  # the CLI test below reuses these programs
  x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
  loss0 = float(tfm._evaluate(model, params, x, y)[0])
  for i in range(8):
    # Eigen-SAM's refresh is the code X-SAM's refresh runs (xsam_jax._eigvec); compiling it
    # once, for X-SAM, keeps the test file fast.
    due = i % TINY.refresh_every == 0
    refresh = due if name == "xsam_adamw" else False
    params, opt_state, metrics = step(params, opt_state, x, y, refresh=refresh)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  loss1 = float(tfm._evaluate(model, params, x, y)[0])
  assert loss1 < loss0
  if name == "xsam_adamw":
    assert float(optax.tree.get(opt_state, "eigval")) > 0.0


def test_unknown_optimizer_raises():
  with pytest.raises(ValueError, match="Unknown optimizer"):
    tfm.build_optimizer("lion", TINY)


def test_summary_helpers():
  assert tfm.first_step_at_or_above([10, 20, 30], [0.5, 0.95, 0.99], 0.9) == 20
  assert tfm.first_step_at_or_above([10, 20], [0.5, 0.6], 0.9) is None
  runs = [
    {
      "optimizer": "adamw",
      "final_test_acc": a,
      "best_test_acc": a,
      "final_train_acc": 1.0,
      "lambda_max": 2.0,
      "wall_time_s": 1.0,
      "step_test_acc_90": s,
    }
    for a, s in ((0.8, None), (0.95, 100), (0.97, 300))
  ]
  summary = tfm.summarize(runs)["adamw"]
  assert summary["reached_test_acc_90"] == "2/3"
  assert summary["step_test_acc_90"]["mean"] == pytest.approx(200.0)
  assert summary["final_test_acc"]["std"] == pytest.approx(np.std([0.8, 0.95, 0.97], ddof=1))
  assert "adamw" in tfm.format_table(tfm.summarize(runs))


def test_cli_writes_json_and_png(tmp_path):
  out = tmp_path / "figs" / "tf.png"
  argv = ["--optimizers", "adamw,xsam_adamw", "--seeds", "0,1", "--out", str(out), "--quiet"]
  for field in dataclasses.fields(tfm.Config):  # all of TINY: the compiled steps are reused
    argv += [f"--{field.name}", str(getattr(TINY, field.name))]
  result = tfm.main(argv)
  assert out.exists() and out.stat().st_size > 0
  saved = json.loads(out.with_suffix(".json").read_text())
  assert saved["optimizers"] == ["adamw", "xsam_adamw"] and saved["seeds"] == [0, 1]
  assert saved["config"] == dataclasses.asdict(TINY)
  assert len(saved["runs"]) == 4 == len(result["runs"])
  run = saved["runs"][0]
  assert run["curves"]["step"] == [4, 8, 12]
  assert run["lambda_max"] is None and run["wall_time_s"] > 0
  assert set(saved["summary"]) == {"adamw", "xsam_adamw"}
  assert "eigval" in saved["runs"][1]["curves"]
