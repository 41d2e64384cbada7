"""Tests for :mod:`xsam_jax.hessian`, each against a dense Hessian or a closed form.

The reference is ``jnp.linalg.eigh`` / ``np.linalg.eigh`` of ``jax.hessian`` of the loss on the
raveled parameters of a tiny 3-4-2 tanh MLP (26 parameters), or a quadratic whose Hessian is
known exactly. JAX runs in float32 (references in float64 NumPy); JAX float64 appears only in a
scoped ``jax.enable_x64`` block.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from xsam_jax import hessian

# --------------------------------------------------------------------------------------------
# Fixtures: a tiny MLP and quadratics with known Hessians.


def _mlp_params(key: jax.Array) -> dict:
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {
    "Dense_0": {"kernel": jax.random.normal(k1, (3, 4)), "bias": 0.1 * jax.random.normal(k2, (4,))},
    "Dense_1": {"kernel": jax.random.normal(k3, (4, 2)), "bias": 0.1 * jax.random.normal(k4, (2,))},
  }


def _mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  logits = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


class MLPCase:
  """Params, gradient, HVP and the dense (float64 NumPy) Hessian of a 26-parameter MLP.

  Unlike the ``tiny_mlp`` fixture of ``conftest.py`` its layers are grouped like Linen modules
  (``Dense_0``/``Dense_1``, for :func:`hessian.layer_masks`), and it is built once per session
  with a jitted dense Hessian, which keeps this file within its time budget.
  """

  def __init__(self, seed: int = 0):
    self.params = _mlp_params(jax.random.key(seed))
    self.x = jax.random.normal(jax.random.key(100), (16, 3))
    self.y = jax.random.randint(jax.random.key(101), (16,), 0, 2)
    self.grad_fn = lambda p: jax.grad(_mlp_loss)(p, self.x, self.y)
    flat, self.unravel = ravel_pytree(self.params)
    self.dim = flat.size
    dense = jax.jit(jax.hessian(lambda f: _mlp_loss(self.unravel(f), self.x, self.y)))(flat)
    dense = np.asarray(dense, np.float64)
    self.H = 0.5 * (dense + dense.T)
    self.eigvals, self.eigvecs = np.linalg.eigh(self.H)  # ascending

  def hvp_fn(self, v):
    return hessian.hvp(self.grad_fn, self.params, v)

  def ravel(self, tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)

  def random_tree(self, seed: int):
    return self.unravel(jax.random.normal(jax.random.key(seed), (self.dim,)))


@functools.cache
def _mlp() -> MLPCase:
  return MLPCase()


def _diag_quadratic(diag: np.ndarray):
  """``hvp_fn`` of ``0.5 * sum_i d_i w_i^2`` over ``{"a": (2, 2), "b": (k,)}`` params."""
  diag = jnp.asarray(diag, jnp.float32)
  like = {"a": jnp.zeros((2, 2)), "b": jnp.zeros((diag.size - 4,))}
  _, unravel = ravel_pytree(like)
  scales = unravel(diag)
  return (lambda v: jax.tree.map(jnp.multiply, scales, v)), like, unravel


def _dense_operator(matrix: np.ndarray):
  """``hvp_fn`` of a dense symmetric matrix acting on ``{"a": (2, 2), "b": (d - 4,)}``."""
  d = matrix.shape[0]
  like = {"a": jnp.zeros((2, 2)), "b": jnp.zeros((d - 4,))}
  _, unravel = ravel_pytree(like)
  m = jnp.asarray(matrix, jnp.float32)
  return (lambda v: unravel(m @ ravel_pytree(v)[0])), like, unravel


def _with_spectrum(eigvals: list[float], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A dense symmetric matrix with the given eigenvalues and a random eigenbasis."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((len(eigvals), len(eigvals))))
  return (q * np.asarray(eigvals)) @ q.T, q


def _run(fn, *args):
  """``fn(*args)`` under one ``jax.jit``: one compile instead of op-by-op dispatch."""
  return jax.jit(fn)(*args)


def _rows(tree) -> np.ndarray:
  """A basis pytree (leading axis m) as an ``(m, dim)`` NumPy matrix."""
  m = jax.tree.leaves(tree)[0].shape[0]
  return np.stack(
    [np.asarray(ravel_pytree(jax.tree.map(lambda b: b[i], tree))[0]) for i in range(m)]
  )


def _abs_cos(a: np.ndarray, b: np.ndarray) -> float:
  return float(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------------------------
# hvp and power iteration.


def test_hvp_matches_dense_hessian_vector_product_on_tiny_mlp():
  mlp = _mlp()
  v = mlp.random_tree(1)
  hv = mlp.ravel(_run(mlp.hvp_fn, v))
  np.testing.assert_allclose(hv, mlp.H @ mlp.ravel(v), rtol=1e-4, atol=1e-5)


def test_power_iteration_finds_top_eigenpair_of_diagonal_quadratic():
  diag = np.array([5.0, 2.0, 1.0, -0.5, 0.3, 0.1, 0.0])
  hvp_fn, like, _ = _diag_quadratic(diag)
  v0 = optax.tree.random_like(jax.random.key(0), like)
  eigval, eigvec = _run(lambda v: hessian.power_iteration(hvp_fn, v, 60), v0)
  np.testing.assert_allclose(eigval, 5.0, rtol=1e-5)
  vec = np.asarray(ravel_pytree(eigvec)[0])
  np.testing.assert_allclose(np.linalg.norm(vec), 1.0, rtol=1e-5)
  assert abs(vec[0]) > 1.0 - 1e-5


def test_power_iteration_matches_largest_magnitude_eigenpair_on_tiny_mlp():
  mlp = _mlp()
  eigval, eigvec = _run(lambda v: hessian.power_iteration(mlp.hvp_fn, v, 200), mlp.random_tree(2))
  i = np.argmax(np.abs(mlp.eigvals))
  np.testing.assert_allclose(eigval, mlp.eigvals[i], rtol=1e-4)
  assert _abs_cos(mlp.ravel(eigvec), mlp.eigvecs[:, i]) > 0.9999


def test_power_iteration_unrolled_equals_fori_loop():
  hvp_fn, like, _ = _dense_operator(_with_spectrum([3.0, -2.0, 1.0, 0.5, 0.1, 0.0])[0])
  v0 = optax.tree.random_like(jax.random.key(3), like)
  val_loop, vec_loop = _run(lambda v: hessian.power_iteration(hvp_fn, v, 4), v0)
  val_unrolled, vec_unrolled = _run(
    lambda v: hessian.power_iteration(hvp_fn, v, 4, unroll=True), v0
  )
  np.testing.assert_allclose(val_unrolled, val_loop, rtol=1e-5)
  chex.assert_trees_all_close(vec_unrolled, vec_loop, rtol=1e-4, atol=1e-6)


def test_power_iteration_under_x64_keeps_float64_and_matches():
  with jax.enable_x64(True):
    diag = jnp.array([4.0, 1.0, 0.5], jnp.float64)
    params = {"w": jnp.ones(3, jnp.float64)}
    grad_fn = jax.grad(lambda p: 0.5 * jnp.sum(diag * p["w"] ** 2))
    hvp_fn = lambda v: hessian.hvp(grad_fn, params, v)
    (val64, vec64), (val32, _), (alphas, _, basis) = _run(
      lambda v, v32: (
        hessian.power_iteration(hvp_fn, v, 80),
        hessian.power_iteration(hvp_fn, v32, 80),  # a float32 start with float64 params
        hessian.lanczos(hvp_fn, v, 3),
      ),
      params,
      {"w": jnp.ones(3, jnp.float32)},
    )
    assert val64.dtype == vec64["w"].dtype == alphas.dtype == basis["w"].dtype == jnp.float64
    np.testing.assert_allclose([val64, val32], [4.0, 4.0], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Zero Hessian, bfloat16.


def test_zero_hessian_keeps_every_estimate_finite():
  like = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
  zero_hvp = lambda v: jax.tree.map(jnp.zeros_like, v)
  v0 = optax.tree.random_like(jax.random.key(0), like)
  key = jax.random.key(1)
  outputs = _run(
    lambda v, k: {
      "power": hessian.power_iteration(zero_hvp, v, 5),
      "top_k_lanczos": hessian.top_k_eigenpairs(zero_hvp, v, 3),
      "density": hessian.spectral_density(zero_hvp, like, k, num_iters=5, num_points=64),
    },
    v0,
    key,
  )
  for name, out in outputs.items():
    for leaf in jax.tree.leaves(out):
      assert np.all(np.isfinite(np.asarray(leaf))), name
  np.testing.assert_allclose(outputs["power"][0], 0.0)
  np.testing.assert_allclose(outputs["top_k_lanczos"][0], 0.0, atol=1e-7)
  # The Lanczos basis stays orthonormal through the breakdowns, so Ritz vectors are orthonormal.
  ritz_vectors = _rows(outputs["top_k_lanczos"][1])
  np.testing.assert_allclose(ritz_vectors @ ritz_vectors.T, np.eye(3), atol=1e-5)
  grid, density = outputs["density"]
  np.testing.assert_allclose(jnp.trapezoid(density, grid), 1.0, atol=1e-3)


def test_bfloat16_params_give_float32_estimates():
  params = {"w": jnp.ones(4, jnp.bfloat16)}
  diag = jnp.array([3.0, 2.0, 1.0, 0.5], jnp.bfloat16)
  grad_fn = jax.grad(lambda p: 0.5 * jnp.sum(diag * p["w"].astype(jnp.float32) ** 2))
  hvp_fn = lambda v: hessian.hvp(grad_fn, params, v)
  (eigval, eigvec), (alphas, _, _) = _run(
    lambda v: (hessian.power_iteration(hvp_fn, v, 60), hessian.lanczos(hvp_fn, v, 4)), params
  )
  assert eigval.dtype == jnp.float32 and eigvec["w"].dtype == jnp.float32
  assert alphas.dtype == jnp.float32
  np.testing.assert_allclose(eigval, 3.0, rtol=1e-2)


# --------------------------------------------------------------------------------------------
# Lanczos.


def test_lanczos_basis_is_orthonormal_and_tridiagonal_extremes_match_dense_eigh():
  mlp = _mlp()
  m = 20
  alphas, betas, basis = _run(lambda v: hessian.lanczos(mlp.hvp_fn, v, m), mlp.random_tree(4))
  chex.assert_shape((alphas, betas), [(m,), (m - 1,)])
  chex.assert_trees_all_equal_shapes(
    basis, jax.tree.map(lambda x: jnp.zeros((m, *x.shape)), mlp.params)
  )
  q = _rows(basis)
  np.testing.assert_allclose(q @ q.T, np.eye(m), atol=1e-5)
  tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
  np.testing.assert_allclose(q @ mlp.H @ q.T, tridiagonal, atol=2e-5)  # T = Q H Q^T
  ritz = np.linalg.eigvalsh(tridiagonal)
  np.testing.assert_allclose(ritz[-1], mlp.eigvals[-1], rtol=1e-4)
  np.testing.assert_allclose(ritz[0], mlp.eigvals[0], rtol=1e-4)
  # (With as many steps as dimensions they are the whole spectrum: see the SLQ test.)


def test_lanczos_breakdown_on_an_invariant_start_restarts_without_nan():
  diag = np.array([4.0, 3.0, 2.0, 1.0, 0.5, 0.25])
  hvp_fn, _, unravel = _diag_quadratic(diag)
  v0 = unravel(jnp.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))  # spans a 2-dim invariant subspace
  alphas, betas, basis = _run(lambda v: hessian.lanczos(hvp_fn, v, 6), v0)
  assert np.all(np.isfinite(alphas)) and np.all(np.isfinite(betas))
  assert betas[1] == 0.0  # the tridiagonal matrix decouples at the breakdown
  q = _rows(basis)
  np.testing.assert_allclose(q @ q.T, np.eye(6), atol=1e-5)
  ritz = np.linalg.eigvalsh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
  np.testing.assert_allclose(ritz, np.sort(diag), atol=1e-5)


def test_unrolled_lanczos_and_sampling_equal_their_compiled_loops():
  hvp_fn, like, _ = _dense_operator(_with_spectrum([3.0, -2.0, 1.0, 0.5, 0.1, 0.0])[0])
  v0 = optax.tree.random_like(jax.random.key(6), like)

  def analyse(v, key, unroll):
    return (
      hessian.lanczos(hvp_fn, v, 3, unroll=unroll),
      hessian.hutchinson_trace(hvp_fn, like, key, 2, unroll=unroll),  # the loop over probes
    )

  loop = _run(functools.partial(analyse, unroll=False), v0, jax.random.key(7))
  unrolled = _run(functools.partial(analyse, unroll=True), v0, jax.random.key(7))
  chex.assert_trees_all_close(unrolled, loop, rtol=1e-4, atol=1e-5)


def test_host_driven_unrolled_lanczos_reuses_one_compiled_update_for_every_step():
  # Not jitted: the loop runs on the host around a jitted HVP (the fast path on XLA:CPU).
  hvp_fn, like, _ = _dense_operator(_with_spectrum([3.0, -2.0, 1.0, 0.5, 0.1, 0.0])[0])
  hvp_fn = jax.jit(hvp_fn)
  before = hessian._lanczos_update._cache_size()
  for seed in range(2):
    v0 = optax.tree.random_like(jax.random.key(seed), like)
    eigvals, _ = hessian.top_k_eigenpairs(hvp_fn, v0, 2, num_iters=6, unroll=True)
    np.testing.assert_allclose(eigvals, [3.0, 1.0], rtol=1e-5)
  assert hessian._lanczos_update._cache_size() - before <= 1  # not one program per step


def test_lanczos_without_reorthogonalization_still_finds_the_top_eigenvalue():
  mlp = _mlp()
  alphas, betas, _ = _run(
    lambda v: hessian.lanczos(mlp.hvp_fn, v, 15, reorthogonalize=False), mlp.random_tree(7)
  )
  ritz = np.linalg.eigvalsh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
  np.testing.assert_allclose(ritz[-1], mlp.eigvals[-1], rtol=1e-3)


# --------------------------------------------------------------------------------------------
# Top-k eigenpairs.


def test_lanczos_top_k_matches_dense_eigh_on_tiny_mlp():
  mlp = _mlp()
  eigvals, eigvecs = _run(lambda v: hessian.top_k_eigenpairs(mlp.hvp_fn, v, 3), mlp.random_tree(8))
  chex.assert_shape(eigvals, (3,))
  np.testing.assert_allclose(eigvals, mlp.eigvals[::-1][:3], rtol=1e-4, atol=1e-5)
  vecs = _rows(eigvecs)
  for i in range(3):
    np.testing.assert_allclose(np.linalg.norm(vecs[i]), 1.0, rtol=1e-5)
    assert _abs_cos(vecs[i], mlp.eigvecs[:, -1 - i]) > 0.999


def test_power_top_k_matches_dense_largest_magnitude_pairs_on_tiny_mlp():
  mlp = _mlp()
  eigvals, eigvecs = _run(
    lambda v: hessian.top_k_eigenpairs(mlp.hvp_fn, v, 3, solver="power", num_iters=300),
    mlp.random_tree(9),
  )
  by_magnitude = np.argsort(-np.abs(mlp.eigvals))[:3]
  expected = by_magnitude[np.argsort(-mlp.eigvals[by_magnitude])]  # sorted algebraically
  assert mlp.eigvals[expected[-1]] < 0  # a negative eigenvalue is among the three
  np.testing.assert_allclose(eigvals, mlp.eigvals[expected], rtol=1e-3, atol=1e-5)
  vecs = _rows(eigvecs)
  for i, j in enumerate(expected):
    assert _abs_cos(vecs[i], mlp.eigvecs[:, j]) > 0.999


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_k_matches_a_dense_operator_with_gaps(method):
  spectrum = [10.0, 6.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.05]
  matrix, q = _with_spectrum(spectrum)
  hvp_fn, like, _ = _dense_operator(matrix)
  v0 = optax.tree.random_like(jax.random.key(0), like)
  num_iters = {"lanczos": 7, "power": 150}[method]  # Lanczos: fewer steps than dimensions
  eigvals, eigvecs = _run(
    lambda v: hessian.top_k_eigenpairs(hvp_fn, v, 3, solver=method, num_iters=num_iters), v0
  )
  np.testing.assert_allclose(eigvals, spectrum[:3], rtol=1e-4)
  vecs = _rows(eigvecs)
  for i in range(3):
    assert _abs_cos(vecs[i], q[:, i]) > 0.9999


def test_power_finds_largest_magnitude_while_lanczos_finds_largest_algebraic():
  matrix, _ = _with_spectrum([3.0, -5.0, 1.0, 0.2, 0.1])
  hvp_fn, like, _ = _dense_operator(matrix)
  v0 = optax.tree.random_like(jax.random.key(1), like)
  power_vals, lanczos_vals = _run(
    lambda v: (
      hessian.top_k_eigenpairs(hvp_fn, v, 2, solver="power", num_iters=200)[0],
      hessian.top_k_eigenpairs(hvp_fn, v, 2)[0],
    ),
    v0,
  )
  np.testing.assert_allclose(power_vals, [3.0, -5.0], rtol=1e-4)
  np.testing.assert_allclose(lanczos_vals, [3.0, 1.0], rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Trace and spectral density.


def test_hutchinson_trace_matches_dense_trace_within_standard_errors():
  mlp = _mlp()
  n = 2000
  estimate, stderr = _run(
    lambda k: hessian.hutchinson_trace(mlp.hvp_fn, mlp.params, k, n), jax.random.key(11)
  )
  off_diagonal = mlp.H - np.diag(np.diag(mlp.H))
  expected_stderr = np.sqrt(2.0 * np.sum(off_diagonal**2) / n)  # Var(z'Hz) = 2 sum_{i!=j} H_ij^2
  np.testing.assert_allclose(stderr, expected_stderr, rtol=0.15)
  assert abs(float(estimate) - np.trace(mlp.H)) < 4.0 * float(stderr)


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
  diag = np.array([4.0, -3.0, 2.0, 1.0, 0.5, 0.25])
  hvp_fn, like, _ = _diag_quadratic(diag)
  estimate, stderr = _run(lambda k: hessian.hutchinson_trace(hvp_fn, like, k, 3), jax.random.key(0))
  np.testing.assert_allclose(estimate, diag.sum(), rtol=1e-6)
  np.testing.assert_allclose(stderr, 0.0, atol=1e-6)


def test_slq_nodes_are_the_spectrum_and_weights_sum_to_one_with_full_lanczos():
  mlp = _mlp()
  nodes, weights = _run(
    lambda k: hessian.slq_nodes_and_weights(
      mlp.hvp_fn, mlp.params, k, num_iters=100, num_samples=3
    ),
    jax.random.key(12),
  )
  chex.assert_shape((nodes, weights), [(3, mlp.dim)] * 2)  # num_iters is capped at the dimension
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
  assert np.all(weights >= 0)
  for s in range(3):
    np.testing.assert_allclose(np.sort(nodes[s]), mlp.eigvals, atol=5e-5)


def test_spectral_density_integrates_to_one_and_its_mean_matches_trace_over_dimension():
  mlp = _mlp()
  key, n = jax.random.key(13), 64
  (grid, density), (estimate, stderr) = _run(
    lambda k: (
      hessian.spectral_density(
        mlp.hvp_fn, mlp.params, k, num_iters=12, num_samples=n, num_points=1024
      ),
      hessian.hutchinson_trace(mlp.hvp_fn, mlp.params, k, n),
    ),
    key,
  )
  chex.assert_shape((grid, density), [(1024,)] * 2)
  assert np.all(density >= 0)
  np.testing.assert_allclose(jnp.trapezoid(density, grid), 1.0, atol=1e-4)
  mean = float(jnp.trapezoid(grid * density, grid))
  # Same probes as Hutchinson: d * sum_j w_j theta_j = z'Hz sample by sample.
  np.testing.assert_allclose(mlp.dim * mean, estimate, rtol=1e-3, atol=1e-4)
  assert abs(mean - np.trace(mlp.H) / mlp.dim) < 4.0 * float(stderr) / mlp.dim


def test_spectral_density_on_a_given_grid_puts_mass_at_the_eigenvalues():
  diag = np.array([3.0, 3.0, 3.0, 1.0, 1.0, 1.0])
  hvp_fn, like, _ = _diag_quadratic(diag)
  grid = jnp.linspace(0.0, 4.0, 401)
  out_grid, density = jax.device_get(
    _run(
      lambda k: hessian.spectral_density(
        hvp_fn, like, k, num_iters=6, num_samples=2, grid=grid, sigma=0.05
      ),
      jax.random.key(0),
    )
  )
  np.testing.assert_array_equal(out_grid, grid)
  peak = 0.5 / (0.05 * np.sqrt(2.0 * np.pi))  # half the mass at 1 and half at 3
  np.testing.assert_allclose(density[[100, 300]], [peak, peak], rtol=1e-3)
  np.testing.assert_allclose(density[200], 0.0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Parameter subsets.


def test_masked_hvp_equals_the_dense_sub_block():
  mlp = _mlp()
  masks = hessian.layer_masks(mlp.params)
  mask = masks["Dense_1"]
  selected = mlp.ravel(jax.tree.map(lambda m, x: jnp.full_like(x, m), mask, mlp.params)) > 0
  assert selected.sum() == 10
  sub_hvp = hessian.masked_hvp(mlp.hvp_fn, mask)
  v, v0 = mlp.random_tree(14), mlp.random_tree(15)
  sub_hv, (eigvals, eigvecs), (nodes, weights) = _run(
    lambda v, v0, k: (
      sub_hvp(v),
      hessian.top_k_eigenpairs(sub_hvp, hessian.apply_mask(v0, mask), 2, num_iters=10),
      # More steps than the subset's 10 coordinates: the Lanczos breakdown must be harmless.
      hessian.slq_nodes_and_weights(mlp.hvp_fn, mlp.params, k, num_iters=12, mask=mask),
    ),
    v,
    v0,
    jax.random.key(16),
  )
  projector = np.diag(selected.astype(np.float64))
  np.testing.assert_allclose(
    mlp.ravel(sub_hv), projector @ mlp.H @ projector @ mlp.ravel(v), rtol=1e-4, atol=1e-5
  )
  block_eigvals = np.linalg.eigvalsh(mlp.H[np.ix_(selected, selected)])
  np.testing.assert_allclose(eigvals, block_eigvals[::-1][:2], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(_rows(eigvecs)[:, ~selected], 0.0)  # stays in the subset
  # Masked SLQ is the quadrature of the sub-block's spectrum: all weight on its eigenvalues.
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
  distance = np.min(np.abs(np.asarray(nodes)[..., None] - block_eigvals), axis=-1)
  np.testing.assert_allclose(np.sum(weights * (distance < 1e-4), axis=1), 1.0, rtol=1e-5)


def test_masked_hvp_accepts_elementwise_zero_one_masks():
  mlp = _mlp()
  mask = jax.tree.map(
    lambda x: (jnp.arange(x.size).reshape(x.shape) % 2).astype(jnp.float32), mlp.params
  )
  selected = mlp.ravel(mask) > 0
  v = mlp.random_tree(17)
  projector = np.diag(selected.astype(np.float64))
  np.testing.assert_allclose(
    mlp.ravel(_run(hessian.masked_hvp(mlp.hvp_fn, mask), v)),
    projector @ mlp.H @ projector @ mlp.ravel(v),
    rtol=1e-4,
    atol=1e-5,
  )


def test_layer_masks_partition_the_parameters_by_module():
  params = {"params": _mlp().params, "scale": jnp.ones(())}
  masks = hessian.layer_masks(params)
  assert list(masks) == ["params/Dense_0", "params/Dense_1", "scale"]
  counts = jax.tree.map(lambda *ms: sum(bool(m) for m in ms), *masks.values())
  assert jax.tree.leaves(counts) == [1] * len(jax.tree.leaves(params))
  assert masks["params/Dense_0"]["params"]["Dense_0"] == {"bias": True, "kernel": True}
  assert masks["params/Dense_0"]["params"]["Dense_1"] == {"bias": False, "kernel": False}


def test_layer_masks_group_nnx_variables_by_module():
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  state = nnx.state(model, nnx.Param)
  masks = hessian.layer_masks(state)
  assert list(masks) == ["layers/0", "layers/1"]
  assert jax.tree.structure(masks["layers/1"]) == jax.tree.structure(state)
  assert masks["layers/1"]["layers"][1]["kernel"].value is True
  assert masks["layers/1"]["layers"][0]["kernel"].value is False


# --------------------------------------------------------------------------------------------
# jit and argument checks.


def test_everything_jits_with_traced_params_and_compiles_once():
  mlp = _mlp()
  x, y = mlp.x, mlp.y

  @jax.jit
  @chex.assert_max_traces(n=1)
  def analyse(params, key):
    grad_fn = lambda p: jax.grad(_mlp_loss)(p, x, y)
    hvp_fn = lambda v: hessian.hvp(grad_fn, params, v)
    return {
      "lanczos": hessian.top_eigenvalue(grad_fn, params, key, num_iters=20),
      "power": hessian.top_eigenvalue(grad_fn, params, key, num_iters=200, solver="power"),
      "trace": hessian.hutchinson_trace(hvp_fn, params, key, 2)[0],
    }

  first = analyse(mlp.params, jax.random.key(19))
  second = analyse(_mlp_params(jax.random.key(20)), jax.random.key(22))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(second))
  assert not np.allclose(first["lanczos"], second["lanczos"])  # the params were traced
  # top_eigenvalue: the largest algebraic eigenvalue (Lanczos) or the largest |lambda| (power).
  np.testing.assert_allclose(first["lanczos"], mlp.eigvals[-1], rtol=1e-4)
  largest_magnitude = mlp.eigvals[np.argmax(np.abs(mlp.eigvals))]
  np.testing.assert_allclose(first["power"], largest_magnitude, rtol=1e-4)


def test_jit_with_static_argnames_compiles_once_per_structure():
  hvp_fn, like, _ = _diag_quadratic(np.array([4.0, 3.0, 2.0, 1.0, 0.5]))

  @functools.partial(jax.jit, static_argnames=("k", "num_iters", "method"))
  @chex.assert_max_traces(n=1)
  def top_k(v0, *, k, num_iters, method):
    return hessian.top_k_eigenpairs(hvp_fn, v0, k, num_iters=num_iters, solver=method)

  for seed in range(3):
    v0 = optax.tree.random_like(jax.random.key(seed), like)
    eigvals, _ = top_k(v0, k=2, num_iters=5, method="lanczos")
    np.testing.assert_allclose(eigvals, [4.0, 3.0], rtol=1e-5)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"k": 0}, "`k`"),
    ({"k": 27}, "`k`"),
    ({"k": 2.0}, "`k`"),
    ({"k": 2, "solver": "arnoldi"}, r"`solver` must be one of \('lanczos', 'power'\)"),
    ({"k": 3, "num_iters": 2}, "`num_iters`"),
    ({"k": 1, "solver": "power", "num_iters": 0}, "`num_iters`"),
  ],
)
def test_top_k_rejects_invalid_arguments(kwargs, match):
  mlp = _mlp()
  with pytest.raises(ValueError, match=match):
    hessian.top_k_eigenpairs(mlp.hvp_fn, mlp.params, **kwargs)


def test_other_routines_reject_invalid_arguments():
  mlp = _mlp()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="`num_iters`"):
    hessian.lanczos(mlp.hvp_fn, mlp.params, mlp.dim + 1)  # more steps than dimensions
  with pytest.raises(ValueError, match="`num_iters`"):
    hessian.power_iteration(mlp.hvp_fn, mlp.params, 0)
  with pytest.raises(ValueError, match="`num_samples`"):
    hessian.hutchinson_trace(mlp.hvp_fn, mlp.params, key, 0)
  with pytest.raises(ValueError, match="`num_samples`"):
    hessian.slq_nodes_and_weights(mlp.hvp_fn, mlp.params, key, num_samples=0)
  with pytest.raises(ValueError, match="`solver`"):
    hessian.top_eigenvalue(mlp.grad_fn, mlp.params, key, solver="eigh")
  with pytest.raises(ValueError, match="`sigma` must be > 0"):
    hessian.spectral_density(mlp.hvp_fn, mlp.params, key, sigma=0.0)
  with pytest.raises(ValueError, match="`num_points`"):
    hessian.spectral_density(mlp.hvp_fn, mlp.params, key, num_points=1)


@pytest.mark.parametrize("empty", [{}, {"w": jnp.zeros((0,))}, [jnp.zeros((2, 0))]])
def test_every_routine_rejects_a_tree_with_no_entries_by_the_argument_name(empty):
  key, hvp_fn, grad_fn = jax.random.key(0), lambda v: v, lambda p: p
  calls = {
    "v0": [
      lambda: hessian.power_iteration(hvp_fn, empty, 3),
      lambda: hessian.lanczos(hvp_fn, empty, 1),
      lambda: hessian.top_k_eigenpairs(hvp_fn, empty, 1),
    ],
    "params": [lambda: hessian.top_eigenvalue(grad_fn, empty, key)],
    "like": [
      lambda: hessian.hutchinson_trace(hvp_fn, empty, key),
      lambda: hessian.slq_nodes_and_weights(hvp_fn, empty, key),
      lambda: hessian.spectral_density(hvp_fn, empty, key),
    ],
  }
  for name, fns in calls.items():
    for call in fns:
      with pytest.raises(ValueError, match=rf"`{name}` holds no entries.*at least one non-empty"):
        call()


def test_a_zero_size_leaf_next_to_non_empty_ones_changes_no_estimate():
  diag = jnp.array([4.0, 2.0, 1.0])
  loss = lambda p: 0.5 * jnp.sum(diag * p["w"] ** 2) + jnp.sum(p["empty"] ** 2)
  with_empty = {"w": jnp.ones(3), "empty": jnp.zeros((0, 2))}
  grad_fn, key = jax.grad(loss), jax.random.key(0)

  def estimates(params):
    hvp_fn = lambda v: hessian.hvp(grad_fn, params, v)
    fd_fn = hessian.make_hvp_fn(grad_fn, params, hvp_method="forward_difference")
    return (
      hessian.power_iteration(hvp_fn, params, 30)[0],
      hessian.power_iteration(fd_fn, params, 30)[0],
      hessian.top_k_eigenpairs(hvp_fn, params, 2)[0],
      hessian.top_eigenvalue(grad_fn, params, key),
      hessian.hutchinson_trace(hvp_fn, params, key, 4)[0],
    )

  got = estimates(with_empty)
  np.testing.assert_allclose(got[0], 4.0, rtol=1e-5)
  np.testing.assert_allclose(got[1], 4.0, rtol=1e-3)
  np.testing.assert_allclose(got[2], [4.0, 2.0], rtol=1e-5)
  np.testing.assert_allclose(got[3], 4.0, rtol=1e-5)
  np.testing.assert_allclose(got[4], 7.0, rtol=1e-5)  # diagonal: exact


def test_method_is_a_deprecated_alias_of_solver_and_both_together_raise():
  matrix, _ = _with_spectrum([4.0, -3.0, 1.0, 0.5])
  hvp_fn, like, _ = _dense_operator(matrix)
  v0 = optax.tree.random_like(jax.random.key(0), like)
  new = hessian.top_k_eigenpairs(hvp_fn, v0, 1, num_iters=40, solver="power")
  with pytest.warns(DeprecationWarning, match="`method=` is deprecated.*`solver=`"):
    old = hessian.top_k_eigenpairs(hvp_fn, v0, 1, num_iters=40, method="power")
  np.testing.assert_array_equal(old[0], new[0])
  with pytest.raises(ValueError, match="`method` is the deprecated name of `solver`"):
    hessian.top_k_eigenpairs(hvp_fn, v0, 1, solver="power", method="lanczos")
  mlp = _mlp()
  key = jax.random.key(0)
  new = hessian.top_eigenvalue(mlp.grad_fn, mlp.params, key, num_iters=5, solver="power")
  with pytest.warns(DeprecationWarning, match="`method=` is deprecated"):
    old = hessian.top_eigenvalue(mlp.grad_fn, mlp.params, key, num_iters=5, method="power")
  np.testing.assert_array_equal(old, new)
  with pytest.raises(ValueError, match="`method` is the deprecated name of `solver`"):
    hessian.top_eigenvalue(mlp.grad_fn, mlp.params, key, solver="power", method="lanczos")
