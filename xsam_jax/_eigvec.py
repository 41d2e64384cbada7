"""The cached top-eigenvector shared by :func:`~xsam_jax.eigen_sam` and :func:`~xsam_jax.xsam`:
initialisation, the in-step refresh (``lax.cond`` or static), and the public
:func:`refresh_eigenvector` for refreshing outside the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_jax import hessian
from xsam_jax._parallel import check_axis
from xsam_jax._perturbation import (
  DEFAULT_EPS,
  as_key,
  check_grad_fn_signature,
  check_nonempty,
  check_positive_int,
  resolve_alias,
  tree_all_finite,
  tree_norm,
  tree_to_f32,
  unit_or_keep,
)

Array = jax.Array
PyTree = Any


def init_eigvec(params: PyTree, key: Any, where: str = "xsam_jax") -> PyTree:
  """A random unit vector shaped like ``params`` (float32 or wider), from ``key``.

  ``key``: a PRNG key or an int seed (see :func:`~xsam_jax._perturbation.as_key`).

  Raises:
    ValueError: if ``params`` holds no entries (``where`` names the caller).
  """
  check_nonempty("params", params, where)
  like = tree_to_f32(params)
  v = optax.tree.random_like(as_key(key, where), like)
  return unit_or_keep(v, v)


def random_eigvec(key: Any, step: Array | int, like: PyTree) -> PyTree:
  """``solver="random"``: a fresh unit vector shaped like ``like`` from ``fold_in(key, step)``.

  Gaussian entries normalised to exactly unit length (uniform on the sphere), in the dtypes of
  ``like``. No Hessian-vector product and no gradient: the same ``key`` and ``step`` give the
  same vector on every device, path (static or ``lax.cond``) and resumed run.
  """
  v = optax.tree.random_like(jax.random.fold_in(as_key(key, "xsam_jax"), step), like)
  return unit_or_keep(v, like)


SOLVERS = ("power", "lanczos", "random")


def check_solver(solver: Any) -> None:
  """Raises ``ValueError`` naming the valid eigenvector sources."""
  if solver not in SOLVERS:
    raise ValueError(
      f"`solver` must be one of {SOLVERS}, got {solver!r}. 'power' is the papers' power "
      "iteration (largest |eigenvalue|); 'lanczos' targets the largest algebraic eigenvalue "
      "and reaches the same accuracy with fewer HVPs; 'random' redraws a random unit vector "
      "at each refresh (no HVPs), the control for whether curvature matters."
    )


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class EigvecSettings:
  """How a transform refreshes its eigenvector: a static (hashable, leafless) state field.

  Stored as the ``settings`` field of :class:`~xsam_jax.EigenSAMState` and
  :class:`~xsam_jax.XSAMState`, so that :func:`refresh_eigenvector` uses the transform's own
  choices. It is part of the state's tree structure (no arrays): it survives ``jit``,
  ``lax.cond``, ``optax.tree`` utilities and checkpoint round trips that restore into the
  structure of ``tx.init(params)``.

  Attributes:
    solver: ``"power"``, ``"lanczos"`` or ``"random"``.
    num_iters: HVPs per refresh.
    hvp_method: ``"exact"`` or ``"forward_difference"``.
    eps: the transform's ``eps`` when it was a Python number, else None (e.g. injected by
      ``optax.inject_hyperparams``; :func:`refresh_eigenvector` then uses its default).
    seed: the transform's ``key`` when it was a Python int, else None (``solver="random"`` in
      :func:`refresh_eigenvector` then needs an explicit ``key``).
  """

  solver: str = "power"
  num_iters: int = 5
  hvp_method: str = "exact"
  eps: float | None = DEFAULT_EPS
  seed: int | None = 0


def make_settings(
  solver: str, num_iters: int, hvp_method: str, eps: Any, key: Any
) -> EigvecSettings:
  """The :class:`EigvecSettings` of a transform; arrays (traced or not) are recorded as None.

  Arrays are never stored, so ``init`` (concrete hyperparameters) and ``update`` (traced ones,
  under ``optax.inject_hyperparams``) build equal settings and the state's structure never
  changes.
  """
  concrete_eps = (
    float(eps)
    if isinstance(eps, (int, float, np.floating, np.integer)) and not isinstance(eps, bool)
    else None
  )
  seed = int(key) if isinstance(key, (int, np.integer)) and not isinstance(key, bool) else None
  return EigvecSettings(solver, num_iters, hvp_method, concrete_eps, seed)


def check_base_grad_flag(check_base_grad: Any, hvp_method: str, solver: str = "power") -> None:
  """Raises ``ValueError`` unless ``check_base_grad`` is a bool usable with ``hvp_method``."""
  if not isinstance(check_base_grad, bool):
    raise ValueError(f"`check_base_grad` must be a Python bool, got {check_base_grad!r}.")
  if check_base_grad and hvp_method != "forward_difference":
    raise ValueError(
      "`check_base_grad=True` checks the base gradient of finite-difference HVPs; it needs "
      f"hvp_method='forward_difference', got {hvp_method!r} (exact HVPs use no base gradient)."
    )
  if check_base_grad and solver == "random":
    raise ValueError(
      "`check_base_grad=True` checks the base gradient of finite-difference HVPs, but "
      "solver='random' makes no HVPs; drop check_base_grad or use solver='power'/'lanczos'."
    )


def _power_refresh(
  eigvec: PyTree,
  params: PyTree,
  grad_fn: Callable[[PyTree], PyTree],
  num_iters: int,
  eps: float,
  axis_name: str | None,
  unroll: bool,
  solver: str = "power",
  hvp_method: str = "exact",
  base_grad: PyTree | None = None,
  key: Any = None,
  step: Array | int = 0,
) -> tuple[Array, PyTree, Array]:
  r"""One refresh of the cached pair, warm-started from ``eigvec``.

  ``solver="power"``: ``num_iters`` HVPs of power iteration (the papers' refresh), largest
  :math:`|\lambda|`; ``eigval`` is the Rayleigh quotient of the last multiplied iterate.
  ``solver="lanczos"``: a ``num_iters``-step Lanczos run from ``eigvec`` with full
  reorthogonalisation, returning the top (largest algebraic) Ritz pair: the same number of
  HVPs, and the Krylov space holds every power iterate (it stores ``num_iters`` basis vectors
  meanwhile). ``solver="random"``: :func:`random_eigvec` from ``key`` folded with ``step``,
  ``eigval = 0``; no HVP and no ``grad_fn`` call.

  The returned ``eigvec`` has exactly unit length (or is the old one when the new estimate's
  norm is at most ``eps``) and the dtypes of the old one; ``eigval`` is in the dtype of
  reductions over it (float32, float64 under x64 with float64 params). The third output,
  ``finite``, is a bool scalar: False when the new estimate or its eigenvalue has a NaN or an
  infinity (a non-finite batch, loss or ``base_grad``); the caller then keeps the previous
  pair (:func:`keep_if_finite`).

  ``hvp_method="forward_difference"``: every HVP is one gradient, against one base gradient
  :math:`\nabla L(w)` shared by all ``num_iters`` products: ``base_grad`` when given (the
  step's clean gradient), else one ``grad_fn`` call at the start of the refresh.
  """
  if solver == "random":
    new_eigvec = random_eigvec(key, step, eigvec)
    eigval = jnp.zeros((), jnp.result_type(*jax.tree.leaves(eigvec)))
    return eigval, new_eigvec, tree_all_finite(new_eigvec)

  hvp_fn = hessian.make_hvp_fn(
    grad_fn, params, hvp_method=hvp_method, base_grad=base_grad, axis_name=axis_name, eps=eps
  )

  if solver == "lanczos" and num_iters > 1:
    eigvals, eigvecs = hessian.top_k_eigenpairs(
      hvp_fn, eigvec, 1, num_iters=num_iters, eps=eps, unroll=unroll
    )
    eigval, new_eigvec = eigvals[0], jax.tree.map(lambda x: x[0], eigvecs)
  else:
    eigval, new_eigvec = hessian.power_iteration(hvp_fn, eigvec, num_iters, eps=eps, unroll=unroll)
  finite = jnp.isfinite(eigval) & tree_all_finite(new_eigvec)
  # Exactly unit length, in the stored dtypes (float32, or float64 under x64).
  return eigval, unit_or_keep(new_eigvec, eigvec, eps), finite


def keep_if_finite(
  finite: Array, new: tuple[Array, PyTree], old: tuple[Array, PyTree]
) -> tuple[Array, PyTree]:
  """``new`` ``(eigval, eigvec)`` when ``finite``, else ``old``; dtypes of ``old``."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n.astype(o.dtype), o), new, old)


class Refreshed(NamedTuple):
  """What :func:`maybe_refresh` returns: the cached pair and the refresh diagnostics."""

  eigval: Array
  eigvec: PyTree
  skipped_refreshes: Array
  base_grad_mismatch: Array


def base_grad_mismatch(
  grad_fn: Callable[[PyTree], PyTree],
  params: PyTree,
  base_grad: PyTree,
  axis_name: str | None,
  eps: float,
) -> Array:
  r"""Relative mismatch :math:`\|b - \nabla L(w)\| / \|\nabla L(w)\|` of a base gradient.

  One ``grad_fn`` call. With ``axis_name`` each device compares its own ``base_grad`` with its
  own gradient and the largest relative mismatch over devices is returned.
  """
  true = hessian.base_gradient(grad_fn, params, axis_name)
  diff = jax.tree.map(lambda b, g: tree_to_f32(b) - tree_to_f32(g), base_grad, true)
  mismatch = tree_norm(diff) / (tree_norm(true) + eps)
  return mismatch if axis_name is None else jax.lax.pmax(mismatch, axis_name)


def maybe_refresh(
  state: Any,
  *,
  params: PyTree,
  grad_fn: Callable[[PyTree], PyTree],
  refresh_every: int,
  num_iters: int,
  eps: float,
  axis_name: str | None,
  refresh: bool | None,
  solver: str = "power",
  accumulation_steps: int = 1,
  hvp_method: str = "exact",
  base_grad: PyTree | None = None,
  check_base_grad: bool = False,
  key: Any = 0,
  due: Array | None = None,
) -> Refreshed:
  """Refreshes ``state.eigval`` and ``state.eigvec`` when ``state.count`` says it is due.

  ``state`` is an :class:`~xsam_jax.XSAMState` or :class:`~xsam_jax.EigenSAMState`; the
  outputs keep the dtypes of its fields. A refresh whose new eigenvalue or eigenvector is not
  finite keeps the previous pair and adds one to ``skipped_refreshes``. With
  ``check_base_grad`` (forward differences with a given ``base_grad`` only), the refresh also
  records :func:`base_grad_mismatch` in ``base_grad_mismatch`` (one more gradient).
  ``solver="random"`` draws :func:`random_eigvec` from ``key`` folded with the optimizer step
  ``count // accumulation_steps``.

  ``refresh=None``: traced decision ``count % (refresh_every * accumulation_steps) == 0``
  (the first micro-batch of every ``refresh_every``-th optimizer step) under ``lax.cond``
  around a ``lax.fori_loop``: one compiled program for every step. ``refresh=True/False``: a
  host-side decision; the refresh is then straight-line HVPs with no control flow around them.
  ``hvp_method`` and ``base_grad`` as in :func:`_power_refresh`; a base gradient that is not
  given is computed inside the refresh branch, so steps without a refresh do not pay for it.
  ``due``: a traced bool that replaces the count test when ``refresh`` is None (X-SAM's
  ``refresh_on="ascent"``).
  """

  old = Refreshed(state.eigval, state.eigvec, state.skipped_refreshes, state.base_grad_mismatch)

  def run(unroll):
    new_val, new_vec, finite = _power_refresh(
      old.eigvec,
      params,
      grad_fn,
      num_iters,
      eps,
      axis_name,
      unroll,
      solver,
      hvp_method,
      base_grad,
      key,
      state.count // accumulation_steps,
    )
    eigval, eigvec = keep_if_finite(finite, (new_val, new_vec), (old.eigval, old.eigvec))
    mismatch = old.base_grad_mismatch
    if check_base_grad and hvp_method == "forward_difference" and base_grad is not None:
      mismatch = base_grad_mismatch(grad_fn, params, base_grad, axis_name, eps)
      mismatch = mismatch.astype(old.base_grad_mismatch.dtype)
    skipped = old.skipped_refreshes + (~finite).astype(old.skipped_refreshes.dtype)
    return Refreshed(eigval, eigvec, skipped, mismatch)

  if refresh is None:
    if due is None:
      due = state.count % (refresh_every * accumulation_steps) == 0
    return jax.lax.cond(
      due,
      lambda: run(False),
      lambda: old,
    )
  if not isinstance(refresh, bool):
    raise ValueError(
      f"`refresh` must be None (decide inside the step) or a Python bool decided on the host, "
      f"got {refresh!r}. For a traced decision leave it as None."
    )
  if refresh:
    return run(True)
  return old


def is_due(count: int, refresh_every: int, accumulation_steps: int = 1) -> bool:
  """Host-side twin of the in-step test: whether call ``count`` refreshes the eigenvector.

  ``count`` counts ``update`` calls (micro-batches included). Use it to pick ``refresh=`` for
  the static path: ``refresh=is_due(step, refresh_every, accumulation_steps)``.

  Example:
    >>> import xsam_jax
    >>> [xsam_jax.is_due(c, refresh_every=2, accumulation_steps=3) for c in range(7)]
    [True, False, False, False, False, False, True]
  """
  check_positive_int("refresh_every", refresh_every)
  check_positive_int("accumulation_steps", accumulation_steps)
  return int(count) % (refresh_every * accumulation_steps) == 0


def _has_eigvec(node: Any) -> bool:
  return isinstance(node, tuple) and "eigvec" in getattr(node, "_fields", ())


def refresh_eigenvector(
  opt_state: PyTree,
  params: PyTree,
  grad_fn: Callable[[PyTree], PyTree],
  *,
  solver: str | None = None,
  num_iters: int | None = None,
  eps: float | None = None,
  axis_name: str | None = None,
  unroll: bool = False,
  hvp_method: str | None = None,
  base_grad: PyTree | None = None,
  key: Array | int | None = None,
  tracker: str | None = None,
  power_iters: int | None = None,
) -> PyTree:
  r"""Refreshes every cached eigenvector in an optimizer state, outside the training step.

  Runs the refresh of the transform that made each state (its ``settings``: the ``solver``,
  ``num_iters``, ``hvp_method`` and ``eps`` it was built with) at ``params``, with :math:`H`
  the Hessian of the loss whose gradient is ``grad_fn``; any of these given here overrides the
  transform's. ``solver="power"``: ``num_iters`` warm-started power-iteration steps,
  :math:`v \leftarrow Hv/\|Hv\|`, storing the new unit ``eigvec`` and ``eigval``, the Rayleigh
  quotient :math:`\langle v, Hv\rangle` of the last multiplied iterate (free: no extra HVP).
  ``solver="lanczos"`` stores the top Ritz pair instead. ``solver="random"`` stores a fresh
  random unit vector drawn from ``key`` folded with the state's ``count`` and ``eigval = 0``
  (no HVP, no ``grad_fn`` call). Every :class:`~xsam_jax.EigenSAMState` and
  :class:`~xsam_jax.XSAMState` found in ``opt_state`` (inside ``optax.chain``,
  ``inject_hyperparams``, ``MultiSteps``...) is updated; everything else is returned
  unchanged. Use it to refresh on another batch (e.g. a fixed held-out batch) or on your own
  schedule, then call ``update(..., refresh=False)``.

  Args:
    opt_state: an optimizer state containing one or more eigenvector-tracking states.
    params: the point at which the Hessian is taken.
    grad_fn: ``params -> grads`` of the loss whose Hessian is wanted.
    solver: ``"power"`` (power iteration, largest :math:`|\lambda|`), ``"lanczos"`` (top Ritz
      pair, largest algebraic :math:`\lambda`, of a warm-started Lanczos run with the same
      number of HVPs) or ``"random"``; None: the transform's.
    num_iters: number of Hessian-vector products, a Python int >= 1; None: the transform's.
    eps: added to every norm before division; None: the transform's (``1e-12`` when the
      transform's was not a Python number, e.g. injected by ``optax.inject_hyperparams``).
    axis_name: inside ``shard_map``/``pmap``, ``pmean`` every HVP over this axis.
    unroll: straight-line HVPs (True; the fast choice on XLA:CPU, where a ``lax.fori_loop``
      around convolutions is slow) or a ``lax.fori_loop`` (False, default, as everywhere in
      the library).
    hvp_method: ``"exact"`` (forward-over-reverse) or ``"forward_difference"``:
      :math:`(\nabla L(w + hv) - \nabla L(w))/h`, one gradient per HVP, relative error
      :math:`O(\sqrt{u})` (:math:`\sim10^{-3}` in float32) with float32-or-wider params and
      loss computation only; 0.06-0.96 with half precision anywhere
      (:func:`xsam_jax.hessian.hvp`). None: the transform's.
    base_grad: forward differences only: ``grad_fn(params)`` if already at hand (with
      ``axis_name``, the device's own); otherwise it is computed once and shared by every HVP
      and every state refreshed.
    key: ``solver="random"`` only: a PRNG key or an int seed; None: the transform's ``key``
      when it was a Python int.
    tracker: deprecated alias of ``solver`` (one release; warns).
    power_iters: deprecated alias of ``num_iters`` (one release; warns).

  Returns:
    ``opt_state`` with refreshed ``eigvec`` and ``eigval`` fields. A refresh whose result is
    not finite (a NaN or infinity in the batch, the loss or ``base_grad``) keeps the previous
    pair and adds one to the state's ``skipped_refreshes``.

  Raises:
    ValueError: if ``opt_state`` holds no eigenvector, ``params`` holds no entries,
      ``num_iters`` < 1, ``solver`` or ``hvp_method`` is unknown, ``grad_fn`` cannot be called
      as ``grad_fn(params)``, ``solver="random"`` has no ``key`` to use, a deprecated name is
      given together with its new one, or ``axis_name`` is not a mapped axis here.

  References:
    Duan, Chen & Guan, "X-SAM: Boosting Sharpness-Aware Minimization with Dominant-Eigenvector
    Gradient Correction", arXiv:2601.10251, 2026.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss = lambda w: 0.5 * (jnp.array([4.0, 1.0]) * w ** 2).sum()
    >>> tx = optax.chain(xsam_jax.xsam(rho=0.05), optax.sgd(0.1))
    >>> state = tx.init(jnp.ones(2))
    >>> state = xsam_jax.refresh_eigenvector(state, jnp.ones(2), jax.grad(loss), num_iters=30)
    >>> round(float(optax.tree.get(state, "eigval")), 3)
    4.0
    >>> state = xsam_jax.refresh_eigenvector(state, jnp.ones(2), jax.grad(loss), num_iters=30,
    ...                                      hvp_method="forward_difference")  # 31 gradients
    >>> round(float(optax.tree.get(state, "eigval")), 2)
    4.0
  """
  where = "xsam_jax.refresh_eigenvector"
  solver = resolve_alias(where, "solver", solver, None, "tracker", tracker)
  num_iters = resolve_alias(where, "num_iters", num_iters, None, "power_iters", power_iters)
  if solver is not None:
    check_solver(solver)
  if num_iters is not None:
    check_positive_int("num_iters", num_iters)
  if hvp_method is not None:
    hessian.check_hvp_method(hvp_method)
  check_axis(where, axis_name)
  check_nonempty("params", params, where)
  check_grad_fn_signature("grad_fn", grad_fn, where)
  found = []
  shared = {"base_grad": base_grad}  # computed at the first state that needs it, then shared

  def refresh_node(node):
    if not _has_eigvec(node):
      return node
    found.append(True)
    built = getattr(node, "settings", None) or EigvecSettings()
    node_solver = solver if solver is not None else built.solver
    node_method = hvp_method if hvp_method is not None else built.hvp_method
    node_eps = eps if eps is not None else (built.eps if built.eps is not None else DEFAULT_EPS)
    node_key = key if key is not None else built.seed
    if node_solver == "random" and node_key is None:
      raise ValueError(
        f"{where}: solver='random' needs a `key`: the transform's key was not a Python int "
        "(an array, or injected by optax.inject_hyperparams). Pass key=jax.random.key(...)."
      )
    fd = node_solver != "random" and node_method == "forward_difference"
    if fd and shared["base_grad"] is None:
      shared["base_grad"] = hessian.base_gradient(grad_fn, params, axis_name)
    eigval, eigvec, finite = _power_refresh(
      node.eigvec,
      params,
      grad_fn,
      num_iters if num_iters is not None else built.num_iters,
      node_eps,
      axis_name,
      unroll,
      node_solver,
      node_method,
      shared["base_grad"],
      node_key,
      node.count,
    )
    eigval, eigvec = keep_if_finite(finite, (eigval, eigvec), (node.eigval, node.eigvec))
    skipped = node.skipped_refreshes + (~finite).astype(node.skipped_refreshes.dtype)
    return node._replace(eigvec=eigvec, eigval=eigval, skipped_refreshes=skipped)

  new_state = jax.tree.map(refresh_node, opt_state, is_leaf=_has_eigvec)
  if not found:
    raise ValueError(
      "refresh_eigenvector: `opt_state` holds no eigenvector. Pass the state of a transform "
      "built with xsam_jax.xsam or xsam_jax.eigen_sam (alone or inside optax.chain)."
    )
  return new_state
