"""Tests for the cached eigenvector: refresh_eigenvector and is_due."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import xsam_jax


def test_refresh_eigenvector_updates_every_tracking_state_inside_a_chain(quadratic):
  lam, v = quadratic.top_eigvec()
  tx = optax.chain(xsam_jax.xsam(), xsam_jax.eigen_sam(), optax.sgd(0.1))
  state = tx.init(quadratic.params)
  state = xsam_jax.refresh_eigenvector(
    state, quadratic.params, jax.grad(quadratic.loss), power_iters=60
  )
  for sub in state[:2]:
    assert abs(quadratic.flat(sub.eigvec) @ v) > 0.9999
    np.testing.assert_allclose(sub.eigval, lam, rtol=1e-4)
  assert isinstance(state[2], type(tx.init(quadratic.params)[2]))


def test_refresh_eigenvector_under_jit_and_inject_hyperparams(quadratic):
  lam, _ = quadratic.top_eigvec()
  tx = optax.inject_hyperparams(xsam_jax.xsam, static_args=("refresh_every", "power_iters"))(
    rho=0.1
  )
  refresh = jax.jit(
    lambda s: xsam_jax.refresh_eigenvector(
      s, quadratic.params, jax.grad(quadratic.loss), power_iters=60, unroll=False
    )
  )
  state = refresh(tx.init(quadratic.params))
  np.testing.assert_allclose(optax.tree.get(state, "eigval"), lam, rtol=1e-4)


def test_refresh_eigenvector_rejects_a_state_without_eigenvector(quadratic):
  state = optax.chain(xsam_jax.sam(), optax.sgd(0.1)).init(quadratic.params)
  with pytest.raises(ValueError, match="no eigenvector"):
    xsam_jax.refresh_eigenvector(state, quadratic.params, jax.grad(quadratic.loss))
  with pytest.raises(ValueError, match="power_iters"):
    xsam_jax.refresh_eigenvector(state, quadratic.params, jax.grad(quadratic.loss), power_iters=0)


def test_is_due_matches_the_in_step_schedule():
  assert [xsam_jax.is_due(i, 3) for i in range(7)] == [True, False, False, True, False, False, True]
