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

import xsam_jax
from experiments.configs.base import OPTIMIZERS, TrainConfig
from experiments.models import get_model
from experiments.optimizers import (
  asam_mask,
  build_optimizer,
  gradient_evaluations,
  learning_rate,
  sharpness_state,
)
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
  esam_beta=0.6,  # not the default, so a builder that drops it fails
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
  mu = var = 0.0  # AE-SAM's moving statistics of ||g||^2
  gv = np.zeros_like(x)  # LookSAM's cached orthogonal part
  total = config.epochs * 10  # the tests build with 10 steps per epoch
  for t in range(1, steps + 1):
    g = _grad(x)
    g_hat = g / np.linalg.norm(g)
    sam = _grad(x + config.rho * g_hat)
    if method in ("sgd", "adamw", "mesa"):  # MESA's term is in the loss, not the chain
      d = g
    elif method == "sam":
      d = sam
    elif method == "sam_every":  # SAM on steps 0, k, 2k, ...
      d = sam if (t - 1) % config.sam_every_k == 0 else g
    elif method == "rst":  # Bernoulli(p) from the seed's key folded with the step
      draw = jax.random.fold_in(jax.random.key(config.seed), t - 1)
      d = sam if bool(jax.random.bernoulli(draw, config.sam_prob)) else g
    elif method == "ae_sam":  # SAM when ||g||^2 >= mu + c_t sigma, c_t linear over the run
      sq = g @ g
      mu = config.ae_decay * mu + (1 - config.ae_decay) * sq
      var = config.ae_decay * var + (1 - config.ae_decay) * (sq - mu) ** 2
      c = config.ae_threshold_start + (config.ae_threshold_end - config.ae_threshold_start) * (
        (t - 1) / total
      )
      d = sam if sq >= mu + c * np.sqrt(var) else g
    elif method == "looksam":  # refresh g_v every k steps, add alpha |g|/|g_v| g_v between
      if (t - 1) % config.looksam_k == 0:
        gv = sam - (sam @ g_hat) * g_hat
        d = sam
      else:
        d = g + config.looksam_alpha * np.linalg.norm(g) / np.linalg.norm(gv) * gv
    elif method == "asam":  # eps = rho T^2 g / ||T g||, T = |w| + eta on weights, 1 on biases
      scale = np.where(ASAM_MASK, np.abs(x) + config.eta, 1.0)
      d = _grad(x + config.rho * scale**2 * g / np.linalg.norm(scale * g))
    elif method == "eigen_sam":  # eps = rho (g_hat + alpha sign(g.v) (v - (g_hat.v) g_hat))
      tilt = np.sign(g @ v) * (v - (g_hat @ v) * g_hat)
      d = _grad(x + config.rho * (g_hat + config.alpha * tilt))
    elif method == "esam":  # leaf i kept iff bernoulli(split(fold_in(key(seed), t), n)[i], beta)
      keys = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), t - 1), 3)
      kept = [bool(jax.random.bernoulli(k, config.esam_beta)) for k in keys]
      mg = np.repeat(kept, [x.size for x in jax.tree.leaves(PARAMS)]) * g
      d = _grad(x + config.rho / config.esam_beta * mg / (np.linalg.norm(mg) + 1e-12))
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
def test_every_optimizer_takes_its_methods_first_steps(name):
  config = dataclasses.replace(TrainConfig(), optimizer=name, **RECIPE)
  spec = build_optimizer(config, 10)
  assert spec.needs_grad_fn == (name not in ("sgd", "adamw", "mesa", "mesa_adamw"))
  assert (spec.mesa_start_step is not None) == name.startswith("mesa")
  assert spec.tracks_eigvec == name.startswith(("xsam", "eigen_sam"))
  step = make_step(spec.tx, _quadratic_loss)
  params, state = PARAMS, spec.tx.init(PARAMS)
  # Three steps: the cheaper variants' second step (k = 5) is a plain or reused one.
  for i, expected in enumerate(_reference_trajectory(config, steps=3)):
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


# Non-default values of every variant's own fields, so a field that does not reach the
# transform (or reaches the wrong argument) changes the trajectory.
VARIANTS = {
  "sam_every": (
    dict(sam_every_k=3),
    lambda c, rho: xsam_jax.sometimes_sam(rho, when="every", k=3),
  ),
  "rst": (
    dict(sam_prob=0.3, seed=7),
    lambda c, rho: xsam_jax.sometimes_sam(rho, when="random", prob=0.3, key=7),
  ),
  "ae_sam": (
    dict(ae_decay=0.5, ae_threshold_start=-0.5, ae_threshold_end=2.0, epochs=1),
    lambda c, rho: xsam_jax.sometimes_sam(
      rho, when="adaptive", decay=0.5, threshold=optax.linear_schedule(-0.5, 2.0, 10)
    ),
  ),
  "looksam": (
    dict(looksam_k=3, looksam_alpha=0.4),
    lambda c, rho: xsam_jax.looksam(rho, k=3, alpha=0.4),
  ),
  "looksam_adamw": (
    dict(looksam_k=2, looksam_alpha=1.3, looksam_adaptive=True, eta=0.05),
    lambda c, rho: xsam_jax.looksam(
      rho, k=2, alpha=1.3, adaptive=True, eta=0.05, adaptive_mask=asam_mask
    ),
  ),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_cheaper_sam_name_builds_the_library_transform_with_its_config_fields(name):
  fields, expected_tx = VARIANTS[name]
  config = dataclasses.replace(TrainConfig(), optimizer=name, **{**RECIPE, **fields})
  spec = build_optimizer(config, 10)
  assert spec.needs_grad_fn and not spec.tracks_eigvec
  base = optax.adamw(config.lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  if not name.endswith("adamw"):
    base = optax.chain(
      optax.add_decayed_weights(config.weight_decay), optax.sgd(config.lr, momentum=0.9)
    )
  reference = optax.chain(expected_tx(config, config.rho), base)
  ours, theirs = make_step(spec.tx, _quadratic_loss), make_step(reference, _quadratic_loss)
  p1, s1 = PARAMS, spec.tx.init(PARAMS)
  p2, s2 = PARAMS, reference.init(PARAMS)
  for i in range(6):
    p1, s1, _ = ours(p1, s1)
    p2, s2, _ = theirs(p2, s2)
    np.testing.assert_allclose(
      ravel_pytree(p1)[0], ravel_pytree(p2)[0], rtol=1e-6, atol=1e-7, err_msg=f"step {i}"
    )
  assert int(sharpness_state(s1).ascent_steps) == int(sharpness_state(s2).ascent_steps)


def test_gradient_evaluations_count_ascents_and_hvps_from_the_state():
  params = jnp.ones(3)
  loss = lambda w: jnp.sum(w**2 + w**4)
  cases = {  # name: (fields, expected ascent gradients and HVPs after 7 steps)
    "sgd": ({}, 0, 0),
    "sam": ({}, 7, 0),
    "sam_every": ({"sam_every_k": 3}, 3, 0),  # steps 0, 3, 6
    "looksam": ({"looksam_k": 2}, 4, 0),  # steps 0, 2, 4, 6
    "xsam": ({"refresh_every": 3, "power_iters": 4}, 7, 3 * 4),  # refreshes at 0, 3, 6
    "eigen_sam": ({"refresh_every": 2, "power_iters": 2, "tracker": "random"}, 7, 0),
  }
  for name, (fields, ascent, hvps) in cases.items():
    config = dataclasses.replace(TrainConfig(), optimizer=name, **fields)
    spec = build_optimizer(config, 10)
    step = make_step(spec.tx, loss, **({"refresh": None} if spec.tracks_eigvec else {}))
    p, state = params, spec.tx.init(params)
    for _ in range(7):
      p, state, _ = step(p, state)
    counts = gradient_evaluations(7, state, spec.refresh_every)
    assert counts == {
      "grad_evals_clean": 7,
      "grad_evals_ascent": ascent,
      "hvps": hvps,
      "grad_evals": 7 + ascent + hvps,
    }, name


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
