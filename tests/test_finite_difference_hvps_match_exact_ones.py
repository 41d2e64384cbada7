"""Finite-difference HVPs: within the documented error of the exact product, one gradient each.

``hvp_method="forward_difference"`` computes :math:`(\\nabla L(w + hv) - \\nabla L(w))/h` with
:math:`h = \\sqrt{u}(1+\\|w\\|)/\\|v\\|`. Checked against the exact forward-over-reverse product
taken in float64 (the reference), on the tiny MLP of ``conftest.py`` and on a tiny CNN with
BatchNorm in eval mode, in float64 and float32; the base gradient is shared by all products of
a refresh and, when the HVP loss is the training loss, is the step's clean gradient (counted
at trace time); and the trackers of X-SAM and Eigen-SAM converge to the same eigenvector.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import xsam_jax
from xsam_jax import hessian

FD = "forward_difference"


class TinyCNN(nn.Module):
  """Conv(3x3, 4) -> BatchNorm (eval mode, running statistics) -> swish -> mean -> Dense(3)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return nn.Dense(3)(nn.swish(x).mean(axis=(1, 2)))


@functools.cache
def _cnn():
  """``(params, loss)`` of a 63-parameter CNN whose BatchNorm uses non-trivial running stats."""
  model = TinyCNN()

  @jax.jit  # one compiled program instead of dozens of eager ops
  def build(key):
    k = jax.random.split(key, 5)
    x = jax.random.normal(k[0], (8, 6, 6, 1))
    y = jax.random.randint(k[1], (8,), 0, 3)
    params = model.init(k[2], x)["params"]
    mean = 0.3 * jax.random.normal(k[3], (4,))
    var = jax.random.uniform(k[4], (4,), minval=0.5, maxval=1.5)
    return params, {"BatchNorm_0": {"mean": mean, "var": var}}, x, y

  params, stats, x, y = build(jax.random.key(0))

  def loss(p):
    dtype = jax.tree.leaves(p)[0].dtype
    variables = {"params": p, "batch_stats": jax.tree.map(lambda a: a.astype(dtype), stats)}
    logits = model.apply(variables, x.astype(dtype))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  return params, loss


def _problem(name, tiny_mlp):
  if name == "mlp":
    return tiny_mlp.params, tiny_mlp.loss
  return _cnn()


def _flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def _cast(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype), tree)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("problem", ["mlp", "cnn"])
def test_forward_difference_error_is_within_the_documented_bound(problem, dtype, tiny_mlp):
  """||FD - Hv|| / ||Hv|| <= truncation + rounding terms of the ``hessian.hvp`` docstring.

  truncation = h ||v|| ||T[v^, v^]|| / (2 ||H v^||), T the third derivative (nested jvp in
  float64); rounding = (2 gamma + u ||H|| ||w + hv|| / 2) / (h ||v|| ||H v^||) with
  gamma = 4 u ||g|| (the rounding of one gradient, itself checked in float32). Directions: the
  top eigenvector and a random unit vector.
  """
  with jax.enable_x64(True):
    params32, loss = _problem(problem, tiny_mlp)
    params64 = _cast(params32, jnp.float64)
    grad_fn = jax.grad(loss)
    u = float(jnp.finfo(dtype).eps)
    exact_fn = lambda v: hessian.hvp(grad_fn, params64, v)
    flat64, unravel = ravel_pytree(params64)
    rand = np.random.default_rng(0).normal(size=flat64.size)

    def measure(v64):
      exact = exact_fn(v64)
      third = jax.jvp(lambda p: hessian.hvp(grad_fn, p, v64), (params64,), (v64,))[1]
      p, v = _cast(params64, dtype), _cast(v64, dtype)
      fd = hessian.hvp(grad_fn, p, v, hvp_method=FD)
      exact_low = hessian.hvp(grad_fn, p, v)
      return exact, third, fd, exact_low, hessian.fd_step_size(p, v), grad_fn(p)

    @jax.jit  # one compiled program for everything
    def run(rand_v):
      h_norm, top_vec = hessian.power_iteration(exact_fn, rand_v, 300)
      stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), top_vec, rand_v)
      return h_norm, jax.vmap(measure)(stacked), grad_fn(params64)

    h_norm, measured, g64 = run(unravel(jnp.asarray(rand / np.linalg.norm(rand))))
    g64, w_norm = _flat(g64), np.linalg.norm(flat64)
    for i in range(2):  # the top eigenvector, then the random direction
      exact, third, fd, exact_low, h, g_low = (
        _flat(jax.tree.map(lambda a: a[i], t)) for t in measured
      )
      h = h.item()
      hv_norm = np.linalg.norm(exact)
      gamma = 4 * u * np.linalg.norm(g64)
      if dtype == "float32":  # the gradient-rounding assumption behind gamma
        assert np.linalg.norm(g_low - g64) <= gamma
      truncation = h * np.linalg.norm(third) / (2 * hv_norm)
      rounding = (2 * gamma + 0.5 * u * abs(float(h_norm)) * (w_norm + h)) / (h * hv_norm)
      error = np.linalg.norm(fd - exact) / hv_norm
      print(f"{problem} {dtype}: rel err {error:.2e} <= bound {truncation + rounding:.2e}")
      assert error <= truncation + rounding
      assert error <= 30 * np.sqrt(u)  # O(sqrt(u)): 4.5e-7 float64, 1e-2 float32
      # The exact product in the same dtype is far more accurate: the error is the method's.
      assert np.linalg.norm(exact_low - exact) / hv_norm < 0.1 * error
      np.testing.assert_allclose(h, np.sqrt(u) * (1 + w_norm), rtol=1e-5)


def test_step_size_scales_with_the_parameters_and_the_precision():
  v = {"a": jnp.array([0.6, 0.8])}
  for dtype, u in [(jnp.float32, 2**-23), (jnp.bfloat16, 2**-7), (jnp.float16, 2**-10)]:
    w = {"a": jnp.array([3.0, 4.0], dtype)}
    np.testing.assert_allclose(hessian.fd_step_size(w, v), np.sqrt(u) * 6.0, rtol=1e-6)
  # Mixed precision: the least precise leaf sets u; ||v|| divides h.
  w = {"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros(1, jnp.bfloat16)}
  v2 = {"a": jnp.array([0.0, 2.0]), "b": jnp.zeros(1)}
  np.testing.assert_allclose(hessian.fd_step_size(w, v2), np.sqrt(2**-7) / 2, rtol=1e-6)
  with jax.enable_x64(True):
    h = hessian.fd_step_size(jnp.zeros(2, jnp.float64), jnp.ones(2, jnp.float64))
    assert h.dtype == jnp.float64
    np.testing.assert_allclose(h, 2**-26 / np.sqrt(2), rtol=1e-12)


def test_zero_direction_gives_a_zero_product_not_nan(quadratic):
  zero = jax.tree.map(jnp.zeros_like, quadratic.params)
  grad_fn = jax.grad(quadratic.loss)
  out = jax.jit(lambda v: hessian.hvp(grad_fn, quadratic.params, v, hvp_method=FD))(zero)
  chex.assert_tree_all_finite(out)
  assert float(optax.tree.norm(out)) < 1e-6


class _Counter:
  """A ``grad_fn`` that counts its calls (at trace time under jit)."""

  def __init__(self, loss):
    self.calls = 0
    self._grad = jax.grad(loss)

  def __call__(self, params):
    self.calls += 1
    return self._grad(params)


def _refreshed_state(tx, grads, params, grad_fn, eig_grad_fn=None):
  return _refresh_step(tx, params, grad_fn, eig_grad_fn)(grads, tx.init(params))


def _refresh_step(tx, params, grad_fn, eig_grad_fn=None):
  return jax.jit(
    lambda g, s: tx.update(g, s, params, grad_fn=grad_fn, eig_grad_fn=eig_grad_fn, refresh=True)[1]
  )


@pytest.mark.parametrize("make", [xsam_jax.xsam, xsam_jax.eigen_sam])
def test_a_refresh_costs_one_gradient_per_hvp_and_reuses_the_clean_gradient(make, quadratic):
  q = 3
  params = quadratic.params
  grads = jax.grad(quadratic.loss)(params)
  tx = make(rho=0.05, num_iters=q, hvp_method=FD)
  # No eig_grad_fn: q gradients for the HVPs and one for the ascent; the base is `updates`.
  grad_fn = _Counter(quadratic.loss)
  _refreshed_state(tx, grads, params, grad_fn)
  assert grad_fn.calls == q + 1
  # With eig_grad_fn: its base gradient once per refresh, then one gradient per HVP.
  grad_fn, eig_grad_fn = _Counter(quadratic.loss), _Counter(quadratic.loss)
  _refreshed_state(tx, grads, params, grad_fn, eig_grad_fn)
  assert (grad_fn.calls, eig_grad_fn.calls) == (1, q + 1)


def test_the_in_step_base_gradient_is_the_clean_gradient_handed_to_update(quadratic):
  q = 3
  params = quadratic.params
  grad_fn = jax.grad(quadratic.loss)
  grads = grad_fn(params)
  tx = xsam_jax.xsam(rho=0.05, num_iters=q, hvp_method=FD)
  # The same eigenvector as an in-step refresh that recomputes the base through eig_grad_fn,
  # up to the documented rounding error of a forward difference (~u ||g|| / h per product).
  ref = _refreshed_state(tx, grads, params, grad_fn, eig_grad_fn=grad_fn)
  step = _refresh_step(tx, params, grad_fn)
  got = step(grads, tx.init(params))
  assert float(optax.tree.norm(optax.tree.sub(got.eigvec, ref.eigvec))) < 3e-3
  np.testing.assert_allclose(got.eigval, ref.eigval, rtol=3e-3)
  # The clean gradient really is the base: a wrong `updates` moves the eigenvector.
  wrong = step(jax.tree.map(lambda g: g + 1e-3, grads), tx.init(params))
  assert float(optax.tree.norm(optax.tree.sub(wrong.eigvec, ref.eigvec))) > 3e-2


def test_out_of_step_refresh_computes_one_base_gradient_for_every_state(quadratic):
  q = 4
  tx = optax.chain(xsam_jax.xsam(), xsam_jax.eigen_sam(), optax.sgd(0.1))
  grad_fn = _Counter(quadratic.loss)
  # unroll=True: every HVP is its own call (a fori_loop would trace its body once).
  state = xsam_jax.refresh_eigenvector(
    tx.init(quadratic.params), quadratic.params, grad_fn, num_iters=q, hvp_method=FD, unroll=True
  )
  assert grad_fn.calls == 2 * q + 1
  exact = xsam_jax.refresh_eigenvector(
    tx.init(quadratic.params), quadratic.params, jax.grad(quadratic.loss), num_iters=q
  )
  for sub, ref in zip(state[:2], exact[:2], strict=True):
    chex.assert_trees_all_close(sub.eigvec, ref.eigvec, rtol=1e-4, atol=1e-5)


_DENSE = {}


def _dense_mlp_hessian(tiny_mlp) -> np.ndarray:
  if "mlp" not in _DENSE:  # the fixture is deterministic: compute once per session
    flat, unravel = ravel_pytree(tiny_mlp.params)
    dense = jax.jit(jax.hessian(lambda f: tiny_mlp.loss(unravel(f))))(flat)
    _DENSE["mlp"] = np.asarray(dense, np.float64)
  return _DENSE["mlp"]


@pytest.mark.parametrize(
  ("make", "tracker"), [(xsam_jax.xsam, "power"), (xsam_jax.eigen_sam, "lanczos")]
)
def test_finite_difference_trackers_find_the_exact_top_eigenvector(
  make, tracker, tiny_mlp, quadratic
):
  """Warm-started refreshes at fixed params, on the cond path, reach the dense top eigenpair.

  X-SAM (power) on the quadratic and the tiny MLP, Eigen-SAM (Lanczos) on the tiny MLP.
  """
  problems = [(tiny_mlp.loss, tiny_mlp.params, _dense_mlp_hessian(tiny_mlp), 40)]
  if tracker == "power":
    problems.append((quadratic.loss, quadratic.params, quadratic.hess, 4))
  for loss, params, dense, steps in problems:
    w, vecs = np.linalg.eigh(dense)
    i = int(np.argmax(np.abs(w))) if tracker == "power" else int(np.argmax(w))
    tx = make(rho=0.05, refresh_every=1, num_iters=5, solver=tracker, hvp_method=FD)
    grads = jax.grad(loss)(params)
    update = jax.jit(lambda s, p=params, g=grads, f=loss: tx.update(g, s, p, grad_fn=jax.grad(f)))
    state = tx.init(params)
    for _ in range(steps if tracker == "power" else steps // 8 + 1):
      _, state = update(state)
    assert abs(_flat(state.eigvec) @ vecs[:, i]) > 0.999
    np.testing.assert_allclose(state.eigval, w[i], rtol=2e-3)


def test_static_and_cond_paths_agree_and_state_dtypes_are_stable_with_finite_differences():
  """bfloat16 and float64 params: same state types, the same numbers on both refresh paths.

  In float64 the finite-difference step must also match the exact-HVP step to the documented
  O(sqrt(u)) = 1.5e-8 (eigenvalue, eigenvector and update), and its eigenvalue the float64
  Rayleigh quotient of the dense Hessian at the same iterate.
  """
  loss = lambda p: jnp.sum(jnp.array([3.0, 1.0, 0.5], p.dtype) * jnp.tanh(p - 0.3) ** 2)
  sig = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
  for dtype in ("bfloat16", "float64"):
    with jax.enable_x64(True):
      params = jnp.array([0.5, -1.0, 2.0], dtype)
      out = {}
      for method in (FD, "exact"):
        tx = xsam_jax.xsam(rho=0.05, num_iters=3, hvp_method=method)
        state = tx.init(params)
        for refresh in (None, True):
          out[method, refresh] = jax.jit(
            lambda s, refresh=refresh, tx=tx: tx.update(
              jax.grad(loss)(params), s, params, grad_fn=jax.grad(loss), refresh=refresh
            )
          )(state)
          assert sig(out[method, refresh][1]) == sig(state), dtype
          chex.assert_tree_all_finite(out[method, refresh])
      tol = {"bfloat16": (1e-5, 1e-6), "float64": (1e-8, 1e-9)}[dtype]  # FD rounding ~ u/h
      chex.assert_trees_all_close(out[FD, None], out[FD, True], rtol=tol[0], atol=tol[1])
      if dtype == "float64":
        (fd_up, fd), (ex_up, ex) = out[FD, None], out["exact", None]
        assert fd.eigval.dtype == jnp.float64 and fd.eigvec.dtype == jnp.float64
        np.testing.assert_allclose(fd.eigval, ex.eigval, rtol=1e-7)
        np.testing.assert_allclose(fd.eigvec, ex.eigvec, rtol=1e-7, atol=1e-8)
        np.testing.assert_allclose(fd_up, ex_up, rtol=1e-7, atol=1e-8)
        # The eigenvalue is the Rayleigh quotient <v, H v> of the last multiplied iterate v.
        hess = np.asarray(jax.hessian(loss)(params), np.float64)
        v = np.asarray(xsam_jax.xsam().init(params).eigvec, np.float64)
        for _ in range(2):
          v = hess @ v / np.linalg.norm(hess @ v)
        np.testing.assert_allclose(fd.eigval, v @ hess @ v, rtol=1e-7)
        np.testing.assert_allclose(fd.eigvec, hess @ v / np.linalg.norm(hess @ v), atol=1e-8)


def test_unknown_hvp_method_raises_value_error_naming_the_argument_and_choices(quadratic):
  grad_fn = jax.grad(quadratic.loss)
  p = quadratic.params
  calls = [
    lambda: xsam_jax.xsam(hvp_method="central"),
    lambda: xsam_jax.eigen_sam(hvp_method="central"),
    lambda: xsam_jax.refresh_eigenvector(xsam_jax.xsam().init(p), p, grad_fn, hvp_method="fd"),
    lambda: hessian.hvp(grad_fn, p, p, hvp_method="fd"),
    lambda: hessian.make_hvp_fn(grad_fn, p, hvp_method="fd"),
    lambda: hessian.top_eigenvalue(grad_fn, p, jax.random.key(0), hvp_method="fd"),
  ]
  for call in calls:
    with pytest.raises(ValueError, match=r"`hvp_method` must be one of.*'exact'.*'forward_differ"):
      call()


@pytest.mark.parametrize("problem", ["mlp", "cnn"])
def test_half_precision_compute_makes_forward_differences_useless_even_with_float32_params(
  problem, tiny_mlp
):
  """The figures the docs quote: relative error along the top eigenvector (float64 reference).

  float16 / bfloat16 params: O(0.1) (measured 0.062 / 0.18 on the MLP, 0.10 / 0.27 on the
  CNN). float32 params with bfloat16 compute: O(1) (0.66 MLP, 0.96 CNN), because h is taken for
  float32 while the gradients carry bfloat16 rounding; exact HVPs in the same bfloat16 compute
  stay at 0.0018 / 0.025 (``-s`` prints these figures).
  """
  with jax.enable_x64(True):
    params32, loss = _problem(problem, tiny_mlp)
    params64 = _cast(params32, jnp.float64)
    grad_fn = jax.grad(loss)
    mixed_fn = jax.grad(lambda p: loss(_cast(p, jnp.bfloat16)).astype(jnp.float32))
    flat64, unravel = ravel_pytree(params64)
    rand = unravel(jnp.asarray(np.random.default_rng(0).normal(size=flat64.size)))

    @jax.jit
    def run(rand_v):
      _, top = hessian.power_iteration(lambda v: hessian.hvp(grad_fn, params64, v), rand_v, 300)
      fd = lambda f, d: hessian.hvp(f, _cast(params64, d), _cast(top, d), hvp_method=FD)
      p32, v32 = _cast(params64, jnp.float32), _cast(top, jnp.float32)
      return (
        hessian.hvp(grad_fn, params64, top),
        fd(grad_fn, jnp.float16),
        fd(grad_fn, jnp.bfloat16),
        fd(mixed_fn, jnp.float32),
        hessian.hvp(mixed_fn, p32, v32),
      )

    exact, f16, bf16, mixed, mixed_exact = (_flat(t) for t in run(rand))
    err = lambda x: np.linalg.norm(x - exact) / np.linalg.norm(exact)
    print(
      f"{problem}: float16 {err(f16):.2g}, bfloat16 {err(bf16):.2g}, float32 params + bfloat16 "
      f"compute {err(mixed):.2g} (exact HVP there {err(mixed_exact):.2g})"
    )
    assert 0.02 < err(f16) < 0.5 and 0.05 < err(bf16) < 0.5
    assert err(mixed) > 0.5 and err(mixed_exact) < 0.05


@pytest.mark.parametrize("make", [xsam_jax.xsam, xsam_jax.eigen_sam])
def test_check_base_grad_measures_a_mismatched_base_gradient_without_changing_the_step(
  make, quadratic
):
  params = quadratic.params
  grad_fn = jax.grad(quadratic.loss)
  grads = grad_fn(params)
  checked = make(rho=0.05, refresh_every=2, num_iters=3, hvp_method=FD, check_base_grad=True)
  plain = make(rho=0.05, refresh_every=2, num_iters=3, hvp_method=FD)

  def run(tx, scale):
    step = jax.jit(
      lambda s: tx.update(jax.tree.map(lambda g: scale * g, grads), s, params, grad_fn=grad_fn)
    )
    _, s0 = step(tx.init(params))  # a refresh step (count 0)
    return s0, step(s0)[1]  # then a plain step (count 1)

  ok, _ = run(checked, 1.0)
  assert float(ok.base_grad_mismatch) < 1e-6
  for scale in (1.0 + 1e-3, 1.1):  # e.g. updates accumulated or reduced elsewhere
    bad, after = run(checked, scale)
    np.testing.assert_allclose(bad.base_grad_mismatch, scale - 1.0, rtol=1e-2)
    assert after.base_grad_mismatch == bad.base_grad_mismatch  # measured at refreshes only
    ref, _ = run(plain, scale)  # the check changes nothing else
    assert float(ref.base_grad_mismatch) == 0.0
    chex.assert_trees_all_equal(bad._replace(base_grad_mismatch=0.0), ref)
  with pytest.raises(ValueError, match=r"check_base_grad.*forward_difference"):
    make(check_base_grad=True)
