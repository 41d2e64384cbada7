"""Eigen-SAM: SAM whose perturbation is tilted towards the top Hessian eigenvector."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from xsam_jax import hessian
from xsam_jax._accumulate import check_accumulation_steps, record_arguments
from xsam_jax._eigvec import (
  EigvecSettings,
  check_base_grad_flag,
  check_solver,
  init_eigvec,
  make_settings,
  maybe_refresh,
)
from xsam_jax._parallel import check_clean_gradient, device_mean, place_state
from xsam_jax._perturbation import (
  DEFAULT_EPS,
  ScalarOrSchedule,
  as_key,
  check_grad_fn_signature,
  check_nonempty,
  check_positive_int,
  check_range,
  check_update_args,
  keep_dtypes,
  normalize,
  perturbed_gradient,
  read_hyperparam,
  resolve_alias,
  scalar_dtype,
  tree_cast_like,
  tree_norm,
  tree_vdot,
)
from xsam_jax._policy import static_ascent
from xsam_jax._sam import ascent_fields

PyTree = Any


class EigenSAMState(NamedTuple):
  r"""State of :func:`eigen_sam`.

  Attributes:
    count: number of ``update`` calls so far (int32 scalar), micro-batches included; the
      eigenvector is refreshed when ``count % (refresh_every * accumulation_steps) == 0``
      (step 0 included).
    eigvec: unit estimate of the top Hessian eigenvector, shaped like params (float32; float64
      for float64 params). Exactly unit length after every refresh.
    eigval: at the last refresh, the Rayleigh quotient :math:`\langle v, Hv\rangle` of the
      last iterate that was multiplied by the Hessian (``solver="power"``; free, no extra
      HVP), the top Ritz value (``solver="lanczos"``), or 0 (``solver="random"``: no HVP is
      made, so no eigenvalue is known; 0 rather than NaN keeps the state finite).
    cos: cosine between the clean gradient and ``eigvec`` at the last step (signed; the sign of
      ``eigvec`` is arbitrary). With ``axis_name``: the mean over devices.
    grad_norm: global L2 norm of the clean gradient :math:`g` (``updates``) at the last step.
      With ``axis_name``: the mean over devices of the local norms.
    perturbation_norm: global L2 norm of the ascent step :math:`\epsilon` at the last step
      (:math:`\rho` for SAM and X-SAM, the Euclidean length of the adaptive step for ASAM,
      :math:`\rho\sqrt{1 + \alpha^2(1 - \cos^2)}` for Eigen-SAM; 0 when ``rho = 0``). With
      ``axis_name``: the mean over devices of the local norms.
    adv_grad_norm: global L2 norm of the perturbed gradient :math:`g_{adv} = \nabla L_B(w +
      \epsilon)` at the last step, before any correction (the scale that X-SAM's
      ``normalize=True`` removes). With ``axis_name``: the norm of the mean over devices.
    ascent_curvature: curvature along the actual (tilted) ascent step :math:`\epsilon` at the
      last step, free from the two gradients: :math:`\langle\epsilon, g_{adv} - g\rangle /
      \|\epsilon\|^2 \approx \hat\epsilon^\top H \hat\epsilon`. Exact for a quadratic, error
      :math:`O(\rho)` otherwise; 0 when ``rho = 0``; ``alpha = 0`` gives SAM's
      :math:`\hat g^\top H \hat g`. With ``axis_name``: the mean over devices of each device's
      value.

    skipped_refreshes: number of refreshes (int32) whose new eigenvector or eigenvalue had a
      NaN or an infinity (a non-finite batch, loss or gradient) and was discarded: ``eigvec``
      and ``eigval`` keep their previous values, so ``optax.apply_if_finite`` (or
      ``optax.MultiSteps(..., should_skip_update_fn=optax.skip_not_finite)``) placed after this
      transform skips that step and training recovers. A growing count means the data or the
      loss produce non-finite values.
    base_grad_mismatch: with ``check_base_grad=True`` (forward-difference HVPs whose base is
      ``updates``), :math:`\|g_{\text{updates}} - \nabla L(w)\|/\|\nabla L(w)\|` measured at
      the last refresh with one extra ``grad_fn`` call; 0 otherwise. It should be at rounding
      level (:math:`\lesssim 10^{-6}` in float32); a larger value means ``updates`` is not
      ``grad_fn(params)`` (clipped, accumulated, reduced over devices...) and every
      finite-difference HVP is off by the mismatch divided by :math:`h`: pass
      ``eig_grad_fn=grad_fn`` or use ``hvp_method="exact"``.
    settings: the :class:`~xsam_jax._eigvec.EigvecSettings` (``solver``, ``num_iters``,
      ``hvp_method``, ``eps``, ``seed``) of the transform whose ``init`` made this state
      (``update`` carries them over unchanged), which :func:`~xsam_jax.refresh_eigenvector`
      uses by default. A static field: part of the tree structure, with no arrays (nothing to
      save in a checkpoint; restore into the structure of ``tx.init(params)``).


  Every float scalar is float32, or float64 for float64 params; dtypes never change across
  steps.
  """

  count: chex.Array
  eigvec: PyTree
  eigval: chex.Array
  cos: chex.Array
  grad_norm: chex.Array
  perturbation_norm: chex.Array
  adv_grad_norm: chex.Array
  ascent_curvature: chex.Array
  skipped_refreshes: chex.Array
  base_grad_mismatch: chex.Array
  settings: EigvecSettings


def eigen_sam_perturbation(
  grads: PyTree, eigvec: PyTree, rho: jax.Array, alpha: jax.Array, eps: float
) -> tuple[PyTree, jax.Array, jax.Array]:
  r"""Eigen-SAM's ascent step, in float32.

  :math:`\epsilon = \rho\,(\hat g + \alpha\,\mathrm{sign}(\langle g, v\rangle)\,
  (v - \langle \hat g, v\rangle \hat g))`, not renormalised. Returns ``(epsilon, cos, ||g||)``
  with ``cos`` :math:`= \langle \hat g, v\rangle`.
  """
  unit, grad_norm = normalize(grads, eps)
  cos = tree_vdot(unit, eigvec)
  # v_perp = v - <g_hat, v> g_hat; the sign term makes the tilt invariant under v -> -v.
  v_perp = optax.tree.add_scale(eigvec, -cos, unit)
  direction = optax.tree.add_scale(unit, alpha * jnp.sign(cos), v_perp)
  return optax.tree.scale(rho, direction), cos, grad_norm


@record_arguments
def eigen_sam(
  rho: ScalarOrSchedule = 0.05,
  alpha: ScalarOrSchedule = 0.2,
  *,
  refresh_every: int = 100,
  num_iters: int = 5,
  eps: float = DEFAULT_EPS,
  axis_name: str | None = None,
  key: jax.Array | int = 0,
  solver: Literal["power", "lanczos", "random"] = "power",
  accumulation_steps: int = 1,
  hvp_method: str = "exact",
  check_base_grad: bool = False,
  power_iters: int | None = None,
  seed: int | None = None,
  tracker: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Eigen-SAM: SAM with the perturbation tilted towards the top Hessian eigenvector.

  With :math:`\hat g = g/(\|g\|+\mathrm{eps})` and :math:`v` the cached unit top eigenvector,

  .. math::
     \epsilon = \rho\,\Big(\hat g + \alpha\,\mathrm{sign}(\langle g, v\rangle)\,
        \big(v - \langle \hat g, v\rangle\,\hat g\big)\Big), \qquad
     \tilde g = \nabla L_B(w + \epsilon).

  The added component is the part of :math:`\pm v` orthogonal to :math:`\hat g`, the sign
  chosen so it points the same way as :math:`g`; the step is therefore invariant under
  :math:`v \to -v`. As in the official code it is not renormalised:
  :math:`\|\epsilon\| = \rho\sqrt{1 + \alpha^2(1 - \langle\hat g, v\rangle^2)}`.
  ``alpha = 0`` is exactly SAM.

  The eigenvector is refreshed when ``count % refresh_every == 0`` (step 0 included, so the
  tilt applies from the first step) by ``num_iters`` warm-started power-iteration steps with
  Hessian-vector products ``jax.jvp(eig_grad_fn or grad_fn, (params,), (v,))`` at the clean
  parameters, under a ``lax.cond`` around a ``lax.fori_loop`` (one compiled step). Pass
  ``refresh=True``/``False`` to ``update`` to decide on the host instead (straight-line HVPs;
  much faster for convolutions on XLA:CPU, see the README). With
  ``hvp_method="forward_difference"`` each HVP is one gradient,
  :math:`Hv \approx (\nabla L(w + hv) - \nabla L(w))/h` (:func:`xsam_jax.hessian.hvp`), with
  the step's clean gradient as :math:`\nabla L(w)` (free) unless ``eig_grad_fn`` is given.

  The official code's cadence differs: it refreshes at batch index 100 of every epoch
  (``step % 100 == 0 and step > 0`` with ``step`` restarting each epoch), i.e. once per epoch,
  and perturbs with the raw :math:`\rho g` until the first refresh. ``refresh_every`` set to
  the steps per epoch gives the same frequency (``experiments/configs`` does this for the
  papers' recipe); the phase (batch 0 here) and the first-epoch perturbation still differ.

  Data parallel (``axis_name``) and gradient accumulation (``accumulation_steps``) work as in
  :func:`~xsam_jax.sam`; the eigenvector is shared by all devices (HVPs are means over
  devices) and refreshed on the first micro-batch of an optimizer step.

  Args:
    rho: neighbourhood radius :math:`\rho \ge 0`, float or schedule.
    alpha: tilt strength in :math:`[0, 2]`, float or schedule (the paper tunes it in
      {0.05, 0.1, 0.2}).
    refresh_every: refresh period :math:`p` in optimizer steps, Python int >= 1 (official
      code: ``freq=100`` within each epoch, which is once per epoch; see above).
    num_iters: HVPs per refresh :math:`q`, Python int >= 1 (official code: 5).
    eps: added to every norm before division.
    axis_name: inside ``shard_map``/``pmap``: ascent from the local gradient (m-sharpness),
      ``pmean`` of the returned gradient, of every HVP (one shared eigenvector) and of the
      state's scalars.
    key: PRNG key (``jax.random.key(0)``, or a raw ``jax.random.PRNGKey``) or an int seed, of
      the initial eigenvector and of ``solver="random"``'s draws.
    solver: where the eigenvector comes from at each refresh. ``"power"`` (the papers' code:
      ``num_iters`` power-iteration HVPs) converges to the eigenvector of largest
      *magnitude*, a negative eigenvalue's when one dominates (then ``eigval < 0``);
      ``"lanczos"`` (top Ritz pair of a ``num_iters``-step Lanczos run warm-started from the
      cached vector, ``num_iters`` extra param-sized buffers during the refresh) targets the
      largest *algebraic* eigenvalue (see ``benchmarks/RESULTS.md``); ``"random"`` redraws a
      uniformly random unit vector from ``jax.random.fold_in(key, step)`` at each refresh,
      with no HVP and no ``grad_fn`` call (``eigval`` is then 0): the control that tells
      whether the method's effect comes from curvature.
    accumulation_steps: set by :func:`~xsam_jax.accumulate` only (a value > 1 given by hand
      raises ``ValueError``): micro-batches per optimizer step; the refresh and schedules then
      read the optimizer step ``count // accumulation_steps``.
    hvp_method: ``"exact"`` (forward-over-reverse, default) or ``"forward_difference"`` (one
      gradient per HVP, base gradient shared; relative error :math:`O(\sqrt{u})`, see
      :func:`xsam_jax.hessian.hvp`). With ``"forward_difference"`` and no ``eig_grad_fn``,
      ``updates`` must be ``grad_fn(params)`` itself (pass ``eig_grad_fn=grad_fn`` otherwise).
      Float32 params and compute or wider: along the top eigenvector the error was 0.06-0.27
      with float16/bfloat16 params and 0.66-0.96 with float32 params and a bfloat16 loss;
      use ``"exact"`` there.
    check_base_grad: forward differences only: at every refresh, spend one more ``grad_fn``
      call to measure :math:`\|g_{\text{updates}} - \nabla L(w)\|/\|\nabla L(w)\|` into the
      state's ``base_grad_mismatch`` (the trajectory is unchanged). A value above rounding
      level (:math:`\sim10^{-6}` in float32) means ``updates`` is not ``grad_fn(params)``
      and every HVP is off by that mismatch over :math:`h`; see ``EigenSAMState``.
    power_iters: deprecated alias of ``num_iters`` (one release; warns).
    seed: deprecated alias of ``key`` (one release; warns).
    tracker: deprecated alias of ``solver`` (one release; warns).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(updates, state, params, *,
    grad_fn, eig_grad_fn=None, refresh=None, **extra)``.

  Raises:
    ValueError: for ``rho < 0``, ``alpha`` outside ``[0, 2]``, ``refresh_every``,
      ``num_iters`` or ``accumulation_steps`` < 1, ``params`` with no entries (``{}``),
      ``check_base_grad=True`` without ``hvp_method="forward_difference"`` (or with
      ``solver="random"``), an unknown ``solver`` or ``hvp_method``, a ``key`` that is neither
      a PRNG key nor an int, a deprecated name given with its new one, when ``params`` or
      ``grad_fn`` is missing or ``grad_fn`` cannot be called as ``grad_fn(params)``, an
      ``ascend=`` (Eigen-SAM ascends on every step), and for data-parallel misuse (see
      :func:`~xsam_jax.sam`).

  References:
    Luo, Truong, Pham, Harandi, Phung & Le, "Explicit Eigenvalue Regularization Improves
    Sharpness-Aware Minimization", NeurIPS 2024, arXiv:2501.12666.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w ** 2)
    >>> tx = optax.chain(xsam_jax.eigen_sam(rho=0.05, alpha=0.2, refresh_every=10),
    ...                  optax.sgd(0.1))
    >>> params = jnp.ones(2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            grad_fn=jax.grad(loss))
    >>> params = optax.apply_updates(params, updates)
    >>> # The first step estimated the Hessian's top eigenpair, (4, e_1) for diag(4, 1):
    >>> round(float(optax.tree.get(state, "eigval")), 2)
    4.0
    >>> print(jnp.abs(optax.tree.get(state, "eigvec")).round(2))
    [1. 0.]
  """
  check_range("rho", rho, 0.0, hint="Use rho=0 to recover the base optimizer.")
  check_range("alpha", alpha, 0.0, 2.0, hint="alpha=0 is SAM; 0.2 is the papers' default.")
  where = "xsam_jax.eigen_sam"
  num_iters = resolve_alias(where, "num_iters", num_iters, 5, "power_iters", power_iters)
  key = resolve_alias(where, "key", key, 0, "seed", seed)
  solver = resolve_alias(where, "solver", solver, "power", "tracker", tracker)
  check_positive_int("refresh_every", refresh_every)
  check_positive_int("num_iters", num_iters)
  check_accumulation_steps(accumulation_steps)
  check_solver(solver)
  as_key(key, where)
  hessian.check_hvp_method(hvp_method)
  check_base_grad_flag(check_base_grad, hvp_method, solver)
  settings = make_settings(solver, num_iters, hvp_method, eps, key)

  def init_fn(params: PyTree) -> EigenSAMState:
    # One buffer per field: a state donated to a jitted step must not hold one buffer twice.
    dtype = scalar_dtype(params)
    state = EigenSAMState(
      **ascent_fields(dtype),
      eigvec=init_eigvec(params, key, "xsam_jax.eigen_sam"),
      eigval=jnp.zeros((), dtype),
      cos=jnp.zeros((), dtype),
      skipped_refreshes=jnp.zeros((), jnp.int32),
      base_grad_mismatch=jnp.zeros((), dtype),
      settings=settings,
    )
    return place_state(state, params, state.eigvec)

  def update_fn(
    updates, state, params=None, *, grad_fn=None, eig_grad_fn=None, refresh=None, **extra_args
  ):
    static_ascent(extra_args.get("ascend"), "xsam_jax.eigen_sam", None)  # no policy here
    del extra_args
    check_update_args("xsam_jax.eigen_sam", params, grad_fn)
    if eig_grad_fn is not None:
      check_grad_fn_signature("eig_grad_fn", eig_grad_fn, "xsam_jax.eigen_sam")
    check_nonempty("params", params, "xsam_jax.eigen_sam")
    check_clean_gradient(updates, "xsam_jax.eigen_sam", axis_name)
    dtype = scalar_dtype(params)
    step = state.count // accumulation_steps
    refreshed = maybe_refresh(
      state,
      params=params,
      grad_fn=eig_grad_fn if eig_grad_fn is not None else grad_fn,
      refresh_every=refresh_every,
      num_iters=num_iters,
      eps=eps,
      axis_name=axis_name,
      refresh=refresh,
      solver=solver,
      accumulation_steps=accumulation_steps,
      hvp_method=hvp_method,
      # The HVP loss is the training loss: its gradient at w is the clean gradient, free.
      base_grad=updates if eig_grad_fn is None else None,
      check_base_grad=check_base_grad,
      key=key,
    )
    eigval, eigvec = refreshed.eigval, refreshed.eigvec
    perturbation, cos, grad_norm = eigen_sam_perturbation(
      updates,
      eigvec,
      read_hyperparam(rho, step, dtype),
      read_hyperparam(alpha, step, dtype),
      eps,
    )
    adv_grads, curvature = perturbed_gradient(
      grad_fn, params, perturbation, axis_name, updates, eps
    )
    cos, grad_norm, perturbation_norm = device_mean(
      (cos, grad_norm, tree_norm(perturbation)), axis_name, what="the gradient norm"
    )
    new_state = EigenSAMState(
      count=optax.safe_increment(state.count),
      eigvec=eigvec,
      eigval=eigval,
      cos=cos,
      grad_norm=grad_norm,
      perturbation_norm=perturbation_norm,
      adv_grad_norm=tree_norm(adv_grads),
      ascent_curvature=curvature,
      skipped_refreshes=refreshed.skipped_refreshes,
      base_grad_mismatch=refreshed.base_grad_mismatch,
      settings=state.settings,  # from init: the state keeps its structure
    )
    return tree_cast_like(adv_grads, params), keep_dtypes(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
