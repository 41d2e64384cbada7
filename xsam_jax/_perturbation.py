"""Shared pieces of every sharpness method: float32 reductions, normalisation, the ascent
point, projections onto an eigenvector, hyperparameter reading and argument checks.

Each concept lives here exactly once; ``_sam.py``, ``_eigen_sam.py``, ``_xsam.py`` and
``hessian.py`` compose them.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_jax._parallel import check_unreduced, device_mean, to_varying

Array = jax.Array
PyTree = Any
ScalarOrSchedule = float | Array | Callable[[Array], Array]

DEFAULT_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# Reductions, always accumulated in float32 (bf16 params included).


def tree_to_f32(tree: PyTree) -> PyTree:
  """Casts every leaf to at least float32 (float64 stays float64)."""
  return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)


def tree_vdot(a: PyTree, b: PyTree) -> Array:
  """Global inner product ``<a, b>`` over all leaves, accumulated in float32."""
  return optax.tree.vdot(tree_to_f32(a), tree_to_f32(b))


def tree_norm(a: PyTree) -> Array:
  """Global L2 norm over all leaves, accumulated in float32."""
  return optax.tree.norm(tree_to_f32(a))


def tree_cast_like(tree: PyTree, like: PyTree) -> PyTree:
  """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def normalize(tree: PyTree, eps: float = DEFAULT_EPS) -> tuple[PyTree, Array]:
  """Returns ``(tree / (||tree|| + eps), ||tree||)`` in float32; zero stays zero, never NaN."""
  tree = tree_to_f32(tree)
  norm = optax.tree.norm(tree)
  return optax.tree.scale(1.0 / (norm + eps), tree), norm


def unit_or_keep(new: PyTree, old: PyTree, eps: float = DEFAULT_EPS) -> PyTree:
  """``new / ||new||`` (exactly unit length), or ``old`` unchanged unless ``eps < ||new|| < inf``.

  Used for the refreshed eigenvector: dividing by ``||new|| + eps`` would leave it slightly
  shorter than 1 whenever ``||Hv||`` is small, and every later projection would be too weak.
  A ``new`` with a NaN or infinite entry (a non-finite norm) also keeps ``old``, so one
  non-finite Hessian-vector product never turns the cached vector into NaN. The result has the
  dtypes of ``old``.
  """
  new = tree_to_f32(new)
  norm = optax.tree.norm(new)
  keep = ~(jnp.isfinite(norm) & (norm > eps))
  safe = jnp.where(keep, jnp.ones_like(norm), norm)
  return jax.tree.map(
    lambda n, o: jnp.where(keep, o, (n / safe).astype(o.dtype)).astype(o.dtype), new, old
  )


def tree_all_finite(tree: PyTree) -> Array:
  """A bool scalar: every entry of every leaf is finite (True for an empty tree)."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)], bool))


def check_nonempty(name: str, tree: PyTree, where: str) -> None:
  """Raises ``ValueError`` naming ``name`` when ``tree`` holds no entries at all.

  An empty pytree (``{}``, ``[]``, ``None``) or one whose leaves all have size 0 has no
  Hessian, no eigenvector and no norm to divide by. A zero-size leaf next to non-empty ones is
  fine (it contributes nothing).
  """
  if sum(int(jnp.size(x)) for x in jax.tree.leaves(tree)) == 0:
    raise ValueError(
      f"{where}: `{name}` holds no entries (an empty pytree, or only zero-size leaves: "
      f"{jax.tree.map(jnp.shape, tree)!r}). Pass the parameters to optimise or analyse: a "
      "pytree with at least one non-empty array (e.g. model.init(...)['params'])."
    )


def scalar_dtype(tree: PyTree) -> jnp.dtype:
  """The dtype of reductions over ``tree``: float32, or float64 if a leaf is float64 (x64)."""
  return jnp.result_type(jnp.float32, *(jnp.result_type(x) for x in jax.tree.leaves(tree)))


def keep_dtypes(new: PyTree, old: PyTree) -> PyTree:
  """Casts every leaf of ``new`` to the dtype of the matching leaf of ``old``.

  Transforms pass their new state through it so that shapes and dtypes never change across
  ``update`` (float16 to float64 params alike), and the state can be carried by ``lax.cond``,
  ``lax.scan`` and ``while_loop``.
  """
  return jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.result_type(o)), new, old)


# --------------------------------------------------------------------------------------------
# Geometry of one step.


def ascent_point(params: PyTree, perturbation: PyTree) -> PyTree:
  """``w + epsilon``, computed in float32 and cast back to the dtype of each parameter."""
  return jax.tree.map(
    lambda w, e: (w.astype(jnp.promote_types(w.dtype, jnp.float32)) + e).astype(w.dtype),
    params,
    perturbation,
  )


def ascent_curvature(
  grads: PyTree, adv_grads: PyTree, perturbation: PyTree, eps: float = DEFAULT_EPS
) -> Array:
  r"""Curvature along the ascent step from SAM's two gradients, at no extra cost.

  .. math::
     \kappa = \frac{\langle \epsilon,\, g_{adv} - g\rangle}{(\|\epsilon\| + \mathrm{eps})^2}
     \approx \hat\epsilon^\top H \hat\epsilon ,\qquad
     \hat\epsilon = \epsilon / \|\epsilon\|,

  since :math:`g_{adv} - g = H\epsilon + O(\|\epsilon\|^2)`; the error is
  :math:`\tfrac12\langle\hat\epsilon, \nabla^3 L[\hat\epsilon,\hat\epsilon]\rangle
  \|\epsilon\| + O(\|\epsilon\|^2)` (zero for a quadratic). For SAM,
  :math:`\epsilon = \rho\hat g` and :math:`\kappa \approx \hat g^\top H \hat g =
  \langle \hat g, g_{adv} - g\rangle/\rho`. ``rho = 0`` (:math:`\epsilon = 0`) gives 0,
  never NaN. Float32 (float64 for float64 inputs); the difference is taken per entry before the
  inner product, so the cancellation in :math:`g_{adv} - g` costs
  :math:`\approx u\|g\|/\|\epsilon\|` absolute.
  """
  e = tree_to_f32(perturbation)
  diff = jax.tree.map(lambda a, b: a - b.astype(a.dtype), tree_to_f32(adv_grads), grads)
  return optax.tree.vdot(e, tree_to_f32(diff)) / jnp.square(optax.tree.norm(e) + eps)


def perturbed_gradient(
  grad_fn: Callable[[PyTree], PyTree],
  params: PyTree,
  perturbation: PyTree,
  axis_name: str | None,
  grads: PyTree,
  eps: float = DEFAULT_EPS,
) -> tuple[PyTree, Array]:
  """``grad_fn(w + epsilon)`` and :func:`ascent_curvature`, device-averaged over ``axis_name``.

  ``grads`` is the clean gradient (with ``axis_name``, the device's own). Inside
  ``shard_map(check_vma=True)`` the point is marked device-varying first, so that ``grad_fn``
  returns the device's own gradient rather than the sum over devices; the curvature is computed
  from the device's own three vectors and then averaged, like the gradient (one ``pmean``).
  Returns ``(g_adv, curvature)``.
  """
  point = ascent_point(to_varying(params, axis_name), perturbation)
  adv = grad_fn(point)
  check_unreduced(adv, axis_name)
  curvature = ascent_curvature(grads, adv, perturbation, eps)
  return device_mean((adv, curvature), axis_name)


def project_out(tree: PyTree, direction: PyTree, alpha: Array | float) -> tuple[PyTree, Array]:
  """Removes ``alpha`` times the component of ``tree`` along the unit vector ``direction``.

  Returns ``(tree - alpha * <tree, d> d, <tree, d>)``, both in float32. The result is
  invariant under ``d -> -d``.
  """
  coef = tree_vdot(tree, direction)
  return optax.tree.add_scale(tree_to_f32(tree), -alpha * coef, tree_to_f32(direction)), coef


# --------------------------------------------------------------------------------------------
# Hyperparameters and checks.


def read_hyperparam(value: ScalarOrSchedule, count: Array, dtype: jnp.dtype = jnp.float32) -> Array:
  """Value of a float-or-schedule hyperparameter at step ``count``, as a ``dtype`` scalar.

  Transforms pass :func:`scalar_dtype` of the params: float32, or float64 for float64 params.
  """
  if callable(value):
    value = value(count)
  return jnp.asarray(value).astype(dtype)


def _concrete_float(value: Any) -> float | None:
  """The Python float behind ``value``, or None for schedules and traced arrays."""
  if callable(value):
    return None
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def check_range(
  name: str, value: Any, low: float, high: float = float("inf"), hint: str = ""
) -> None:
  """Raises ``ValueError`` if a concrete ``value`` lies outside ``[low, high]``.

  Schedules and traced values (e.g. under ``optax.inject_hyperparams``) are not checked here.
  """
  x = _concrete_float(value)
  if x is None:
    return
  if not (low <= x <= high):  # also catches NaN
    bounds = f"[{low}, {high}]" if high != float("inf") else f">= {low}"
    raise ValueError(f"`{name}` must be {bounds}, got {value!r}.{(' ' + hint) if hint else ''}")


def check_positive_int(name: str, value: Any, *, traced_ok: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is a Python int >= 1.

  With ``traced_ok`` an array (e.g. injected by ``optax.inject_hyperparams``) is accepted
  unchecked, for arguments that only enter traced arithmetic.
  """
  if traced_ok and isinstance(value, jax.Array):
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(
      f"`{name}` must be a Python int >= 1, got {value!r}. It fixes the compiled program's "
      f"structure; with optax.inject_hyperparams pass static_args=('{name}',)."
    )


# Old argument names kept for one release: old -> new. One vocabulary across the library:
# ``solver`` (eigen-solver choice), ``num_iters`` (HVPs / iterations), ``key`` (randomness).
DEPRECATED_ALIASES = {
  "tracker": "solver",
  "method": "solver",
  "power_iters": "num_iters",
  "seed": "key",
}


def resolve_alias(
  where: str, new_name: str, new_value: Any, default: Any, old_name: str, old_value: Any
) -> Any:
  """The value of a renamed argument, from its new name or its deprecated old one.

  ``old_value`` None means the old name was not used: ``new_value`` is returned. Otherwise a
  ``DeprecationWarning`` naming the new name is emitted and ``old_value`` is returned, unless
  the new name was also set to a value other than its ``default`` (then the two disagree or
  duplicate each other: ``ValueError``). A new value equal to its default cannot be told apart
  from "not passed" (``optax.inject_hyperparams`` passes every default), so it yields to the
  old name.

  Raises:
    ValueError: when both names are given (the new one at a non-default value).
  """
  if old_value is None:
    return new_value
  if not _same(new_value, default):
    raise ValueError(
      f"{where}: `{old_name}` is the deprecated name of `{new_name}`; pass only "
      f"`{new_name}=` (got {new_name}={new_value!r} and {old_name}={old_value!r})."
    )
  warnings.warn(
    f"{where}: `{old_name}=` is deprecated and will be removed in the next release; use "
    f"`{new_name}=` instead.",
    DeprecationWarning,
    stacklevel=3,
  )
  return old_value


def _same(value: Any, default: Any) -> bool:
  """``value`` is ``default`` (identity or equal Python scalars/strings; arrays never)."""
  if value is default:
    return True
  if isinstance(value, (bool, int, float, str)) and isinstance(default, (bool, int, float, str)):
    return type(value) is type(default) and value == default
  return False


def as_key(key: Any, where: str) -> Array:
  """A typed PRNG key from an int seed, an integer scalar array, a typed or a raw key.

  An int (or an integer scalar array, as ``optax.inject_hyperparams`` injects) is a seed for
  ``jax.random.key``; a raw ``uint32`` key (``jax.random.PRNGKey(0)``) is wrapped. Traced
  values are accepted (under ``jit``).

  Raises:
    ValueError: for a float (``optax.inject_hyperparams`` turns a float into a float
      hyperparameter) or any other value that is not a key or an integer seed.
  """
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  dtype = getattr(key, "dtype", None)
  if dtype is not None:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      return key
    shape = jnp.shape(key)
    if jnp.issubdtype(dtype, jnp.integer) and shape == ():
      return jax.random.key(key)
    if dtype == jnp.uint32 and len(shape) == 1:
      return jax.random.wrap_key_data(key)
  raise ValueError(
    f"{where}: `key` must be a PRNG key (jax.random.key(0)) or an int seed, got {key!r}. With "
    "optax.inject_hyperparams, a number becomes a float or integer hyperparameter: pass a "
    'Python int, or list it with static_args=("key", "refresh_every", "num_iters").'
  )


def check_grad_fn_signature(name: str, grad_fn: Callable, where: str) -> None:
  """Raises ``ValueError`` if ``grad_fn`` cannot be called with the parameters alone.

  Uses :func:`inspect.signature` (which sees through ``functools.partial``, ``functools.wraps``
  and ``jax.jit``); a callable whose signature cannot be read (some builtins) is accepted.
  """
  try:
    signature = inspect.signature(grad_fn)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(None)
  except TypeError:
    raise ValueError(
      f"{where}: `{name}` must be callable as `{name}(params) -> grads`, but its signature is "
      f"{signature}. optax.contrib.sam's `grad_fn(params, i)` takes a second argument: close "
      f"over the batch instead, e.g. `{name}=lambda p: jax.grad(loss)(p, batch)`."
    ) from None


def check_update_args(method: str, params: PyTree | None, grad_fn: Callable | None) -> None:
  """Raises a ``ValueError`` naming the fix when ``params`` or ``grad_fn`` is missing or when
  ``grad_fn`` cannot be called as ``grad_fn(params)``."""
  if params is None:
    raise ValueError(
      f"{method}: `params` is required. Call `tx.update(grads, state, params, "
      "grad_fn=...)`; nnx.Optimizer and xsam_jax.training.TrainState pass them for you "
      "(Flax's stock TrainState forwards no extra arguments)."
    )
  if grad_fn is None or not callable(grad_fn):
    raise ValueError(
      f"{method}: `grad_fn` is required as a keyword argument: a function `params -> grads` of "
      "the same minibatch loss, e.g. `grad_fn=lambda p: jax.grad(loss)(p, batch)`; with Flax "
      "use xsam_jax.training.linen_grad_fns or nnx_grad_fns to build it. "
      f"Got {grad_fn!r}."
    )
  check_grad_fn_signature("grad_fn", grad_fn, method)
