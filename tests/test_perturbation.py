"""Tests for the shared pieces in xsam_jax._perturbation."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xsam_jax import _perturbation as pert


def test_reductions_accumulate_in_float32_for_bfloat16_leaves():
  # 4096 ones in bf16: a bf16 accumulator would saturate at 256 for the sum of squares.
  x = {"a": jnp.ones(4096, jnp.bfloat16), "b": jnp.ones(4096, jnp.bfloat16)}
  assert pert.tree_vdot(x, x).dtype == jnp.float32
  np.testing.assert_allclose(pert.tree_vdot(x, x), 8192.0)
  np.testing.assert_allclose(pert.tree_norm(x), np.sqrt(8192.0), rtol=1e-6)


def test_normalize_gives_unit_vector_and_keeps_zero_finite():
  unit, norm = pert.normalize({"a": jnp.array([3.0]), "b": jnp.array([4.0])})
  np.testing.assert_allclose(norm, 5.0)
  np.testing.assert_allclose([unit["a"][0], unit["b"][0]], [0.6, 0.8], rtol=1e-6)
  zero, n0 = pert.normalize({"a": jnp.zeros(2)})
  assert float(n0) == 0.0 and np.all(np.isfinite(zero["a"]))


def test_project_out_removes_alpha_times_parallel_part():
  t = {"a": jnp.array([1.0, 2.0])}
  d = {"a": jnp.array([1.0, 0.0])}
  out, coef = pert.project_out(t, d, 0.5)
  np.testing.assert_allclose(out["a"], [0.5, 2.0])
  assert float(coef) == 1.0


def test_ascent_point_keeps_parameter_dtype():
  w = {"a": jnp.ones(3, jnp.bfloat16)}
  out = pert.ascent_point(w, {"a": jnp.full(3, 0.5, jnp.float32)})
  assert out["a"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["a"].astype(jnp.float32), 1.5)


def test_checks_name_the_argument():
  with pytest.raises(ValueError, match="`rho` must be >= 0"):
    pert.check_range("rho", -1.0, 0.0)
  with pytest.raises(ValueError, match=r"`alpha` must be \[0.0, 2.0\]"):
    pert.check_range("alpha", 2.1, 0.0, 2.0)
  pert.check_range("rho", lambda c: -1.0, 0.0)  # schedules are not evaluated here
  with pytest.raises(ValueError, match="power_iters"):
    pert.check_positive_int("power_iters", True)


def test_resolve_alias_warns_for_the_old_name_and_refuses_both():
  assert pert.resolve_alias("f", "solver", "lanczos", "power", "tracker", None) == "lanczos"
  with pytest.warns(DeprecationWarning, match=r"f: `tracker=` is deprecated.*use `solver=`"):
    assert pert.resolve_alias("f", "solver", "power", "power", "tracker", "lanczos") == "lanczos"
  with pytest.raises(ValueError, match=r"`tracker` is the deprecated name of `solver`"):
    pert.resolve_alias("f", "solver", "random", "power", "tracker", "lanczos")
  # An array never counts as "the default": a key given with seed= is a conflict.
  with pytest.raises(ValueError, match="`seed` is the deprecated name of `key`"):
    pert.resolve_alias("f", "key", jax.random.key(0), 0, "seed", 1)


def test_as_key_takes_seeds_typed_and_raw_keys_and_refuses_floats():
  want = jax.random.key_data(jax.random.key(3))
  for key in (3, np.int64(3), jnp.asarray(3), jax.random.key(3), jax.random.PRNGKey(3)):
    np.testing.assert_array_equal(jax.random.key_data(pert.as_key(key, "f")), want)
  # Traced integer seeds (optax.inject_hyperparams under jit) work.
  traced = jax.jit(lambda s: jax.random.key_data(pert.as_key(s, "f")))(jnp.asarray(3))
  np.testing.assert_array_equal(traced, want)
  for bad in (1.0, jnp.asarray(1.0), True, "0", None):
    with pytest.raises(ValueError, match=r"`key` must be a PRNG key.*static_args=\(\"key\""):
      pert.as_key(bad, "f")


def test_grad_fn_signature_check_refuses_two_argument_functions_only():
  def loss_grad(params, batch):
    return params

  for bad in (lambda params, i: params, loss_grad, jax.jit(loss_grad)):
    with pytest.raises(ValueError, match=r"`grad_fn` must be callable as `grad_fn\(params\)"):
      pert.check_grad_fn_signature("grad_fn", bad, "where")
  good = (
    lambda p: p,
    lambda p, batch=None: p,
    lambda *args: args[0],
    functools.partial(loss_grad, batch=None),
    jax.jit(lambda p: p),
    jax.grad(lambda p: jnp.sum(p**2)),
    min,  # a builtin without a readable signature: accepted
  )
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for fn in good:
      pert.check_grad_fn_signature("grad_fn", fn, "where")
