"""Tests for the cached eigenvector: refresh_eigenvector and is_due."""

from __future__ import annotations

import warnings

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


# --------------------------------------------------------------------------------------------
# One vocabulary: solver, num_iters, key; the old names are deprecated aliases.

FACTORIES = [xsam_jax.xsam, xsam_jax.eigen_sam]
GRAD_FN_ERROR = r"`grad_fn` must be callable as `grad_fn\(params\) -> grads`"


def _run_steps(tx, quadratic, steps=3, refresh=None):
  """``steps`` updates at fixed params; returns (list of updates, final state)."""
  params, grad_fn = quadratic.params, jax.grad(quadratic.loss)
  state, outs = tx.init(params), []
  for i in range(steps):
    kw = {} if refresh is None else {"refresh": refresh(i)}
    out, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn, **kw)
    outs.append(quadratic.flat(out))
  return outs, state


@pytest.mark.parametrize("make", FACTORIES)
@pytest.mark.parametrize(
  ("old", "new"),
  [
    ({"power_iters": 3}, {"num_iters": 3}),
    ({"tracker": "lanczos"}, {"solver": "lanczos"}),
    ({"seed": 7}, {"key": 7}),
  ],
)
def test_deprecated_names_warn_and_give_the_same_steps_as_the_new_ones(make, old, new, quadratic):
  (old_name,), (new_name,) = old, new
  with pytest.warns(DeprecationWarning, match=rf"`{old_name}=` is deprecated.*`{new_name}=`"):
    tx_old = make(rho=0.1, refresh_every=2, **old)
  tx_new = make(rho=0.1, refresh_every=2, **new)
  outs_old, state_old = _run_steps(tx_old, quadratic)
  outs_new, state_new = _run_steps(tx_new, quadratic)
  np.testing.assert_array_equal(outs_old, outs_new)
  np.testing.assert_array_equal(quadratic.flat(state_old.eigvec), quadratic.flat(state_new.eigvec))
  assert state_old.settings == state_new.settings


@pytest.mark.parametrize("make", FACTORIES)
@pytest.mark.parametrize(
  "both",
  [
    {"power_iters": 3, "num_iters": 4},
    {"tracker": "lanczos", "solver": "random"},
    {"seed": 1, "key": 2},
    {"seed": 1, "key": jax.random.key(1)},
  ],
)
def test_an_old_name_with_its_new_one_raises_value_error(make, both):
  old = next(k for k in both if k in ("power_iters", "tracker", "seed"))
  with pytest.raises(ValueError, match=rf"`{old}` is the deprecated name of"):
    make(**both)


def test_accumulate_rebuilds_a_method_built_with_an_old_name_without_warning_again(quadratic):
  with pytest.warns(DeprecationWarning):
    tx = xsam_jax.xsam(tracker="lanczos", power_iters=3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    acc = xsam_jax.accumulate(tx, optax.sgd(0.1), 2)
  assert acc.init(quadratic.params)[0].settings.solver == "lanczos"


@pytest.mark.parametrize("make", FACTORIES)
def test_key_may_be_an_int_a_typed_key_or_a_raw_key_and_a_float_is_refused(make, quadratic):
  want = quadratic.flat(make(key=3).init(quadratic.params).eigvec)
  for key in (jax.random.key(3), jax.random.PRNGKey(3), jnp.asarray(3)):
    np.testing.assert_array_equal(quadratic.flat(make(key=key).init(quadratic.params).eigvec), want)
  with pytest.raises(ValueError, match=r'`key` must be a PRNG key.*static_args=\("key"'):
    make(key=1.5)
  # optax.inject_hyperparams turns a float into a float hyperparameter: refused by name.
  injected = optax.inject_hyperparams(make, static_args=("refresh_every", "num_iters"))
  with pytest.raises(ValueError, match=r'static_args=\("key"'):
    injected(key=1.0).init(quadratic.params)
  # An int key is injected as an integer array and gives the same vector.
  state = injected(key=3).init(quadratic.params)
  np.testing.assert_array_equal(quadratic.flat(state.inner_state.eigvec), want)


@pytest.mark.parametrize("make", [xsam_jax.sam, *FACTORIES])
def test_a_grad_fn_taking_params_and_an_index_gets_a_value_error_naming_the_fix(make, quadratic):
  # optax.contrib.sam's grad_fn shape (params, i): a bare TypeError before.
  tx = make()
  params = quadratic.params
  grads = jax.grad(quadratic.loss)(params)
  with pytest.raises(ValueError, match=GRAD_FN_ERROR):
    tx.update(grads, tx.init(params), params, grad_fn=lambda p, i: jax.grad(quadratic.loss)(p))
  if make is not xsam_jax.sam:
    with pytest.raises(ValueError, match=r"`eig_grad_fn` must be callable"):
      tx.update(
        grads,
        tx.init(params),
        params,
        grad_fn=jax.grad(quadratic.loss),
        eig_grad_fn=lambda p, i: p,
      )


def test_refresh_eigenvector_uses_the_transforms_solver_and_num_iters_unless_overridden(tiny_mlp):
  params, grad_fn = tiny_mlp.params, jax.grad(tiny_mlp.loss)
  tx = xsam_jax.xsam(solver="lanczos", num_iters=4)
  state = tx.init(params)
  assert state.settings == xsam_jax._eigvec.EigvecSettings("lanczos", 4, "exact", 1e-12, 0)
  default = xsam_jax.refresh_eigenvector(state, params, grad_fn)
  explicit = xsam_jax.refresh_eigenvector(state, params, grad_fn, solver="lanczos", num_iters=4)
  library_default = xsam_jax.refresh_eigenvector(
    state, params, grad_fn, solver="power", num_iters=5
  )
  np.testing.assert_array_equal(default.eigval, explicit.eigval)
  np.testing.assert_array_equal(
    *(np.asarray(jax.flatten_util.ravel_pytree(s.eigvec)[0]) for s in (default, explicit))
  )
  assert abs(float(default.eigval) - float(library_default.eigval)) > 1e-3
  # Deprecated names work here too, and conflict with the new ones.
  with pytest.warns(DeprecationWarning, match="`power_iters=` is deprecated"):
    old = xsam_jax.refresh_eigenvector(state, params, grad_fn, power_iters=4, tracker="lanczos")
  np.testing.assert_array_equal(old.eigval, explicit.eigval)
  with pytest.raises(ValueError, match="`tracker` is the deprecated name of `solver`"):
    xsam_jax.refresh_eigenvector(state, params, grad_fn, solver="power", tracker="lanczos")
  with pytest.raises(ValueError, match=GRAD_FN_ERROR):
    xsam_jax.refresh_eigenvector(state, params, lambda p, i: p)


def test_settings_are_a_static_field_that_survives_jit_cond_inject_and_a_checkpoint(
  quadratic, tmp_path
):
  import orbax.checkpoint as ocp

  tx = optax.chain(xsam_jax.xsam(solver="lanczos", num_iters=3, refresh_every=2), optax.sgd(0.1))
  params, grad_fn = quadratic.params, jax.grad(quadratic.loss)
  state = tx.init(params)
  assert jax.tree.leaves(state[0].settings) == []  # no arrays: nothing to save or shard

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, flag):
    new = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)[1]
    return jax.lax.cond(flag, lambda: new, lambda: state)

  for flag in (True, False, True):
    state = step(state, flag)
  assert state[0].settings.solver == "lanczos" and int(optax.tree.get(state, "count")) == 2
  # An injected eps (a traced float) is recorded as None in init and update alike.
  injected = optax.inject_hyperparams(xsam_jax.xsam, static_args=("refresh_every", "num_iters"))()
  s0 = injected.init(params)
  s1 = jax.jit(lambda s: injected.update(grad_fn(params), s, params, grad_fn=grad_fn)[1])(s0)
  assert jax.tree.structure(s0) == jax.tree.structure(s1) and s1.inner_state.settings.eps is None
  # Save and restore as experiments/train.py does (StandardSave / StandardRestore).
  manager = ocp.CheckpointManager(
    tmp_path / "ck", options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  )
  manager.save(0, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored = manager.restore(0, args=ocp.args.StandardRestore(abstract))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert restored[0].settings == state[0].settings
  np.testing.assert_array_equal(quadratic.flat(restored[0].eigvec), quadratic.flat(state[0].eigvec))


def test_every_state_documents_grad_perturbation_and_adv_grad_norms_identically():
  def field_doc(cls, name):
    """The ``name: ...`` entry of the Attributes section, continuation lines included."""
    first, *rest = cls.__doc__[cls.__doc__.index(f"    {name}: ") :].splitlines()
    lines = [first]
    for line in rest:
      if not line.startswith("      "):
        break
      lines.append(line)
    return "\n".join(lines)

  states = (xsam_jax.SAMState, xsam_jax.EigenSAMState, xsam_jax.XSAMState)
  for name in ("grad_norm", "perturbation_norm", "adv_grad_norm"):
    docs = {field_doc(cls, name) for cls in states}
    assert len(docs) == 1, (name, docs)
    assert all(name in cls._fields for cls in states)
  assert all("ascent_curvature" in cls._fields for cls in states)


# --------------------------------------------------------------------------------------------
# solver="random": a fresh random unit vector at each refresh, no HVPs.


def _expected_random(key, step, quadratic):
  """The documented draw: Gaussian from fold_in(key, step), normalised (NumPy)."""
  like = jax.tree.map(lambda x: x.astype(jnp.float32), quadratic.params)
  v = quadratic.flat(optax.tree.random_like(jax.random.fold_in(jax.random.key(key), step), like))
  return v / np.linalg.norm(v)


@pytest.mark.parametrize("make", FACTORIES)
def test_random_solver_draws_a_new_unit_vector_at_each_refresh_identically_on_both_paths(
  make, quadratic
):
  tx = make(rho=0.1, refresh_every=2, solver="random", key=5)
  cond_outs, cond_vecs, static_outs, static_vecs = [], [], [], []
  params, grad_fn = quadratic.params, jax.grad(quadratic.loss)
  cond_step = jax.jit(lambda s: tx.update(grad_fn(params), s, params, grad_fn=grad_fn))
  s_cond = s_static = tx.init(params)
  for i in range(5):
    out, s_cond = cond_step(s_cond)
    cond_outs.append(quadratic.flat(out))
    cond_vecs.append(quadratic.flat(s_cond.eigvec))
    out, s_static = tx.update(
      grad_fn(params), s_static, params, grad_fn=grad_fn, refresh=xsam_jax.is_due(i, 2)
    )
    static_outs.append(quadratic.flat(out))
    static_vecs.append(quadratic.flat(s_static.eigvec))
  np.testing.assert_allclose(cond_vecs, static_vecs, atol=1e-6)
  np.testing.assert_allclose(cond_outs, static_outs, rtol=1e-5, atol=1e-6)
  for i, v in enumerate(cond_vecs):
    assert abs(np.linalg.norm(v) - 1.0) < 1e-6
    np.testing.assert_allclose(v, _expected_random(5, 2 * (i // 2), quadratic), atol=1e-6)
  np.testing.assert_array_equal(cond_vecs[0], cond_vecs[1])  # kept between refreshes
  assert abs(cond_vecs[0] @ cond_vecs[2]) < 0.999 and abs(cond_vecs[2] @ cond_vecs[4]) < 0.999
  assert float(s_cond.eigval) == 0.0 and int(s_cond.skipped_refreshes) == 0
  # The same key gives the same vectors; another key other ones.
  _, again = _run_steps(make(rho=0.1, refresh_every=2, solver="random", key=5), quadratic, 5)
  _, other = _run_steps(make(rho=0.1, refresh_every=2, solver="random", key=6), quadratic, 5)
  np.testing.assert_array_equal(quadratic.flat(again.eigvec), cond_vecs[-1])
  assert abs(quadratic.flat(other.eigvec) @ cond_vecs[-1]) < 0.999


@pytest.mark.parametrize("make", FACTORIES)
@pytest.mark.parametrize("refresh", [None, True])
@pytest.mark.parametrize("hvp_method", ["exact", "forward_difference"])
def test_random_solver_calls_grad_fn_only_for_the_perturbed_gradient(
  make, refresh, hvp_method, quadratic
):
  calls = {"grad_fn": 0, "eig_grad_fn": 0}

  def counted(name):
    def grad_fn(p):
      calls[name] += 1  # counts traces: every HVP or gradient in the program calls it once
      return jax.grad(quadratic.loss)(p)

    return grad_fn

  params = quadratic.params
  for solver, want in (("random", 1), ("power", 2)):
    calls.update(grad_fn=0, eig_grad_fn=0)
    tx = make(solver=solver, num_iters=3, hvp_method=hvp_method)
    jax.jit(
      lambda s: tx.update(
        jax.grad(quadratic.loss)(params),
        s,
        params,
        grad_fn=counted("grad_fn"),
        eig_grad_fn=counted("eig_grad_fn") if solver == "random" else None,
        refresh=refresh,
      )
    ).lower(tx.init(params))
    if solver == "random":
      assert calls == {"grad_fn": 1, "eig_grad_fn": 0}
    else:  # the control: power iteration does call it for its HVPs
      assert calls["grad_fn"] >= want


def test_random_solver_updates_match_numpy_xsam_and_eigen_sam_with_that_vector(quadratic):
  rho, alpha = 0.2, 0.5
  x = quadratic.flat(quadratic.params)
  g = quadratic.grad_np(x)
  gh = g / np.linalg.norm(g)
  v = _expected_random(11, 0, quadratic)
  # X-SAM: g_adv at w + rho g_hat, normalised, minus alpha times its component along v.
  outs, state = _run_steps(
    xsam_jax.xsam(rho=rho, alpha=alpha, solver="random", key=11), quadratic, steps=1
  )
  g_adv = quadratic.grad_np(x + rho * gh)
  u = g_adv / np.linalg.norm(g_adv)
  np.testing.assert_allclose(quadratic.flat(state.eigvec), v, atol=1e-6)
  np.testing.assert_allclose(outs[0], u - alpha * (u @ v) * v, rtol=1e-5, atol=1e-6)
  # Eigen-SAM: perturbation tilted towards sign(<g, v>) v_perp, gradient at w + epsilon.
  outs, state = _run_steps(
    xsam_jax.eigen_sam(rho=rho, alpha=alpha, solver="random", key=11), quadratic, steps=1
  )
  e = rho * (gh + alpha * np.sign(g @ v) * (v - (gh @ v) * gh))
  np.testing.assert_allclose(outs[0], quadratic.grad_np(x + e), rtol=1e-5, atol=1e-6)


def test_random_solver_in_refresh_eigenvector_and_its_errors(quadratic):
  params, grad_fn = quadratic.params, jax.grad(quadratic.loss)
  state = xsam_jax.xsam(solver="random", key=4).init(params)
  refreshed = xsam_jax.refresh_eigenvector(state, params, lambda p: 1 / 0)  # never called
  np.testing.assert_allclose(
    quadratic.flat(refreshed.eigvec), _expected_random(4, 0, quadratic), atol=1e-6
  )
  assert float(refreshed.eigval) == 0.0
  # A transform whose key was an array records no seed: refresh_eigenvector needs one.
  state = xsam_jax.xsam(solver="random", key=jax.random.key(4)).init(params)
  with pytest.raises(ValueError, match="solver='random' needs a `key`"):
    xsam_jax.refresh_eigenvector(state, params, grad_fn)
  np.testing.assert_array_equal(
    quadratic.flat(xsam_jax.refresh_eigenvector(state, params, grad_fn, key=4).eigvec),
    quadratic.flat(refreshed.eigvec),
  )
  with pytest.raises(ValueError, match="solver='random' makes no HVPs"):
    xsam_jax.xsam(solver="random", hvp_method="forward_difference", check_base_grad=True)


@pytest.mark.parametrize("make", FACTORIES)
def test_a_state_from_another_seeds_init_updates_through_a_shared_step(make, quadratic):
  # experiments/transformer.py compiles one step per optimizer and feeds it every seed's state:
  # the settings travel with the state, so its structure never changes under update.
  params, grad_fn = quadratic.params, jax.grad(quadratic.loss)
  tx = make(key=0)
  state = make(key=1).init(params)
  new = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)[1]
  assert jax.tree.structure(new) == jax.tree.structure(state) and new.settings.seed == 1


@pytest.mark.parametrize("name", ["eigen_sam", "xsam"])
def test_empty_params_raise_value_error_naming_params_at_init_and_update(name, quadratic):
  grad_fn = jax.grad(quadratic.loss)
  make = getattr(xsam_jax, name)
  for solver in ("power", "lanczos"):
    tx = make(solver=solver)
    for empty in ({}, {"w": jnp.zeros((0, 3))}):
      with pytest.raises(ValueError, match=rf"xsam_jax.{name}: `params` holds no entries"):
        tx.init(empty)
      with pytest.raises(ValueError, match=rf"xsam_jax.{name}: `params` holds no entries"):
        tx.update(empty, tx.init(quadratic.params), empty, grad_fn=grad_fn)


@pytest.mark.parametrize("name", ["eigen_sam", "xsam"])
@pytest.mark.parametrize(
  ("solver", "hvp_method"), [("power", "exact"), ("lanczos", "forward_difference")]
)
def test_a_zero_size_leaf_next_to_non_empty_ones_just_works(name, solver, hvp_method, quadratic):
  with_empty = {**quadratic.params, "z": jnp.zeros((0, 2))}  # ravels to the same flat vector
  lam, _ = quadratic.top_eigvec()
  make = getattr(xsam_jax, name)
  tx = make(rho=0.05, num_iters=30, solver=solver, hvp_method=hvp_method)
  out = {}
  for label, params in (("plain", quadratic.params), ("with_empty", with_empty)):
    grad_fn = jax.grad(quadratic.loss)
    out[label] = jax.jit(lambda s, p=params, f=grad_fn: tx.update(f(p), s, p, grad_fn=f))(
      tx.init(params)
    )
  updates, state = out["with_empty"]
  assert updates["z"].shape == (0, 2) and state.eigvec["z"].shape == (0, 2)
  np.testing.assert_allclose(state.eigval, lam, rtol=1e-3)
  np.testing.assert_allclose(state.eigval, out["plain"][1].eigval, rtol=1e-3)
  for key in ("a", "b"):
    np.testing.assert_allclose(updates[key], out["plain"][0][key], rtol=1e-3, atol=1e-5)
