"""X-SAM and Eigen-SAM chained before ``optax.adamw``: NumPy re-derivations and scale invariance.

The chain ``optax.chain(method, optax.adamw(lr, b1, b2, eps, weight_decay=wd))`` hands the
method's output ``u_t`` to Adam:

  mu_t = b1 mu + (1 - b1) u_t,   nu_t = b2 nu + (1 - b2) u_t^2,
  w_{t+1} = w_t - lr (mu_t / (1 - b1^t) / (sqrt(nu_t / (1 - b2^t)) + eps) + wd w_t).

Scale invariance (derived, and asserted below): replacing the loss ``L`` by ``c L`` (c > 0)
scales every gradient and HVP by ``c``. SAM's ascent point ``w + rho g/||g||`` is unchanged, so
SAM hands Adam ``c g_adv``; Adam maps ``c u`` with ``eps`` to the same update as ``u`` with
``eps / c``. Hence SAM+Adam (and Eigen-SAM+Adam, whose ascent point depends only on ``g/||g||``
and ``v``, and X-SAM with ``normalize=False``, which is linear in ``g_adv``) on ``c L`` is
*exactly* SAM+Adam on ``L`` with ``eps / c``: invariant only while ``eps / c`` stays negligible
against the gradient's coordinates. X-SAM with ``normalize=True`` hands Adam
``g_adv/||g_adv|| - alpha <.,v> v``, which does not depend on ``c`` at all (the eigenvector of
``c H`` is that of ``H``), so its trajectory is the same for every ``c``, even where Adam's
``eps`` dominates SAM+Adam.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import xsam_jax

LR, B1, B2, EPS, WD = 0.05, 0.9, 0.98, 1e-8, 0.1
RHO, ALPHA = 0.2, 0.5


# --------------------------------------------------------------------------------------------
# NumPy references (float64).


def _np_xsam_direction(quadratic, x, v, rho, alpha, normalize=True, eps=1e-12):
  g = quadratic.grad_np(x)
  g_adv = quadratic.grad_np(x + rho * g / (np.linalg.norm(g) + eps))
  u = g_adv / (np.linalg.norm(g_adv) + eps) if normalize else g_adv
  return u - alpha * (u @ v) * v


def _np_eigen_sam_direction(quadratic, x, v, rho, alpha, eps=1e-12):
  g = quadratic.grad_np(x)
  g_hat = g / (np.linalg.norm(g) + eps)
  c = g_hat @ v
  e = rho * (g_hat + alpha * np.sign(c) * (v - c * g_hat))
  return quadratic.grad_np(x + e)


def _np_adamw_trajectory(direction, x0, steps, lr=LR, b1=B1, b2=B2, eps=EPS, wd=WD):
  """Iterates of NumPy AdamW fed ``direction(x)``; returns ``(xs, mu, nu)``."""
  x, mu, nu = x0.copy(), np.zeros_like(x0), np.zeros_like(x0)
  xs = []
  for t in range(1, steps + 1):
    u = direction(x)
    mu = b1 * mu + (1 - b1) * u
    nu = b2 * nu + (1 - b2) * u * u
    adam = (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
    x = x - lr * (adam + wd * x)
    xs.append(x)
  return np.stack(xs), mu, nu


# --------------------------------------------------------------------------------------------
# JAX side.


def _chain(method, **adamw_kwargs):
  kwargs = {"b1": B1, "b2": B2, "eps": EPS, "weight_decay": WD, **adamw_kwargs}
  return optax.chain(method, optax.adamw(LR, **kwargs))


def _run(tx, loss, params, steps, *, eigvec=None, refresh=False):
  """``steps`` chain updates on ``loss``; returns ``(list of params, final state)``.

  ``eigvec`` (a params-shaped pytree) replaces the method's cached eigenvector (if it has one),
  and
  ``refresh`` (a host-side bool, or None for methods without one) is passed to every update.
  """
  state = tx.init(params)
  if eigvec is not None and hasattr(state[0], "eigvec"):
    state = (state[0]._replace(eigvec=eigvec), *state[1:])

  def step(params, state, refresh):  # eager: cheaper than compiling for a 5-dim problem
    extra = {} if refresh is None else {"refresh": refresh}
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss), **extra)
    return optax.apply_updates(params, updates), state

  out = []
  for _ in range(steps):
    params, state = step(params, state, refresh)
    out.append(params)
  return out, state


def _flat_trajectory(quadratic, trajectory):
  return np.stack([quadratic.flat(p) for p in trajectory])


# --------------------------------------------------------------------------------------------
# NumPy re-derivations.


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("steps", [1, 6])
def test_xsam_adamw_matches_numpy(quadratic, normalize, steps):
  _, v = quadratic.top_eigvec()
  tx = _chain(xsam_jax.xsam(rho=RHO, alpha=ALPHA, normalize=normalize))
  traj, state = _run(tx, quadratic.loss, quadratic.params, steps, eigvec=quadratic.unflat(v))
  expected, mu, nu = _np_adamw_trajectory(
    lambda x: _np_xsam_direction(quadratic, x, v, RHO, ALPHA, normalize),
    quadratic.flat(quadratic.params),
    steps,
  )
  np.testing.assert_allclose(_flat_trajectory(quadratic, traj), expected, rtol=2e-5, atol=2e-6)
  adam_state = state[1][0]
  np.testing.assert_allclose(quadratic.flat(adam_state.mu), mu, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(quadratic.flat(adam_state.nu), nu, rtol=1e-4, atol=1e-8)
  assert int(state[0].count) == steps


@pytest.mark.parametrize("steps", [1, 6])
def test_eigen_sam_adamw_matches_numpy(quadratic, steps):
  _, v = quadratic.top_eigvec()
  tx = _chain(xsam_jax.eigen_sam(rho=RHO, alpha=ALPHA))
  traj, _ = _run(tx, quadratic.loss, quadratic.params, steps, eigvec=quadratic.unflat(v))
  expected, _, _ = _np_adamw_trajectory(
    lambda x: _np_eigen_sam_direction(quadratic, x, v, RHO, ALPHA),
    quadratic.flat(quadratic.params),
    steps,
  )
  np.testing.assert_allclose(_flat_trajectory(quadratic, traj), expected, rtol=2e-5, atol=2e-6)


def test_xsam_adamw_with_in_step_refresh_matches_numpy_with_exact_eigvec(quadratic):
  # Power iteration inside the chain converges to +-v (gap 6 : 2.5); the default projection
  # correction does not depend on the sign, so NumPy with the exact eigenvector must agree.
  lam, v = quadratic.top_eigvec()
  tx = _chain(xsam_jax.xsam(rho=RHO, alpha=ALPHA, refresh_every=1, num_iters=40))
  traj, state = _run(tx, quadratic.loss, quadratic.params, 4, refresh=True)
  expected, _, _ = _np_adamw_trajectory(
    lambda x: _np_xsam_direction(quadratic, x, v, RHO, ALPHA),
    quadratic.flat(quadratic.params),
    4,
  )
  np.testing.assert_allclose(_flat_trajectory(quadratic, traj), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(state[0].eigval), lam, rtol=1e-4)


def test_first_adam_step_ignores_normalization_later_steps_do_not(quadratic):
  # Adam's first (bias-corrected) step is lr * u / (|u| + eps) per coordinate: the scale of u,
  # hence X-SAM's normalisation, drops out. Later steps weight each u_t by 1/||g_adv,t|| (the
  # scale changes along the trajectory), so the two variants part.
  _, v = quadratic.top_eigvec()
  eigvec = quadratic.unflat(v)
  runs = {
    n: _flat_trajectory(
      quadratic,
      _run(
        _chain(xsam_jax.xsam(rho=RHO, alpha=ALPHA, normalize=n)),
        quadratic.loss,
        quadratic.params,
        8,
        eigvec=eigvec,
      )[0],
    )
    for n in (True, False)
  }
  np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-6, atol=1e-7)
  x0 = quadratic.flat(quadratic.params)
  later = np.linalg.norm(runs[True][-1] - runs[False][-1]) / np.linalg.norm(runs[False][-1] - x0)
  assert later > 1e-3
  # The raw perturbed-gradient norm did change along the trajectory (the cause of the split).
  norms = [np.linalg.norm(_np_adv_grad(quadratic, x)) for x in np.concatenate([[x0], runs[False]])]
  assert max(norms) / min(norms) > 1.1


def _np_adv_grad(quadratic, x, rho=RHO):
  g = quadratic.grad_np(x)
  return quadratic.grad_np(x + rho * g / np.linalg.norm(g))


# --------------------------------------------------------------------------------------------
# Scale invariance of the loss, L -> c L.


def _scaled(quadratic, c):
  return lambda p: c * quadratic.loss(p)


@pytest.mark.parametrize("c", [1e-7, 1e-3, 1e3])
def test_normalized_xsam_adamw_is_invariant_to_loss_scale(quadratic, c):
  # Includes in-step refreshes: power iteration on cH returns the eigenvector of H.
  def run(scale):
    tx = _chain(xsam_jax.xsam(rho=RHO, alpha=ALPHA, refresh_every=1, num_iters=5))
    traj, state = _run(tx, _scaled(quadratic, scale), quadratic.params, 6, refresh=True)
    return _flat_trajectory(quadratic, traj), float(state[0].eigval)

  base, lam = run(1.0)
  scaled, lam_c = run(c)
  np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(lam_c, c * lam, rtol=1e-4)


@pytest.mark.parametrize(
  "method",
  [
    lambda: xsam_jax.sam(rho=RHO),
    lambda: xsam_jax.eigen_sam(rho=RHO, alpha=ALPHA),
    lambda: xsam_jax.xsam(rho=RHO, alpha=ALPHA, normalize=False),
  ],
  ids=["sam", "eigen_sam", "xsam_unnormalized"],
)
def test_unnormalized_methods_with_adamw_see_loss_scale_only_through_eps(quadratic, method):
  _, v = quadratic.top_eigvec()
  eigvec = quadratic.unflat(v)
  steps = 6

  def run(scale, eps):
    traj, _ = _run(
      _chain(method(), eps=eps), _scaled(quadratic, scale), quadratic.params, steps, eigvec=eigvec
    )
    return _flat_trajectory(quadratic, traj)

  base = run(1.0, EPS)
  # Exact identity: loss c L with eps == loss L with eps / c.
  c = 1e-7
  np.testing.assert_allclose(run(c, EPS), run(1.0, EPS / c), rtol=1e-4, atol=1e-5)
  # Invariant while eps / c is negligible against the gradient coordinates (~0.1-1 here) ...
  np.testing.assert_allclose(run(1e3, EPS), base, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(run(1e-3, EPS), base, rtol=1e-4, atol=1e-5)
  # ... but not once c |g_i| is comparable to eps (c = 1e-7: eps / c = 0.1).
  x0 = quadratic.flat(quadratic.params)
  rel = np.linalg.norm(run(c, EPS)[-1] - base[-1]) / np.linalg.norm(base[-1] - x0)
  assert rel > 0.05
