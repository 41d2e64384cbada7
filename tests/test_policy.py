"""Tests for the ascent policies' host-side twin (xsam_jax.ascent_due) and the static path
(``update(..., ascend=bool)``) of sometimes_sam, looksam and xsam(when=...)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_mlp as mlp
import optax
import pytest

import xsam_jax

LR, RHO, STEPS = 0.1, 0.2, 8

# (transform, the ascent_due arguments of its policy)
CASES = {
  "sam_every": (lambda: xsam_jax.sometimes_sam(RHO, when="every", k=3), {"when": "every", "k": 3}),
  "rst": (
    lambda: xsam_jax.sometimes_sam(RHO, when="random", prob=0.4, key=5),
    {"when": "random", "prob": 0.4, "key": 5},
  ),
  "rst_schedule": (
    lambda: xsam_jax.sometimes_sam(
      RHO, when="random", prob=optax.linear_schedule(0.1, 0.9, STEPS), key=2
    ),
    {"when": "random", "prob": optax.linear_schedule(0.1, 0.9, STEPS), "key": 2},
  ),
  "looksam": (lambda: xsam_jax.looksam(RHO, k=3, alpha=0.5), {"when": "every", "k": 3}),
  "xsam_every": (
    lambda: xsam_jax.xsam(RHO, when="every", k=2, refresh_every=2, num_iters=3),
    {"when": "every", "k": 2},
  ),
  "xsam_random": (
    lambda: xsam_jax.xsam(RHO, when="random", prob=0.5, key=1, refresh_every=3, num_iters=2),
    {"when": "random", "prob": 0.5, "key": 1},
  ),
}


def _train(tx, params, ascend_of=None, counter=None):
  """``STEPS`` jitted SGD steps on different batches, ``ascend`` static (None: lax.cond path).

  Returns the per-step ``(params, state)``, the step function (for its cache) and the number
  of ``cond`` primitives in the jaxpr of each compiled flavour.
  """
  counter = [0] if counter is None else counter
  opt = optax.chain(tx, optax.sgd(LR))

  def step(params, state, x, y, ascend):
    grads = jax.grad(mlp.loss)(params, x, y)
    grad_fn = mlp.counting_grad_fn(x, y, counter)
    updates, state = opt.update(grads, state, params, grad_fn=grad_fn, ascend=ascend)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step, static_argnums=4)
  state = opt.init(params)
  history, conds = [], {}
  for t, (x, y) in enumerate(mlp.batches(STEPS)):
    ascend = None if ascend_of is None else ascend_of(t)
    if ascend not in conds:
      jaxpr = jax.make_jaxpr(step, static_argnums=4)(params, state, x, y, ascend)
      conds[ascend] = str(jaxpr).count("cond[")
    params, state = jitted(params, state, jnp.asarray(x), jnp.asarray(y), ascend)
    history.append((params, state[0]))
  jax.effects_barrier()
  return history, jitted, conds


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_static_path_makes_the_in_step_choices_and_the_same_updates_without_a_cond(case):
  make, policy = CASES[case]
  params = mlp.init()
  cond_counter, static_counter = [0], [0]
  traced, traced_step, traced_conds = _train(make(), params, counter=cond_counter)
  due = [xsam_jax.ascent_due(t, **policy) for t in range(STEPS)]
  assert 0 < sum(due) < STEPS  # both kinds of step occur, so the comparison can fail
  static, static_step, static_conds = _train(
    make(), params, ascend_of=lambda t: due[t], counter=static_counter
  )
  # The in-step policy made exactly the host's choices, and the updates agree.
  assert [bool(s.ascended) for _, s in traced] == due
  assert [bool(s.ascended) for _, s in static] == due
  for (p_traced, s_traced), (p_static, s_static) in zip(traced, static, strict=True):
    for k in mlp.KEYS:
      np.testing.assert_allclose(np.asarray(p_static[k]), np.asarray(p_traced[k]), rtol=1e-6)
    assert int(s_static.ascent_steps) == int(s_traced.ascent_steps)
  # Both paths run the same grad_fn calls: one per ascent (X-SAM's refresh HVPs run through
  # grad_fn too, the same number on both paths).
  assert static_counter[0] == cond_counter[0]
  if not case.startswith("xsam"):
    assert static_counter[0] == sum(due)
  assert traced_step._cache_size() == 1 and static_step._cache_size() == 2
  # The lax.cond path has the policy's cond; the static programs have none around the ascent
  # (X-SAM keeps the refresh's own cond when `refresh` is None).
  refresh_conds = 1 if case.startswith("xsam") else 0
  assert traced_conds[None] == 1 + refresh_conds
  assert static_conds[True] == static_conds[False] == refresh_conds


def test_ascent_due_twins_the_in_step_choice_under_accumulation():
  # Call c of accumulate(k=2) belongs to optimizer step c // 2: both micro-batches agree.
  params = mlp.init()
  for tx_policy, policy in (
    (xsam_jax.sometimes_sam(RHO, when="every", k=2), {"when": "every", "k": 2}),
    (
      xsam_jax.sometimes_sam(RHO, when="random", prob=0.5, key=4),
      {"when": "random", "prob": 0.5, "key": 4},
    ),
  ):
    tx = xsam_jax.accumulate(tx_policy, optax.sgd(LR), 2)
    state = tx.init(params)
    seen = []
    for x, y in mlp.batches(8):
      grad_fn = lambda q, x=x, y=y: jax.grad(mlp.loss)(q, x, y)
      _, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
      seen.append(bool(state[0].ascended))
    want = [xsam_jax.ascent_due(c, **policy, accumulation_steps=2) for c in range(8)]
    assert seen == want
    assert want[0::2] == want[1::2] and 0 < sum(want) < 8


def test_the_random_draw_is_the_same_for_float64_params():
  # The Bernoulli draw is made in float32 whatever the params' dtype, so ascent_due (float32)
  # twins a float64 run under x64 too.
  with jax.enable_x64(True):
    params = mlp.init(dtype=jnp.float64)
    tx = xsam_jax.sometimes_sam(RHO, when="random", prob=optax.linear_schedule(0.1, 0.9, 40), key=7)
    state = tx.init(params)
    grad_fn = lambda q: jax.grad(mlp.loss)(q, *mlp.batches(1)[0])
    step = jax.jit(lambda s: tx.update(grad_fn(params), s, params, grad_fn=grad_fn)[1])
    seen = []
    for _ in range(40):
      state = step(state)
      seen.append(bool(state.ascended))
    assert state.grad_norm.dtype == jnp.float64
  want = [
    xsam_jax.ascent_due(t, when="random", prob=optax.linear_schedule(0.1, 0.9, 40), key=7)
    for t in range(40)
  ]
  assert seen == want


def test_ascent_due_every_k_and_random_match_the_documented_rules():
  assert [xsam_jax.ascent_due(c, when="every", k=4) for c in range(9)] == [
    c % 4 == 0 for c in range(9)
  ]
  key = jax.random.key(9)
  want = [bool(jax.random.bernoulli(jax.random.fold_in(key, t), 0.3)) for t in range(30)]
  assert [xsam_jax.ascent_due(t, when="random", prob=0.3, key=key) for t in range(30)] == want
  assert [xsam_jax.ascent_due(t, when="random", prob=0.3, key=9) for t in range(30)] == want
  assert not any(xsam_jax.ascent_due(t, when="random", prob=0.0) for t in range(20))
  assert all(xsam_jax.ascent_due(t, when="random", prob=1.0) for t in range(20))


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"when": "adaptive"}, "has no host-side twin"),
    ({"when": "sometimes"}, "`when` must be one of"),
    ({"when": "every", "k": 0}, "`k` must be a Python int >= 1"),
    ({"when": "every", "prob": 0.5}, "`prob` is read only with when='random'"),
    ({"when": "random", "prob": 1.5}, r"`prob` must be \[0.0, 1.0\]"),
    ({"when": "random", "key": 0.5}, "`key` must be a PRNG key"),
    ({"when": "every", "accumulation_steps": 0}, "`accumulation_steps` must be a Python int"),
  ],
)
def test_ascent_due_refuses_bad_arguments_naming_them(kwargs, match):
  with pytest.raises(ValueError, match=match):
    xsam_jax.ascent_due(0, **kwargs)


@pytest.mark.parametrize(
  "make",
  [
    lambda: xsam_jax.sometimes_sam(RHO, when="every", k=2),
    lambda: xsam_jax.looksam(RHO, k=2),
    lambda: xsam_jax.xsam(RHO, when="every", k=2),
  ],
)
def test_a_traced_or_array_ascend_is_refused_naming_the_static_path(make):
  tx = make()
  params = mlp.init()
  x, y = mlp.batches(1)[0]
  grad_fn = lambda q: jax.grad(mlp.loss)(q, x, y)
  for bad in (jnp.asarray(True), np.bool_(True), 1):
    with pytest.raises(ValueError, match="`ascend` must be None"):
      tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn, ascend=bad)


@pytest.mark.parametrize(
  "make",
  [
    lambda: xsam_jax.sam(RHO),
    lambda: xsam_jax.sam(RHO, adaptive=True),
    lambda: xsam_jax.esam(RHO, beta=0.5),
    lambda: xsam_jax.eigen_sam(RHO),
    lambda: xsam_jax.xsam(RHO),
  ],
)
def test_ascend_given_to_a_transform_without_a_policy_is_refused_not_ignored(make):
  # These ascend on every step: a silently ignored ascend=False would still ascend.
  tx = make()
  params = mlp.init()
  x, y = mlp.batches(1)[0]
  grad_fn = lambda q: jax.grad(mlp.loss)(q, x, y)
  for ascend in (False, True):
    with pytest.raises(ValueError, match="`ascend` is read only by a transform with an ascent"):
      tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn, ascend=ascend)
  tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn, ascend=None)  # the default


def test_the_static_path_under_every_device_mapping_matches_the_cond_path():
  # shard_map (check_vma=True) and pmap: ascend=True gives the cond path's ascent step (SAM's
  # m-sharpness gradient for sometimes_sam), ascend=False its skipped step (the mean clean
  # gradient), identical on every device (run() asserts it).
  body = """
MAKE = (
  lambda: xsam_jax.sometimes_sam(0.1, when="every", k=2, axis_name="data"),
  lambda: xsam_jax.looksam(0.1, k=2, alpha=0.5, axis_name="data"),
  lambda: xsam_jax.xsam(0.1, when="every", k=2, axis_name="data", refresh_every=2, num_iters=2),
)
for mode in ("vma", "pmap"):
  for i, make in enumerate(MAKE):
    for count, ascend in ((0, True), (1, False)):
      traced, st_t = run(make(), count, mode)
      static, st_s = run(make(), count, mode, ascend=ascend)
      np.testing.assert_allclose(flat(static), flat(traced), rtol=1e-5, atol=1e-7)
      assert bool(st_s.ascended) == bool(st_t.ascended) == ascend
      if i == 0:
        want = flat(sam_out) if ascend else clean
        np.testing.assert_allclose(flat(static), want, rtol=1e-5, atol=1e-7)
  print("OK", mode)
"""
  out = mlp.run_on_four_devices(body)
  assert out.count("OK") == 2, out
