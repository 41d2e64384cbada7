"""Tests for the cached eigenvector: refresh_eigenvector and is_due."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax


def test_refresh_eigenvector_updates_every_tracking_state_inside_a_chain(quadratic):
  lam, v = quadratic.top_eigvec()
  tx = optax.chain(xsam_jax.xsam(), xsam_jax.eigen_sam(), optax.sgd(0.1))
  state = tx.init(quadratic.params)
  state = xsam_jax.refresh_eigenvector(
    state, quadratic.params, jax.grad(quadratic.loss), num_iters=60
  )
  for sub in state[:2]:
    assert abs(quadratic.flat(sub.eigvec) @ v) > 0.9999
    np.testing.assert_allclose(sub.eigval, lam, rtol=1e-4)
  assert isinstance(state[2], type(tx.init(quadratic.params)[2]))


def test_refresh_eigenvector_under_jit_and_inject_hyperparams(quadratic):
  lam, _ = quadratic.top_eigvec()
  tx = optax.inject_hyperparams(xsam_jax.xsam, static_args=("refresh_every", "num_iters"))(rho=0.1)
  refresh = jax.jit(
    lambda s: xsam_jax.refresh_eigenvector(
      s, quadratic.params, jax.grad(quadratic.loss), num_iters=60, unroll=False
    )
  )
  state = refresh(tx.init(quadratic.params))
  np.testing.assert_allclose(optax.tree.get(state, "eigval"), lam, rtol=1e-4)


def test_refresh_eigenvector_rejects_a_state_without_eigenvector(quadratic):
  state = optax.chain(xsam_jax.sam(), optax.sgd(0.1)).init(quadratic.params)
  with pytest.raises(ValueError, match="no eigenvector"):
    xsam_jax.refresh_eigenvector(state, quadratic.params, jax.grad(quadratic.loss))
  with pytest.raises(ValueError, match="num_iters"):
    xsam_jax.refresh_eigenvector(state, quadratic.params, jax.grad(quadratic.loss), num_iters=0)


def test_is_due_matches_the_in_step_schedule():
  assert [xsam_jax.is_due(i, 3) for i in range(7)] == [True, False, False, True, False, False, True]


def _cos_to_dense_top(tiny_mlp, eigvec) -> float:
  w, vecs = np.linalg.eigh(tiny_mlp.dense_hessian(tiny_mlp.params))
  top = vecs[:, np.argmax(w)]  # largest algebraic, lambda_max
  return abs(float(np.asarray(jax.flatten_util.ravel_pytree(eigvec)[0]) @ top))


def test_lanczos_tracker_beats_power_iteration_for_the_same_hvp_count(tiny_mlp):
  params = tiny_mlp.params
  grads = jax.grad(tiny_mlp.loss)(params)
  w, _ = np.linalg.eigh(tiny_mlp.dense_hessian(params))
  cos = {}
  for tracker in ("power", "lanczos"):
    tx = xsam_jax.xsam(num_iters=8, solver=tracker)
    _, state = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(tiny_mlp.loss))
    cos[tracker] = _cos_to_dense_top(tiny_mlp, state.eigvec)
    if tracker == "lanczos":
      # The Ritz value never exceeds lambda_max and is close to it.
      assert float(state.eigval) <= w[-1] + 1e-4
      np.testing.assert_allclose(state.eigval, w[-1], rtol=0.01)
  assert cos["lanczos"] > cos["power"]
  assert cos["lanczos"] > 0.99


def test_lanczos_tracker_static_and_traced_paths_agree(tiny_mlp):
  params = tiny_mlp.params
  grads = jax.grad(tiny_mlp.loss)(params)
  tx = xsam_jax.eigen_sam(num_iters=4, solver="lanczos")
  out = {}
  for refresh in (None, True):
    out[refresh] = jax.jit(
      lambda s, refresh=refresh: tx.update(
        grads, s, params, grad_fn=jax.grad(tiny_mlp.loss), refresh=refresh
      )
    )(tx.init(params))
  chex.assert_trees_all_close(out[None], out[True], rtol=1e-5, atol=1e-6)


def test_refresh_eigenvector_accepts_the_lanczos_tracker(tiny_mlp):
  tx = xsam_jax.xsam()
  state = xsam_jax.refresh_eigenvector(
    tx.init(tiny_mlp.params),
    tiny_mlp.params,
    jax.grad(tiny_mlp.loss),
    num_iters=10,
    solver="lanczos",
  )
  assert _cos_to_dense_top(tiny_mlp, state.eigvec) > 0.999


def test_unknown_tracker_raises_value_error():
  for make in (xsam_jax.xsam, xsam_jax.eigen_sam):
    with pytest.raises(ValueError, match="solver"):
      make(solver="oja")


@pytest.mark.parametrize("tracker", ["power", "lanczos"])
@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e3])
def test_refreshed_eigenvector_has_exactly_unit_length(tracker, scale):
  # Dividing by ||Hv|| + eps would leave it 0.1% short at scale 1e-9.
  loss = lambda w: 0.5 * scale * jnp.sum(jnp.array([4.0, 1.0, 0.5]) * w**2)
  params = jnp.ones(3)
  tx = xsam_jax.xsam(num_iters=3, solver=tracker)
  _, state = tx.update(jax.grad(loss)(params), tx.init(params), params, grad_fn=jax.grad(loss))
  np.testing.assert_allclose(optax.tree.norm(state.eigvec), 1.0, rtol=1e-6)
  np.testing.assert_allclose(state.eigval / scale, 4.0, rtol=0.2)


def test_eigenvector_is_kept_unchanged_when_the_hessian_product_is_below_eps():
  loss = lambda w: 0.5 * 1e-14 * jnp.sum(w**2)  # ||Hv|| = 1e-14 < eps = 1e-12
  params = jnp.ones(3)
  tx = xsam_jax.xsam(num_iters=3)
  state0 = tx.init(params)
  _, state = tx.update(jax.grad(loss)(params), state0, params, grad_fn=jax.grad(loss))
  np.testing.assert_array_equal(state.eigvec, state0.eigvec)


def test_power_tracker_follows_largest_magnitude_and_lanczos_largest_algebraic():
  # A saddle whose negative eigenvalue dominates: lambda = -5, 2, 1, 0.5.
  diag = jnp.array([-5.0, 2.0, 1.0, 0.5])
  loss = lambda w: 0.5 * jnp.sum(diag * w**2)
  params = jnp.array([0.3, -0.2, 0.5, 1.0])
  grads = jax.grad(loss)(params)
  for tracker, iters, want_val, want_axis in [("power", 60, -5.0, 0), ("lanczos", 4, 2.0, 1)]:
    tx = xsam_jax.xsam(num_iters=iters, solver=tracker)
    _, state = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(loss))
    np.testing.assert_allclose(state.eigval, want_val, rtol=1e-4)
    np.testing.assert_allclose(abs(state.eigvec[want_axis]), 1.0, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Non-finite refreshes keep the previous pair, say so, and let apply_if_finite recover.

MAKERS = {"xsam": xsam_jax.xsam, "eigen_sam": xsam_jax.eigen_sam}


def _batch_loss(quadratic):
  """A minibatch loss ``b * L(w)``: a NaN ``b`` is a batch that makes everything NaN."""
  return lambda p, b: b * quadratic.loss(p)


@pytest.mark.parametrize("hvp_method", ["exact", "forward_difference"])
@pytest.mark.parametrize("tracker", ["power", "lanczos"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_nan_batch_on_a_refresh_step_keeps_the_previous_eigenvector_and_says_so(
  name, tracker, hvp_method, quadratic
):
  loss = _batch_loss(quadratic)
  tx = MAKERS[name](refresh_every=1, num_iters=3, solver=tracker, hvp_method=hvp_method)

  @jax.jit
  def step(state, b):
    grad_fn = lambda p: jax.grad(loss)(p, b)
    return tx.update(grad_fn(quadratic.params), state, quadratic.params, grad_fn=grad_fn)[1]

  before = step(tx.init(quadratic.params), 1.0)
  after = step(before, jnp.nan)
  chex.assert_trees_all_equal(after.eigvec, before.eigvec)
  np.testing.assert_array_equal(after.eigval, before.eigval)
  assert np.isfinite(before.eigval) and int(before.skipped_refreshes) == 0
  assert int(after.skipped_refreshes) == 1
  assert int(step(after, 1.0).skipped_refreshes) == 1  # a finite refresh adds nothing


@pytest.mark.parametrize("hvp_method", ["exact", "forward_difference"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_nan_eigenvector_gradient_keeps_the_previous_pair_and_the_update_finite(
  name, hvp_method, quadratic
):
  tx = MAKERS[name](refresh_every=1, num_iters=3, hvp_method=hvp_method)
  grad_fn = jax.grad(quadratic.loss)
  nan_fn = lambda p: jax.tree.map(lambda g: g * jnp.nan, grad_fn(p))
  params = quadratic.params
  state0 = tx.init(params)
  updates, state = jax.jit(
    lambda s: tx.update(grad_fn(params), s, params, grad_fn=grad_fn, eig_grad_fn=nan_fn)
  )(state0)
  chex.assert_tree_all_finite(updates)
  chex.assert_trees_all_equal(state.eigvec, state0.eigvec)
  np.testing.assert_array_equal(state.eigval, state0.eigval)
  assert int(state.skipped_refreshes) == 1


def test_refresh_eigenvector_with_a_nan_gradient_keeps_the_previous_pair(quadratic):
  tx = optax.chain(xsam_jax.xsam(), xsam_jax.eigen_sam(), optax.sgd(0.1))
  grad_fn = jax.grad(quadratic.loss)
  good = xsam_jax.refresh_eigenvector(tx.init(quadratic.params), quadratic.params, grad_fn)
  nan_fn = lambda p: jax.tree.map(lambda g: g * jnp.nan, grad_fn(p))
  for method in ("exact", "forward_difference"):
    state = xsam_jax.refresh_eigenvector(good, quadratic.params, nan_fn, hvp_method=method)
    for sub, ref in zip(state[:2], good[:2], strict=True):
      chex.assert_trees_all_equal(sub.eigvec, ref.eigvec)
      np.testing.assert_array_equal(sub.eigval, ref.eigval)
      assert int(sub.skipped_refreshes) == 1


def _apply_if_finite_sgd():
  return optax.apply_if_finite(optax.sgd(0.05, momentum=0.9), max_consecutive_errors=3)


def _multisteps_skip_sgd():
  return optax.MultiSteps(
    optax.sgd(0.05, momentum=0.9), every_k_schedule=1, should_skip_update_fn=optax.skip_not_finite
  ).gradient_transformation()


def _train(tx, loss, params, batches):
  """Jitted steps over ``batches``; returns the params after each step."""

  @jax.jit
  def step(params, state, b):
    grad_fn = lambda p: jax.grad(loss)(p, b)
    updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  state, out = tx.init(params), []
  for b in batches:
    params, state = step(params, state, b)
    out.append(params)
  return out, state


@pytest.mark.parametrize(
  ("name", "hvp_method", "guard"),
  [
    ("xsam", "exact", _apply_if_finite_sgd),
    ("xsam", "forward_difference", _apply_if_finite_sgd),
    ("eigen_sam", "exact", _apply_if_finite_sgd),
    ("eigen_sam", "forward_difference", _apply_if_finite_sgd),
    ("xsam", "exact", _multisteps_skip_sgd),
  ],
)
def test_a_guard_after_the_method_recovers_from_a_nan_batch_as_if_it_were_skipped(
  name, hvp_method, guard, quadratic
):
  """``chain(method, apply_if_finite(sgd))``: the NaN step is skipped, then training goes on.

  Every step refreshes (``refresh_every=1``), so the run equals a reference that never saw the
  NaN batch (the refresh schedule does not depend on the step count).
  """
  loss = _batch_loss(quadratic)
  batches = [1.0, 0.8, jnp.nan, 1.2, 0.9, 1.1]
  tx = optax.chain(
    MAKERS[name](rho=0.05, alpha=0.2, refresh_every=1, num_iters=2, hvp_method=hvp_method),
    guard(),
  )
  got, state = _train(tx, loss, quadratic.params, batches)
  ref, _ = _train(tx, loss, quadratic.params, [b for b in batches if not np.isnan(b)])
  chex.assert_trees_all_equal(got[2], got[1])  # the NaN step changed nothing
  for i in range(3, len(batches)):  # and every later step moves the params again
    assert float(optax.tree.norm(optax.tree.sub(got[i], got[i - 1]))) > 1e-4
    chex.assert_trees_all_close(got[i], ref[i - 1], rtol=1e-6, atol=1e-7)
  assert int(state[0].skipped_refreshes) == 1
