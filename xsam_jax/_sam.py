"""SAM and ASAM as the first link of an ``optax.chain``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from xsam_jax._accumulate import check_accumulation_steps, record_arguments
from xsam_jax._parallel import check_clean_gradient, device_mean, place_state
from xsam_jax._perturbation import (
  DEFAULT_EPS,
  ScalarOrSchedule,
  check_range,
  check_update_args,
  keep_dtypes,
  normalize,
  perturbed_gradient,
  read_hyperparam,
  scalar_dtype,
  tree_cast_like,
  tree_norm,
  tree_to_f32,
)
from xsam_jax._policy import static_ascent

PyTree = Any


class SAMState(NamedTuple):
  r"""State of :func:`sam`.

  Attributes:
    count: number of ``update`` calls so far (int32 scalar), micro-batches included; schedules
      read ``count // accumulation_steps``.
    grad_norm: global L2 norm of the clean gradient :math:`g` (``updates``) at the last step.
      With ``axis_name``: the mean over devices of the local norms.
    perturbation_norm: global L2 norm of the ascent step :math:`\epsilon` at the last step
      (:math:`\rho` for SAM and X-SAM, the Euclidean length of the adaptive step for ASAM,
      :math:`\rho\sqrt{1 + \alpha^2(1 - \cos^2)}` for Eigen-SAM; 0 when ``rho = 0``). With
      ``axis_name``: the mean over devices of the local norms.
    adv_grad_norm: global L2 norm of the perturbed gradient :math:`g_{adv} = \nabla L_B(w +
      \epsilon)` at the last step, before any correction (the scale that X-SAM's
      ``normalize=True`` removes). With ``axis_name``: the norm of the mean over devices.
    ascent_curvature: curvature along the ascent step at the last step, free from the two
      gradients already computed: :math:`\langle \epsilon, g_{adv} - g\rangle /
      \|\epsilon\|^2 \approx \hat\epsilon^\top H \hat\epsilon` (for SAM
      :math:`\langle \hat g, g_{adv} - g\rangle/\rho \approx \hat g^\top H \hat g`; for
      ASAM along the adaptive step :math:`\epsilon`). Exact for a quadratic; error
      :math:`O(\rho)` otherwise; 0 when ``rho = 0``. With ``axis_name``: the mean over devices
      of each device's value (its own :math:`g`, :math:`\epsilon`, :math:`g_{adv}`).

  Every float scalar is float32, or float64 for float64 params; dtypes never change across
  steps.
  """

  count: chex.Array
  grad_norm: chex.Array
  perturbation_norm: chex.Array
  adv_grad_norm: chex.Array
  ascent_curvature: chex.Array


def sam_perturbation(
  grads: PyTree,
  params: PyTree,
  rho: jax.Array,
  *,
  adaptive: bool,
  eta: float,
  adaptive_mask: PyTree | None,
  eps: float,
) -> tuple[PyTree, jax.Array]:
  r"""The ascent step of SAM (``adaptive=False``) or ASAM (``adaptive=True``), in float32.

  SAM: :math:`\epsilon = \rho\, g/(\|g\|+\mathrm{eps})`.
  ASAM: :math:`\epsilon = \rho\, T^2 g/(\|T g\|+\mathrm{eps})`, :math:`T = |w| + \eta` on the
  leaves selected by ``adaptive_mask`` (all by default) and :math:`T = 1` elsewhere.

  Returns ``(epsilon, ||g||)``.
  """
  g = tree_to_f32(grads)
  grad_norm = optax.tree.norm(g)
  if not adaptive:
    unit, _ = normalize(g, eps)
    return optax.tree.scale(rho, unit), grad_norm
  w = tree_to_f32(params)
  mask = adaptive_mask if adaptive_mask is not None else jax.tree.map(lambda _: True, w)
  scale = jax.tree.map(lambda wi, m: jnp.where(m, jnp.abs(wi) + eta, 1.0), w, mask)
  tg = optax.tree.mul(scale, g)
  t2g = optax.tree.mul(scale, tg)
  return optax.tree.scale(rho / (optax.tree.norm(tg) + eps), t2g), grad_norm


class Ascent(NamedTuple):
  """What :func:`sam_ascent` returns: the perturbed gradient and the four SAM diagnostics."""

  grads: PyTree
  grad_norm: jax.Array
  perturbation_norm: jax.Array
  adv_grad_norm: jax.Array
  ascent_curvature: jax.Array


def sam_ascent(
  updates: PyTree,
  params: PyTree,
  grad_fn: Callable[[PyTree], PyTree],
  rho: jax.Array,
  *,
  adaptive: bool,
  eta: float,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] | None,
  eps: float,
  axis_name: str | None,
) -> Ascent:
  r"""One SAM (or ASAM) ascent: :math:`g_{adv} = \nabla L_B(w + \epsilon)` and the diagnostics.

  One ``grad_fn`` call. With ``axis_name`` the ascent is each device's own and every returned
  value is the mean over devices (see :class:`SAMState` for each field). The shared step of
  :func:`sam`, :func:`~xsam_jax.sometimes_sam` and :func:`~xsam_jax.looksam`.
  """
  mask = adaptive_mask(params) if callable(adaptive_mask) else adaptive_mask
  perturbation, grad_norm = sam_perturbation(
    updates, params, rho, adaptive=adaptive, eta=eta, adaptive_mask=mask, eps=eps
  )
  adv_grads, curvature = perturbed_gradient(grad_fn, params, perturbation, axis_name, updates, eps)
  grad_norm, perturbation_norm = device_mean(
    (grad_norm, tree_norm(perturbation)), axis_name, what="the gradient norm"
  )
  return Ascent(adv_grads, grad_norm, perturbation_norm, tree_norm(adv_grads), curvature)


def skipped_ascent(
  mean_grads: PyTree, updates: PyTree, state: Any, axis_name: str | None
) -> Ascent:
  """A step whose ascent is skipped, as an :class:`Ascent`: the clean gradient and diagnostics.

  ``mean_grads`` is the (device-averaged) clean gradient the step hands on; ``grad_norm`` is the
  device mean of the local norms of ``updates``, ``perturbation_norm`` is 0, and the last
  ascent's ``adv_grad_norm`` and ``ascent_curvature`` are kept from ``state``. The skip branch of
  :func:`~xsam_jax.sometimes_sam` and the reuse branch of :func:`~xsam_jax.looksam`.
  """
  grad_norm = device_mean(tree_norm(updates), axis_name, what="the gradient norm")
  return Ascent(
    mean_grads,
    grad_norm,
    jnp.zeros_like(grad_norm),
    state.adv_grad_norm,
    state.ascent_curvature,
  )


def cast_ascent(ascent: Ascent, params: PyTree, dtype: jnp.dtype) -> Ascent:
  """Gradients in the params' dtypes and diagnostics in ``dtype``: both ``lax.cond`` branches
  of a transform that sometimes ascends return the same types."""
  scalars = (jnp.asarray(x).astype(dtype) for x in ascent[1:])
  return Ascent(tree_cast_like(ascent.grads, params), *scalars)


def ascent_fields(dtype: jnp.dtype) -> dict[str, jax.Array]:
  """Fresh zeros for the fields every sharpness state has: ``count`` (int32) and
  ``grad_norm``, ``perturbation_norm``, ``adv_grad_norm``, ``ascent_curvature`` (``dtype``).

  One buffer per field: a state donated to a jitted step must not hold one buffer twice.
  """
  return {
    "count": jnp.zeros((), jnp.int32),
    **{
      name: jnp.zeros((), dtype)
      for name in ("grad_norm", "perturbation_norm", "adv_grad_norm", "ascent_curvature")
    },
  }


@record_arguments
def sam(
  rho: ScalarOrSchedule = 0.05,
  *,
  adaptive: bool = False,
  eta: float = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
  eps: float = DEFAULT_EPS,
  axis_name: str | None = None,
  accumulation_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization (and ASAM with ``adaptive=True``) as a gradient producer.

  Given the clean minibatch gradient :math:`g = \nabla L_B(w)` as ``updates``, it returns the
  gradient at the ascent point, to be consumed by the optimizer chained after it:

  .. math::
     \epsilon = \rho\,\frac{g}{\|g\| + \mathrm{eps}}, \qquad
     g^{\mathrm{SAM}} = \nabla L_B(w + \epsilon).

  ASAM (``adaptive=True``) rescales the neighbourhood per weight,
  :math:`\epsilon = \rho\,T^2 g / \|T g\|` with :math:`T = \mathrm{diag}(|w| + \eta)`.

  Place it first in an ``optax.chain``; pass ``grad_fn`` (the gradient of the *same*
  minibatch loss at other parameters) to ``update``. Norms are global over the whole pytree and
  accumulated in float32 (float64 for float64 params); the result keeps the dtype of
  ``params``, and the state keeps its dtypes across steps.

  Free curvature: the two gradients give :math:`g_{adv} - g \approx H\epsilon`, so the state
  records ``ascent_curvature`` :math:`= \langle\epsilon, g_{adv} - g\rangle/\|\epsilon\|^2
  \approx \hat g^\top H \hat g` (SAM) at no extra cost.

  Data parallel: under ``jax.jit`` with a sharded batch pass nothing (the ascent uses the global
  gradient). Inside ``shard_map``/``pmap`` pass ``axis_name``: each device ascends along its
  *own* gradient (m-sharpness, as in the SAM paper) and the returned gradient and the state are
  means over devices. With ``shard_map``'s default ``check_vma=True`` take the clean gradient at
  device-varying parameters (``jax.lax.pcast(params, axis, to="varying")``); a gradient already
  reduced over the axis is refused with a ``ValueError`` (see the README, "Data parallelism").
  Do not ``pmean`` the loss: under ``check_vma=True`` that silently divides every gradient by the
  number of devices (its type is that of the device's own gradient, so it cannot be detected).

  Gradient accumulation: ``xsam_jax.accumulate(sam(...), base, k)`` (see
  :func:`~xsam_jax.accumulate`); each micro-batch makes its own ascent and the base optimizer
  receives the mean of the k SAM gradients. ``optax.MultiSteps(optax.chain(sam(...), base), k)``
  is wrong and cannot be detected: it calls the method on the running mean of clean gradients
  and keeps only the last micro-batch's perturbed gradient.

  Args:
    rho: neighbourhood radius :math:`\rho \ge 0`, a float or a schedule ``count -> rho``.
      0.05 is the SAM paper's default; ASAM typically uses 0.5-1.0.
    adaptive: use ASAM's scale-invariant neighbourhood.
    eta: ASAM's offset :math:`\eta \ge 0` in :math:`T = |w| + \eta` (official class default 0.01).
    adaptive_mask: ASAM only: a pytree of bools shaped like ``params`` (or a function
      ``params -> mask``); leaves marked False use :math:`T = 1` (the official ASAM code applies
      :math:`T` only to weights, not biases). Default: every leaf.
    eps: added to every norm before division.
    axis_name: the mapped axis name inside ``shard_map``/``pmap``, or None under plain ``jit``.
    accumulation_steps: set by :func:`~xsam_jax.accumulate` only (a value > 1 given by hand
      raises ``ValueError``): micro-batches per optimizer step; a ``rho`` schedule then reads
      the optimizer step ``count // accumulation_steps``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``;
    ``update(updates, state, params, *, grad_fn, **extra)``.

  Raises:
    ValueError: for ``rho < 0``, ``eta < 0``, ``accumulation_steps < 1`` (or > 1 outside
      :func:`~xsam_jax.accumulate`), when ``params`` or
      ``grad_fn`` is missing, and for data-parallel misuse: ``axis_name`` not a mapped axis,
      a clean gradient already reduced over it, a ``grad_fn`` that reduces, or a gradient that
      varies over a mapped axis while ``axis_name`` is None; an ``ascend=`` (SAM ascends on
      every step: see :func:`~xsam_jax.sometimes_sam` for a policy).

  References:
    Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021, arXiv:2010.01412.
    Kwon, Kim, Park & Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks", ICML 2021, arXiv:2102.11600.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = optax.chain(xsam_jax.sam(rho=0.05), optax.sgd(0.1))
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            grad_fn=jax.grad(loss))
    >>> params = optax.apply_updates(params, updates)
    >>> # SGD alone steps to 0.2; SAM takes the gradient at w + rho g/|g| = w - rho/sqrt(3):
    >>> bool(jnp.allclose(params, 0.1 * 2 * (1 + 0.05 / 3**0.5)))
    True
  """
  check_range("rho", rho, 0.0, hint="Use rho=0 to recover the base optimizer.")
  check_range("eta", eta, 0.0)
  check_accumulation_steps(accumulation_steps)
  method = "xsam_jax.asam" if adaptive else "xsam_jax.sam"

  def init_fn(params: PyTree) -> SAMState:
    return place_state(SAMState(**ascent_fields(scalar_dtype(params))), params)

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    static_ascent(extra_args.get("ascend"), method, None)  # refused: no policy here
    del extra_args
    check_update_args(method, params, grad_fn)
    check_clean_gradient(updates, method, axis_name)
    ascent = sam_ascent(
      updates,
      params,
      grad_fn,
      read_hyperparam(rho, state.count // accumulation_steps, scalar_dtype(params)),
      adaptive=adaptive,
      eta=eta,
      adaptive_mask=adaptive_mask,
      eps=eps,
      axis_name=axis_name,
    )
    new_state = SAMState(
      count=optax.safe_increment(state.count),
      grad_norm=ascent.grad_norm,
      perturbation_norm=ascent.perturbation_norm,
      adv_grad_norm=ascent.adv_grad_norm,
      ascent_curvature=ascent.ascent_curvature,
    )
    return tree_cast_like(ascent.grads, params), keep_dtypes(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
