"""Tests for experiments.optimizers: the chain each config builds and its schedule."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import make_step
from jax.flatten_util import ravel_pytree

from experiments.configs.base import OPTIMIZERS, TrainConfig
from experiments.models import get_model
from experiments.optimizers import asam_mask, build_optimizer, learning_rate
from xsam_jax import is_due


def test_cosine_epoch_schedule_is_torch_cosine_annealing_stepped_per_epoch():
  config = TrainConfig(lr=0.1, epochs=4, lr_schedule="cosine_epoch")
  schedule = learning_rate(config, steps_per_epoch=10)
  expected = [0.1 * 0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(4)]
  got = [float(schedule(jnp.asarray(s))) for s in (0, 9, 10, 25, 39)]
  np.testing.assert_allclose(
    got, [expected[0], expected[0], expected[1], expected[2], expected[3]], rtol=1e-6
  )


def test_sgd_chain_matches_torch_sgd_with_coupled_weight_decay():
  config = TrainConfig(
    optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01, lr_schedule="constant"
  )
  tx = build_optimizer(config, 10).tx
  w = jnp.array([1.0, -2.0])
  g = jnp.array([0.5, 0.25])
  state = tx.init(w)
  buf = np.zeros(2)
  w_np = np.asarray(w)
  for _ in range(3):
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    buf = 0.9 * buf + (np.asarray(g) + 0.01 * w_np)  # torch: b = mu b + (g + wd w)
    w_np = w_np - 0.1 * buf
  np.testing.assert_allclose(w, w_np, rtol=1e-6)


# A quadratic L(w) = 0.5 w^T H w - b^T w over a Linen-like params tree (a dense layer and a
# norm layer), with a clear top-eigenvalue gap so power iteration converges to float32 precision.
_EIGS = np.array([5.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.2])
_RNG = np.random.default_rng(0)
_Q, _ = np.linalg.qr(_RNG.normal(size=(8, 8)))
HESS = (_Q * _EIGS) @ _Q.T
SHIFT = _RNG.normal(size=8)
PARAMS = {
  "dense": {
    "kernel": jnp.asarray(_RNG.normal(size=(2, 2)), jnp.float32),
    "bias": jnp.asarray([1.5, -2.0], jnp.float32),  # far from 1: T = |w| + eta would show
  },
  "norm": {"scale": jnp.asarray([0.5, 1.2], jnp.float32)},
}
FLAT0, UNRAVEL = ravel_pytree(PARAMS)
# ASAM's official code rescales weights (conv/linear kernels, BN scales), not biases.
ASAM_MASK = np.asarray(
  ravel_pytree(
    {
      "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
      "norm": {"scale": jnp.ones(2)},
    }
  )[0],
  dtype=bool,
)
RECIPE = dict(
  lr=0.05,
  lr_schedule="constant",
  momentum=0.9,
  weight_decay=0.05,
  rho=0.1,
  alpha=0.2,
  eta=0.01,
  refresh_every=2,  # refresh at step 0, keep the cached vector at step 1
  power_iters=60,
)


def _quadratic_loss(params):
  x = ravel_pytree(params)[0]
  return 0.5 * x @ jnp.asarray(HESS, x.dtype) @ x - jnp.asarray(SHIFT, x.dtype) @ x


def _grad(x):
  return HESS @ x - SHIFT


def _reference_trajectory(config, steps):
  """Each method's rule re-derived in float64 NumPy, ``steps`` steps from ``PARAMS``."""
  method = config.optimizer.removesuffix("_adamw")
  evals, evecs = np.linalg.eigh(HESS)
  v = evecs[:, np.argmax(np.abs(evals))]
  x = np.asarray(FLAT0, np.float64)
  buf, m, s = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
  out = []
  for t in range(1, steps + 1):
    g = _grad(x)
    g_hat = g / np.linalg.norm(g)
    if method in ("sgd", "adamw", "mesa"):  # MESA's term is in the loss, not the chain
      d = g
    elif method == "sam":
      d = _grad(x + config.rho * g_hat)
    elif method == "asam":  # eps = rho T^2 g / ||T g||, T = |w| + eta on weights, 1 on biases
      scale = np.where(ASAM_MASK, np.abs(x) + config.eta, 1.0)
      d = _grad(x + config.rho * scale**2 * g / np.linalg.norm(scale * g))
    elif method == "eigen_sam":  # eps = rho (g_hat + alpha sign(g.v) (v - (g_hat.v) g_hat))
      tilt = np.sign(g @ v) * (v - (g_hat @ v) * g_hat)
      d = _grad(x + config.rho * (g_hat + config.alpha * tilt))
    elif method == "xsam":  # normalised g_adv minus alpha times its projection on v
      g_adv = _grad(x + config.rho * g_hat)
      g_adv = g_adv / np.linalg.norm(g_adv)
      d = g_adv - config.alpha * (g_adv @ v) * v
    else:
      raise AssertionError(method)
    if config.optimizer.endswith("adamw"):  # optax.adamw: decoupled decay, bias correction
      m = config.b1 * m + (1 - config.b1) * d
      s = config.b2 * s + (1 - config.b2) * d**2
      m_hat, s_hat = m / (1 - config.b1**t), s / (1 - config.b2**t)
      x = x - config.lr * (m_hat / (np.sqrt(s_hat) + 1e-8) + config.weight_decay * x)
    else:  # torch SGD: b = mu b + (d + wd w), w -= lr b
      buf = config.momentum * buf + (d + config.weight_decay * x)
      x = x - config.lr * buf
    out.append(x)
  return out


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_takes_its_methods_first_two_steps(name):
  config = dataclasses.replace(TrainConfig(), optimizer=name, **RECIPE)
  spec = build_optimizer(config, 10)
  assert spec.needs_grad_fn == (name not in ("sgd", "adamw", "mesa", "mesa_adamw"))
  assert (spec.mesa_start_step is not None) == name.startswith("mesa")
  assert spec.tracks_eigvec == name.startswith(("xsam", "eigen_sam"))
  step = make_step(spec.tx, _quadratic_loss)
  params, state = PARAMS, spec.tx.init(PARAMS)
  for i, expected in enumerate(_reference_trajectory(config, steps=2)):
    params, state, _ = step(params, state)
    np.testing.assert_allclose(
      ravel_pytree(params)[0], expected, rtol=2e-5, atol=2e-6, err_msg=f"{name} step {i}"
    )


def test_asam_mask_scales_resnet18_kernels_and_batchnorm_scales_but_not_biases():
  model = get_model("resnet18", num_classes=10)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)[
    "params"
  ]
  mask = asam_mask(params)
  by_name: dict[str, set[bool]] = {}
  for path, scaled in jax.tree_util.tree_leaves_with_path(mask):
    by_name.setdefault(path[-1].key, set()).add(scaled)
  assert by_name == {"kernel": {True}, "scale": {True}, "bias": {False}}
  # The PyTorch reference has 62 parameter tensors; the 41 whose name contains 'weight' (20
  # conv, 20 BatchNorm, 1 linear) get T_w, the 21 biases (20 BatchNorm, 1 linear) T = 1.
  flags = jax.tree.leaves(mask)
  assert (len(flags), sum(flags)) == (62, 41)


def test_asam_mask_reaches_the_transform_built_for_asam():
  # The bias leaf alone: masked, ASAM's ascent there is rho g / |g| (T = 1), unmasked it would
  # be rho (|w| + eta)^2 g / ((|w| + eta) |g|) = (|w| + eta) times that.
  params = {"bias": jnp.asarray([3.0])}
  config = dataclasses.replace(TrainConfig(), optimizer="asam", rho=0.1, eta=0.01)
  tx = build_optimizer(config, 10).tx
  seen = []

  def grad_fn(p):
    seen.append(p["bias"])
    return {"bias": jnp.asarray([2.0])}

  tx.update({"bias": jnp.asarray([2.0])}, tx.init(params), params, grad_fn=grad_fn)
  np.testing.assert_allclose(seen[0], [3.1], rtol=1e-6)


@pytest.mark.parametrize("once_per_epoch", [False, True])
def test_refresh_once_per_epoch_sets_the_period_of_the_transform_and_of_the_host(once_per_epoch):
  steps_per_epoch = 3
  config = dataclasses.replace(
    TrainConfig(),
    optimizer="eigen_sam",
    refresh_every=2,
    refresh_once_per_epoch=once_per_epoch,
    power_iters=20,
  )
  spec = build_optimizer(config, steps_per_epoch)
  period = steps_per_epoch if once_per_epoch else 2
  assert spec.refresh_every == period  # what train.py's static path feeds is_due
  # A curvature that grows with the step count: the cached eigenvalue tells when the
  # in-step (lax.cond) refresh ran.
  params = jnp.ones(2)
  state = spec.tx.init(params)
  cached = []
  for count in range(7):
    c = float(count + 1)
    eig_grad_fn = lambda p, c=c: c * jnp.array([4.0, 1.0]) * p
    _, state = spec.tx.update(params, state, params, grad_fn=lambda p: p, eig_grad_fn=eig_grad_fn)
    cached.append(float(optax.tree.get(state, "eigval")))
  expected = [4.0 * (period * (count // period) + 1) for count in range(7)]
  np.testing.assert_allclose(cached, expected, rtol=1e-4)
  assert [is_due(count, spec.refresh_every) for count in range(7)] == [
    count % period == 0 for count in range(7)
  ]


@pytest.mark.parametrize("name", ["mesa", "mesa_adamw"])
def test_mesa_starts_its_kl_term_mesa_start_epoch_epochs_in_on_the_base_optimizer(name):
  config = dataclasses.replace(TrainConfig(), optimizer=name, mesa_start_epoch=3)
  spec = build_optimizer(config, steps_per_epoch=7)
  assert spec.mesa_start_step == 21 and not spec.needs_grad_fn and not spec.tracks_eigvec
  plain = {"mesa": "sgd", "mesa_adamw": "adamw"}[name]
  base = build_optimizer(dataclasses.replace(config, optimizer=plain), 7)
  params = {"w": jnp.asarray([1.0, -2.0])}
  grads = {"w": jnp.asarray([0.5, 0.25])}
  updates = spec.tx.update(grads, spec.tx.init(params), params)[0]
  np.testing.assert_array_equal(
    updates["w"], base.tx.update(grads, base.tx.init(params), params)[0]["w"]
  )
