"""SAM on a subset of steps, the plain gradient on the others: every k-th step, at random with a
scheduled probability (RST), or when the gradient norm is unusually large (AE-SAM).

The choice is a traced boolean and the ascent sits in one branch of ``lax.cond``: a step that
skips it runs no second ``grad_fn`` call (counted at run time in ``tests/test_sometimes.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
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
  read_hyperparam,
  scalar_dtype,
  tree_norm,
)
from xsam_jax._policy import decide, policy_args, run_branch, static_ascent
from xsam_jax._sam import ascent_fields, cast_ascent, sam_ascent, skipped_ascent

PyTree = Any


class SometimesSAMState(NamedTuple):
  r"""State of :func:`sometimes_sam`.

  Attributes:
    count: number of ``update`` calls so far (int32 scalar), micro-batches included; schedules
      read ``count // accumulation_steps``.
    grad_norm: global L2 norm of the clean gradient :math:`g` (``updates``) at the last step.
      With ``axis_name``: the mean over devices of the local norms.
    perturbation_norm: global L2 norm of the ascent step :math:`\epsilon` at the last step
      (:math:`\rho` for SAM, the Euclidean length of the adaptive step for ASAM; 0 when
      ``rho = 0`` and 0 on a step that skipped the ascent). With ``axis_name``: the mean over
      devices of the local norms.
    adv_grad_norm: global L2 norm of the perturbed gradient :math:`g_{adv} = \nabla L_B(w +
      \epsilon)` at the last step that ascended (kept through skipped steps; 0 before the
      first ascent). With ``axis_name``: the norm of the mean over devices.
    ascent_curvature: curvature along the ascent step at the last step that ascended, free
      from the two gradients already computed: :math:`\langle \epsilon, g_{adv} - g\rangle /
      \|\epsilon\|^2 \approx \hat\epsilon^\top H \hat\epsilon` (for SAM
      :math:`\langle \hat g, g_{adv} - g\rangle/\rho \approx \hat g^\top H \hat g`; for
      ASAM along the adaptive step :math:`\epsilon`). Exact for a quadratic; error
      :math:`O(\rho)` otherwise; 0 when ``rho = 0``; kept through skipped steps. With
      ``axis_name``: the mean over devices of each device's value.
    ascended: bool scalar, whether the last step made the ascent (one more ``grad_fn`` call).
    ascent_steps: number of ``update`` calls that ascended (int32 scalar).
    ascent_fraction: running fraction of ascent steps, ``ascent_steps / count``: a step costs
      on average ``1 + ascent_fraction`` gradient evaluations (the clean one included).
    sq_norm_mean: ``when="adaptive"``: exponential moving mean :math:`\mu_t` of
      :math:`\|g_t\|^2` (0 for the other policies).
    sq_norm_var: ``when="adaptive"``: exponential moving variance :math:`\sigma_t^2` of
      :math:`\|g_t\|^2` (0 for the other policies).

  Every float scalar is float32, or float64 for float64 params; dtypes never change across
  steps.
  """

  count: chex.Array
  grad_norm: chex.Array
  perturbation_norm: chex.Array
  adv_grad_norm: chex.Array
  ascent_curvature: chex.Array
  ascended: chex.Array
  ascent_steps: chex.Array
  ascent_fraction: chex.Array
  sq_norm_mean: chex.Array
  sq_norm_var: chex.Array


@record_arguments
def sometimes_sam(
  rho: ScalarOrSchedule = 0.05,
  *,
  when: str = "every",
  k: int | None = None,
  prob: ScalarOrSchedule | None = None,
  key: Any = 0,
  decay: float | None = None,
  threshold: ScalarOrSchedule | None = None,
  adaptive: bool = False,
  eta: float = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
  eps: float = DEFAULT_EPS,
  axis_name: str | None = None,
  accumulation_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM (or ASAM) on a chosen subset of steps, the clean gradient on the others.

  On step :math:`t` (the optimizer step, ``count // accumulation_steps``) a traced boolean
  :math:`a_t` chooses between SAM's gradient and the clean one,

  .. math::
     \tilde g_t = \begin{cases} \nabla L_B(w + \epsilon), &
     \epsilon = \rho\,g/(\|g\| + \mathrm{eps}) & \text{if } a_t \\
     g & & \text{otherwise,} \end{cases}

  with :math:`a_t` from ``when``:

  * ``"every"``: :math:`a_t = [t \bmod k = 0]` (steps 0, k, 2k, ...).
  * ``"random"`` (RST): :math:`a_t \sim \mathrm{Bernoulli}(p_t)` with :math:`p_t` from a
    scheduling function (``prob``: a constant, or a schedule such as
    ``optax.linear_schedule(0.2, 0.8, total_steps)``), drawn from ``key`` folded with
    :math:`t`, so a run is reproducible and every micro-batch of one optimizer step makes the
    same choice. Zhao et al.'s G-RST, which also decouples the degree of sharpness
    regularisation from :math:`p_t`, is not reproduced here: only RST's Bernoulli rule.
  * ``"adaptive"`` (AE-SAM): with :math:`s_t = \|g_t\|^2`,
    :math:`\mu_t = \delta\mu_{t-1} + (1-\delta)s_t`,
    :math:`\sigma^2_t = \delta\sigma^2_{t-1} + (1-\delta)(s_t - \mu_t)^2` (from
    :math:`\mu_{-1} = \sigma^2_{-1} = 0`, no bias correction) and
    :math:`a_t = [s_t \ge \mu_t + c_t\sigma_t]`: SAM where the gradient norm is large for its
    recent history, taken by the paper as a sign of a sharp region. This is our reading of
    Jiang et al.'s Algorithm 1 (statistics updated with the current :math:`s_t` before the
    test); the paper moves :math:`c_t` linearly from :math:`\lambda_1` to :math:`\lambda_2`
    over training, which is ``threshold=optax.linear_schedule(lambda1, lambda2,
    total_steps)`` (we read its defaults as :math:`\delta = 0.9`, :math:`\lambda_1 = -1`,
    :math:`\lambda_2 = 1`; check the paper before relying on them). The rule is evaluated on
    every ``update`` call (every micro-batch under accumulation). A non-finite :math:`s_t`
    keeps :math:`\mu, \sigma^2` and skips the ascent.

  Cost: the ascent and its ``grad_fn`` call live in one branch of ``lax.cond`` (one compiled
  program for every step), so a step costs 2 gradient evaluations when it ascends and 1 when it
  does not; ``ascent_fraction`` in the state is the running fraction, and the k-average cost is
  ``1 + ascent_fraction`` gradients per step (``when="every"``: :math:`1 + 1/k`).
  ``tests/test_sometimes.py`` counts the ``grad_fn`` calls at run time with a
  ``jax.debug.callback`` inside ``grad_fn`` (an untaken ``lax.cond`` branch runs nothing).

  Static path: on XLA:CPU a gradient inside a ``lax.cond`` branch is 20-30x slower than at top
  level (jax-ml/jax#12868), which makes the ``lax.cond`` path dearer than SAM there. Pass
  ``update(..., ascend=xsam_jax.ascent_due(count, when=..., k=..., prob=..., key=...))``, a
  Python bool decided on the host, with the train step jitted with ``ascend`` static: each of
  the two compiled programs holds one branch and no control flow, and the choices are the
  in-step ones (``when="every"`` and ``"random"``; AE-SAM's rule needs the step's gradient norm
  and stays on the ``lax.cond`` path). ``ascend`` overrides the policy on that call; AE-SAM's
  statistics are still updated.

  Data parallel and accumulation: as :func:`~xsam_jax.sam` (pass ``axis_name`` inside
  ``shard_map``/``pmap``; use :func:`~xsam_jax.accumulate` for accumulation). With
  ``axis_name`` the adaptive rule reads the mean over devices of each device's :math:`s_t`, so
  every device makes the same choice.

  Args:
    rho: neighbourhood radius :math:`\rho \ge 0`, a float or a schedule ``step -> rho``.
    when: ``"every"``, ``"random"`` or ``"adaptive"`` (above).
    k: ``when="every"`` only: ascend every ``k``-th optimizer step, a Python int >= 1
      (default 2).
    prob: ``when="random"`` only: the probability :math:`p_t \in [0, 1]` of an ascent, a float
      or a schedule ``step -> p`` (default 0.5).
    key: ``when="random"``: a PRNG key (``jax.random.key(0)``) or an int seed.
    decay: ``when="adaptive"`` only: the moving-average factor :math:`\delta \in [0, 1]`
      (default 0.9).
    threshold: ``when="adaptive"`` only: :math:`c_t`, a float or a schedule ``step -> c``
      (default 0: SAM when :math:`s_t \ge \mu_t`).
    adaptive: use ASAM's scale-invariant neighbourhood on the ascent steps.
    eta: ASAM's offset :math:`\eta \ge 0`.
    adaptive_mask: ASAM only: leaves marked False use :math:`T = 1` (see
      :func:`~xsam_jax.sam`).
    eps: added to every norm before division.
    axis_name: the mapped axis name inside ``shard_map``/``pmap``, or None under plain ``jit``.
    accumulation_steps: set by :func:`~xsam_jax.accumulate` only.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SometimesSAMState`;
    ``update(updates, state, params, *, grad_fn, ascend=None, **extra)``.

  Raises:
    ValueError: for an unknown ``when``; an argument of another policy (``k`` with
      ``when="random"``, ...); ``rho < 0``, ``eta < 0``, ``prob`` outside [0, 1], ``decay``
      outside [0, 1], a NaN ``threshold``; ``k`` not a Python int >= 1; a ``key`` that is
      neither a PRNG key nor an int; ``accumulation_steps`` as in :func:`~xsam_jax.sam`; a
      missing ``params`` or ``grad_fn``; an ``ascend`` that is neither None nor a Python bool;
      and the data-parallel misuse :func:`~xsam_jax.sam` refuses.

  References:
    Zhao, Zhang & Hu, "Randomized Sharpness-Aware Training for Boosting Computational
    Efficiency in Deep Learning", 2022, arXiv:2203.09962 (RST).
    Jiang, Yang, Zhang & Kwok, "An Adaptive Policy to Employ Sharpness-Aware Minimization",
    ICLR 2023, arXiv:2304.14647 (AE-SAM).
    Liu, Mai, Chen, Hsieh & You, "Towards Efficient and Scalable Sharpness-Aware
    Minimization", CVPR 2022, arXiv:2203.02714 (SAM every k steps as a baseline).

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = optax.chain(xsam_jax.sometimes_sam(rho=0.05, when="every", k=2), optax.sgd(0.1))
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                              grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> # Steps 0 and 2 ascended, steps 1 and 3 took the clean gradient:
    >>> int(state[0].ascent_steps), float(state[0].ascent_fraction), bool(state[0].ascended)
    (2, 0.5, False)
  """
  method = "xsam_jax.sometimes_sam"
  args = policy_args(
    method, when, {"k": k, "prob": prob, "decay": decay, "threshold": threshold}, key
  )
  check_range("rho", rho, 0.0, hint="Use rho=0 to recover the base optimizer.")
  check_range("eta", eta, 0.0)
  check_accumulation_steps(accumulation_steps)

  def init_fn(params: PyTree) -> SometimesSAMState:
    dtype = scalar_dtype(params)
    state = SometimesSAMState(
      **ascent_fields(dtype),
      ascended=jnp.zeros((), bool),
      ascent_steps=jnp.zeros((), jnp.int32),
      ascent_fraction=jnp.zeros((), dtype),
      sq_norm_mean=jnp.zeros((), dtype),
      sq_norm_var=jnp.zeros((), dtype),
    )
    return place_state(state, params)

  def update_fn(updates, state, params=None, *, grad_fn=None, ascend=None, **extra_args):
    del extra_args
    check_update_args(method, params, grad_fn)
    static = static_ascent(ascend, method, when)
    check_clean_gradient(updates, method, axis_name)
    dtype = scalar_dtype(params)
    step = state.count // accumulation_steps
    local_norm = tree_norm(updates)
    sq_norm = jnp.zeros((), dtype)
    if when == "adaptive":
      sq_norm = device_mean(jnp.square(local_norm), axis_name, what="the gradient norm")
    due, mean, var = decide(
      when,
      args,
      key,
      method,
      state.sq_norm_mean,
      state.sq_norm_var,
      sq_norm.astype(dtype),
      step,
      dtype,
    )

    def ascend_branch():
      return sam_ascent(
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

    def skip():
      return skipped_ascent(device_mean(updates, axis_name), updates, state, axis_name)

    (grads, grad_norm, perturbation_norm, adv_grad_norm, curvature), due = run_branch(
      due,
      static,
      lambda: cast_ascent(ascend_branch(), params, dtype),
      lambda: cast_ascent(skip(), params, dtype),
    )
    count = optax.safe_increment(state.count)
    ascent_steps = state.ascent_steps + due.astype(state.ascent_steps.dtype)
    new_state = SometimesSAMState(
      count=count,
      grad_norm=grad_norm,
      perturbation_norm=perturbation_norm,
      adv_grad_norm=adv_grad_norm,
      ascent_curvature=curvature,
      ascended=due,
      ascent_steps=ascent_steps,
      ascent_fraction=ascent_steps.astype(dtype) / jnp.maximum(count, 1).astype(dtype),
      sq_norm_mean=mean,
      sq_norm_var=var,
    )
    return grads, keep_dtypes(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
