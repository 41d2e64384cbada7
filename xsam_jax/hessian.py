"""Hessian toolbox: Hessian-vector products and spectral estimates over parameter pytrees.

Everything here is pure, pytree-native and jit-able. Reductions accumulate in float32.
A Hessian is never formed: every routine talks to it through ``hvp_fn(v) -> H v``, which
:func:`hvp` builds from a gradient function by forward-over-reverse differentiation, or by a
forward difference of two gradients (``hvp_method="forward_difference"``, one gradient per
product; :func:`make_hvp_fn` shares the base gradient between products).

* Extreme eigenpairs: :func:`power_iteration`, :func:`lanczos`, :func:`top_k_eigenpairs`,
  :func:`top_eigenvalue`.
* Trace and spectrum: :func:`hutchinson_trace`, :func:`slq_nodes_and_weights`,
  :func:`spectral_density`.
* Parameter subsets (per layer): :func:`masked_hvp`, :func:`apply_mask`, :func:`layer_masks`.

Structural arguments (``num_iters``, ``k``, ``num_samples``, ``solver``, ``unroll``, ...) are
Python values that fix the compiled program; mark them static under ``jax.jit``. ``unroll``
defaults to False (``lax.fori_loop``/``lax.map``) everywhere; True (straight-line Python loops)
is the fast choice on XLA:CPU, where control flow around convolutions is slow.
A vector, ``like`` or ``params`` pytree with no entries (``{}``, or only zero-size leaves)
raises a ``ValueError`` naming that argument; zero-size leaves next to non-empty ones are fine.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from xsam_jax import hessian
  >>> loss = lambda w: 0.5 * (3.0 * w["a"] ** 2 + w["b"] ** 2).sum()
  >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  >>> hvp_fn = lambda v: hessian.hvp(jax.grad(loss), params, v)
  >>> eigval, eigvec = hessian.power_iteration(hvp_fn, {"a": jnp.ones(2), "b": jnp.ones(2)}, 20)
  >>> round(float(eigval), 3)
  3.0
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from xsam_jax._parallel import check_unreduced, device_mean, to_varying
from xsam_jax._perturbation import (
  DEFAULT_EPS,
  ascent_point,
  check_nonempty,
  normalize,
  resolve_alias,
  scalar_dtype,
  tree_cast_like,
  tree_norm,
  tree_to_f32,
  tree_vdot,
  unit_or_keep,
)

Array = jax.Array
PyTree = Any
HVPFn = Callable[[PyTree], PyTree]

__all__ = [
  "HVP_METHODS",
  "apply_mask",
  "base_gradient",
  "fd_rounding_unit",
  "fd_step_size",
  "hutchinson_trace",
  "hvp",
  "lanczos",
  "layer_masks",
  "make_hvp_fn",
  "masked_hvp",
  "power_iteration",
  "slq_nodes_and_weights",
  "spectral_density",
  "top_eigenvalue",
  "top_k_eigenpairs",
]

_SOLVERS = ("lanczos", "power")
# A Lanczos residual below this fraction of the largest ||H q_j|| seen so far is treated as a
# breakdown (an invariant subspace was found): the recurrence restarts from a fresh direction.
_BREAKDOWN_RTOL = 1e-6
# A deflated power-iteration start whose part orthogonal to the pairs already found is below
# this fraction of its norm is replaced by a fresh direction.
_RESTART_RTOL = 1e-4
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Hessian-vector products and power iteration.


HVP_METHODS = ("exact", "forward_difference")
# c in the finite-difference step h = c sqrt(u) (1 + ||w||) / ||v||; c = 1 balances the
# truncation and rounding terms when the third derivative, the gradient and the Hessian are of
# comparable size (see :func:`hvp`).
FD_STEP_SCALE = 1.0


def check_hvp_method(hvp_method: Any) -> None:
  """Raises ``ValueError`` naming ``hvp_method`` and its valid choices."""
  if hvp_method not in HVP_METHODS:
    raise ValueError(
      f"`hvp_method` must be one of {HVP_METHODS}, got {hvp_method!r}. 'exact' is "
      "forward-over-reverse differentiation (about 2-3 gradients per product); "
      "'forward_difference' costs one gradient per product (plus one base gradient shared by "
      "all products of a refresh) with a relative error of order sqrt(machine epsilon)."
    )


def fd_rounding_unit(params: PyTree) -> float:
  """Machine epsilon of the least precise floating leaf of ``params`` (a Python float).

  ``2**-52`` for float64, ``2**-23`` for float32, ``2**-10`` for float16, ``2**-7`` for
  bfloat16: the point :math:`w + hv` is rounded to the parameters' dtypes before ``grad_fn``
  sees it, so the least precise leaf sets the finite-difference rounding error.
  """
  eps = [
    float(jnp.finfo(jnp.result_type(x)).eps)
    for x in jax.tree.leaves(params)
    if jnp.issubdtype(jnp.result_type(x), jnp.floating)
  ]
  return max(eps, default=float(jnp.finfo(jnp.float32).eps))


def fd_step_size(params: PyTree, v: PyTree, *, eps: float = DEFAULT_EPS) -> Array:
  r"""The forward-difference step :math:`h` of :func:`hvp` for the direction ``v`` at ``params``.

  .. math:: h = c\,\sqrt{u}\;\frac{1 + \|w\|}{\|v\| + \mathrm{eps}},\qquad c = 1,

  with :math:`u` = :func:`fd_rounding_unit` of the parameters (``2**-23`` for float32,
  ``2**-7`` for bfloat16, ``2**-52`` for float64) and global norms. The displacement
  :math:`\|hv\| \approx \sqrt{u}(1+\|w\|)` is relative to the parameters' scale: large enough
  that rounding :math:`w + hv` to the parameter dtype (error :math:`\le u\|w\|/2`) and the
  gradients' rounding errors cost only :math:`O(\sqrt{u})` relative error, small enough that
  the truncation error is :math:`O(\sqrt{u})` too (error analysis in :func:`hvp`).

  Args:
    params: the point :math:`w` (its dtypes fix :math:`u`).
    v: the direction, shaped like ``params``.
    eps: added to :math:`\|v\|` before division (a zero ``v`` gives a finite :math:`h`).

  Returns:
    :math:`h > 0`, a float32 scalar (float64 for float64 params).

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> h = hessian.fd_step_size(jnp.zeros(3), jnp.ones(3) / jnp.sqrt(3.0))
    >>> round(float(h) / 2 ** -11.5, 3)  # sqrt(2**-23) for float32 params, ||w|| = 0, ||v|| = 1
    1.0
  """
  dtype = scalar_dtype(params)
  w_norm = tree_norm(params).astype(dtype)
  v_norm = tree_norm(v).astype(dtype)
  scale = FD_STEP_SCALE * math.sqrt(fd_rounding_unit(params))
  return scale * (1.0 + w_norm) / (v_norm + eps)


def base_gradient(
  grad_fn: Callable[[PyTree], PyTree], params: PyTree, axis_name: str | None = None
) -> PyTree:
  """``grad_fn(w)``: the base of a forward difference, the device's own with ``axis_name``.

  Evaluated at device-varying ``params`` and checked not to be reduced over ``axis_name``.
  """
  base = grad_fn(to_varying(params, axis_name))
  check_unreduced(base, axis_name, what="grad_fn (the base gradient of a finite difference)")
  return base


def _forward_difference(
  grad_fn: Callable[[PyTree], PyTree],
  params: PyTree,
  v: PyTree,
  base_grad: PyTree,
  axis_name: str | None,
  eps: float,
) -> PyTree:
  """``(grad_fn(w + h v) - base_grad) / h``, per device, then ``pmean``-ed over ``axis_name``."""
  h = fd_step_size(params, v, eps=eps)
  point = ascent_point(to_varying(params, axis_name), optax.tree.scale(h, tree_to_f32(v)))
  shifted = grad_fn(point)
  check_unreduced(
    shifted, axis_name, what="grad_fn (in a finite-difference Hessian-vector product)"
  )

  def difference(g1, g0):
    wide = jnp.promote_types(jnp.result_type(g1), scalar_dtype(params))
    return ((g1.astype(wide) - g0.astype(wide)) / h.astype(wide)).astype(jnp.result_type(g1))

  return device_mean(jax.tree.map(difference, shifted, base_grad), axis_name, what="grad_fn")


def hvp(
  grad_fn: Callable[[PyTree], PyTree],
  params: PyTree,
  v: PyTree,
  *,
  axis_name: str | None = None,
  hvp_method: str = "exact",
  base_grad: PyTree | None = None,
  eps: float = DEFAULT_EPS,
) -> PyTree:
  r"""Hessian-vector product :math:`H(w)\,v`, exact or by a forward difference of gradients.

  ``hvp_method="exact"`` (default), forward-over-reverse differentiation:

  .. math:: H(w)\,v = \frac{d}{dt}\,\nabla L(w + t v)\Big|_{t=0}
     = \texttt{jax.jvp(grad\_fn, (w,), (v,))[1]},

  about one gradient plus its forward-mode tangent (2-3 gradients), exact to rounding.

  ``hvp_method="forward_difference"``, one gradient per product:

  .. math:: \widehat{Hv} = \frac{\nabla L(w + h v) - \nabla L(w)}{h},\qquad
     h = \sqrt{u}\,\frac{1 + \|w\|}{\|v\|},

  (:func:`fd_step_size`) with :math:`u` the machine epsilon of the parameters' dtype
  (:func:`fd_rounding_unit`). The base gradient :math:`\nabla L(w)` is ``base_grad`` when given
  (e.g. the step's clean gradient, free), else one more ``grad_fn`` call; :func:`make_hvp_fn`
  computes it once and shares it between many products. Error, to first order in :math:`u`, with
  :math:`\hat v = v/\|v\|`:

  .. math:: \frac{\|\widehat{Hv} - Hv\|}{\|Hv\|} \le
     \underbrace{\frac{h\|v\|}{2}\,\frac{\|\nabla^3 L[\hat v, \hat v]\|}
       {\|H\hat v\|}}_{\text{truncation}}
     + \underbrace{\frac{2\gamma_g + \tfrac{u}{2}\|H\|\,\|w + hv\|}
       {h\|v\|\,\|H\hat v\|}}_{\text{rounding}}
     = \sqrt{u}\left(\frac{(1+\|w\|)\,\|\nabla^3L[\hat v,\hat v]\|}{2\|H\hat v\|}
       + \frac{2\gamma_g/u + \|H\|\,\|w\|/2}{(1+\|w\|)\,\|H\hat v\|}\right)

  where :math:`\gamma_g` bounds the rounding error of one computed gradient (about
  :math:`u\|g\|` times a modest factor for a well-conditioned loss) and the
  :math:`\|H\|` term is the rounding of :math:`w + hv` to the parameter dtype. Both terms are
  :math:`O(\sqrt{u})` (:math:`\sqrt{u} = 1.5\cdot10^{-8}` in float64,
  :math:`3.5\cdot10^{-4}` in float32); measured relative errors on a tiny tanh MLP and a
  Conv+BatchNorm CNN, along the top eigenvector / a random direction: float64
  :math:`2.9\cdot10^{-8}` / :math:`3.8\cdot10^{-8}` (MLP), :math:`5.3\cdot10^{-8}` /
  :math:`3.4\cdot10^{-8}` (CNN); float32 :math:`6.7\cdot10^{-4}` / :math:`6.6\cdot10^{-4}`
  (MLP), :math:`1.2\cdot10^{-3}` / :math:`5.7\cdot10^{-4}` (CNN), within the bound
  (``tests/test_finite_difference_hvps_match_exact_ones.py``, run with ``-s`` to print them;
  issue 18 measured :math:`3.9\cdot10^{-3}` in float32 on another net: the constants grow
  with :math:`\|g\|/\|H\hat v\|` and :math:`\|w\|`).

  **Half precision anywhere breaks it.** Along the top eigenvector, float16 parameters gave
  0.06 (MLP) / 0.10 (CNN), bfloat16 parameters 0.18 / 0.27 (issue 18: 0.29 and 0.54 on another
  net). Float32 master weights do **not** help when the loss computes in bfloat16: :math:`h`
  is taken from the *parameters'* dtype (:math:`\sqrt{2^{-23}}`), far below the gradients'
  bfloat16 rounding, and the error was 0.66 / 0.96 (an :math:`h` chosen for bfloat16 would
  only bring it back to the bfloat16 figures), while exact HVPs in the same bfloat16 compute
  stayed at 0.002 / 0.025 (``test_half_precision_compute_makes_forward_differences_useless``).
  Use ``"exact"`` whenever the parameters or the loss computation are float16 or bfloat16.

  A ``base_grad`` that is not ``grad_fn(params)`` (clipped, accumulated over other
  micro-batches, summed rather than averaged over devices, from another batch) biases every
  product by :math:`(\nabla L(w) - b)/h`, i.e. the relative mismatch times
  :math:`\|g\|/(h\,\|H\hat v\|)`, about :math:`3000\,\|g\|/((1+\|w\|)\,\|H\hat v\|)`
  in float32: a mismatch of :math:`10^{-3}` is already an :math:`O(1)` error.
  :func:`xsam_jax.xsam` and :func:`xsam_jax.eigen_sam` measure it with
  ``check_base_grad=True`` (state field ``base_grad_mismatch``).

  The bound assumes a smooth loss (:math:`\nabla^3 L` finite along :math:`v`). **ReLU and
  max-pool networks break it**: moving the weights by :math:`hv` flips activation and pooling
  decisions, each flip is a jump in the gradient, and the error does not shrink with :math:`h`.
  Measured on the digits SimpleCNN (ReLU, max-pool) at init in float32: relative error 45 for a
  random direction and 2.0 for the top eigenvector (``benchmarks/RESULTS.md``). Use ``"exact"``
  (which differentiates the piecewise-smooth function, as the papers' double backward does) for
  such models; ``"forward_difference"`` is for smooth activations (tanh, GELU, swish, softplus).

  Args:
    grad_fn: ``params -> grads``, the gradient of the loss whose Hessian is wanted.
    params: the point :math:`w` at which the Hessian is taken.
    v: a tangent shaped like ``params``; it is cast to the dtype of each parameter.
    axis_name: inside ``shard_map``/``pmap``: ``grad_fn`` is the gradient of the device's own
      loss; the product is taken at device-varying ``params`` and ``v`` (so that, under
      ``check_vma=True``, autodiff does not sum it over devices) and ``pmean``-ed over this
      axis, so every device sees the Hessian of the global (mean) loss. A ``base_grad`` must
      then be the device's own gradient.
    hvp_method: ``"exact"`` or ``"forward_difference"``.
    base_grad: forward differences only: :math:`\nabla L(w)` if already known.
    eps: forward differences only: added to :math:`\|v\|` in :math:`h`.

  Returns:
    :math:`Hv`, shaped like ``params``, in the dtype ``grad_fn`` returns.

  Raises:
    ValueError: for an unknown ``hvp_method``; if ``axis_name`` is not a mapped axis here, or
      ``grad_fn`` returns a value already reduced over it.

  References:
    Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation, 1994.
    Nocedal & Wright, "Numerical Optimization", 2nd ed., 2006, sections 7.1 and 8.1
    (finite-difference Hessian-vector products and the choice of :math:`h`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> loss = lambda w: jnp.sum(w ** 4) / 4  # H = diag(3 w^2)
    >>> w, v = jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0])
    >>> exact = hessian.hvp(jax.grad(loss), w, v)
    >>> fd = hessian.hvp(jax.grad(loss), w, v, hvp_method="forward_difference")
    >>> [round(float(x), 2) for x in exact], [round(float(x), 2) for x in fd]
    ([3.0, 0.0], [3.0, 0.0])
  """
  check_hvp_method(hvp_method)
  if hvp_method == "forward_difference":
    base_grad = _fd_base(grad_fn, params, base_grad, axis_name)
    return _forward_difference(grad_fn, params, v, base_grad, axis_name, eps)
  primal = to_varying(params, axis_name)
  tangent = to_varying(tree_cast_like(v, params), axis_name)
  _, out = jax.jvp(grad_fn, (primal,), (tangent,))
  return device_mean(out, axis_name, what="grad_fn (in a Hessian-vector product)")


def _fd_base(grad_fn, params, base_grad, axis_name):
  """The finite-difference base gradient: ``base_grad`` checked, or computed once here."""
  if base_grad is None:
    return base_gradient(grad_fn, params, axis_name)
  check_unreduced(base_grad, axis_name, what="`base_grad`")
  return base_grad


def make_hvp_fn(
  grad_fn: Callable[[PyTree], PyTree],
  params: PyTree,
  *,
  hvp_method: str = "exact",
  base_grad: PyTree | None = None,
  axis_name: str | None = None,
  eps: float = DEFAULT_EPS,
) -> HVPFn:
  r"""``v -> H(w) v`` for the routines of this module, with a shared finite-difference base.

  For ``hvp_method="forward_difference"`` the base gradient :math:`\nabla L(w)` is computed
  here, once (or taken from ``base_grad``), and every product then costs one gradient:
  :math:`q` products cost :math:`q + 1` gradients, or :math:`q` with ``base_grad``. For
  ``"exact"`` it is ``lambda v: hvp(grad_fn, params, v)``. Arguments as in :func:`hvp`.

  Returns:
    ``hvp_fn(v) -> H v`` (see :func:`hvp` for the accuracy of each method).

  Raises:
    ValueError: for an unknown ``hvp_method`` and data-parallel misuse (see :func:`hvp`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w ** 2)
    >>> hvp_fn = hessian.make_hvp_fn(jax.grad(loss), jnp.ones(2), hvp_method="forward_difference")
    >>> eigval, _ = hessian.power_iteration(hvp_fn, jnp.ones(2), 30)
    >>> round(float(eigval), 3)
    4.0
  """
  check_hvp_method(hvp_method)
  if hvp_method == "forward_difference":
    base_grad = _fd_base(grad_fn, params, base_grad, axis_name)
  else:
    base_grad = None
  return lambda v: hvp(
    grad_fn, params, v, axis_name=axis_name, hvp_method=hvp_method, base_grad=base_grad, eps=eps
  )


def _power_step(hvp_fn: HVPFn, v: PyTree, eps: float) -> tuple[Array, PyTree]:
  """One power-iteration step from a unit ``v``: returns ``(<v, Hv>, Hv / ||Hv||)``.

  The new iterate has exactly unit length; if ``||Hv|| <= eps`` the previous ``v`` is kept, so
  the estimate never becomes 0, NaN or shorter than 1. The outputs have the dtypes of ``v`` (so
  a loop carry keeps its type).
  """
  hv = tree_cast_like(tree_to_f32(hvp_fn(v)), v)
  rayleigh = tree_vdot(v, hv).astype(scalar_dtype(v))
  return rayleigh, unit_or_keep(hv, v, eps)


def power_iteration(
  hvp_fn: HVPFn,
  v0: PyTree,
  num_iters: int,
  *,
  eps: float = DEFAULT_EPS,
  unroll: bool = False,
) -> tuple[Array, PyTree]:
  r"""Top eigenpair (largest :math:`|\lambda|`) of a symmetric operator by power iteration.

  .. math::
     v_0 = \frac{v_{\text{init}}}{\|v_{\text{init}}\|},\qquad
     v_{k+1} = \frac{H v_k}{\|H v_k\|}\ (\text{or } v_k \text{ if } \|H v_k\| \le \epsilon),\qquad
     \lambda = \langle v_{q-1},\, H v_{q-1} \rangle

  ``eigval`` is the Rayleigh quotient of the last iterate that was multiplied, so it costs no
  extra HVP; it keeps its sign, so a dominant negative eigenvalue shows up as negative.
  Warm-start by passing the previous eigenvector as ``v0``.

  Args:
    hvp_fn: ``v -> H v`` on pytrees shaped like ``v0``.
    v0: starting vector (need not be normalised; must not be zero).
    num_iters: number of HVPs, a Python int >= 1.
    eps: added to every norm before division.
    unroll: if True, a straight-line Python loop (no ``while`` in the compiled program; the
      fast choice on XLA:CPU, where control flow around convolutions is slow); otherwise
      (default) a ``lax.fori_loop``.

  Returns:
    ``(eigval, eigvec)``: float32 scalar and a float32 unit pytree shaped like ``v0`` (float64
    where ``v0`` is float64).

  References:
    Golub & Van Loan, "Matrix Computations", 4th ed., 2013, section 8.2 (power method).
  """
  check_nonempty("v0", v0, "xsam_jax.hessian.power_iteration")
  _check_int("num_iters", num_iters)
  v, _ = normalize(v0, eps)
  rayleigh = jnp.zeros((), scalar_dtype(v))
  if unroll:
    for _ in range(num_iters):
      rayleigh, v = _power_step(hvp_fn, v, eps)
  else:

    def body(_, carry):
      return _power_step(hvp_fn, carry[1], eps)

    rayleigh, v = jax.lax.fori_loop(0, num_iters, body, (rayleigh, v))
  return rayleigh, v


# --------------------------------------------------------------------------------------------
# Private helpers: checks, and "bases" (pytrees whose leaves carry a leading axis of vectors).


def _check_int(name: str, value: Any, low: int = 1, high: int | None = None) -> None:
  """Raises ``ValueError`` unless ``value`` is a Python int in ``[low, high]``."""
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
  if ok and high is not None:
    ok = value <= high
  if not ok:
    bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"`{name}` must be a Python int {bounds}, got {value!r}.")


def _check_positive(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless a concrete ``value`` is > 0 (traced values are not checked)."""
  try:
    x = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return
  if not x > 0:  # also catches NaN
    raise ValueError(f"`{name}` must be > 0, got {value!r}.")


def _check_solver(solver: Any) -> None:
  if solver not in _SOLVERS:
    raise ValueError(f"`solver` must be one of {_SOLVERS}, got {solver!r}.")


def _dimension(tree: PyTree) -> int:
  """Total number of scalars in ``tree`` (static)."""
  return int(optax.tree.size(tree))


def _basis_coeffs(basis: PyTree, v: PyTree) -> Array:
  """``[<b_j, v>]_j`` for every row ``b_j`` (leading axis) of ``basis``: shape ``(m,)``."""
  parts = jax.tree.map(
    lambda b, x: jnp.tensordot(b, x.astype(b.dtype), axes=x.ndim, precision=_HIGHEST), basis, v
  )
  return functools.reduce(jnp.add, jax.tree.leaves(parts))


def _basis_combine(basis: PyTree, coeffs: Array) -> PyTree:
  """``sum_j coeffs[..., j] b_j``: a vector for 1-D ``coeffs``, a new basis for 2-D ones."""
  return jax.tree.map(
    lambda b: jnp.tensordot(coeffs.astype(b.dtype), b, axes=1, precision=_HIGHEST), basis
  )


def _orthogonalize(w: PyTree, basis: PyTree, passes: int = 2) -> PyTree:
  """Classical Gram-Schmidt of ``w`` against the (orthonormal or zero) rows of ``basis``.

  Two passes restore orthogonality to working precision ("twice is enough", Parlett 1980).
  """
  for _ in range(passes):
    w = optax.tree.sub(w, _basis_combine(basis, _basis_coeffs(basis, w)))
  return w


def _set_row(basis: PyTree, index: int | Array, v: PyTree) -> PyTree:
  return jax.tree.map(lambda b, x: b.at[index].set(x.astype(b.dtype)), basis, v)


def _normalize_like(w: PyTree, like: PyTree, eps: float) -> PyTree:
  return tree_cast_like(normalize(w, eps)[0], like)


def _hash_uniform(shape: tuple[int, ...], offset: int, seed: Array) -> Array:
  """Deterministic pseudo-random numbers in ``[-1, 1)`` from the murmur3 finaliser.

  Entry ``i`` of a leaf hashes ``offset + i`` together with ``seed``: cheap integer ops that
  compile fast (no per-leaf PRNG kernels inside a loop body).
  """
  h = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) + jnp.uint32(offset)
  h = h * jnp.uint32(0x9E3779B1) + jnp.asarray(seed).astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
  for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    h = (h ^ (h >> jnp.uint32(shift))) * jnp.uint32(mult)
  h = h ^ (h >> jnp.uint32(16))
  return (h >> jnp.uint32(8)).astype(jnp.float32) * (2.0 / (1 << 24)) - 1.0


def _hash_direction(like: PyTree, seed: int | Array) -> PyTree:
  """A deterministic pseudo-random vector (entries in ``[-1, 1)``) shaped like ``like``."""
  leaves, treedef = jax.tree.flatten(like)
  offsets = itertools.accumulate((x.size for x in leaves), initial=0)
  r = [
    _hash_uniform(x.shape, o, seed).astype(x.dtype) for x, o in zip(leaves, offsets, strict=False)
  ]
  return jax.tree.unflatten(treedef, r)


def _fresh_direction(like: PyTree, basis: PyTree, seed: int | Array, eps: float) -> PyTree:
  """A deterministic pseudo-random unit vector orthogonal to the rows of ``basis``."""
  return _normalize_like(_orthogonalize(_hash_direction(like, seed), basis), like, eps)


def _normalize_rows(basis: PyTree, eps: float) -> PyTree:
  """Scales every row (leading-axis slice) of ``basis`` to unit norm; zero rows stay zero."""

  def row_sq_norms(b: Array) -> Array:
    b = b.astype(jnp.promote_types(b.dtype, jnp.float32))
    return jnp.sum(jnp.square(b).reshape(b.shape[0], -1), axis=1)

  sq = functools.reduce(jnp.add, jax.tree.leaves(jax.tree.map(row_sq_norms, basis)))
  inv = 1.0 / (jnp.sqrt(sq) + eps)
  return jax.tree.map(lambda b: b * inv.reshape((-1,) + (1,) * (b.ndim - 1)).astype(b.dtype), basis)


def _map_samples(fn: Callable[[Array], Any], keys: Array, unroll: bool) -> Any:
  """``fn`` over the leading axis of ``keys``, stacked: a ``lax.map`` or a Python loop."""
  if unroll:
    outs = [fn(k) for k in keys]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  return jax.lax.map(fn, keys)


def _rademacher_like(key: Array, like: PyTree) -> PyTree:
  """Independent +-1 entries shaped like ``like``, in at least float32."""
  return tree_to_f32(optax.tree.random_like(key, like, jax.random.rademacher))


def _tridiagonal(alphas: Array, betas: Array) -> Array:
  return jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)


# --------------------------------------------------------------------------------------------
# Lanczos and top-k eigenpairs.


def _lanczos_step(hvp_fn: HVPFn, j: int | Array, carry: tuple, eps: float, reorth: bool) -> tuple:
  q = carry[3]
  hq = tree_cast_like(tree_to_f32(hvp_fn(q)), q)
  return _lanczos_update(carry, hq, jnp.asarray(j, jnp.int32), eps, reorth=reorth)


# Jitted on its own so that a host-driven (``unroll=True``, not jitted) Lanczos runs one compiled
# program per step around the caller's HVP instead of dozens of op-by-op dispatches; inside an
# outer ``jit`` it is simply inlined. ``j`` is traced, so every step reuses the same program.
@functools.partial(jax.jit, static_argnames=("reorth",))
def _lanczos_update(carry: tuple, hq: PyTree, j: Array, eps: float, *, reorth: bool) -> tuple:
  alphas, betas, basis, q, q_prev, beta_prev, scale = carry
  basis = _set_row(basis, j, q)
  scale = jnp.maximum(scale, tree_norm(hq).astype(scale.dtype))
  if reorth:
    # Classical Gram-Schmidt against q_0..q_j; the coefficients are (0, ..., beta_{j-1},
    # alpha_j) up to rounding, so this pass also performs the three-term recurrence.
    coeffs = _basis_coeffs(basis, hq)
    alpha = coeffs[j]
    w = optax.tree.sub(hq, _basis_combine(basis, coeffs))
  else:
    alpha = tree_vdot(q, hq)
    w = optax.tree.add_scale(hq, -alpha, q)
    w = optax.tree.add_scale(w, -beta_prev, q_prev)
  # Breakdown (w ~ 0): span(q_0..q_j) is invariant under H. Continue from a fresh direction
  # orthogonal to it and decouple the tridiagonal matrix (beta_j = 0) instead of dividing
  # rounding noise by ~0.
  breakdown = tree_norm(w) <= _BREAKDOWN_RTOL * scale
  fresh = _hash_direction(q, j + 1)
  if reorth:  # the second Gram-Schmidt pass ("twice is enough") also orthogonalises `fresh`
    w = jax.tree.map(lambda f, x: jnp.where(breakdown, f, x), fresh, w)
    w = _orthogonalize(w, basis, passes=1)
  else:
    w = jax.lax.cond(breakdown, lambda: _orthogonalize(fresh, basis), lambda: w)
  beta = tree_norm(w).astype(betas.dtype)
  q_next = tree_cast_like(optax.tree.scale(1.0 / (beta + eps), w), q)
  beta = jnp.where(breakdown, jnp.zeros_like(beta), beta)
  alphas = alphas.at[j].set(alpha.astype(alphas.dtype))
  betas = betas.at[j].set(beta)
  return alphas, betas, basis, q_next, q, beta, scale


def lanczos(
  hvp_fn: HVPFn,
  v0: PyTree,
  num_iters: int,
  *,
  eps: float = DEFAULT_EPS,
  reorthogonalize: bool = True,
  unroll: bool = False,
) -> tuple[Array, Array, PyTree]:
  r"""Lanczos tridiagonalisation :math:`Q_m^\top H Q_m = T_m` of a symmetric operator.

  .. math::
     q_0 = \frac{v_0}{\|v_0\|},\quad
     \alpha_j = \langle q_j, H q_j\rangle,\quad
     r_j = H q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},\quad
     \beta_j = \|r_j\|,\quad q_{j+1} = \frac{r_j}{\beta_j + \epsilon},

  .. math::
     T_m = \begin{pmatrix} \alpha_0 & \beta_0 & & \\ \beta_0 & \alpha_1 & \ddots & \\
       & \ddots & \ddots & \beta_{m-2} \\ & & \beta_{m-2} & \alpha_{m-1} \end{pmatrix}.

  With ``reorthogonalize=True`` (full reorthogonalisation) the residual is instead computed by
  classical Gram-Schmidt twice against all of :math:`Q_{j+1} = [q_0, \dots, q_j]`,

  .. math:: r_j = (I - Q_{j+1} Q_{j+1}^\top)^2\, H q_j ,

  whose first pass has coefficients :math:`(0, \dots, 0, \beta_{j-1}, \alpha_j)` and so
  performs the three-term recurrence; this keeps :math:`Q_m` orthonormal in floating point and
  prevents the spurious copies of converged Ritz values that plain Lanczos produces. On
  breakdown (:math:`\|r_j\| \approx 0` relative to :math:`\max_i \|H q_i\|`: the Krylov
  space is invariant, e.g. :math:`H = 0` or ``v0`` an eigenvector) :math:`\beta_j` is set to
  0 and the recurrence continues from a deterministic pseudo-random direction orthogonal to
  :math:`Q`, so nothing becomes NaN, :math:`T_m` stays the restriction of :math:`H` to an
  orthonormal basis, and the decoupled blocks carry no weight for :math:`q_0` (see
  :func:`slq_nodes_and_weights`).

  The eigenvalues of :math:`T_m` (Ritz values) approximate the extreme eigenvalues of
  :math:`H`, and :math:`m` steps are exact once :math:`m` equals the dimension. Memory:
  :math:`m` vectors shaped like ``v0``.

  Args:
    hvp_fn: ``v -> H v`` on pytrees shaped like ``v0`` (e.g. built with :func:`hvp`).
    v0: starting vector (need not be normalised; must not be zero).
    num_iters: number of steps :math:`m` (= HVPs), a Python int in ``[1, dim]`` where ``dim``
      is the total number of scalars in ``v0``.
    eps: added to every norm before division.
    reorthogonalize: full reorthogonalisation (recommended; costs :math:`O(m \cdot dim)` per
      step on top of the HVP).
    unroll: if True, a straight-line Python loop instead of a ``lax.fori_loop``. Called
      outside ``jit`` this drives the loop from the host: one compiled update per step (the
      same program for every step) around ``hvp_fn``, which may itself be a jitted function.

  Returns:
    ``(alphas, betas, basis)``: the diagonal ``(m,)`` and off-diagonal ``(m - 1,)`` of
    :math:`T_m` (float32, float64 where ``v0`` is), and the Lanczos vectors :math:`q_j` as a
    pytree shaped like ``v0`` whose leaves have an extra leading axis of size ``m``.

  References:
    Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators", J. Res. Nat. Bur. Standards, 1950.
    Golub & Van Loan, "Matrix Computations", 4th ed., 2013, section 10.1.
    Parlett, "The Symmetric Eigenvalue Problem", 1980 (reorthogonalisation).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> hvp_fn = lambda v: {"w": jnp.array([3.0, 2.0, 1.0]) * v["w"]}
    >>> alphas, betas, basis = hessian.lanczos(hvp_fn, {"w": jnp.ones(3)}, 3)
    >>> T = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    >>> [round(float(x), 3) for x in jnp.linalg.eigvalsh(T)]
    [1.0, 2.0, 3.0]
    >>> basis["w"].shape
    (3, 3)
  """
  check_nonempty("v0", v0, "xsam_jax.hessian.lanczos")
  dim = _dimension(v0)
  _check_int("num_iters", num_iters, 1, dim)
  q0, _ = normalize(v0, eps)
  dtype = scalar_dtype(q0)
  basis = jax.tree.map(lambda x: jnp.zeros((num_iters, *x.shape), x.dtype), q0)
  carry = (
    jnp.zeros((num_iters,), dtype),
    jnp.zeros((num_iters,), dtype),
    basis,
    q0,
    optax.tree.zeros_like(q0),
    jnp.zeros((), dtype),
    jnp.zeros((), dtype),
  )
  step = functools.partial(_lanczos_step, hvp_fn, eps=eps, reorth=reorthogonalize)
  if unroll:
    for j in range(num_iters):
      carry = step(j, carry)
  else:
    carry = jax.lax.fori_loop(0, num_iters, step, carry)
  alphas, betas, basis = carry[:3]
  return alphas, betas[:-1], basis


def _top_k_lanczos(
  hvp_fn: HVPFn, v0: PyTree, k: int, num_iters: int, eps: float, unroll: bool
) -> tuple[Array, PyTree]:
  alphas, betas, basis = lanczos(hvp_fn, v0, num_iters, eps=eps, unroll=unroll)
  return _top_ritz_pairs(alphas, betas, basis, eps, k=k)


@functools.partial(jax.jit, static_argnames=("k",))  # one program when run eagerly
def _top_ritz_pairs(
  alphas: Array, betas: Array, basis: PyTree, eps: float, *, k: int
) -> tuple[Array, PyTree]:
  """The ``k`` largest Ritz values of ``T`` and their unit Ritz vectors ``Q s_i``."""
  ritz_vals, ritz_coeffs = jnp.linalg.eigh(_tridiagonal(alphas, betas))  # ascending
  eigvals = ritz_vals[::-1][:k]
  coeffs = ritz_coeffs[:, ::-1][:, :k].T  # (k, m)
  eigvecs = _normalize_rows(_basis_combine(basis, coeffs), eps)
  return eigvals, eigvecs


def _top_k_power(
  hvp_fn: HVPFn, v0: PyTree, k: int, num_iters: int, eps: float, unroll: bool
) -> tuple[Array, PyTree]:
  v0, _ = normalize(v0, eps)
  vals, vecs = [], []
  for i in range(k):
    if i == 0:
      op, start = hvp_fn, v0
    else:
      found_vals = jnp.stack(vals)
      found = jax.tree.map(lambda *xs: jnp.stack(xs), *vecs)

      def op(v, found_vals=found_vals, found=found):
        hv = tree_cast_like(tree_to_f32(hvp_fn(v)), v)
        coeffs = found_vals * _basis_coeffs(found, v)
        return optax.tree.sub(hv, tree_cast_like(_basis_combine(found, coeffs), v))

      rest = _orthogonalize(v0, found)
      start = jax.lax.cond(
        tree_norm(rest) <= _RESTART_RTOL,
        lambda found=found, i=i: _fresh_direction(v0, found, i, eps),
        lambda rest=rest: _normalize_like(rest, v0, eps),
      )
    val, vec = power_iteration(op, start, num_iters, eps=eps, unroll=unroll)
    vals.append(val)
    vecs.append(vec)
  eigvals = jnp.stack(vals)
  order = jnp.argsort(-eigvals)
  eigvecs = jax.tree.map(lambda *xs: jnp.stack(xs)[order], *vecs)
  return eigvals[order], eigvecs


def top_k_eigenpairs(
  hvp_fn: HVPFn,
  v0: PyTree,
  k: int,
  *,
  num_iters: int | None = None,
  solver: str = "lanczos",
  eps: float = DEFAULT_EPS,
  unroll: bool = False,
  method: str | None = None,
) -> tuple[Array, PyTree]:
  r"""The ``k`` top eigenpairs of a symmetric operator, by Lanczos or deflated power iteration.

  ``solver="lanczos"`` (default) runs :func:`lanczos` for :math:`m` steps, diagonalises
  :math:`T_m = S \Theta S^\top` and returns the ``k`` largest Ritz pairs

  .. math:: \lambda_i \approx \theta_i,\qquad u_i \approx Q_m s_i .

  Here "top" means the **largest algebraic** eigenvalues :math:`\lambda_1 \ge \lambda_2 \ge
  \dots`; by interlacing, :math:`\theta_i \le \lambda_i`, with fast convergence at a gap.

  ``solver="power"`` runs :func:`power_iteration` ``k`` times (``num_iters`` HVPs each) on the
  deflated operators

  .. math:: H_i = H - \sum_{l < i} \lambda_l\, u_l u_l^\top ,

  each started from ``v0`` orthogonalised against :math:`u_{<i}`. Power iteration finds the
  eigenvalue of largest **magnitude**, so this returns the ``k`` largest-:math:`|\lambda|`
  pairs (signed); they equal the Lanczos answer when those are the ``k`` largest algebraic
  ones (e.g. a positive semi-definite :math:`H`). Errors of early pairs propagate to later
  ones, and convergence depends on the ratios :math:`|\lambda_{i+1} / \lambda_i|`.

  Either way the result is sorted by algebraic value, descending. Eigenvector signs are
  arbitrary.

  Args:
    hvp_fn: ``v -> H v`` on pytrees shaped like ``v0``.
    v0: starting vector (need not be normalised; must not be zero). For a masked operator
      (:func:`masked_hvp`), mask it too so no null-space component enters.
    k: number of eigenpairs, a Python int in ``[1, dim]`` where ``dim`` is the number of
      scalars in ``v0``.
    num_iters: Lanczos steps (default ``max(2k, 20)``; capped at ``dim``; must be >= ``k``),
      or HVPs per eigenpair for ``"power"`` (default 100).
    solver: ``"lanczos"`` or ``"power"``.
    eps: added to every norm before division.
    unroll: Python loops instead of ``lax.fori_loop`` (default False; True is the fast choice
      on XLA:CPU, see :func:`power_iteration`).
    method: deprecated alias of ``solver`` (one release; warns).

  Returns:
    ``(eigvals, eigvecs)``: eigenvalues of shape ``(k,)`` sorted descending (float32, float64
    where ``v0`` is) and unit eigenvectors as a pytree shaped like ``v0`` whose leaves have an
    extra leading axis of size ``k`` (``eigvecs[i]`` goes with ``eigvals[i]``).

  Raises:
    ValueError: if ``k`` or ``num_iters`` is out of range, ``solver`` is unknown, or
      ``method`` is given with a non-default ``solver``.

  References:
    Lanczos, J. Res. Nat. Bur. Standards, 1950. Golub & Van Loan, "Matrix Computations",
    4th ed., 2013, sections 8.2 and 10.1 (power method, deflation, Lanczos).
    Yao, Gholami, Keutzer & Mahoney, "PyHessian: Neural Networks Through the Lens of the
    Hessian", 2020, arXiv:1912.07145 (top-k eigenvalues of network Hessians).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> hvp_fn = lambda v: {"w": jnp.array([4.0, 3.0, 2.0, 1.0]) * v["w"]}
    >>> vals, vecs = hessian.top_k_eigenpairs(hvp_fn, {"w": jnp.ones(4)}, 2)
    >>> [round(float(x), 3) for x in vals], vecs["w"].shape
    ([4.0, 3.0], (2, 4))
  """
  check_nonempty("v0", v0, "xsam_jax.hessian.top_k_eigenpairs")
  dim = _dimension(v0)
  _check_int("k", k, 1, dim)
  solver = resolve_alias(
    "xsam_jax.hessian.top_k_eigenpairs", "solver", solver, "lanczos", "method", method
  )
  _check_solver(solver)
  if solver == "lanczos":
    if num_iters is None:
      num_iters = min(dim, max(2 * k, 20))
    _check_int("num_iters", num_iters, k)
    num_iters = min(num_iters, dim)
    return _top_k_lanczos(hvp_fn, v0, k, num_iters, eps, unroll)
  if num_iters is None:
    num_iters = 100
  _check_int("num_iters", num_iters)
  return _top_k_power(hvp_fn, v0, k, num_iters, eps, unroll)


def top_eigenvalue(
  grad_fn: Callable[[PyTree], PyTree],
  params: PyTree,
  key: Array,
  *,
  num_iters: int = 20,
  solver: str = "lanczos",
  eps: float = DEFAULT_EPS,
  axis_name: str | None = None,
  unroll: bool = False,
  hvp_method: str = "exact",
  method: str | None = None,
) -> Array:
  r"""The largest Hessian eigenvalue :math:`\lambda_{\max}(\nabla^2 L(w))` from a random start.

  .. math:: \lambda_{\max} = \max_{\|u\| = 1} u^\top \nabla^2 L(w)\, u

  A one-call independent estimate for analysis: builds the HVP with :func:`hvp`, draws a
  Gaussian start from ``key`` and runs :func:`top_k_eigenpairs` with ``k=1`` (``"lanczos"``,
  the largest algebraic eigenvalue; ``num_iters`` capped at the dimension) or
  :func:`power_iteration` (``"power"``, the eigenvalue of largest magnitude, signed).

  Args:
    grad_fn: ``params -> grads`` of the loss.
    params: the point :math:`w`.
    key: PRNG key for the start vector.
    num_iters: Lanczos steps or power iterations (= HVPs).
    solver: ``"lanczos"`` or ``"power"``.
    eps: added to every norm before division.
    axis_name: forwarded to :func:`hvp` (data-parallel mean over devices).
    unroll: Python loops instead of ``lax.fori_loop`` (default False; True is the fast choice
      on XLA:CPU).
    hvp_method: ``"exact"`` or ``"forward_difference"`` (one gradient per HVP plus one shared
      base gradient; see :func:`hvp`).
    method: deprecated alias of ``solver`` (one release; warns).

  Returns:
    A float32 scalar.

  References:
    Lanczos, 1950; Golub & Van Loan, "Matrix Computations", 4th ed., 2013.
    Yao et al., "PyHessian", 2020, arXiv:1912.07145.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([5.0, 1.0, 0.5]) * w["w"] ** 2)
    >>> lam = hessian.top_eigenvalue(jax.grad(loss), {"w": jnp.ones(3)}, jax.random.key(0))
    >>> round(float(lam), 3)
    5.0
  """
  check_nonempty("params", params, "xsam_jax.hessian.top_eigenvalue")
  solver = resolve_alias(
    "xsam_jax.hessian.top_eigenvalue", "solver", solver, "lanczos", "method", method
  )
  _check_solver(solver)
  _check_int("num_iters", num_iters)
  hvp_fn = make_hvp_fn(grad_fn, params, hvp_method=hvp_method, axis_name=axis_name, eps=eps)
  v0 = optax.tree.random_like(key, params, jax.random.normal, dtype=jnp.float32)
  if solver == "power":
    eigval, _ = power_iteration(hvp_fn, v0, num_iters, eps=eps, unroll=unroll)
    return eigval
  num_iters = min(num_iters, _dimension(params))
  eigvals, _ = top_k_eigenpairs(hvp_fn, v0, 1, num_iters=num_iters, eps=eps, unroll=unroll)
  return eigvals[0]


# --------------------------------------------------------------------------------------------
# Trace and spectral density.


def hutchinson_trace(
  hvp_fn: HVPFn,
  like: PyTree,
  key: Array,
  num_samples: int = 16,
  *,
  unroll: bool = False,
) -> tuple[Array, Array]:
  r"""Hutchinson's stochastic estimate of :math:`\operatorname{tr}(H)` with Rademacher probes.

  .. math::
     \widehat{\operatorname{tr}}(H) = \frac{1}{N}\sum_{s=1}^N z_s^\top H z_s,\qquad
     z_s \in \{-1, +1\}^d \text{ i.i.d.},\qquad
     \operatorname{Var}(z^\top H z) = 2 \sum_{i \ne j} H_{ij}^2 .

  Unbiased; exact for a diagonal :math:`H`. The standard error is the sample standard
  deviation over :math:`\sqrt{N}`.

  Args:
    hvp_fn: ``v -> H v`` on pytrees shaped like ``like``.
    like: a pytree of arrays giving the shapes (e.g. the params).
    key: PRNG key; sample ``s`` uses ``jax.random.split(key, num_samples)[s]`` (the same probes
      as :func:`slq_nodes_and_weights` with the same key).
    num_samples: number of probes :math:`N` (= HVPs), a Python int >= 1.
    unroll: a Python loop over probes instead of ``lax.map`` (default False; True is the fast
      choice on XLA:CPU).

  Returns:
    ``(estimate, stderr)``: float32 scalars; ``stderr`` is ``inf`` when ``num_samples == 1``.

  References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", Communications in Statistics - Simulation and Computation, 1989.
    Yao et al., "PyHessian", 2020, arXiv:1912.07145.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> hvp_fn = lambda v: {"w": jnp.array([3.0, 2.0, 1.0]) * v["w"]}
    >>> est, err = hessian.hutchinson_trace(hvp_fn, {"w": jnp.ones(3)}, jax.random.key(0), 8)
    >>> round(float(est), 3), round(float(err), 3)
    (6.0, 0.0)
  """
  check_nonempty("like", like, "xsam_jax.hessian.hutchinson_trace")
  _check_int("num_samples", num_samples)

  def sample(k: Array) -> Array:
    z = _rademacher_like(k, like)
    return tree_vdot(z, hvp_fn(z)).astype(jnp.float32)

  samples = _map_samples(sample, jax.random.split(key, num_samples), unroll)
  mean = jnp.mean(samples)
  if num_samples == 1:
    return mean, jnp.full((), jnp.inf, jnp.float32)
  var = jnp.sum(jnp.square(samples - mean)) / (num_samples - 1)
  return mean, jnp.sqrt(var / num_samples)


def slq_nodes_and_weights(
  hvp_fn: HVPFn,
  like: PyTree,
  key: Array,
  *,
  num_iters: int = 30,
  num_samples: int = 4,
  mask: PyTree | None = None,
  eps: float = DEFAULT_EPS,
  unroll: bool = False,
) -> tuple[Array, Array]:
  r"""Stochastic Lanczos quadrature: Gauss nodes and weights of the spectral measure.

  For each normalised Rademacher probe :math:`q_s = z_s / \sqrt{d}`, ``m`` Lanczos steps give
  :math:`T_m^{(s)} = S^{(s)} \Theta^{(s)} S^{(s)\top}`; nodes :math:`\theta^{(s)}_j` and
  weights :math:`\omega^{(s)}_j = (S^{(s)}_{0j})^2` (summing to 1) define the Gauss quadrature

  .. math::
     q_s^\top f(H)\, q_s \approx \sum_{j} \omega^{(s)}_j f(\theta^{(s)}_j),\qquad
     \frac{1}{d}\operatorname{tr} f(H) \approx \frac{1}{N}\sum_s \sum_j
     \omega^{(s)}_j f(\theta^{(s)}_j),

  exact for polynomials of degree :math:`\le 2m - 1`. In particular
  :math:`d \sum_j \omega_j^{(s)} \theta_j^{(s)} = z_s^\top H z_s`, the Hutchinson sample.
  Nodes of blocks split off by a Lanczos breakdown get weight 0.

  With ``mask`` (a parameter subset :math:`S`, e.g. one layer) both the probes and the HVP are
  masked (:func:`masked_hvp`), so the measure is that of the sub-block :math:`H_{SS}` with
  :math:`d = |S|`.

  Args:
    hvp_fn: ``v -> H v`` on pytrees shaped like ``like``.
    like: a pytree of arrays giving the shapes (e.g. the params).
    key: PRNG key; sample ``s`` uses ``jax.random.split(key, num_samples)[s]``.
    num_iters: Lanczos steps per probe (capped at the dimension ``d``).
    num_samples: number of probes :math:`N`.
    mask: optional leaf-level mask shaped like ``like`` (see :func:`apply_mask`).
    eps: added to every norm before division.
    unroll: Python loops instead of ``lax.map``/``lax.fori_loop`` (default False; True is the
      fast choice on XLA:CPU).

  Returns:
    ``(nodes, weights)``, float32 arrays of shape ``(num_samples, min(num_iters, d))``.

  References:
    Golub & Meurant, "Matrices, Moments and Quadrature with Applications", 2010.
    Ghorbani, Krishnan & Xiao, "An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density", ICML 2019, arXiv:1901.10159.
    Yao et al., "PyHessian", 2020, arXiv:1912.07145.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> hvp_fn = lambda v: {"w": jnp.array([3.0, 2.0, 1.0]) * v["w"]}
    >>> nodes, weights = hessian.slq_nodes_and_weights(
    ...   hvp_fn, {"w": jnp.ones(3)}, jax.random.key(0), num_iters=3, num_samples=2)
    >>> nodes.shape, [round(float(s), 3) for s in weights.sum(axis=1)]
    ((2, 3), [1.0, 1.0])
  """
  check_nonempty("like", like, "xsam_jax.hessian.slq_nodes_and_weights")
  _check_int("num_iters", num_iters)
  _check_int("num_samples", num_samples)
  num_iters = min(num_iters, _dimension(like))
  if mask is not None:
    hvp_fn = masked_hvp(hvp_fn, mask)

  def sample(k: Array) -> tuple[Array, Array]:
    z = _rademacher_like(k, like)
    if mask is not None:
      z = apply_mask(z, mask)
    alphas, betas, _ = lanczos(hvp_fn, z, num_iters, eps=eps, unroll=unroll)
    theta, s = jnp.linalg.eigh(_tridiagonal(alphas, betas))
    return theta.astype(jnp.float32), jnp.square(s[0]).astype(jnp.float32)

  return _map_samples(sample, jax.random.split(key, num_samples), unroll)


def spectral_density(
  hvp_fn: HVPFn,
  like: PyTree,
  key: Array,
  *,
  num_iters: int = 30,
  num_samples: int = 4,
  grid: Array | Sequence[float] | None = None,
  num_points: int = 512,
  sigma: float | None = None,
  mask: PyTree | None = None,
  eps: float = DEFAULT_EPS,
  unroll: bool = False,
) -> tuple[Array, Array]:
  r"""Smoothed Hessian eigenvalue density by stochastic Lanczos quadrature.

  .. math::
     \rho_\sigma(t) = \frac{1}{N}\sum_{s=1}^{N}\sum_{j=1}^{m} \omega^{(s)}_j\,
     \frac{1}{\sigma\sqrt{2\pi}}\exp\!\Big(-\frac{(t - \theta^{(s)}_j)^2}{2\sigma^2}\Big)
     \;\approx\; \frac{1}{d}\sum_{i=1}^{d} \mathcal{N}(t;\, \lambda_i, \sigma^2),

  with nodes and weights from :func:`slq_nodes_and_weights`. :math:`\rho_\sigma` integrates to
  1 over a grid that covers the nodes by a few :math:`\sigma`, and
  :math:`\int t\,\rho_\sigma(t)\,dt` estimates :math:`\operatorname{tr}(H)/d`.

  Args:
    hvp_fn: ``v -> H v`` on pytrees shaped like ``like``.
    like: a pytree of arrays giving the shapes (e.g. the params).
    key: PRNG key for the probes.
    num_iters: Lanczos steps per probe (capped at the dimension).
    num_samples: number of probes.
    grid: 1-D points at which to evaluate the density. Default: ``num_points`` evenly spaced
      points from ``min(nodes) - 5 sigma`` to ``max(nodes) + 5 sigma``.
    num_points: size of the default grid (ignored when ``grid`` is given).
    sigma: Gaussian broadening (> 0). Default: 1% of the node range (at least ``1e-6``).
    mask: optional parameter subset: the density of the sub-block :math:`H_{SS}` (see
      :func:`slq_nodes_and_weights`).
    eps: added to every norm before division.
    unroll: Python loops instead of ``lax.map``/``lax.fori_loop`` (default False; True is the
      fast choice on XLA:CPU).

  Returns:
    ``(grid, density)``: two float32 arrays of the grid's shape.

  References:
    Ghorbani, Krishnan & Xiao, "An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density", ICML 2019, arXiv:1901.10159.
    Lin, Saad & Yang, "Approximating spectral densities of large matrices", SIAM Review, 2016.
    Yao et al., "PyHessian", 2020, arXiv:1912.07145.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> hvp_fn = lambda v: {"w": jnp.array([3.0, 2.0, 1.0, 0.0]) * v["w"]}
    >>> grid, density = hessian.spectral_density(
    ...   hvp_fn, {"w": jnp.ones(4)}, jax.random.key(0), num_iters=4, num_points=256)
    >>> round(float(jnp.trapezoid(density, grid)), 3)
    1.0
  """
  check_nonempty("like", like, "xsam_jax.hessian.spectral_density")
  _check_int("num_points", num_points, 2)
  if sigma is not None:
    _check_positive("sigma", sigma)
  nodes, weights = slq_nodes_and_weights(
    hvp_fn,
    like,
    key,
    num_iters=num_iters,
    num_samples=num_samples,
    mask=mask,
    eps=eps,
    unroll=unroll,
  )
  lo, hi = jnp.min(nodes), jnp.max(nodes)
  if sigma is None:
    sigma = jnp.maximum(0.01 * (hi - lo), 1e-6)
  sigma = jnp.asarray(sigma, jnp.float32)
  if grid is None:
    grid = jnp.linspace(lo - 5.0 * sigma, hi + 5.0 * sigma, num_points)
  grid = jnp.asarray(grid, jnp.float32)
  z = (grid[..., None, None] - nodes) / (sigma + eps)
  kernel = jnp.exp(-0.5 * jnp.square(z)) / (sigma * jnp.sqrt(2.0 * jnp.pi) + eps)
  density = jnp.sum(weights * kernel, axis=(-2, -1)) / num_samples
  return grid, density


# --------------------------------------------------------------------------------------------
# Parameter subsets.


def apply_mask(tree: PyTree, mask: PyTree) -> PyTree:
  r"""The coordinate projection :math:`P v`: zeroes the entries of ``tree`` where ``mask`` is off.

  .. math:: (P v)_i = m_i\, v_i,\qquad m_i \in \{0, 1\}

  Args:
    tree: a pytree of arrays.
    mask: a pytree with the structure of ``tree`` whose leaves are bools or 0/1 values, either
      one per leaf (the whole leaf in or out) or arrays broadcastable to the leaf.

  Returns:
    ``tree`` with the masked-out entries set to zero (dtypes kept).

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> hessian.apply_mask({"a": jnp.ones(2), "b": jnp.ones(1)}, {"a": True, "b": False})
    {'a': Array([1., 1.], dtype=float32), 'b': Array([0.], dtype=float32)}
  """
  return jax.tree.map(
    lambda m, x: jnp.where(jnp.asarray(m).astype(bool), x, jnp.zeros((), x.dtype)), mask, tree
  )


def masked_hvp(hvp_fn: HVPFn, mask: PyTree) -> HVPFn:
  r"""The HVP of the Hessian restricted to a parameter subset: :math:`v \mapsto P H P v`.

  .. math:: P H P = \begin{pmatrix} H_{SS} & 0 \\ 0 & 0 \end{pmatrix}
     \quad\text{(coordinates reordered so the subset } S \text{ comes first)}

  where :math:`P` is the coordinate projector of ``mask`` (:func:`apply_mask`). Every routine
  of this module then analyses the sub-block :math:`H_{SS}` (e.g. one layer's curvature),
  padded with zero eigenvalues on the other coordinates; start them from a masked vector
  (``apply_mask(v0, mask)``) so those zeros stay out of the Krylov space. Each call still
  costs one full HVP.

  Args:
    hvp_fn: ``v -> H v`` on pytrees shaped like the params.
    mask: a pytree shaped like the params with bool or 0/1 leaves (per leaf or per entry);
      True selects, e.g. one value of :func:`layer_masks`.

  Returns:
    ``v -> P H P v``, same input and output shapes as ``hvp_fn``.

  References:
    Yao et al., "PyHessian", 2020, arXiv:1912.07145 (layer-wise Hessian spectra).

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> H = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    >>> hvp_fn = lambda v: {"a": H[0, 0] * v["a"] + H[0, 1] * v["b"],
    ...                     "b": H[1, 0] * v["a"] + H[1, 1] * v["b"]}
    >>> sub = hessian.masked_hvp(hvp_fn, {"a": False, "b": True})
    >>> sub({"a": jnp.float32(1.0), "b": jnp.float32(1.0)})
    {'a': Array(0., dtype=float32), 'b': Array(3., dtype=float32)}
  """
  return lambda v: apply_mask(hvp_fn(apply_mask(v, mask)), mask)


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _group_path(path: tuple) -> tuple:
  """A leaf's module: its path minus the last key (minus a trailing ``.value`` first)."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]  # flax.nnx Variables
  return path[:-1] if len(path) > 1 else path


def layer_masks(params: PyTree) -> dict[str, PyTree]:
  r"""One leaf-level mask per module, for per-layer Hessian analysis with :func:`masked_hvp`.

  Leaves are grouped by their key path minus the last key, so
  ``{"params": {"Dense_0": {"kernel", "bias"}}}`` gives the group ``"params/Dense_0"``
  (a trailing ``.value`` of ``flax.nnx`` variables is dropped first). A leaf directly at the
  root is its own group. The masks partition the parameters:

  .. math:: \sum_{g} P_g = I,\qquad P_g P_{g'} = 0 \;(g \ne g').

  Args:
    params: the parameter pytree (Linen ``params`` dict, ``nnx.State``, nested dicts, ...).

  Returns:
    ``{name: mask}`` in the order of first appearance, names joined with ``"/"``; each mask has
    the structure of ``params`` and a Python bool per leaf.

  References:
    Yao et al., "PyHessian", 2020, arXiv:1912.07145 (layer-wise Hessian spectra).

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax import hessian
    >>> params = {"Dense_0": {"bias": jnp.zeros(2), "kernel": jnp.zeros((3, 2))},
    ...           "Dense_1": {"bias": jnp.zeros(1), "kernel": jnp.zeros((2, 1))}}
    >>> masks = hessian.layer_masks(params)
    >>> list(masks), masks["Dense_1"]["Dense_0"]["kernel"], masks["Dense_1"]["Dense_1"]["bias"]
    (['Dense_0', 'Dense_1'], False, True)
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = ["/".join(_key_name(e) for e in _group_path(path)) for path, _ in leaves]
  return {
    group: jax.tree_util.tree_unflatten(treedef, [name == group for name in names])
    for group in dict.fromkeys(names)
  }
