"""Tests for xsam_jax.xsam against NumPy re-derivations and a dense Hessian."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_mlp as mlp
import optax
import pytest
from helpers import make_step

import xsam_jax


def _np_xsam(quadratic, x, v, rho, alpha, normalize=True, correction="projection", eps=1e-12):
  g = quadratic.grad_np(x)
  g_adv = quadratic.grad_np(x + rho * g / (np.linalg.norm(g) + eps))
  u = g_adv / (np.linalg.norm(g_adv) + eps) if normalize else g_adv
  c = u @ v
  if correction == "official":
    c = abs(c)
  return u - alpha * c * v


def _with_eigvec(state, quadratic, v):
  return state._replace(eigvec=quadratic.unflat(v))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("correction", ["projection", "official"])
def test_correction_matches_numpy_on_quadratic(quadratic, normalize, correction):
  _, v = quadratic.top_eigvec()
  tx = xsam_jax.xsam(rho=0.2, alpha=0.5, normalize=normalize, correction=correction)
  params = quadratic.params
  state = _with_eigvec(tx.init(params), quadratic, v)
  out, new_state = tx.update(
    jax.grad(quadratic.loss)(params),
    state,
    params,
    grad_fn=jax.grad(quadratic.loss),
    refresh=False,
  )
  x = quadratic.flat(params)
  expected = _np_xsam(quadratic, x, v, 0.2, 0.5, normalize, correction)
  np.testing.assert_allclose(quadratic.flat(out), expected, rtol=1e-5, atol=1e-6)
  g = quadratic.grad_np(x)
  g_adv = quadratic.grad_np(x + 0.2 * g / np.linalg.norm(g))
  np.testing.assert_allclose(new_state.cos, g_adv @ v / np.linalg.norm(g_adv), rtol=1e-5)
  np.testing.assert_allclose(new_state.adv_grad_norm, np.linalg.norm(g_adv), rtol=1e-5)
  np.testing.assert_allclose(new_state.perturbation_norm, 0.2, rtol=1e-5)


def test_parallel_component_shrinks_by_one_minus_alpha(quadratic):
  _, v = quadratic.top_eigvec()
  alpha = 0.3
  tx = xsam_jax.xsam(rho=0.1, alpha=alpha)
  params = quadratic.params
  state = _with_eigvec(tx.init(params), quadratic, v)
  out, st = tx.update(
    jax.grad(quadratic.loss)(params), state, params, grad_fn=jax.grad(quadratic.loss), refresh=False
  )
  out = quadratic.flat(out)
  np.testing.assert_allclose(out @ v, (1 - alpha) * float(st.cos), rtol=1e-5)
  # The orthogonal part is untouched and the norm is that of a unit vector minus the shrink.
  perp = out - (out @ v) * v
  np.testing.assert_allclose(np.linalg.norm(perp) ** 2 + float(st.cos) ** 2, 1.0, rtol=1e-5)


def test_default_correction_is_invariant_to_eigvec_sign(quadratic):
  _, v = quadratic.top_eigvec()
  params = quadratic.params
  grads = jax.grad(quadratic.loss)(params)
  for normalize in (True, False):
    tx = xsam_jax.xsam(rho=0.1, alpha=0.4, normalize=normalize)
    outs = [
      tx.update(
        grads,
        _with_eigvec(tx.init(params), quadratic, s * v),
        params,
        grad_fn=jax.grad(quadratic.loss),
        refresh=False,
      )[0]
      for s in (1.0, -1.0)
    ]
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)


def test_official_correction_depends_on_eigvec_sign(quadratic):
  _, v = quadratic.top_eigvec()
  params = quadratic.params
  grads = jax.grad(quadratic.loss)(params)
  tx = xsam_jax.xsam(rho=0.1, alpha=0.4, correction="official")
  out_pos, out_neg = (
    quadratic.flat(
      tx.update(
        grads,
        _with_eigvec(tx.init(params), quadratic, s * v),
        params,
        grad_fn=jax.grad(quadratic.loss),
        refresh=False,
      )[0]
    )
    for s in (1.0, -1.0)
  )
  assert not np.allclose(out_pos, out_neg, atol=1e-3)
  # One sign shrinks the parallel component, the other amplifies it.
  assert (
    sorted([abs(out_pos @ v), abs(out_neg @ v)])[1]
    > sorted([abs(out_pos @ v), abs(out_neg @ v)])[0] * 1.5
  )


def test_alpha_zero_without_normalisation_is_exactly_sam(tiny_mlp):
  sam_tx = optax.chain(xsam_jax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
  xsam_tx = optax.chain(
    xsam_jax.xsam(rho=0.05, alpha=0.0, normalize=False, refresh_every=2),
    optax.sgd(0.1, momentum=0.9),
  )
  p1, s1 = tiny_mlp.params, sam_tx.init(tiny_mlp.params)
  p2, s2 = tiny_mlp.params, xsam_tx.init(tiny_mlp.params)
  step1, step2 = make_step(sam_tx, tiny_mlp.loss), make_step(xsam_tx, tiny_mlp.loss)
  for _ in range(4):
    p1, s1, _ = step1(p1, s1)
    p2, s2, _ = step2(p2, s2)
  chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)


def test_alpha_zero_with_normalisation_is_normalised_sam(quadratic):
  tx = xsam_jax.xsam(rho=0.1, alpha=0.0)
  params = quadratic.params
  out, _ = tx.update(
    jax.grad(quadratic.loss)(params), tx.init(params), params, grad_fn=jax.grad(quadratic.loss)
  )
  x = quadratic.flat(params)
  g = quadratic.grad_np(x)
  g_adv = quadratic.grad_np(x + 0.1 * g / np.linalg.norm(g))
  np.testing.assert_allclose(quadratic.flat(out), g_adv / np.linalg.norm(g_adv), rtol=1e-5)


def test_eigvec_is_refreshed_at_step_zero_to_dense_top_eigenvector(tiny_mlp):
  hess = tiny_mlp.dense_hessian(tiny_mlp.params)
  w, vecs = np.linalg.eigh(hess)
  i = np.argmax(np.abs(w))
  tx = xsam_jax.xsam(rho=0.05, alpha=0.2, num_iters=200)
  params = tiny_mlp.params
  _, state = tx.update(
    jax.grad(tiny_mlp.loss)(params), tx.init(params), params, grad_fn=jax.grad(tiny_mlp.loss)
  )
  v = np.asarray(jax.flatten_util.ravel_pytree(state.eigvec)[0])
  assert abs(v @ vecs[:, i]) > 0.999
  np.testing.assert_allclose(state.eigval, w[i], rtol=1e-3)


def test_one_step_on_tiny_mlp_matches_dense_hessian_reference(tiny_mlp):
  """Full rule with the eigenvector from the dense Hessian, gradients from finite formulas."""
  from jax.flatten_util import ravel_pytree

  params = tiny_mlp.params
  flat, unravel = ravel_pytree(params)
  hess = tiny_mlp.dense_hessian(params)
  w, vecs = np.linalg.eigh(hess)
  v = vecs[:, np.argmax(np.abs(w))]
  tx = xsam_jax.xsam(rho=0.1, alpha=0.2)
  state = tx.init(params)._replace(eigvec=unravel(jnp.asarray(v, jnp.float32)))
  out, _ = tx.update(
    jax.grad(tiny_mlp.loss)(params), state, params, grad_fn=jax.grad(tiny_mlp.loss), refresh=False
  )
  grad_flat = lambda z: np.asarray(jax.grad(lambda q: tiny_mlp.loss(unravel(q)))(z), np.float64)
  g = grad_flat(flat)
  g_adv = grad_flat(flat + jnp.asarray(0.1 * g / np.linalg.norm(g), jnp.float32))
  u = g_adv / np.linalg.norm(g_adv)
  expected = u - 0.2 * (u @ v) * v
  np.testing.assert_allclose(np.asarray(ravel_pytree(out)[0]), expected, rtol=1e-4, atol=1e-6)


def test_refresh_happens_every_refresh_every_steps(quadratic):
  tx = xsam_jax.xsam(refresh_every=3, num_iters=1)
  params = quadratic.params
  state = tx.init(params)
  grads = jax.grad(quadratic.loss)(params)
  update = jax.jit(lambda s: tx.update(grads, s, params, grad_fn=jax.grad(quadratic.loss)))
  changed = []
  for _ in range(7):
    old = quadratic.flat(state.eigvec)
    _, state = update(state)
    changed.append(not np.allclose(old, quadratic.flat(state.eigvec)))
  assert changed == [True, False, False, True, False, False, True]


def test_static_refresh_path_equals_traced_path(tiny_mlp):
  tx = optax.chain(xsam_jax.xsam(rho=0.05, refresh_every=2, num_iters=3), optax.sgd(0.1))
  traced = make_step(tx, tiny_mlp.loss)
  static = {r: make_step(tx, tiny_mlp.loss, refresh=r) for r in (True, False)}
  p1 = p2 = tiny_mlp.params
  s1 = s2 = tx.init(tiny_mlp.params)
  for i in range(5):
    p1, s1, _ = traced(p1, s1)
    p2, s2, _ = static[xsam_jax.is_due(i, 2)](p2, s2)
  chex.assert_trees_all_close((p1, s1), (p2, s2), rtol=1e-5, atol=1e-6)


def test_training_step_compiles_once_across_refresh_and_plain_steps(tiny_mlp):
  tx = optax.chain(xsam_jax.xsam(refresh_every=2), optax.sgd(0.1))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    grads = jax.grad(tiny_mlp.loss)(params)
    updates, state = tx.update(grads, state, params, grad_fn=jax.grad(tiny_mlp.loss))
    return optax.apply_updates(params, updates), state

  chex.clear_trace_counter()
  params, state = tiny_mlp.params, tx.init(tiny_mlp.params)
  for _ in range(5):
    params, state = step(params, state)
  assert int(state[0].count) == 5


def test_eig_grad_fn_is_used_for_the_eigenvector(quadratic):
  # A different loss for the Hessian: its top eigenvector is e_0.
  eig_loss = lambda p: 0.5 * 10.0 * p["a"][0] ** 2 + 0.5 * jnp.sum(p["b"] ** 2)
  tx = xsam_jax.xsam(num_iters=50)
  params = quadratic.params
  _, state = tx.update(
    jax.grad(quadratic.loss)(params),
    tx.init(params),
    params,
    grad_fn=jax.grad(quadratic.loss),
    eig_grad_fn=jax.grad(eig_loss),
  )
  v = quadratic.flat(state.eigvec)
  np.testing.assert_allclose(abs(v[0]), 1.0, rtol=1e-4)
  np.testing.assert_allclose(state.eigval, 10.0, rtol=1e-4)


def test_alpha_schedule_and_inject_hyperparams_work(quadratic):
  _, v = quadratic.top_eigvec()
  tx = optax.inject_hyperparams(
    xsam_jax.xsam, static_args=("refresh_every", "num_iters", "normalize")
  )(rho=0.2, alpha=0.1)
  params = quadratic.params
  state = tx.init(params)
  state.hyperparams["alpha"] = jnp.asarray(0.5)
  state = state._replace(inner_state=_with_eigvec(state.inner_state, quadratic, v))
  out, _ = jax.jit(
    lambda s: tx.update(
      jax.grad(quadratic.loss)(params), s, params, grad_fn=jax.grad(quadratic.loss), refresh=False
    )
  )(state)
  expected = _np_xsam(quadratic, quadratic.flat(params), v, 0.2, 0.5)
  np.testing.assert_allclose(quadratic.flat(out), expected, rtol=1e-5, atol=1e-6)

  sched = xsam_jax.xsam(rho=0.2, alpha=lambda c: jnp.where(c < 1, 0.0, 0.5))
  st = _with_eigvec(sched.init(params), quadratic, v)
  out0, st = sched.update(
    jax.grad(quadratic.loss)(params), st, params, grad_fn=jax.grad(quadratic.loss), refresh=False
  )
  out1, _ = sched.update(
    jax.grad(quadratic.loss)(params), st, params, grad_fn=jax.grad(quadratic.loss), refresh=False
  )
  x = quadratic.flat(params)
  np.testing.assert_allclose(quadratic.flat(out0), _np_xsam(quadratic, x, v, 0.2, 0.0), rtol=1e-5)
  np.testing.assert_allclose(quadratic.flat(out1), _np_xsam(quadratic, x, v, 0.2, 0.5), rtol=1e-5)


def test_bfloat16_params_keep_dtype_and_state_dtypes_are_stable():
  loss = lambda p: jnp.sum((p["w"].astype(jnp.float32) - jnp.arange(6.0)) ** 2 * jnp.arange(1, 7))
  params = {"w": jnp.zeros(6, jnp.bfloat16)}
  tx = optax.chain(xsam_jax.xsam(refresh_every=2), optax.sgd(0.05))
  step = make_step(tx, loss)
  state = tx.init(params)
  dtypes0 = jax.tree.map(lambda x: x.dtype, state)
  for _ in range(3):
    params, state, updates = step(params, state)
  assert params["w"].dtype == jnp.bfloat16 and updates["w"].dtype == jnp.bfloat16
  assert state[0].eigvec["w"].dtype == jnp.float32
  assert jax.tree.map(lambda x: x.dtype, state) == dtypes0
  chex.assert_tree_all_finite(state)


def test_zero_gradient_and_zero_hessian_give_finite_updates():
  loss = lambda w: jnp.sum(w) * 0.0
  params = jnp.ones(3)
  tx = optax.chain(xsam_jax.xsam(), optax.sgd(0.1))
  out, state = tx.update(jax.grad(loss)(params), tx.init(params), params, grad_fn=jax.grad(loss))
  chex.assert_tree_all_finite((out, state))
  np.testing.assert_allclose(optax.tree.norm(state[0].eigvec), 1.0, rtol=1e-5)


def test_unknown_extra_args_are_ignored(quadratic):
  # Gradient accumulation is tested in test_gradient_accumulation.py with distinct micro-batches.
  tx = optax.chain(xsam_jax.xsam(), optax.sgd(0.1))
  params = quadratic.params
  grads = jax.grad(quadratic.loss)(params)
  plain, _ = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(quadratic.loss))
  extra, _ = tx.update(
    grads, tx.init(params), params, grad_fn=jax.grad(quadratic.loss), unrelated="ignored"
  )
  chex.assert_trees_all_equal(extra, plain)
  assert float(optax.tree.norm(plain)) > 0


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"rho": -1.0}, "rho"),
    ({"alpha": 2.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"refresh_every": 0}, "refresh_every"),
    ({"num_iters": 0}, "num_iters"),
    ({"num_iters": 2.0}, "num_iters"),
    ({"correction": "code"}, "correction"),
    ({"normalize": 1}, "normalize"),
  ],
)
def test_bad_hyperparameters_raise_value_error_naming_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    xsam_jax.xsam(**kwargs)


def test_missing_grad_fn_and_bad_refresh_raise_value_error(quadratic):
  tx = xsam_jax.xsam()
  params = quadratic.params
  grads = jax.grad(quadratic.loss)(params)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(grads, tx.init(params), params)
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, tx.init(params), grad_fn=jax.grad(quadratic.loss))
  with pytest.raises(ValueError, match="refresh"):
    tx.update(grads, tx.init(params), params, grad_fn=jax.grad(quadratic.loss), refresh=1)


# X-SAM on a subset of steps (``when=``): the policies of sometimes_sam, issue 21 item 5.


def _counting(fn, counter, name):
  """``fn`` that adds one to ``counter[name]`` each time it runs (at run time, also in HVPs)."""

  def bump():
    counter[name] += 1

  def wrapped(p):
    jax.debug.callback(bump)
    return fn(p)

  return wrapped


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
  ("refresh_on", "refresh_steps"), [("step", {0, 2, 4, 6}), ("ascent", {0, 6})]
)
def test_every_k_xsam_corrects_on_ascent_steps_and_hands_the_clean_gradient_between(
  quadratic, normalize, refresh_on, refresh_steps
):
  # NumPy re-derivation of 7 SGD steps on the quadratic: k = 3 ascends at steps 0, 3, 6; the
  # eigenvector (one power step per refresh, refresh_every = 2) is refreshed every 2nd step
  # ("step") or every 2nd ascent step, i.e. at steps 0 and 6 ("ascent").
  rho, alpha, lr, eps = 0.2, 0.5, 0.1, 1e-12
  tx = xsam_jax.xsam(
    rho,
    alpha,
    when="every",
    k=3,
    refresh_every=2,
    num_iters=1,
    normalize=normalize,
    refresh_on=refresh_on,
  )
  grad_fn = jax.grad(quadratic.loss)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
  params = quadratic.params
  state = tx.init(params)
  x, v = quadratic.flat(params).astype(np.float64), quadratic.flat(state.eigvec)
  for t in range(7):
    out, state = update(grad_fn(params), state, params)
    if t in refresh_steps:
      v = quadratic.hess @ v
      v = v / np.linalg.norm(v)
    g = quadratic.grad_np(x)
    if t % 3 == 0:
      expected = _np_xsam(quadratic, x, v, rho, alpha, normalize)
    else:
      expected = g / (np.linalg.norm(g) + eps) if normalize else g
    assert bool(state.ascended) == (t % 3 == 0)
    np.testing.assert_allclose(quadratic.flat(state.eigvec), v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(quadratic.flat(out), expected, rtol=1e-5, atol=1e-6)
    params = jax.tree.map(lambda p, u: p - lr * u, params, out)
    x = x - lr * expected
  assert int(state.ascent_steps) == 3
  np.testing.assert_allclose(state.ascent_fraction, 3 / 7, rtol=1e-6)


@pytest.mark.parametrize(
  ("kwargs", "grads", "hvps"),
  [
    ({}, 7, 4 * 2),  # plain X-SAM: every step ascends; refreshes at 0, 2, 4, 6
    ({"when": "every", "k": 3}, 3, 4 * 2),  # ascents at 0, 3, 6; refreshes as plain X-SAM
    ({"when": "every", "k": 3, "refresh_on": "ascent"}, 3, 2 * 2),  # refreshes at 0, 6 only
  ],
)
def test_skipped_steps_make_no_ascent_gradient_and_no_hvp(quadratic, kwargs, grads, hvps):
  # Counted at run time: jax.debug.callback inside grad_fn (the ascent) and eig_grad_fn (every
  # HVP of a refresh) runs only in the taken branch of lax.cond; one compiled program.
  counter = {"grad": 0, "hvp": 0}
  tx = xsam_jax.xsam(refresh_every=2, num_iters=2, **kwargs)
  grad_fn = jax.grad(quadratic.loss)
  update = jax.jit(
    lambda g, s, p: tx.update(
      g,
      s,
      p,
      grad_fn=_counting(grad_fn, counter, "grad"),
      eig_grad_fn=_counting(grad_fn, counter, "hvp"),
    )
  )
  params = quadratic.params
  state = tx.init(params)
  for _ in range(7):
    out, state = update(grad_fn(params), state, params)
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, out)
  jax.effects_barrier()
  assert counter == {"grad": grads, "hvp": hvps}
  assert int(state.ascent_steps) == grads
  assert update._cache_size() == 1


@pytest.mark.parametrize(
  "policy", [{"when": "random", "prob": 0.5, "key": 3}, {"when": "adaptive", "threshold": 0.5}]
)
def test_xsam_and_sometimes_sam_ascend_on_the_same_steps_for_the_same_policy(quadratic, policy):
  # One copy of the policy code: fed the same clean gradients, both choose the same steps.
  grad_fn = jax.grad(quadratic.loss)
  params = quadratic.params
  chosen = {}
  for name, make in (("xsam", xsam_jax.xsam), ("sometimes_sam", xsam_jax.sometimes_sam)):
    tx = make(rho=0.1, **policy)
    update = jax.jit(lambda g, s, tx=tx: tx.update(g, s, params, grad_fn=grad_fn))
    state, seen = tx.init(params), []
    for t in range(12):
      scale = 1.0 + 3.0 * float(np.sin(1.7 * t) > 0.3)  # gradient norms that jump about
      grads = jax.tree.map(lambda g, scale=scale: scale * g, grad_fn(params))
      _, state = update(grads, state)
      seen.append(bool(state.ascended))
    chosen[name] = seen
  assert chosen["xsam"] == chosen["sometimes_sam"]
  assert 0 < sum(chosen["xsam"]) < 12


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"when": "sometimes"}, "`when` must be one of"),
    ({"k": 2}, "`k` is read only with when='every'"),
    ({"when": "random", "k": 2}, "`k` is read only with when='every'"),
    ({"when": "every", "k": 0}, "`k` must be a Python int >= 1"),
    ({"when": "random", "prob": 1.5}, "`prob` must be"),
    ({"when": "adaptive", "decay": 2.0}, "`decay` must be"),
    ({"when": "every", "refresh_on": "never"}, "`refresh_on` must be one of"),
  ],
)
def test_bad_schedule_arguments_raise_a_value_error_naming_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    xsam_jax.xsam(**kwargs)


def test_accumulated_scheduled_xsam_ascends_on_whole_optimizer_steps_and_refreshes_per_ascent():
  # accumulate(..., 2): 12 calls = 6 optimizer steps; k = 2 ascends on steps 0, 2, 4 (both
  # micro-batches), refresh_on="ascent" with p = 2 refreshes on the first micro-batch of the
  # 1st and 3rd ascent steps (steps 0 and 4): 2 refreshes of q = 3 HVPs.
  counter = {"grad": 0, "hvp": 0}
  a = jnp.array([4.0, 1.0, 0.5])
  loss = lambda w, b: 0.5 * jnp.sum(a * (w - b) ** 2)
  inner = xsam_jax.xsam(when="every", k=2, refresh_every=2, num_iters=3, refresh_on="ascent")
  tx = xsam_jax.accumulate(inner, optax.sgd(0.1), 2)

  @jax.jit
  def step(w, s, b):
    grad_fn = lambda u: jax.grad(loss)(u, b)
    u, s = tx.update(
      grad_fn(w),
      s,
      w,
      grad_fn=_counting(grad_fn, counter, "grad"),
      eig_grad_fn=_counting(grad_fn, counter, "hvp"),
    )
    return optax.apply_updates(w, u), s

  w, state, ascended = jnp.ones(3), tx.init(jnp.ones(3)), []
  for t in range(12):
    w, state = step(w, state, 0.1 * t * jnp.ones(3))
    ascended.append(bool(optax.tree.get(state, "ascended")))
  jax.effects_barrier()
  assert ascended == [True, True, False, False] * 3
  assert counter == {"grad": 6, "hvp": 2 * 3}
  assert step._cache_size() == 1


def test_every_device_mapping_of_scheduled_xsam_agrees_on_the_step_and_averages():
  # Ascent step (count 0): plain X-SAM's data-parallel output; skipped step (count 1, no
  # refresh): the normalised mean clean gradient, identical on every device.
  body = """
for mode in ("vma", "pmap"):
  plain, _ = run(xsam_jax.xsam(0.1, axis_name="data"), 0, mode)
  for when, kw in (("every", {"k": 2}), ("adaptive", {"threshold": -10.0})):
    out, st = run(xsam_jax.xsam(0.1, when=when, axis_name="data", **kw), 0, mode)
    np.testing.assert_allclose(flat(out), flat(plain), rtol=1e-5, atol=1e-7)
    assert bool(st.ascended)
  for when, kw in (("every", {"k": 2}), ("adaptive", {"threshold": 10.0})):
    out, st = run(xsam_jax.xsam(0.1, when=when, axis_name="data", **kw), 1, mode)
    np.testing.assert_allclose(flat(out), clean / np.linalg.norm(clean), rtol=1e-5, atol=1e-7)
    assert not bool(st.ascended)
  print("OK", mode)
"""
  out = mlp.run_on_four_devices(body)
  assert out.count("OK") == 2, out
