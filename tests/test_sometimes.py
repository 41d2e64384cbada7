"""Tests for xsam_jax.sometimes_sam (SAM every k steps, RST, AE-SAM) against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_mlp as mlp
import optax
import pytest

import xsam_jax

LR, RHO, STEPS = 0.1, 0.2, 6


def _run(tx, params, steps=STEPS, counter=None):
  """Runs ``steps`` jitted SGD steps on different batches; returns per-step params and states."""
  counter = [0] if counter is None else counter
  opt = optax.chain(tx, optax.sgd(LR))

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(mlp.loss)(params, x, y)
    updates, state = opt.update(grads, state, params, grad_fn=mlp.counting_grad_fn(x, y, counter))
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  history = []
  for x, y in mlp.batches(steps):
    params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
    history.append((params, state[0]))
  jax.effects_barrier()
  assert step._cache_size() == 1  # compiled once for every step, ascent or not
  return history


def _reference(params, decide, adaptive=False, steps=STEPS):
  """NumPy: SAM's gradient where ``decide(t, g)`` says so, the clean gradient elsewhere."""
  p = mlp.to_np(params)
  out = []
  for t, (x, y) in enumerate(mlp.batches(steps)):
    g = mlp.grad_np(p, x, y)
    due = decide(t, g)
    d = mlp.sam_grad_np(p, x, y, RHO, adaptive) if due else g
    p = mlp.axpy(-LR, d, p)
    out.append((p, due))
  return out


def _assert_matches(history, reference):
  for (params, state), (p_ref, due) in zip(history, reference, strict=True):
    assert bool(state.ascended) == due
    for k in mlp.KEYS:
      np.testing.assert_allclose(np.asarray(params[k]), p_ref[k], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_every_k_ascends_on_steps_0_k_2k_and_takes_the_clean_gradient_between(adaptive):
  params = mlp.init()
  history = _run(xsam_jax.sometimes_sam(RHO, when="every", k=3, adaptive=adaptive), params)
  _assert_matches(history, _reference(params, lambda t, g: t % 3 == 0, adaptive))
  # And the skipped steps differ from SAM (the test can fail).
  sam_everywhere = _reference(params, lambda t, g: True, adaptive)
  assert not np.allclose(history[-1][0]["w1"], sam_everywhere[-1][0]["w1"], atol=1e-4)
  assert int(history[-1][1].ascent_steps) == 2
  np.testing.assert_allclose(history[-1][1].ascent_fraction, 2 / 6)
  assert float(history[1][1].perturbation_norm) == 0.0
  if not adaptive:
    np.testing.assert_allclose(history[0][1].perturbation_norm, RHO, rtol=1e-5)


def test_random_ascends_on_bernoulli_draws_from_the_key_and_the_scheduled_probability():
  params = mlp.init()
  prob = optax.linear_schedule(0.2, 0.9, STEPS)  # a scheduled probability
  key = jax.random.key(3)
  draws = [bool(jax.random.bernoulli(jax.random.fold_in(key, t), prob(t))) for t in range(STEPS)]
  assert 0 < sum(draws) < STEPS  # both kinds of step occur, so the test can fail
  history = _run(xsam_jax.sometimes_sam(RHO, when="random", prob=prob, key=key), params)
  _assert_matches(history, _reference(params, lambda t, g: draws[t]))
  # An int seed is the same key; p = 0 never ascends and p = 1 always does.
  again = _run(xsam_jax.sometimes_sam(RHO, when="random", prob=prob, key=3), params)
  assert [bool(s.ascended) for _, s in again] == draws
  for p, n in ((0.0, 0), (1.0, STEPS)):
    hist = _run(xsam_jax.sometimes_sam(RHO, when="random", prob=p), params)
    assert int(hist[-1][1].ascent_steps) == n


def test_adaptive_ascends_when_the_squared_gradient_norm_exceeds_its_running_mean_by_c_sigmas():
  params = mlp.init()
  decay, c = 0.6, optax.linear_schedule(-0.5, 0.5, STEPS)
  moments = {"mean": 0.0, "var": 0.0}
  trace = []

  def decide(t, g):
    s = mlp.norm(g) ** 2
    mean = decay * moments["mean"] + (1 - decay) * s
    var = decay * moments["var"] + (1 - decay) * (s - mean) ** 2
    moments.update(mean=mean, var=var)
    trace.append((mean, var))
    return s >= mean + float(c(t)) * var**0.5

  reference = _reference(params, decide)
  dues = [due for _, due in reference]
  assert 0 < sum(dues) < STEPS, dues  # both kinds of step occur
  history = _run(xsam_jax.sometimes_sam(RHO, when="adaptive", decay=decay, threshold=c), params)
  _assert_matches(history, reference)
  for (_, state), (mean, var) in zip(history, trace, strict=True):
    np.testing.assert_allclose(state.sq_norm_mean, mean, rtol=1e-4)
    np.testing.assert_allclose(state.sq_norm_var, var, rtol=1e-3)


def test_a_nan_gradient_keeps_the_adaptive_moments_and_skips_the_ascent():
  params = mlp.init()
  tx = xsam_jax.sometimes_sam(RHO, when="adaptive")
  x, y = mlp.batches(1)[0]
  grad_fn = lambda p: jax.grad(mlp.loss)(p, x, y)
  _, state = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
  nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), params)
  _, after = tx.update(nan, state, params, grad_fn=grad_fn)
  assert float(after.sq_norm_mean) == float(state.sq_norm_mean) > 0
  assert float(after.sq_norm_var) == float(state.sq_norm_var)
  assert not bool(after.ascended)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_steps_that_skip_the_ascent_really_skip_its_gradient_evaluation(k):
  # Counted at run time: a jax.debug.callback inside grad_fn runs only when the ascent branch
  # of lax.cond is taken. Cost per step = (clean gradients + grad_fn calls) / steps.
  counter = [0]
  history = _run(xsam_jax.sometimes_sam(RHO, when="every", k=k), mlp.init(), counter=counter)
  ascents = -(-STEPS // k)
  assert counter[0] == ascents == int(history[-1][1].ascent_steps)
  assert (STEPS + counter[0]) / STEPS == pytest.approx(1 + 1 / k, abs=1 / STEPS)
  counter = [0]
  history = _run(
    xsam_jax.sometimes_sam(RHO, when="random", prob=0.5, key=1), mlp.init(), counter=counter
  )
  assert counter[0] == int(history[-1][1].ascent_steps)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"when": "sometimes"}, "`when` must be one of"),
    ({"when": "every", "prob": 0.5}, "`prob` is read only with when='random'"),
    ({"when": "random", "k": 2}, "`k` is read only with when='every'"),
    ({"when": "every", "threshold": 1.0}, "`threshold` is read only with when='adaptive'"),
    ({"when": "every", "k": 0}, "`k` must be a Python int >= 1"),
    ({"when": "every", "k": 2.0}, "`k` must be a Python int >= 1"),
    ({"when": "random", "prob": 1.5}, r"`prob` must be \[0.0, 1.0\]"),
    ({"when": "random", "key": 0.5}, "`key` must be a PRNG key"),
    ({"when": "adaptive", "decay": -0.1}, "`decay` must be"),
    ({"when": "adaptive", "threshold": float("nan")}, "`threshold` must be"),
    ({"rho": -0.1}, "`rho` must be"),
    ({"eta": -1.0, "adaptive": True}, "`eta` must be"),
    ({"accumulation_steps": 2}, "xsam_jax.accumulate"),
  ],
)
def test_bad_arguments_raise_a_value_error_naming_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    xsam_jax.sometimes_sam(**kwargs)


def test_update_without_grad_fn_or_params_raises_a_value_error_naming_it():
  tx = xsam_jax.sometimes_sam()
  params = mlp.init()
  with pytest.raises(ValueError, match="`grad_fn` is required"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="`params` is required"):
    tx.update(params, tx.init(params), None, grad_fn=lambda p: p)


def test_accumulate_averages_sam_gradients_on_ascent_steps_and_clean_ones_between():
  params = mlp.init()
  tx = xsam_jax.accumulate(xsam_jax.sometimes_sam(RHO, when="every", k=2), optax.sgd(LR), 2)
  micro = mlp.batches(4)
  state = tx.init(params)
  p_ref = mlp.to_np(params)
  for step in range(2):
    pair = micro[2 * step : 2 * step + 2]
    for x, y in pair:
      grad_fn = lambda q, x=x, y=y: jax.grad(mlp.loss)(q, x, y)
      updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
      params = optax.apply_updates(params, updates)
    rule = (lambda x, y: mlp.sam_grad_np(p_ref, x, y, RHO)) if step == 0 else None
    grads = [rule(x, y) if rule else mlp.grad_np(p_ref, x, y) for x, y in pair]
    p_ref = mlp.axpy(-LR / 2, mlp.axpy(1.0, grads[0], grads[1]), p_ref)
    for k in mlp.KEYS:
      np.testing.assert_allclose(np.asarray(params[k]), p_ref[k], rtol=2e-5, atol=2e-6)
  assert int(state[0].ascent_steps) == 2  # both micro-batches of optimizer step 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("when", ["every", "random", "adaptive"])
def test_state_dtypes_stay_constant_across_ascent_and_skipped_steps(when, dtype):
  params = mlp.init(dtype=dtype)
  tx = xsam_jax.sometimes_sam(RHO, when=when)
  state = tx.init(params)
  dtypes = jax.tree.map(lambda a: a.dtype, state)
  step = jax.jit(
    lambda p, s, x, y: tx.update(
      jax.grad(mlp.loss)(p, x, y), s, p, grad_fn=lambda q: jax.grad(mlp.loss)(q, x, y)
    )
  )
  for x, y in mlp.batches(3):
    out, state = step(params, state, x, y)
    assert jax.tree.map(lambda a: a.dtype, state) == dtypes
    assert all(o.dtype == dtype for o in jax.tree.leaves(out))
  assert state.grad_norm.dtype == jnp.float32 and state.ascended.dtype == jnp.bool_
  assert step._cache_size() == 1


def test_every_device_mapping_averages_over_devices_and_agrees_on_the_choice():
  # Ascent steps give sam's m-sharpness gradient, skipped ones the mean clean gradient, the
  # same on every device (the adaptive rule reads the device mean of ||g||^2).
  body = """
ASCEND = (("every", {"k": 2}), ("adaptive", {"threshold": -10.0}))
SKIP = (("random", {"prob": 0.0}), ("adaptive", {"threshold": 10.0}))
for mode in ("vma", "pmap"):
  for count, cases, want in ((0, ASCEND, flat(sam_out)), (1, SKIP, clean)):
    for when, kw in cases:
      tx = xsam_jax.sometimes_sam(0.1, when=when, axis_name="data", **kw)
      out, st = run(tx, count, mode)
      np.testing.assert_allclose(flat(out), want, rtol=1e-5, atol=1e-7)
      assert bool(st.ascended) == (count == 0)
  print("OK", mode)
"""
  out = mlp.run_on_four_devices(body)
  assert out.count("OK") == 2, out
