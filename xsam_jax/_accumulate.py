"""Gradient accumulation in one call: :func:`accumulate` builds the method-then-``MultiSteps``
chain from a single ``k``, and the methods refuse ``accumulation_steps > 1`` given any other way.

Why the methods cannot check the chain themselves: a transform sees only its own ``updates``,
state, ``params`` and extra arguments. ``optax.chain`` and ``optax.MultiSteps`` pass nothing
that tells what comes after the method or whether it runs inside ``MultiSteps`` (``MultiSteps``
forwards the caller's extra arguments unchanged and throws away the inner state on every
micro-step but the last, so a method inside it sees the same state ``k`` times and cannot tell
that from ``k`` fresh calls). So the one thing the library *can* see is how
``accumulation_steps`` was set: every wrong arrangement that sets it (without ``MultiSteps``,
or inside it) is refused with a ``ValueError`` naming :func:`accumulate`, and :func:`accumulate`
is the only place that sets it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax

from xsam_jax._perturbation import DEPRECATED_ALIASES

# Set while `accumulate` builds, initialises or updates its method: only then may a method
# receive `accumulation_steps > 1`.
_ACCUMULATING = contextvars.ContextVar("xsam_jax_accumulating", default=False)
# update function of a transform built by a method factory -> (factory, keyword arguments).
_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

RIGHT_CALL = (
  "xsam_jax.accumulate(xsam_jax.xsam(rho=...), optax.sgd(...), k) (likewise sam, eigen_sam; "
  "build the method without accumulation_steps)"
)


@contextlib.contextmanager
def _accumulating() -> Iterator[None]:
  token = _ACCUMULATING.set(True)
  try:
    yield
  finally:
    _ACCUMULATING.reset(token)


def check_accumulation_steps(value: Any) -> None:
  """Validates a method's ``accumulation_steps``.

  A Python int or a concrete integer array (``optax.inject_hyperparams`` injects one) must be
  >= 1; an abstract tracer (inside a jitted ``inject_hyperparams`` update) is accepted
  unchecked. A value > 1 is accepted only while :func:`accumulate` builds or runs the method.

  Raises:
    ValueError: for a value < 1, a non-integer, or a value > 1 set outside :func:`accumulate`.
  """
  if isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, (jax.Array, np.ndarray, np.integer)) and not isinstance(value, bool):
    concrete = np.asarray(value)
    ok = concrete.ndim == 0 and np.issubdtype(concrete.dtype, np.integer)
    steps = int(concrete) if ok else None
  else:
    ok = isinstance(value, int) and not isinstance(value, bool)
    steps = value if ok else None
  if not ok or steps < 1:
    raise ValueError(
      f"`accumulation_steps` must be an int >= 1, got {value!r}. Build accumulation with "
      f"{RIGHT_CALL}. Under optax.inject_hyperparams an int is injected as an integer array "
      "(accepted); for anything else list it in static_args=('accumulation_steps', ...)."
    )
  if steps > 1 and not _ACCUMULATING.get():
    raise ValueError(
      f"`accumulation_steps={steps}` must not be set by hand: the method is right only when "
      f"followed by optax.MultiSteps with the same k, and wrong (silently) without it or "
      f"inside it. Use {RIGHT_CALL}, which sets both from one k."
    )


def record_arguments(factory: Callable[..., Any]) -> Callable[..., Any]:
  """Decorates a method factory so that :func:`accumulate` can rebuild its transform with k."""

  signature = inspect.signature(factory)

  @functools.wraps(factory)
  def build(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    tx = factory(*args, **kwargs)
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    # Record deprecated names under their new ones, so a rebuild does not warn again (the
    # factory has refused both names together already).
    for old, new in DEPRECATED_ALIASES.items():
      if arguments.get(old) is not None and old in signature.parameters:
        arguments[new] = arguments.pop(old)
    _BUILT[tx.update] = (factory, arguments)
    return tx

  return build


def accumulate(
  method: optax.GradientTransformation | Callable[..., optax.GradientTransformation],
  base: optax.GradientTransformation,
  k: int,
  **multi_steps_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient accumulation over ``k`` micro-batches for a sharpness method, from one ``k``.

  Builds ``optax.chain(method(..., accumulation_steps=k),
  optax.MultiSteps(base, every_k_schedule=k).gradient_transformation())``. Call ``update`` once
  per micro-batch :math:`B_j` with its clean gradient and its ``grad_fn``; every micro-batch
  makes its own ascent (and X-SAM correction), and every ``k``-th call the base optimizer
  receives the mean of the ``k`` sharpness-aware gradients,

  .. math::
     \bar g = \frac1k \sum_{j=1}^{k} \tilde g_j(w), \qquad
     \tilde g_j = \nabla L_{B_j}(w + \epsilon_j) \ \text{(SAM)},

  while the parameters stay fixed in between (the returned updates are zero). The eigenvector
  of :func:`~xsam_jax.eigen_sam` / :func:`~xsam_jax.xsam` is refreshed on the first micro-batch
  of every ``refresh_every``-th *optimizer* step (never more than once per step), and
  ``rho``/``alpha`` schedules read the optimizer step.

  The arrangements that look alike but are wrong (max :math:`|w - w_{ref}|` after 3 optimizer
  steps of a tiny MLP with 3 different micro-batches, ``tests/test_gradient_accumulation.py``):

  * ``accumulation_steps=k`` set by hand, without ``MultiSteps`` or with the method inside it:
    refused with a ``ValueError`` naming this function.
  * ``optax.MultiSteps(optax.chain(method, base), k)`` (0.12-0.22: the method runs on the
    running mean of the clean gradients and only the last micro-batch's perturbed gradient is
    kept) and ``optax.chain(method, optax.MultiSteps(base, k).gradient_transformation())``
    without ``accumulation_steps`` (right for SAM; 1.2e-2 for Eigen-SAM and 5.9e-2 for X-SAM,
    whose refresh then counts micro-batches): not detectable, because a transform cannot see
    what surrounds it in the chain (``MultiSteps`` passes nothing that says so).

  Args:
    method: either a transform built by :func:`~xsam_jax.sam`, :func:`~xsam_jax.eigen_sam`,
      :func:`~xsam_jax.xsam`, :func:`~xsam_jax.sometimes_sam`, :func:`~xsam_jax.looksam` or
      :func:`~xsam_jax.esam`
      *without* ``accumulation_steps`` (it is rebuilt with
      ``accumulation_steps=k`` and the same other arguments), or a factory called as
      ``method(accumulation_steps=k)``, e.g.
      ``functools.partial(optax.inject_hyperparams(xsam_jax.xsam), rho=0.05)``.
    base: the optimizer that consumes the accumulated gradient (e.g. ``optax.sgd``).
    k: micro-batches per optimizer step, a Python int >= 1.
    **multi_steps_kwargs: passed on to ``optax.MultiSteps`` (e.g. ``should_skip_update_fn``);
      not ``every_k_schedule``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is the chain's
    ``(method_state, MultiStepsState)``; ``update(updates, state, params, *, grad_fn, ...)``
    takes the method's extra arguments. On the static refresh path pass
    ``refresh=xsam_jax.is_due(call, refresh_every, k)`` with ``call`` counting micro-batches.

  Raises:
    ValueError: for ``k`` not a Python int >= 1, ``every_k_schedule`` in
      ``multi_steps_kwargs``, a transform not built by a xsam_jax method (pass a factory), or a
      factory that does not take ``accumulation_steps``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss = lambda w, x: jnp.sum((w - x) ** 2)
    >>> tx = xsam_jax.accumulate(xsam_jax.xsam(rho=0.05, refresh_every=5),
    ...                          optax.sgd(0.1, momentum=0.9), k=2)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> for x in (1.0, 3.0):  # two micro-batches, one optimizer step
    ...   grad_fn = lambda p, x=x: jax.grad(loss)(p, x)
    ...   updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> int(state[1].gradient_step)
    1
  """
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(
      f"`k` (micro-batches per optimizer step) must be a Python int >= 1, got {k!r}."
    )
  if "every_k_schedule" in multi_steps_kwargs:
    raise ValueError(
      "xsam_jax.accumulate: do not pass `every_k_schedule`; `k` sets it, so that the method and "
      "optax.MultiSteps cannot disagree."
    )
  if isinstance(method, optax.GradientTransformation):
    built = _BUILT.get(method.update)
    if built is None:
      raise ValueError(
        "xsam_jax.accumulate: `method` is a transform not built by a xsam_jax method (sam, "
        "eigen_sam, xsam, sometimes_sam, looksam), so it cannot be rebuilt with "
        "accumulation_steps=k. Pass a factory instead, e.g. "
        "functools.partial(optax.inject_hyperparams(xsam_jax.xsam), rho=0.05)."
      )
    factory, kwargs = built
    # accumulation_steps can only be 1 here: a value > 1 outside accumulate was refused.

    def make() -> optax.GradientTransformation:
      return factory(**{**kwargs, "accumulation_steps": k})
  elif callable(method):

    def make() -> optax.GradientTransformation:
      try:
        return method(accumulation_steps=k)
      except TypeError as err:
        raise ValueError(
          "xsam_jax.accumulate: `method` must be a transform built by xsam_jax.sam, eigen_sam "
          "or xsam, or a factory that takes `accumulation_steps` (e.g. "
          f"functools.partial(xsam_jax.xsam, rho=0.05)); calling it failed: {err}"
        ) from None
  else:
    raise ValueError(
      f"xsam_jax.accumulate: `method` must be a transform or a factory, got {method!r}."
    )

  with _accumulating():
    inner = optax.chain(
      make(),
      optax.MultiSteps(base, every_k_schedule=k, **multi_steps_kwargs).gradient_transformation(),
    )

  def init_fn(params: Any) -> Any:
    with _accumulating():
      return inner.init(params)

  def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any:
    with _accumulating():
      return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
