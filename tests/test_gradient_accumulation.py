"""Gradient accumulation: the method before ``optax.MultiSteps(base, k)``, micro-batches differ.

Each micro-batch makes its own ascent (and X-SAM correction), the base optimizer receives the
mean of the k sharpness-aware gradients once every k micro-batches, and the eigenvector is
refreshed on the first micro-batch of every ``refresh_every``-th optimizer step, never more
than once per step. Checked against a NumPy re-derivation with a dense Hessian.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import xsam_jax

K = 3  # micro-batches per optimizer step
STEPS = 3  # optimizer steps
RHO, ALPHA, LR, MOMENTUM, POWER_ITERS = 0.2, 0.4, 0.1, 0.9, 4


def _problem():
  keys = jax.random.split(jax.random.key(7), 4)
  params = {
    "w1": jax.random.normal(keys[0], (3, 4)),
    "b1": 0.1 * jax.random.normal(keys[1], (4,)),
    "w2": jax.random.normal(keys[2], (4, 2)),
  }
  xs = jax.random.normal(keys[3], (K * STEPS, 8, 3))  # a different micro-batch every call
  ys = (xs[..., 0] - 0.7 * xs[..., 2] > 0).astype(jnp.int32)
  return params, xs, ys


def _loss(params, x, y):
  logits = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _make(name, refresh_every):
  if name == "sam":
    return xsam_jax.sam(rho=RHO, accumulation_steps=K)
  make = {"eigen_sam": xsam_jax.eigen_sam, "xsam": xsam_jax.xsam}[name]
  return make(
    rho=RHO,
    alpha=ALPHA,
    refresh_every=refresh_every,
    power_iters=POWER_ITERS,
    accumulation_steps=K,
  )


def _reference(name, refresh_every, params, xs, ys, v):
  """NumPy: per-micro-batch rule, dense-Hessian power iteration, SGD with momentum."""
  w, unravel = ravel_pytree(params)
  w = np.asarray(w, np.float64)
  flat_loss = lambda z, j: _loss(unravel(jnp.asarray(z, jnp.float32)), xs[j], ys[j])
  grad = lambda z, j: np.asarray(jax.grad(flat_loss)(z, j), np.float64)
  hess = lambda z, j: np.asarray(jax.hessian(flat_loss)(jnp.asarray(z, jnp.float32), j))
  unit = lambda a: a / np.linalg.norm(a)
  trace = np.zeros_like(w)
  lam = 0.0
  for t in range(STEPS):
    if name != "sam" and t % refresh_every == 0:
      h = hess(w, K * t)  # the first micro-batch of this optimizer step
      for _ in range(POWER_ITERS):
        lam, v = v @ h @ v, unit(h @ v)
    grads = []
    for j in range(K * t, K * (t + 1)):
      g_hat = unit(grad(w, j))
      if name == "sam":
        grads.append(grad(w + RHO * g_hat, j))
      elif name == "eigen_sam":
        c = g_hat @ v
        grads.append(grad(w + RHO * (g_hat + ALPHA * np.sign(c) * (v - c * g_hat)), j))
      else:
        u = unit(grad(w + RHO * g_hat, j))
        grads.append(u - ALPHA * (u @ v) * v)
    trace = np.mean(grads, axis=0) + MOMENTUM * trace
    w = w - LR * trace
  return w, v, lam


@pytest.mark.parametrize(("name", "refresh_every"), [("sam", 1), ("eigen_sam", 2), ("xsam", 1)])
@pytest.mark.parametrize("path", ["cond", "static"])
def test_method_before_multisteps_accumulates_per_micro_batch_sharpness_gradients(
  name, refresh_every, path
):
  params, xs, ys = _problem()
  base = optax.MultiSteps(optax.sgd(LR, momentum=MOMENTUM), every_k_schedule=K)
  tx = optax.chain(_make(name, refresh_every), base.gradient_transformation())
  state = tx.init(params)
  v0 = np.asarray(ravel_pytree(state[0].eigvec)[0], np.float64) if name != "sam" else None

  @jax.jit
  def micro_step(params, state, x, y, refresh):
    grad_fn = lambda p: jax.grad(_loss)(p, x, y)
    extra = {} if refresh is None else {"refresh": refresh}
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn, **extra)
    return optax.apply_updates(params, updates), state

  step = micro_step
  if path == "static":
    step = jax.jit(micro_step.__wrapped__, static_argnums=4)
  eigvals = []
  for call in range(K * STEPS):
    refresh = None
    if path == "static" and name != "sam":
      refresh = xsam_jax.is_due(call, refresh_every, accumulation_steps=K)
    before = params
    params, state = step(params, state, xs[call], ys[call], refresh)
    if (call + 1) % K:  # mid-step micro-batches change nothing
      chex.assert_trees_all_equal(params, before)
    if name != "sam":
      eigvals.append(float(state[0].eigval))

  w_ref, v_ref, lam_ref = _reference(name, refresh_every, *_problem(), v0)
  np.testing.assert_allclose(ravel_pytree(params)[0], w_ref, rtol=2e-4, atol=2e-5)
  if name != "sam":
    v = np.asarray(ravel_pytree(state[0].eigvec)[0])
    np.testing.assert_allclose(v, v_ref, rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(eigvals[-1], lam_ref, rtol=1e-4)
    # At most one refresh per optimizer step: eigval only changes on first micro-batches.
    changes = [c for c in range(1, K * STEPS) if eigvals[c] != eigvals[c - 1]]
    assert changes == [c for c in range(K, K * STEPS, K) if (c // K) % refresh_every == 0]


def test_schedules_read_the_optimizer_step_not_the_micro_batch():
  seen = []
  rho = lambda step: jnp.asarray(0.1) * (1 + step)
  loss = lambda w: 0.5 * jnp.sum(w**2)
  tx = xsam_jax.sam(rho=rho, accumulation_steps=2)
  params, state = jnp.ones(2), tx.init(jnp.ones(2))
  for _ in range(4):
    _, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
    seen.append(float(state.perturbation_norm))
  np.testing.assert_allclose(seen, [0.1, 0.1, 0.2, 0.2], rtol=1e-6)


def test_accumulation_steps_must_be_a_positive_int():
  for make in (xsam_jax.sam, xsam_jax.eigen_sam, xsam_jax.xsam):
    with pytest.raises(ValueError, match="accumulation_steps"):
      make(accumulation_steps=0)
  with pytest.raises(ValueError, match="accumulation_steps"):
    xsam_jax.is_due(3, 2, accumulation_steps=0)
