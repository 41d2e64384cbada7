"""Tests for xsam_jax.sam (SAM and ASAM) against NumPy re-derivations."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import make_step

import xsam_jax


def _np_sam_grad(quadratic, x, rho, eps=1e-12):
  g = quadratic.grad_np(x)
  e = rho * g / (np.linalg.norm(g) + eps)
  return quadratic.grad_np(x + e)


def _np_asam_grad(quadratic, x, rho, eta, eps=1e-12):
  g = quadratic.grad_np(x)
  t = np.abs(x) + eta
  e = rho * t * t * g / (np.linalg.norm(t * g) + eps)
  return quadratic.grad_np(x + e)


def test_sam_returns_gradient_at_normalised_ascent_point(quadratic):
  tx = xsam_jax.sam(rho=0.3)
  params = quadratic.params
  state = tx.init(params)
  grads = jax.grad(quadratic.loss)(params)
  out, state = tx.update(grads, state, params, grad_fn=jax.grad(quadratic.loss))
  x = quadratic.flat(params)
  np.testing.assert_allclose(quadratic.flat(out), _np_sam_grad(quadratic, x, 0.3), rtol=1e-5)
  np.testing.assert_allclose(state.grad_norm, np.linalg.norm(quadratic.grad_np(x)), rtol=1e-5)
  np.testing.assert_allclose(state.perturbation_norm, 0.3, rtol=1e-5)
  np.testing.assert_allclose(
    state.adv_grad_norm, np.linalg.norm(_np_sam_grad(quadratic, x, 0.3)), rtol=1e-5
  )
  assert int(state.count) == 1


def test_asam_scales_perturbation_by_weight_magnitude(quadratic):
  tx = xsam_jax.sam(rho=0.5, adaptive=True, eta=0.01)
  params = quadratic.params
  out, _ = tx.update(
    jax.grad(quadratic.loss)(params), tx.init(params), params, grad_fn=jax.grad(quadratic.loss)
  )
  x = quadratic.flat(params)
  expected = _np_asam_grad(quadratic, x, 0.5, 0.01)
  np.testing.assert_allclose(quadratic.flat(out), expected, rtol=1e-5)
  # And it is not plain SAM (the test can fail).
  assert not np.allclose(expected, _np_sam_grad(quadratic, x, 0.5), rtol=1e-3)


def test_asam_mask_leaves_unmasked_leaves_unscaled(quadratic):
  params = quadratic.params
  mask = {"a": True, "b": False}
  tx = xsam_jax.sam(rho=0.5, adaptive=True, eta=0.1, adaptive_mask=mask)
  out, _ = tx.update(
    jax.grad(quadratic.loss)(params), tx.init(params), params, grad_fn=jax.grad(quadratic.loss)
  )
  x = quadratic.flat(params)
  g = quadratic.grad_np(x)
  t = np.concatenate([np.abs(x[:3]) + 0.1, np.ones(2)])
  e = 0.5 * t * t * g / np.linalg.norm(t * g)
  np.testing.assert_allclose(quadratic.flat(out), quadratic.grad_np(x + e), rtol=1e-5)
  # A callable mask gives the same result.
  tx2 = xsam_jax.sam(rho=0.5, adaptive=True, eta=0.1, adaptive_mask=lambda p: mask)
  out2, _ = tx2.update(
    jax.grad(quadratic.loss)(params), tx2.init(params), params, grad_fn=jax.grad(quadratic.loss)
  )
  chex.assert_trees_all_close(out, out2)


def test_several_sam_steps_through_sgd_chain_match_numpy(quadratic):
  lr, rho, mom = 0.05, 0.1, 0.9
  tx = optax.chain(xsam_jax.sam(rho=rho), optax.sgd(lr, momentum=mom))
  step = make_step(tx, quadratic.loss)
  params, state = quadratic.params, tx.init(quadratic.params)
  x = quadratic.flat(params)
  buf = np.zeros_like(x)
  for _ in range(6):
    params, state, _ = step(params, state)
    buf = mom * buf + _np_sam_grad(quadratic, x, rho)
    x = x - lr * buf
  np.testing.assert_allclose(quadratic.flat(params), x, rtol=1e-4, atol=1e-5)


def test_rho_zero_reduces_to_base_optimizer(tiny_mlp):
  base = optax.sgd(0.1, momentum=0.9)
  tx = optax.chain(xsam_jax.sam(rho=0.0), base)
  step = make_step(tx, tiny_mlp.loss)
  p_sam, s_sam = tiny_mlp.params, tx.init(tiny_mlp.params)
  p_ref, s_ref = tiny_mlp.params, base.init(tiny_mlp.params)
  for _ in range(3):
    p_sam, s_sam, _ = step(p_sam, s_sam)
    u, s_ref = base.update(jax.grad(tiny_mlp.loss)(p_ref), s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  chex.assert_trees_all_close(p_sam, p_ref, rtol=1e-6, atol=1e-7)


def test_rho_schedule_is_read_at_the_current_count(quadratic):
  schedule = lambda count: 0.1 * (count + 1)
  tx = xsam_jax.sam(rho=schedule)
  params = quadratic.params
  state = tx.init(params)
  grads = jax.grad(quadratic.loss)(params)
  for expected_rho in (0.1, 0.2, 0.3):
    _, state = tx.update(grads, state, params, grad_fn=jax.grad(quadratic.loss))
    np.testing.assert_allclose(state.perturbation_norm, expected_rho, rtol=1e-5)


def test_inject_hyperparams_can_change_rho(quadratic):
  tx = optax.inject_hyperparams(xsam_jax.sam)(rho=0.1)
  params = quadratic.params
  state = tx.init(params)
  state.hyperparams["rho"] = jnp.asarray(0.4)
  out, state = jax.jit(
    lambda s: tx.update(
      jax.grad(quadratic.loss)(params), s, params, grad_fn=jax.grad(quadratic.loss)
    )
  )(state)
  x = quadratic.flat(params)
  np.testing.assert_allclose(quadratic.flat(out), _np_sam_grad(quadratic, x, 0.4), rtol=1e-5)


def test_zero_gradient_gives_finite_update():
  loss = lambda w: jnp.sum(w**2)
  params = jnp.zeros(4)  # gradient is exactly zero here
  for adaptive in (False, True):
    tx = xsam_jax.sam(rho=0.05, adaptive=adaptive)
    out, state = tx.update(jax.grad(loss)(params), tx.init(params), params, grad_fn=jax.grad(loss))
    chex.assert_tree_all_finite((out, state))
    np.testing.assert_array_equal(out, np.zeros(4))


def test_bfloat16_params_keep_their_dtype_and_state_dtypes_are_stable():
  loss = lambda w: jnp.sum((w.astype(jnp.float32) - 1.0) ** 2)
  params = jnp.zeros(8, jnp.bfloat16)
  tx = optax.chain(xsam_jax.sam(rho=0.05), optax.sgd(0.1))
  step = make_step(tx, loss)
  state = tx.init(params)
  dtypes0 = jax.tree.map(lambda x: x.dtype, state)
  for _ in range(2):
    params, state, updates = step(params, state)
  assert params.dtype == jnp.bfloat16 and updates.dtype == jnp.bfloat16
  assert jax.tree.map(lambda x: x.dtype, state) == dtypes0


def test_unknown_extra_args_are_ignored(quadratic):
  tx = optax.chain(xsam_jax.sam(), optax.sgd(0.1))
  params = quadratic.params
  tx.update(
    jax.grad(quadratic.loss)(params),
    tx.init(params),
    params,
    grad_fn=jax.grad(quadratic.loss),
    some_other_arg=3,
    value=1.0,
  )


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [({"rho": -0.1}, "rho"), ({"rho": float("nan")}, "rho"), ({"eta": -1.0}, "eta")],
)
def test_bad_hyperparameters_raise_value_error_naming_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    xsam_jax.sam(**kwargs)


def test_missing_params_or_grad_fn_raise_value_error_naming_the_fix(quadratic):
  tx = xsam_jax.sam()
  params = quadratic.params
  grads = jax.grad(quadratic.loss)(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, tx.init(params), None, grad_fn=jax.grad(quadratic.loss))
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(grads, tx.init(params), params)
