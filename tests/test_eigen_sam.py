"""Tests for xsam_jax.eigen_sam against a NumPy re-derivation of the official update."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import make_step

import xsam_jax


def _np_eigen_sam(quadratic, x, v, rho, alpha, eps=1e-12):
  g = quadratic.grad_np(x)
  gh = g / (np.linalg.norm(g) + eps)
  c = gh @ v
  e = rho * (gh + alpha * np.sign(g @ v) * (v - c * gh))
  return quadratic.grad_np(x + e), e


def _run(tx, quadratic, v, **kw):
  params = quadratic.params
  state = tx.init(params)._replace(eigvec=quadratic.unflat(v))
  return tx.update(
    jax.grad(quadratic.loss)(params),
    state,
    params,
    grad_fn=jax.grad(quadratic.loss),
    refresh=False,
    **kw,
  )


def test_perturbation_is_tilted_towards_eigvec_as_in_official_code(quadratic):
  _, v = quadratic.top_eigvec()
  out, state = _run(xsam_jax.eigen_sam(rho=0.3, alpha=0.5), quadratic, v)
  x = quadratic.flat(quadratic.params)
  expected, e = _np_eigen_sam(quadratic, x, v, 0.3, 0.5)
  np.testing.assert_allclose(quadratic.flat(out), expected, rtol=1e-5)
  g = quadratic.grad_np(x)
  np.testing.assert_allclose(state.cos, g @ v / np.linalg.norm(g), rtol=1e-5)
  # Not renormalised: |eps| = rho * sqrt(1 + alpha^2 (1 - cos^2)).
  c = float(state.cos)
  np.testing.assert_allclose(np.linalg.norm(e), 0.3 * np.sqrt(1 + 0.25 * (1 - c * c)), rtol=1e-6)
  # The same norms as every method's state: ||g||, ||epsilon||, ||g_adv||.
  np.testing.assert_allclose(state.grad_norm, np.linalg.norm(g), rtol=1e-5)
  np.testing.assert_allclose(state.perturbation_norm, np.linalg.norm(e), rtol=1e-5)
  np.testing.assert_allclose(state.adv_grad_norm, np.linalg.norm(expected), rtol=1e-5)


def test_alpha_zero_reduces_to_sam_exactly(tiny_mlp):
  sam_tx = optax.chain(xsam_jax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
  eig_tx = optax.chain(
    xsam_jax.eigen_sam(rho=0.05, alpha=0.0, refresh_every=2), optax.sgd(0.1, momentum=0.9)
  )
  p1, s1 = tiny_mlp.params, sam_tx.init(tiny_mlp.params)
  p2, s2 = tiny_mlp.params, eig_tx.init(tiny_mlp.params)
  step1, step2 = make_step(sam_tx, tiny_mlp.loss), make_step(eig_tx, tiny_mlp.loss)
  for _ in range(4):
    p1, s1, _ = step1(p1, s1)
    p2, s2, _ = step2(p2, s2)
  chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)


def test_perturbation_is_invariant_to_eigvec_sign(quadratic):
  _, v = quadratic.top_eigvec()
  tx = xsam_jax.eigen_sam(rho=0.2, alpha=0.3)
  out_pos, _ = _run(tx, quadratic, v)
  out_neg, _ = _run(tx, quadratic, -v)
  chex.assert_trees_all_close(out_pos, out_neg, rtol=1e-6, atol=1e-7)
  # ... while the tilt is real: it differs from SAM.
  sam_out, _ = _run(xsam_jax.eigen_sam(rho=0.2, alpha=0.0), quadratic, v)
  assert not np.allclose(quadratic.flat(out_pos), quadratic.flat(sam_out), atol=1e-4)


def test_eigenvector_converges_over_warm_started_refreshes(tiny_mlp):
  w, vecs = np.linalg.eigh(tiny_mlp.dense_hessian(tiny_mlp.params))
  top = vecs[:, np.argmax(np.abs(w))]
  tx = xsam_jax.eigen_sam(rho=0.0, refresh_every=1, num_iters=5)
  params = tiny_mlp.params
  state = tx.init(params)
  update = jax.jit(
    lambda s: tx.update(jax.grad(tiny_mlp.loss)(params), s, params, grad_fn=jax.grad(tiny_mlp.loss))
  )
  cosines = []
  for _ in range(40):
    _, state = update(state)
    cosines.append(abs(np.asarray(jax.flatten_util.ravel_pytree(state.eigvec)[0]) @ top))
  assert cosines[-1] > 0.999
  assert cosines[-1] >= cosines[0]


def test_step_compiles_once_and_keeps_bfloat16(tiny_mlp):
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_mlp.params)
  loss = lambda p: tiny_mlp.loss(jax.tree.map(lambda x: x.astype(jnp.float32), p))
  tx = optax.chain(xsam_jax.eigen_sam(refresh_every=2), optax.sgd(0.1))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss))
    return optax.apply_updates(params, updates), state

  chex.clear_trace_counter()
  state = tx.init(params)
  dtypes0 = jax.tree.map(lambda x: x.dtype, state)
  for _ in range(4):
    params, state = step(params, state)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert jax.tree.map(lambda x: x.dtype, state) == dtypes0


def test_zero_gradient_gives_finite_update():
  loss = lambda w: jnp.sum(w**2)
  params = jnp.zeros(3)
  tx = xsam_jax.eigen_sam()
  out, state = tx.update(jax.grad(loss)(params), tx.init(params), params, grad_fn=jax.grad(loss))
  chex.assert_tree_all_finite((out, state))


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"rho": -0.1}, "rho"),
    ({"alpha": 3.0}, "alpha"),
    ({"refresh_every": -1}, "refresh_every"),
    ({"num_iters": 0}, "num_iters"),
  ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    xsam_jax.eigen_sam(**kwargs)


def test_missing_grad_fn_raises_value_error(quadratic):
  tx = xsam_jax.eigen_sam()
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(
      jax.grad(quadratic.loss)(quadratic.params), tx.init(quadratic.params), quadratic.params
    )
