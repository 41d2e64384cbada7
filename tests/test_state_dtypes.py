"""Every method's state keeps its shapes and dtypes across ``update``, for every params dtype.

So the state can be carried by ``lax.cond``, ``lax.scan`` and ``while_loop`` (which require equal
types), including under x64 with float64 params, where hyperparameters and reductions are
float64 too.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_jax

METHODS = {
  "sam": lambda: xsam_jax.sam(rho=0.05),
  "asam": lambda: xsam_jax.sam(rho=0.5, adaptive=True),
  "eigen_sam": lambda: xsam_jax.eigen_sam(rho=0.05, alpha=0.2, refresh_every=2),
  "xsam": lambda: xsam_jax.xsam(rho=0.05, alpha=0.2, refresh_every=2),
  "xsam_lanczos": lambda: xsam_jax.xsam(rho=0.05, refresh_every=2, num_iters=3, solver="lanczos"),
  "xsam_adaptive": lambda: xsam_jax.xsam(
    rho=0.05, refresh_every=2, when="adaptive", refresh_on="ascent"
  ),
}
DTYPES = ("float16", "bfloat16", "float32", "float64")
DIAG = np.array([3.0, 1.0, 0.5, 2.0, 0.25])


def _loss(params):
  w = params["w"].astype(jnp.promote_types(params["w"].dtype, jnp.float32))
  b = params["b"].astype(w.dtype)
  return 0.5 * jnp.sum(jnp.asarray(DIAG[:3], w.dtype) * jnp.tanh(w - 0.3) ** 2) + jnp.sum(b**2)


def _params(dtype):
  return {"w": jnp.array([0.5, -1.0, 2.0], dtype), "b": jnp.array([1.0, -0.5], dtype)}


def _signature(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_types_survive_update_inside_cond_and_scan(name, dtype):
  with jax.enable_x64(True):
    params = _params(dtype)
    tx = optax.chain(METHODS[name](), optax.sgd(0.1))
    state = tx.init(params)
    grad_fn = jax.grad(_loss)

    def step(carry, _):
      p, s = carry
      updates, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return (optax.apply_updates(p, updates), s), None

    # lax.scan carries the state over refresh and plain steps (refresh_every=2).
    (new_params, new_state), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=3))((params, state))
    assert _signature(new_state) == _signature(state)
    assert _signature(new_params) == _signature(params)
    chex.assert_tree_all_finite(new_state)

    # lax.cond with an identity branch needs equal types on both sides.
    @jax.jit
    def maybe_step(flag, p, s):
      return jax.lax.cond(flag, lambda: step((p, s), None)[0], lambda: (p, s))

    stepped = maybe_step(True, params, state)
    assert _signature(stepped) == _signature((params, state))

    # Counters are int32 and flags (X-SAM's `ascended`) bool; every other scalar is a float.
    counters = (jnp.int32, jnp.bool_)
    scalars = [x for x in jax.tree.leaves(state) if jnp.ndim(x) == 0 and x.dtype not in counters]
    want = jnp.float64 if dtype == "float64" else jnp.float32
    assert all(x.dtype == want for x in scalars), _signature(state)


def test_float64_sam_reads_rho_and_reduces_in_float64():
  # A float32 rho (0.05 -> 0.0500000007) or float32 norms would be off by ~1e-8 relative.
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    hess = a @ a.T + np.eye(4)
    x = rng.normal(size=4)
    loss = lambda w: 0.5 * w @ jnp.asarray(hess) @ w
    g = hess @ x
    expected = hess @ (x + 0.05 * g / (np.linalg.norm(g) + 1e-12))
    for tx in (xsam_jax.sam(rho=0.05), xsam_jax.xsam(rho=0.05, alpha=0.0, normalize=False)):
      out, state = tx.update(
        jax.grad(loss)(jnp.asarray(x)),
        tx.init(jnp.asarray(x)),
        jnp.asarray(x),
        grad_fn=jax.grad(loss),
      )
      assert out.dtype == jnp.float64
      np.testing.assert_allclose(out, expected, rtol=1e-13)
      np.testing.assert_allclose(state.grad_norm, np.linalg.norm(g), rtol=1e-13)


def test_float64_refresh_on_the_cond_path_keeps_a_float64_eigenvalue():
  with jax.enable_x64(True):
    params = jnp.ones(3, jnp.float64)
    loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0, 0.5]) * w**2)
    tx = xsam_jax.xsam(num_iters=60)
    _, state = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss)))(
      params, tx.init(params)
    )
    assert state.eigval.dtype == jnp.float64 and state.eigvec.dtype == jnp.float64
    np.testing.assert_allclose(state.eigval, 4.0, rtol=1e-12)


@pytest.mark.parametrize("name", ["sam", "eigen_sam", "xsam"])
def test_a_fresh_state_holds_one_buffer_per_field_so_it_can_be_donated(name):
  # init used to put one zero array in every scalar field: donating that state to a jitted
  # step raised "Attempt to donate the same buffer twice".
  tx = optax.chain(METHODS[name](), optax.adamw(0.1))
  params = _params("float32")
  state = tx.init(params)
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
  assert len(set(pointers)) == len(pointers)
  step = jax.jit(
    lambda s, p: tx.update(jax.grad(_loss)(p), s, p, grad_fn=jax.grad(_loss))[1],
    donate_argnums=(0,),
  )
  for _ in range(2):
    state = step(state, params)
  assert int(state[0].count) == 2
