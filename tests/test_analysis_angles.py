"""experiments.analysis.angles: angles against a dense-Hessian reference, and the CLI outputs."""

from __future__ import annotations

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from experiments import train as train_lib
from experiments.analysis import angles
from experiments.configs.base import TrainConfig
from xsam_jax import training


def _dense_top(hess: np.ndarray) -> tuple[float, np.ndarray, float]:
  """Top eigenpair of a dense symmetric matrix and the gap to the second eigenvalue."""
  w, v = np.linalg.eigh(hess)
  return float(w[-1]), v[:, -1], float(w[-1] - w[-2])


def _deg(a: np.ndarray, b: np.ndarray) -> float:
  cos = abs(np.dot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b))
  return math.degrees(math.acos(min(1.0, cos)))


def _layer_unit(x: np.ndarray, segments) -> np.ndarray:
  out = np.zeros_like(x)
  for _, idx in segments:
    out[idx] = x[idx] / np.linalg.norm(x[idx])
  return out


def _reference(hess, grad, adv, segments):
  """Angles from ``np.linalg.eigh`` of the dense Hessian and of its per-layer blocks."""
  lam, v, gap = _dense_top(hess)
  blocks = np.zeros_like(v)
  for _, idx in segments:
    _, u, _ = _dense_top(hess[np.ix_(idx, idx)])
    blocks[idx] = u if np.dot(u, v[idx]) >= 0 else -u
  ref = {"lambda_max": lam, "gap": gap}
  for name, g in (("clean", grad), ("adv", adv)):
    ref[f"angle_{name}"] = _deg(g, v)
    ref[f"angle_{name}_layer_slice"] = _deg(_layer_unit(g, segments), _layer_unit(v, segments))
    ref[f"angle_{name}_layer_block"] = _deg(_layer_unit(g, segments), blocks)
  return ref


def _mlp_problem():
  """A 3-5-3 tanh MLP with two layers (groups ``l1``, ``l2``) and a fixed batch."""
  k = jax.random.split(jax.random.key(3), 5)
  params = {
    "l1": {"w": jax.random.normal(k[0], (3, 5)), "b": 0.1 * jax.random.normal(k[1], (5,))},
    "l2": {"w": jax.random.normal(k[2], (5, 3)), "b": jnp.zeros((3,))},
  }
  x = jax.random.normal(k[3], (32, 3))
  y = jax.random.randint(k[4], (32,), 0, 3)

  def loss(p):
    h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    logits = h @ p["l2"]["w"] + p["l2"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss


def test_angles_on_a_tiny_mlp_match_dense_hessian_and_eigh():
  params, loss = _mlp_problem()
  flat, unravel = ravel_pytree(params)
  flat_loss = lambda z: loss(unravel(z))
  hess = np.asarray(jax.hessian(flat_loss)(flat), np.float64)
  grad = np.asarray(jax.grad(flat_loss)(flat), np.float64)
  rho = 0.1
  adv = np.asarray(
    jax.grad(flat_loss)(flat + rho * jnp.asarray(grad / np.linalg.norm(grad), jnp.float32)),
    np.float64,
  )
  segments = angles.layer_segments(params)
  assert [name for name, _ in segments] == ["l1", "l2"]
  hvp = jax.jit(lambda v: jax.jvp(jax.grad(flat_loss), (flat,), (v,))[1])

  record, v = angles.measure(
    hvp, grad, adv, segments, jax.random.key(0), num_iters=flat.size, layer_iters=flat.size
  )

  ref = _reference(hess, grad, adv, segments)
  assert ref["gap"] > 1e-3 * ref["lambda_max"]  # a well-defined top eigenvector
  np.testing.assert_allclose(record["lambda_max"], ref["lambda_max"], rtol=1e-4)
  assert record["residual"] < 1e-2
  for field in (
    "angle_clean",
    "angle_adv",
    "angle_clean_layer_slice",
    "angle_adv_layer_slice",
    "angle_clean_layer_block",
    "angle_adv_layer_block",
  ):
    assert 0.0 <= record[field] <= 90.0
    np.testing.assert_allclose(record[field], ref[field], atol=0.05, err_msg=field)
  # Signed cosines are consistent with the angles and with the returned eigenvector.
  assert math.isclose(
    math.degrees(math.acos(abs(record["cos_clean"]))), record["angle_clean"], abs_tol=1e-9
  )
  np.testing.assert_allclose(record["cos_clean"], angles.cosine(grad, v), rtol=1e-9)
  assert record["layer_names"] == ["l1", "l2"]
  for name, idx in segments:
    block_lam = _dense_top(hess[np.ix_(idx, idx)])[0]
    np.testing.assert_allclose(
      record["layer_lambda"][record["layer_names"].index(name)], block_lam, rtol=1e-3
    )


def test_layerwise_cosine_is_the_mean_of_per_layer_cosines():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=10), rng.normal(size=10)
  idx1 = np.arange(10) < 4
  segments = [("x", idx1), ("y", ~idx1)]
  expected = 0.5 * (angles.cosine(a[idx1], b[idx1]) + angles.cosine(a[~idx1], b[~idx1]))
  np.testing.assert_allclose(angles.layerwise_cosine(a, b, segments), expected, rtol=1e-12)
  # Scaling one layer does not change the per-layer angle; it does change the full one.
  c = a.copy()
  c[idx1] *= 100.0
  np.testing.assert_allclose(angles.layerwise_cosine(c, b, segments), expected, rtol=1e-12)
  assert not math.isclose(angles.cosine(c, b), angles.cosine(a, b))
  assert angles.angle_degrees(-1.0) == 0.0 and angles.angle_degrees(0.0) == 90.0


class _BNNet(nn.Module):
  """Dense - BatchNorm - tanh - Dense: train and eval mode give different losses."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(4, name="dense1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x)
    return nn.Dense(3, name="head")(jnp.tanh(x))


def test_measure_state_uses_train_mode_gradients_and_eval_mode_hessian():
  model = _BNNet()
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], (16, 3))
  labels = jax.random.randint(k[1], (16,), 0, 3)
  variables = model.init(k[2], x, train=False)
  stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])  # running stats != batch
  state = training.TrainState.create(
    apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1), batch_stats=stats
  )
  config = dataclasses.replace(TrainConfig(), rho=0.2, seed=0)
  segments = angles.layer_segments(state.params)
  batch = {"image": x, "label": labels}

  record = angles.measure_state(
    state, batch, config, segments, jax.random.key(0), num_iters=40, per_layer="slice"
  )

  flat, unravel = ravel_pytree(state.params)

  def train_loss(z):
    logits, _ = model.apply(
      {"params": unravel(z), "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )
    return train_lib.cross_entropy(logits, labels)[0]

  def eval_loss(z):
    logits = model.apply({"params": unravel(z), "batch_stats": stats}, x, train=False)
    return train_lib.cross_entropy(logits, labels)[0]

  grad = np.asarray(jax.grad(train_loss)(flat), np.float64)
  step = jnp.asarray(0.2 * grad / np.linalg.norm(grad), jnp.float32)
  adv = np.asarray(jax.grad(train_loss)(flat + step), np.float64)
  hess = np.asarray(jax.hessian(eval_loss)(flat), np.float64)
  ref = _reference(hess, grad, adv, segments)
  assert ref["gap"] > 1e-3 * ref["lambda_max"]
  np.testing.assert_allclose(record["grad_norm"], np.linalg.norm(grad), rtol=1e-4)
  np.testing.assert_allclose(record["adv_grad_norm"], np.linalg.norm(adv), rtol=1e-4)
  np.testing.assert_allclose(record["lambda_max"], ref["lambda_max"], rtol=1e-3)
  assert "angle_clean_layer_block" not in record
  for field in ("angle_clean", "angle_adv", "angle_clean_layer_slice", "angle_adv_layer_slice"):
    np.testing.assert_allclose(record[field], ref[field], atol=0.1, err_msg=field)
  train_hess = np.asarray(jax.hessian(train_loss)(flat), np.float64)
  assert not math.isclose(_dense_top(train_hess)[0], ref["lambda_max"], rel_tol=1e-2)


def _fake_records():
  rng = np.random.default_rng(0)
  records = []
  for opt, center in (("sgd", 80.0), ("sam", 75.0), ("xsam", 85.0)):
    for step in range(0, 100, 10):
      record = {"optimizer": opt, "step": step, "lambda_max": 1.0 + step, "residual": 0.01}
      for field in ("clean", "adv", "clean_layer_block", "adv_layer_block"):
        record[f"angle_{field}"] = float(np.clip(center + rng.normal(), 0, 90))
      if opt == "xsam":
        record["cached_eigvec_abs_cos"] = 0.5
      records.append(record)
  return records


def test_summary_and_figure_from_records(tmp_path):
  records = _fake_records()
  rows = angles.summarize(records)
  assert [r["optimizer"] for r in rows] == ["sgd", "sam", "xsam"]
  sgd = [r["angle_adv"] for r in records if r["optimizer"] == "sgd"]
  np.testing.assert_allclose(rows[0]["mean_angle_adv"], np.mean(sgd))
  np.testing.assert_allclose(rows[0]["median_angle_adv"], np.median(sgd))
  table = angles.summary_markdown(rows, [{"optimizer": "sam", "test_accuracy": 0.5}])
  assert "| sam | 10 |" in table and "| 50.0% |" in table and "| 0.50 |" in table
  assert "slice" not in table  # only the variants present are shown
  angles.plot(records, tmp_path / "a.png", title="fake")
  assert (tmp_path / "a.png").stat().st_size > 10_000


@pytest.mark.slow
def test_cli_trains_measures_and_writes_figure_and_records(tmp_path):
  out = tmp_path / "angles.png"
  code = angles.main(
    [
      "--optimizers",
      "xsam",
      "--every",
      "8",
      "--max_steps",
      "10",
      "--lanczos_iters",
      "4",
      "--layer_iters",
      "4",
      "--out",
      str(out),
      "--set",
      "epochs=1",
    ]
  )
  assert code == 0
  paths = angles.output_paths(out)
  for path in paths.values():
    assert path.exists() and path.stat().st_size > 0
  records = [json.loads(line) for line in paths["jsonl"].read_text().splitlines()]
  assert [(r["optimizer"], r["step"]) for r in records] == [("xsam", 0), ("xsam", 8)]
  for r in records:
    for key, value in r.items():
      if key.startswith("angle_"):
        assert 0.0 <= value <= 90.0
    assert len(r["layer_names"]) == 6  # conv1-4, fc1, head
    assert 0.0 <= r["cached_eigvec_abs_cos"] <= 1.0 + 1e-6
  header = paths["csv"].read_text().splitlines()[0].split(",")
  assert "angle_adv_layer_block" in header and "layer_names" not in header
  assert "| xsam | 2 |" in paths["summary"].read_text()
