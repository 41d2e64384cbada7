"""The cached top-eigenvector shared by :func:`~xsam_jax.eigen_sam` and :func:`~xsam_jax.xsam`:
initialisation, the in-step refresh (``lax.cond`` or static), and the public
:func:`refresh_eigenvector` for refreshing outside the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from xsam_jax import hessian
from xsam_jax._perturbation import DEFAULT_EPS, check_positive_int, normalize, tree_to_f32

Array = jax.Array
PyTree = Any


def init_eigvec(params: PyTree, seed: int) -> PyTree:
  """A random unit vector shaped like ``params`` (float32 or wider), from ``seed``."""
  like = tree_to_f32(params)
  v = optax.tree.random_like(jax.random.key(seed), like)
  return normalize(v)[0]


TRACKERS = ("power", "lanczos")


def check_tracker(tracker: str) -> None:
  """Raises ``ValueError`` naming the valid trackers."""
  if tracker not in TRACKERS:
    raise ValueError(
      f"`tracker` must be one of {TRACKERS}, got {tracker!r}. 'power' is the papers' power "
      "iteration; 'lanczos' reaches the same accuracy with fewer HVPs."
    )


def _power_refresh(
  eigvec: PyTree,
  params: PyTree,
  grad_fn: Callable[[PyTree], PyTree],
  power_iters: int,
  eps: float,
  axis_name: str | None,
  unroll: bool,
  tracker: str = "power",
) -> tuple[Array, PyTree]:
  """``power_iters`` HVPs at ``params`` warm-started from ``eigvec``.

  ``tracker="power"``: power iteration (the papers' refresh). ``tracker="lanczos"``: a
  ``power_iters``-step Lanczos run from ``eigvec`` with full reorthogonalisation, returning the
  top Ritz pair: the same number of HVPs, but the Krylov space holds every power iterate, so the
  estimate is at least as good (and stores ``power_iters`` basis vectors meanwhile).
  """

  def hvp_fn(v):
    return hessian.hvp(grad_fn, params, v, axis_name=axis_name)

  if tracker == "lanczos" and power_iters > 1:
    eigvals, eigvecs = hessian.top_k_eigenpairs(
      hvp_fn, eigvec, 1, num_iters=power_iters, eps=eps, unroll=unroll
    )
    eigval, new_eigvec = eigvals[0], jax.tree.map(lambda x: x[0], eigvecs)
  else:
    eigval, new_eigvec = hessian.power_iteration(
      hvp_fn, eigvec, power_iters, eps=eps, unroll=unroll
    )
  # Keep the stored dtypes (float32, or float64 under x64) stable across steps.
  new_eigvec = jax.tree.map(lambda n, o: n.astype(o.dtype), new_eigvec, eigvec)
  return eigval, new_eigvec


def maybe_refresh(
  eigval: Array,
  eigvec: PyTree,
  count: Array,
  *,
  params: PyTree,
  grad_fn: Callable[[PyTree], PyTree],
  refresh_every: int,
  power_iters: int,
  eps: float,
  axis_name: str | None,
  refresh: bool | None,
  tracker: str = "power",
) -> tuple[Array, PyTree]:
  """Refreshes ``(eigval, eigvec)`` when due.

  ``refresh=None``: traced decision ``count % refresh_every == 0`` under ``lax.cond`` around a
  ``lax.fori_loop`` (one compiled program for every step). ``refresh=True/False``: a host-side
  decision; the refresh is then straight-line HVPs with no control flow around them.
  """
  if refresh is None:
    return jax.lax.cond(
      count % refresh_every == 0,
      lambda: _power_refresh(eigvec, params, grad_fn, power_iters, eps, axis_name, False, tracker),
      lambda: (eigval, eigvec),
    )
  if not isinstance(refresh, bool):
    raise ValueError(
      f"`refresh` must be None (decide inside the step) or a Python bool decided on the host, "
      f"got {refresh!r}. For a traced decision leave it as None."
    )
  if refresh:
    return _power_refresh(eigvec, params, grad_fn, power_iters, eps, axis_name, True, tracker)
  return eigval, eigvec


def is_due(count: int, refresh_every: int) -> bool:
  """Host-side twin of the in-step test: whether step ``count`` refreshes the eigenvector.

  Use it to pick ``refresh=`` for the static path: ``refresh=is_due(step, refresh_every)``.
  """
  return int(count) % refresh_every == 0


def _has_eigvec(node: Any) -> bool:
  return isinstance(node, tuple) and "eigvec" in getattr(node, "_fields", ())


def refresh_eigenvector(
  opt_state: PyTree,
  params: PyTree,
  grad_fn: Callable[[PyTree], PyTree],
  *,
  power_iters: int = 5,
  eps: float = DEFAULT_EPS,
  axis_name: str | None = None,
  unroll: bool = True,
  tracker: str = "power",
) -> PyTree:
  r"""Refreshes every cached eigenvector in an optimizer state, outside the training step.

  Runs ``power_iters`` warm-started power-iteration steps,
  :math:`v \leftarrow Hv/(\|Hv\|+\epsilon)`, with :math:`H` the Hessian of the loss whose
  gradient is ``grad_fn``, at ``params``; stores the new ``eigvec`` and its Rayleigh quotient
  ``eigval``. Every :class:`~xsam_jax.EigenSAMState` and :class:`~xsam_jax.XSAMState` found in
  ``opt_state`` (inside ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``...) is updated;
  everything else is returned unchanged. Use it to refresh on another batch (e.g. a fixed
  held-out batch) or on your own schedule, then call ``update(..., refresh=False)``.

  Args:
    opt_state: an optimizer state containing one or more eigenvector-tracking states.
    params: the point at which the Hessian is taken.
    grad_fn: ``params -> grads`` of the loss whose Hessian is wanted.
    power_iters: number of Hessian-vector products, a Python int >= 1.
    eps: added to every norm before division.
    axis_name: inside ``shard_map``/``pmap``, ``pmean`` every HVP over this axis.
    unroll: straight-line HVPs (True) or a ``lax.fori_loop`` (False).
    tracker: ``"power"`` (power iteration) or ``"lanczos"`` (top Ritz pair of a warm-started
      Lanczos run with the same number of HVPs).

  Returns:
    ``opt_state`` with refreshed ``eigvec`` and ``eigval`` fields.

  Raises:
    ValueError: if ``opt_state`` holds no eigenvector, or ``power_iters`` < 1.

  References:
    Duan, Chen & Guan, "X-SAM: Boosting Sharpness-Aware Minimization with Dominant-Eigenvector
    Gradient Correction", arXiv:2601.10251, 2026.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss = lambda w: 0.5 * (jnp.array([4.0, 1.0]) * w ** 2).sum()
    >>> tx = optax.chain(xsam_jax.xsam(rho=0.05), optax.sgd(0.1))
    >>> state = tx.init(jnp.ones(2))
    >>> state = xsam_jax.refresh_eigenvector(state, jnp.ones(2), jax.grad(loss), power_iters=30)
    >>> round(float(optax.tree.get(state, "eigval")), 3)
    4.0
  """
  check_positive_int("power_iters", power_iters)
  check_tracker(tracker)
  found = []

  def refresh_node(node):
    if not _has_eigvec(node):
      return node
    found.append(True)
    eigval, eigvec = _power_refresh(
      node.eigvec, params, grad_fn, power_iters, eps, axis_name, unroll, tracker
    )
    return node._replace(eigvec=eigvec, eigval=eigval.astype(node.eigval.dtype))

  new_state = jax.tree.map(refresh_node, opt_state, is_leaf=_has_eigvec)
  if not found:
    raise ValueError(
      "refresh_eigenvector: `opt_state` holds no eigenvector. Pass the state of a transform "
      "built with xsam_jax.xsam or xsam_jax.eigen_sam (alone or inside optax.chain)."
    )
  return new_state
