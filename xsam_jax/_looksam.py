"""LookSAM: SAM's gradient every k steps, and its cached component orthogonal to the clean
gradient reused on the steps between (Liu et al., CVPR 2022)."""

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
  check_positive_int,
  check_range,
  check_update_args,
  keep_dtypes,
  normalize,
  project_out,
  read_hyperparam,
  scalar_dtype,
  tree_all_finite,
  tree_norm,
  tree_to_f32,
)
from xsam_jax._policy import run_branch, static_ascent
from xsam_jax._sam import ascent_fields, cast_ascent, sam_ascent, skipped_ascent

PyTree = Any


class LookSAMState(NamedTuple):
  r"""State of :func:`looksam`.

  Attributes:
    count: number of ``update`` calls so far (int32 scalar), micro-batches included; schedules
      read ``count // accumulation_steps``.
    grad_norm: global L2 norm of the clean gradient :math:`g` (``updates``) at the last step.
      With ``axis_name``: the mean over devices of the local norms.
    perturbation_norm: global L2 norm of the ascent step :math:`\epsilon` at the last step
      (:math:`\rho` for SAM, the Euclidean length of the adaptive step for ASAM; 0 when
      ``rho = 0`` and 0 on a step that reused :math:`g_v`). With ``axis_name``: the mean over
      devices of the local norms.
    adv_grad_norm: global L2 norm of the perturbed gradient :math:`g_{adv} = \nabla L_B(w +
      \epsilon)` at the last refresh step (kept through the steps between). With
      ``axis_name``: the norm of the mean over devices.
    ascent_curvature: curvature along the ascent step at the last refresh step, free from the
      two gradients already computed: :math:`\langle \epsilon, g_{adv} - g\rangle /
      \|\epsilon\|^2 \approx \hat\epsilon^\top H \hat\epsilon` (for SAM
      :math:`\langle \hat g, g_{adv} - g\rangle/\rho \approx \hat g^\top H \hat g`; for
      ASAM along the adaptive step :math:`\epsilon`). Exact for a quadratic; error
      :math:`O(\rho)` otherwise; 0 when ``rho = 0``; kept through the steps between. With
      ``axis_name``: the mean over devices of each device's value.
    gv: the cached :math:`g_v = g_s - \langle g_s, \hat g\rangle \hat g`, shaped like
      ``params`` in float32 (float64 for float64 params); zeros before the first refresh.
    gv_norm: :math:`\|g_v\|` of the cached :math:`g_v`.
    ascended: bool scalar, whether the last step was a refresh (one more ``grad_fn`` call).
    skipped_refreshes: refreshes whose new :math:`g_v` was not finite (NaN/inf), which kept
      the previous one (int32).
    ascent_steps: number of ``update`` calls that were refreshes, each with one more
      ``grad_fn`` call (int32 scalar): a run's gradient evaluations are ``count +
      ascent_steps``, counted rather than assumed (the train CLI's ``summary.json``).

  Every float scalar is float32, or float64 for float64 params; dtypes never change across
  steps.
  """

  count: chex.Array
  grad_norm: chex.Array
  perturbation_norm: chex.Array
  adv_grad_norm: chex.Array
  ascent_curvature: chex.Array
  gv: PyTree
  gv_norm: chex.Array
  ascended: chex.Array
  skipped_refreshes: chex.Array
  ascent_steps: chex.Array


@record_arguments
def looksam(
  rho: ScalarOrSchedule = 0.05,
  k: int = 5,
  alpha: ScalarOrSchedule = 0.7,
  *,
  adaptive: bool = False,
  eta: float = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
  eps: float = DEFAULT_EPS,
  axis_name: str | None = None,
  accumulation_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: SAM's gradient every ``k`` steps, its orthogonal part reused in between.

  On every ``k``-th optimizer step :math:`t` (``t % k == 0``, step 0 included) it takes SAM's
  gradient :math:`g_s = \nabla L_B(w + \epsilon)` (ASAM's :math:`\epsilon` with
  ``adaptive=True``), hands it on, and caches its component orthogonal to the clean gradient:

  .. math::
     g_v = g_s - \langle g_s, \hat g\rangle\,\hat g, \qquad \hat g = g/(\|g\| + \mathrm{eps}).

  On the other steps it hands on the clean gradient plus the cached direction, rescaled to the
  current gradient's norm:

  .. math::
     \tilde g = g + \alpha\,\frac{\|g\|}{\|g_v\| + \mathrm{eps}}\,g_v

  (a zero :math:`g_v` gives :math:`g`). A refresh whose new :math:`g_v` is not finite keeps the
  previous one and adds one to ``skipped_refreshes``, so ``optax.apply_if_finite`` after the
  method recovers from a NaN batch. The refresh and its ``grad_fn`` call live in one branch of
  ``lax.cond``: 2 gradient evaluations on refresh steps, 1 otherwise, :math:`1 + 1/k` on
  average (counted at run time in ``tests/test_looksam.py``). With ``axis_name`` each device
  ascends along its own gradient and :math:`g`, :math:`g_s` (hence :math:`g_v`) are the means
  over devices. Under :func:`~xsam_jax.accumulate` every micro-batch of a refresh step
  refreshes, and the last one's :math:`g_v` is kept.

  Static path (XLA:CPU, where a gradient inside ``lax.cond`` is 20-30x slower: see
  :func:`~xsam_jax.ascent_due`): pass ``update(..., ascend=xsam_jax.ascent_due(count,
  when="every", k=k))``, a Python bool decided on the host, with the step jitted with
  ``ascend`` static; each compiled program then holds one branch (refresh or reuse) and no
  control flow. ``ascend`` overrides the ``t % k`` test on that call.

  Args:
    rho: neighbourhood radius :math:`\rho \ge 0`, a float or a schedule ``step -> rho``.
    k: refresh every ``k``-th optimizer step, a Python int >= 1 (the paper uses 5; ``k = 1``
      is SAM).
    alpha: weight :math:`\alpha \ge 0` of the reused direction, a float or a schedule (the
      paper uses 0.7).
    adaptive: ASAM's scale-invariant neighbourhood for the refresh ascent (Adaptive LookSAM).
    eta: ASAM's offset :math:`\eta \ge 0`.
    adaptive_mask: ASAM only: leaves marked False use :math:`T = 1` (see
      :func:`~xsam_jax.sam`).
    eps: added to every norm before division.
    axis_name: the mapped axis name inside ``shard_map``/``pmap``, or None under plain ``jit``.
    accumulation_steps: set by :func:`~xsam_jax.accumulate` only.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`LookSAMState`;
    ``update(updates, state, params, *, grad_fn, ascend=None, **extra)``.

  Raises:
    ValueError: for ``rho < 0``, ``alpha < 0``, ``eta < 0``, ``k`` not a Python int >= 1,
      ``accumulation_steps`` as in :func:`~xsam_jax.sam`, a missing ``params`` or
      ``grad_fn``, an ``ascend`` that is neither None nor a Python bool, and the data-parallel
      misuse :func:`~xsam_jax.sam` refuses.

  References:
    Liu, Mai, Chen, Hsieh & You, "Towards Efficient and Scalable Sharpness-Aware
    Minimization", CVPR 2022, arXiv:2203.02714.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss = lambda w: jnp.sum(w ** 2 + w ** 4)
    >>> tx = xsam_jax.looksam(rho=0.1, k=2, alpha=0.5)
    >>> params = jnp.array([1.0, -0.5])
    >>> state = tx.init(params)
    >>> g = jax.grad(loss)(params)
    >>> g_s, state = tx.update(g, state, params, grad_fn=jax.grad(loss))  # refresh step
    >>> g_v = g_s - jnp.vdot(g_s, g) / jnp.vdot(g, g) * g
    >>> bool(jnp.allclose(state.gv, g_v, atol=1e-6))
    True
    >>> out, state = tx.update(g, state, params, grad_fn=jax.grad(loss))  # reuse step
    >>> expected = g + 0.5 * jnp.linalg.norm(g) / jnp.linalg.norm(g_v) * g_v
    >>> bool(jnp.allclose(out, expected, atol=1e-5)), bool(state.ascended)
    (True, False)
  """
  check_range("rho", rho, 0.0, hint="Use rho=0 to recover the base optimizer.")
  check_positive_int("k", k, traced_ok=True)
  check_range("alpha", alpha, 0.0, hint="alpha=0 is SAM every k steps, the clean gradient between.")
  check_range("eta", eta, 0.0)
  check_accumulation_steps(accumulation_steps)
  method = "xsam_jax.looksam"

  def init_fn(params: PyTree) -> LookSAMState:
    dtype = scalar_dtype(params)
    gv = jax.tree.map(jnp.zeros_like, tree_to_f32(params))
    state = LookSAMState(
      **ascent_fields(dtype),
      gv=gv,
      gv_norm=jnp.zeros((), dtype),
      ascended=jnp.zeros((), bool),
      skipped_refreshes=jnp.zeros((), jnp.int32),
      ascent_steps=jnp.zeros((), jnp.int32),
    )
    return place_state(state, params, gv, field="gv")

  def update_fn(updates, state, params=None, *, grad_fn=None, ascend=None, **extra_args):
    del extra_args
    check_update_args(method, params, grad_fn)
    static = static_ascent(ascend, method, "every")
    check_clean_gradient(updates, method, axis_name)
    dtype = scalar_dtype(params)
    step = state.count // accumulation_steps
    due = step % k == 0
    grads = tree_to_f32(device_mean(updates, axis_name))

    def refresh():
      ascent = sam_ascent(
        updates,
        params,
        grad_fn,
        read_hyperparam(rho, step, dtype),
        adaptive=adaptive,
        eta=eta,
        adaptive_mask=adaptive_mask,
        eps=eps,
        axis_name=axis_name,
      )
      unit, _ = normalize(grads, eps)
      gv, _ = project_out(ascent.grads, unit, 1.0)
      finite = tree_all_finite(gv)
      gv = jax.tree.map(lambda n, o: jnp.where(finite, n.astype(o.dtype), o), gv, state.gv)
      skipped = state.skipped_refreshes + (~finite).astype(state.skipped_refreshes.dtype)
      return cast_ascent(ascent, params, dtype), gv, skipped

    def reuse():
      gv = state.gv
      scale = read_hyperparam(alpha, step, dtype) * tree_norm(grads) / (tree_norm(gv) + eps)
      out = optax.tree.add_scale(grads, scale, gv)
      step_out = skipped_ascent(out, updates, state, axis_name)
      return cast_ascent(step_out, params, dtype), gv, state.skipped_refreshes

    ((out, grad_norm, perturbation_norm, adv_grad_norm, curvature), gv, skipped), due = run_branch(
      due, static, refresh, reuse
    )
    new_state = LookSAMState(
      count=optax.safe_increment(state.count),
      grad_norm=grad_norm,
      perturbation_norm=perturbation_norm,
      adv_grad_norm=adv_grad_norm,
      ascent_curvature=curvature,
      gv=gv,
      gv_norm=tree_norm(gv),
      ascended=due,
      skipped_refreshes=skipped,
      ascent_steps=state.ascent_steps + due.astype(state.ascent_steps.dtype),
    )
    return out, keep_dtypes(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
