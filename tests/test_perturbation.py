"""Tests for the shared pieces in xsam_jax._perturbation."""

from __future__ import annotations

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
