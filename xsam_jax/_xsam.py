"""X-SAM: SAM whose perturbed gradient is corrected along the top Hessian eigenvector."""

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
  perturbed_gradient,
  read_hyperparam,
  resolve_alias,
  scalar_dtype,
  tree_norm,
  tree_to_f32,
  tree_vdot,
)
from xsam_jax._perturbation import normalize as normalize_tree
from xsam_jax._policy import decide, policy_args, run_branch, static_ascent
from xsam_jax._sam import Ascent, ascent_fields, cast_ascent, sam_perturbation, skipped_ascent

PyTree = Any
Correction = Literal["projection", "official"]
RefreshOn = Literal["step", "ascent"]
REFRESH_ON = ("step", "ascent")
Solver = Literal["power", "lanczos", "random"]
CORRECTIONS = ("projection", "official")


class XSAMState(NamedTuple):
  r"""State of :func:`xsam`.

  Attributes:
    count: number of ``update`` calls so far (int32 scalar), micro-batches included; the
      eigenvector is refreshed when ``count % (refresh_every * accumulation_steps) == 0``
      (step 0 included; with ``refresh_on="ascent"`` see :func:`xsam`).
    eigvec: unit estimate of the top Hessian eigenvector, shaped like params (float32; float64
      for float64 params). Exactly unit length after every refresh.
    eigval: at the last refresh, the Rayleigh quotient :math:`\langle v, Hv\rangle` of the
      last iterate that was multiplied by the Hessian (``solver="power"``; free, no extra
      HVP), the top Ritz value (``solver="lanczos"``), or 0 (``solver="random"``: no HVP is
      made, so no eigenvalue is known; 0 rather than NaN keeps the state finite).
    cos: :math:`\langle \hat g_{adv}, v\rangle`, cosine between the (device-averaged)
      perturbed gradient and ``eigvec`` before the correction, at the last step (signed; the
      sign of ``eigvec`` is arbitrary, so histogram ``|cos|`` or the angle to the nearer of
      :math:`\pm v`).
    grad_norm: global L2 norm of the clean gradient :math:`g` (``updates``) at the last step.
      With ``axis_name``: the mean over devices of the local norms.
    perturbation_norm: global L2 norm of the ascent step :math:`\epsilon` at the last step
      (:math:`\rho` for SAM and X-SAM, the Euclidean length of the adaptive step for ASAM,
      :math:`\rho\sqrt{1 + \alpha^2(1 - \cos^2)}` for Eigen-SAM; 0 when ``rho = 0``). With
      ``axis_name``: the mean over devices of the local norms.
    adv_grad_norm: global L2 norm of the perturbed gradient :math:`g_{adv} = \nabla L_B(w +
      \epsilon)` at the last step, before any correction (the scale that X-SAM's
      ``normalize=True`` removes). With ``axis_name``: the norm of the mean over devices.
    ascent_curvature: :math:`\langle \hat g, g_{adv} - g\rangle/\rho \approx \hat g^\top H
      \hat g`, the curvature along the ascent direction at the last step, free from the two
      gradients SAM already computes (exact for a quadratic, error :math:`O(\rho)` otherwise;
      0 when ``rho = 0``). With ``axis_name``: the mean over devices of each device's value.
      Compare with ``eigval``: :math:`\hat g^\top H \hat g \le \lambda_{\max}`.

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
    ascended: bool scalar, whether the last step made the ascent and the correction (always
      True without ``when``).
    ascent_steps: number of ``update`` calls that ascended (int32 scalar; ``count`` without
      ``when``).
    ascent_fraction: running fraction of ascent steps, ``ascent_steps / count``: a step costs on
      average ``1 + ascent_fraction`` gradient evaluations plus the refreshes' HVPs.
    sq_norm_mean: ``when="adaptive"``: AE-SAM's moving mean :math:`\mu_t` of :math:`\|g_t\|^2`
      (0 otherwise).
    sq_norm_var: ``when="adaptive"``: AE-SAM's moving variance :math:`\sigma^2_t` of
      :math:`\|g_t\|^2` (0 otherwise).
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
  ascended: chex.Array
  ascent_steps: chex.Array
  ascent_fraction: chex.Array
  sq_norm_mean: chex.Array
  sq_norm_var: chex.Array
  settings: EigvecSettings


def xsam_correction(
  adv_grads: PyTree,
  eigvec: PyTree,
  alpha: jax.Array,
  *,
  normalize_grad: bool,
  correction: Correction,
  eps: float,
) -> tuple[PyTree, jax.Array, jax.Array]:
  r"""X-SAM's gradient correction, in float32.

  ``projection``: :math:`u - \alpha\langle u, v\rangle v`; ``official``:
  :math:`u - \alpha|\langle u, v\rangle| v`; with :math:`u = \hat g_{adv}` when
  ``normalize_grad`` else :math:`g_{adv}`. Returns ``(corrected, cos, ||g_adv||)`` where
  ``cos`` :math:`= \langle \hat g_{adv}, v\rangle` before correction.
  """
  unit, adv_norm = normalize_tree(adv_grads, eps)
  cos = tree_vdot(unit, eigvec)
  base = unit if normalize_grad else tree_to_f32(adv_grads)
  coef = cos if normalize_grad else tree_vdot(base, eigvec)
  if correction == "official":
    coef = jnp.abs(coef)
  return optax.tree.add_scale(base, -alpha * coef, eigvec), cos, adv_norm


@record_arguments
def xsam(
  rho: ScalarOrSchedule = 0.05,
  alpha: ScalarOrSchedule = 0.2,
  *,
  refresh_every: int = 5,
  num_iters: int = 5,
  normalize: bool = True,
  correction: Correction = "projection",
  eps: float = DEFAULT_EPS,
  axis_name: str | None = None,
  key: jax.Array | int = 0,
  solver: Solver = "power",
  accumulation_steps: int = 1,
  hvp_method: str = "exact",
  check_base_grad: bool = False,
  power_iters: int | None = None,
  seed: int | None = None,
  tracker: str | None = None,
  when: str | None = None,
  k: int | None = None,
  prob: ScalarOrSchedule | None = None,
  decay: float | None = None,
  threshold: ScalarOrSchedule | None = None,
  refresh_on: RefreshOn = "step",
) -> optax.GradientTransformationExtraArgs:
  r"""X-SAM: SAM with the perturbed gradient corrected along the top Hessian eigenvector.

  With the clean gradient :math:`g` (``updates``) and the cached unit top eigenvector
  :math:`v`:

  .. math::
     \epsilon = \rho\,\frac{g}{\|g\|+\mathrm{eps}},\quad
     g_{adv} = \nabla L_B(w+\epsilon),\quad
     \hat g_{adv} = \frac{g_{adv}}{\|g_{adv}\|+\mathrm{eps}},\quad
     \tilde g = \hat g_{adv} - \alpha\,\langle \hat g_{adv}, v\rangle\, v .

  :math:`\tilde g` is handed to the next optimizer in the chain. The component of the
  perturbed gradient along :math:`v` is shrunk by :math:`(1-\alpha)` and the orthogonal part
  kept, which widens the angle between the step and the sharpest direction. For
  :math:`\alpha\in[0,2]` the parallel part contracts, :math:`|1-\alpha|\le 1`.

  Variants:

  * ``normalize=False``: the operator of the paper's Theorem 5.1,
    :math:`\tilde g = (I - \alpha v v^\top)\, g_{adv}`, which keeps the gradient's scale.
    With ``normalize=True`` (default, as in the paper's Eq. 11 and the official code) the base
    optimizer receives a unit-norm direction, so the learning rate plays the role of a step
    length: tune it separately from SAM's.
  * ``correction="official"``: the authors' released code,
    :math:`\tilde g = \hat g_{adv} - \alpha\,|\langle\hat g_{adv}, v\rangle|\, v`. Because
    :math:`|c|\,v` flips with :math:`v \to -v`, whether the parallel component is shrunk or
    *amplified* (:math:`\times(1\pm\alpha)`) depends on the arbitrary sign that power iteration
    happens to return, and the step drifts persistently along :math:`+v`. It is provided to
    reproduce the code's numbers; the default ``"projection"`` is invariant under
    :math:`v\to -v` and always shrinks the parallel part, matching the paper's stated intent.

  The eigenvector is refreshed when ``count % refresh_every == 0`` (step 0 included) by
  ``num_iters`` warm-started power-iteration steps with HVPs
  ``jax.jvp(eig_grad_fn or grad_fn, (params,), (v,))`` at the clean parameters, inside a
  ``lax.cond`` around a ``lax.fori_loop``; ``update(..., refresh=True|False)`` decides on the
  host instead (straight-line HVPs, the fast path on XLA:CPU). With
  ``hvp_method="forward_difference"`` each HVP is one gradient,
  :math:`Hv \approx (\nabla L(w + hv) - \nabla L(w))/h` with
  :math:`h = \sqrt{u}(1+\|w\|)` (:func:`xsam_jax.hessian.hvp`), and the base gradient
  :math:`\nabla L(w)` is the step's clean gradient ``updates`` (free) unless ``eig_grad_fn`` is
  given (then one ``eig_grad_fn`` call per refresh): a refresh costs ``num_iters`` gradients
  instead of ``num_iters`` forward-over-reverse products (measured 2.1x a gradient each on
  ResNet-18), for a relative HVP error along the top eigenvector of :math:`6.7\cdot10^{-4}`-
  :math:`1.2\cdot10^{-3}` in float32 on small smooth nets (:func:`xsam_jax.hessian.hvp`),
  only with float32-or-wider parameters *and* loss computation.
  ``alpha = 0`` with
  ``normalize=False`` is exactly SAM; ``alpha = 0`` with ``normalize=True`` is normalised SAM.

  X-SAM on a subset of steps (``when``): the ascent and the correction run only on the steps
  that :func:`~xsam_jax.sometimes_sam`'s policies choose (``when="every"`` with ``k``,
  ``"random"`` with ``prob`` and ``key``, ``"adaptive"`` with ``decay`` and ``threshold``; the
  same code, :mod:`xsam_jax._policy`, so ``xsam`` and ``sometimes_sam`` with equal arguments
  ascend on the same steps), and the other steps hand on the clean gradient, normalised like
  the ascent steps' output: :math:`\hat g = g/(\|g\|+\mathrm{eps})` with ``normalize=True``
  (the base optimizer's learning rate keeps one meaning, a step length), :math:`g` with
  ``normalize=False``. A skipped step makes no ``grad_fn`` call beyond the clean gradient the
  caller already has (one ``lax.cond``, one compiled program; counted at run time in
  ``tests/test_xsam.py``). The refresh schedule, ``refresh_on``:

  * ``"step"`` (default): as without ``when``, every ``refresh_every``-th optimizer step, ascent
    or not (the cached vector is as old, in steps, as plain X-SAM's; a refresh on a skipped
    step still costs its ``num_iters`` HVPs). With ``when="every"``, choose ``refresh_every`` a
    multiple of ``k`` so that refreshes fall on ascent steps.
  * ``"ascent"`` (the cheap setting): on every ``refresh_every``-th ascent step (the ascent
    steps whose number of earlier ascended ``update`` calls is a multiple of
    ``refresh_every * accumulation_steps``); skipped steps never refresh. A step then costs on
    average :math:`1 + f` gradients and :math:`f\,q/p` HVPs, with :math:`f` the ascent
    fraction (:math:`1/k` for ``when="every"``), and the vector is about :math:`p/f` steps old
    when used.

  ``when=None`` (default) is X-SAM on every step, the program of the transform without these
  arguments. ``ascent_fraction`` in the state is the running fraction of ascent steps. On
  XLA:CPU, where the ``lax.cond`` around the ascent makes its gradient 20-30x slower, pass
  ``update(..., ascend=xsam_jax.ascent_due(count, when=..., ...))`` (a host-side Python bool,
  ``when="every"``/``"random"``; with ``refresh=xsam_jax.is_due(...)`` and
  ``refresh_on="step"`` no ``lax.cond`` is left in the step).
  Why arguments of ``xsam`` and not a wrapper ``sometimes(xsam(...))``: a wrapper would not
  know the scale of X-SAM's output (unit norm with ``normalize=True``) for the skipped steps,
  and by not calling the inner ``update`` on skipped steps it would freeze its ``count``, so
  ``rho``/``alpha`` schedules and the refresh period would silently count ascent steps only.

  Data parallel (``axis_name``) and gradient accumulation (``accumulation_steps``) work as in
  :func:`~xsam_jax.sam`: the correction is applied per micro-batch to the device-averaged
  perturbed gradient, with one eigenvector shared by all devices and refreshed on the first
  micro-batch of an optimizer step.

  With ``optax.inject_hyperparams`` pass ``static_args=("refresh_every", "num_iters")``: they
  are Python ints that fix the compiled program (an injected array is refused). Strings and
  bools (``solver``, ``hvp_method``, ``normalize``, ...) stay static by themselves; an int
  ``key`` and ``accumulation_steps`` may be injected as integer arrays, and a float ``key`` is
  refused (list it in ``static_args``).

  Args:
    rho: neighbourhood radius :math:`\rho \ge 0`, float or schedule (0.05 CIFAR-10, 0.1
      CIFAR-100 in the paper).
    alpha: correction strength in :math:`[0, 2]`, float or schedule (paper: 0.2).
    refresh_every: refresh period :math:`p` in optimizer steps, Python int >= 1 (official
      code: 3-5).
    num_iters: HVPs per refresh :math:`q`, Python int >= 1 (official code: 5).
    normalize: normalise the perturbed gradient before the correction (see above).
    correction: ``"projection"`` (sign-invariant, default) or ``"official"``.
    eps: added to every norm before division.
    axis_name: inside ``shard_map``/``pmap``: ascent from the local gradient (m-sharpness);
      the perturbed gradient, every HVP and the state's scalars are ``pmean``-ed, so all
      devices share one eigenvector and return the same corrected gradient.
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
      gradient per HVP, base gradient shared; see above). With ``"forward_difference"`` and no
      ``eig_grad_fn``, ``updates`` must be ``grad_fn(params)`` itself (not clipped or rescaled),
      or pass ``eig_grad_fn=grad_fn`` to have the base gradient recomputed. Float32 params
      and compute or wider: along the top eigenvector the error was 0.06-0.27 with
      float16/bfloat16 params and 0.66-0.96 with float32 params and a bfloat16 loss
      (:func:`xsam_jax.hessian.hvp`); use ``"exact"`` there.
    check_base_grad: forward differences only: at every refresh, spend one more ``grad_fn``
      call to measure :math:`\|g_{\text{updates}} - \nabla L(w)\|/\|\nabla L(w)\|` into the
      state's ``base_grad_mismatch`` (the trajectory is unchanged). A value above rounding
      level (:math:`\sim10^{-6}` in float32) means ``updates`` is not ``grad_fn(params)``
      and every HVP is off by that mismatch over :math:`h`; see ``XSAMState``.
    power_iters: deprecated alias of ``num_iters`` (one release; warns).
    seed: deprecated alias of ``key`` (one release; warns).
    tracker: deprecated alias of ``solver`` (one release; warns).
    when: None (every step ascends), ``"every"``, ``"random"`` or ``"adaptive"``: the steps
      that make the ascent and the correction (above; the policies of
      :func:`~xsam_jax.sometimes_sam`). ``"random"`` draws from ``key`` folded with the
      optimizer step, as :func:`~xsam_jax.sometimes_sam` does.
    k: ``when="every"`` only: ascend every ``k``-th optimizer step, a Python int >= 1
      (default 2).
    prob: ``when="random"`` only: the probability :math:`p_t \in [0, 1]` of an ascent, a
      float or a schedule (default 0.5).
    decay: ``when="adaptive"`` only: AE-SAM's moving-average factor in [0, 1] (default 0.9).
    threshold: ``when="adaptive"`` only: AE-SAM's :math:`c_t`, a float or a schedule
      (default 0).
    refresh_on: ``"step"`` (every ``refresh_every``-th optimizer step) or ``"ascent"`` (every
      ``refresh_every``-th ascent step; the same as ``"step"`` when ``when`` is None).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(updates, state, params, *,
    grad_fn, eig_grad_fn=None, refresh=None, ascend=None, **extra)``.

  Raises:
    ValueError: for ``rho < 0``, ``alpha`` outside ``[0, 2]``, ``refresh_every``,
      ``num_iters`` or ``accumulation_steps`` < 1, ``params`` with no entries (``{}``),
      ``check_base_grad=True`` without ``hvp_method="forward_difference"`` (or with
      ``solver="random"``), an unknown ``correction``, ``solver`` or ``hvp_method``, a
      ``key`` that is neither a PRNG key nor an int, a deprecated name given with its new one,
      when ``params`` or ``grad_fn`` is missing or ``grad_fn`` cannot be called as
      ``grad_fn(params)``, and for data-parallel misuse (see :func:`~xsam_jax.sam`); an
      unknown ``when`` or ``refresh_on``, a policy argument (``k``, ``prob``, ``decay``,
      ``threshold``) of another policy or without ``when``, the policy arguments'
      ranges as in :func:`~xsam_jax.sometimes_sam`, and an ``ascend`` that is not None or a
      Python bool, or given without ``when``.

  References:
    Duan, Chen & Guan, "X-SAM: Boosting Sharpness-Aware Minimization with Dominant-Eigenvector
    Gradient Correction", arXiv:2601.10251, 2026.
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021, arXiv:2010.01412.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w ** 2)
    >>> tx = optax.chain(xsam_jax.xsam(rho=0.05, alpha=0.2), optax.sgd(0.1))
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
    >>> # X-SAM on every 2nd step only, refreshing v on every 2nd of those (the cheap setting):
    >>> tx = optax.chain(xsam_jax.xsam(when="every", k=2, refresh_every=2, refresh_on="ascent"),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                              grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> int(state[0].ascent_steps), float(state[0].ascent_fraction), bool(state[0].ascended)
    (2, 0.5, False)
  """
  check_range("rho", rho, 0.0, hint="Use rho=0 to recover the base optimizer.")
  check_range("alpha", alpha, 0.0, 2.0, hint="alpha=0 is (normalised) SAM; 0.2 is the paper's.")
  num_iters = resolve_alias("xsam_jax.xsam", "num_iters", num_iters, 5, "power_iters", power_iters)
  key = resolve_alias("xsam_jax.xsam", "key", key, 0, "seed", seed)
  solver = resolve_alias("xsam_jax.xsam", "solver", solver, "power", "tracker", tracker)
  check_positive_int("refresh_every", refresh_every)
  check_positive_int("num_iters", num_iters)
  check_accumulation_steps(accumulation_steps)
  check_solver(solver)
  as_key(key, "xsam_jax.xsam")
  hessian.check_hvp_method(hvp_method)
  check_base_grad_flag(check_base_grad, hvp_method, solver)
  settings = make_settings(solver, num_iters, hvp_method, eps, key)
  if correction not in CORRECTIONS:
    raise ValueError(
      f"`correction` must be one of {CORRECTIONS}, got {correction!r}. 'projection' is the "
      "sign-invariant default; 'official' reproduces the authors' code."
    )
  policy = policy_args(
    "xsam_jax.xsam",
    when,
    {"k": k, "prob": prob, "decay": decay, "threshold": threshold},
    key,
    optional=True,
  )
  if refresh_on not in REFRESH_ON:
    raise ValueError(
      f"xsam_jax.xsam: `refresh_on` must be one of {REFRESH_ON}, got {refresh_on!r}. 'step' "
      "refreshes every refresh_every-th optimizer step; 'ascent' every refresh_every-th "
      "ascent step (with `when`, the cheap setting)."
    )
  if not isinstance(normalize, bool):
    raise ValueError(
      f"`normalize` must be a Python bool, got {normalize!r}. With optax.inject_hyperparams "
      "pass static_args=('normalize', 'refresh_every', 'num_iters')."
    )

  def init_fn(params: PyTree) -> XSAMState:
    # One buffer per field: a state donated to a jitted step must not hold one buffer twice.
    dtype = scalar_dtype(params)
    state = XSAMState(
      **ascent_fields(dtype),
      eigvec=init_eigvec(params, key, "xsam_jax.xsam"),
      eigval=jnp.zeros((), dtype),
      cos=jnp.zeros((), dtype),
      skipped_refreshes=jnp.zeros((), jnp.int32),
      base_grad_mismatch=jnp.zeros((), dtype),
      ascended=jnp.zeros((), bool),
      ascent_steps=jnp.zeros((), jnp.int32),
      ascent_fraction=jnp.zeros((), dtype),
      sq_norm_mean=jnp.zeros((), dtype),
      sq_norm_var=jnp.zeros((), dtype),
      settings=settings,
    )
    return place_state(state, params, state.eigvec)

  def update_fn(
    updates,
    state,
    params=None,
    *,
    grad_fn=None,
    eig_grad_fn=None,
    refresh=None,
    ascend=None,
    **extra_args,
  ):
    del extra_args
    check_update_args("xsam_jax.xsam", params, grad_fn)
    static = static_ascent(ascend, "xsam_jax.xsam", when)
    if eig_grad_fn is not None:
      check_grad_fn_signature("eig_grad_fn", eig_grad_fn, "xsam_jax.xsam")
    check_nonempty("params", params, "xsam_jax.xsam")
    check_clean_gradient(updates, "xsam_jax.xsam", axis_name)
    dtype = scalar_dtype(params)
    step = state.count // accumulation_steps
    mean, var = state.sq_norm_mean, state.sq_norm_var
    due, refresh_due = True, None
    if policy is not None:
      sq_norm = jnp.zeros((), dtype)
      if when == "adaptive":
        sq_norm = device_mean(jnp.square(tree_norm(updates)), axis_name, what="the gradient norm")
      due, mean, var = decide(
        when, policy, key, "xsam_jax.xsam", mean, var, sq_norm.astype(dtype), step, dtype
      )
      if static is not None:
        due = jnp.asarray(static)
      if refresh_on == "ascent":
        period = refresh_every * accumulation_steps
        refresh_due = due & (state.ascent_steps % period == 0)
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
      due=refresh_due,
    )
    eigval, eigvec = refreshed.eigval, refreshed.eigvec

    def ascend():
      perturbation, grad_norm = sam_perturbation(
        updates,
        params,
        read_hyperparam(rho, step, dtype),
        adaptive=False,
        eta=0.0,
        adaptive_mask=None,
        eps=eps,
      )
      adv_grads, curvature = perturbed_gradient(
        grad_fn, params, perturbation, axis_name, updates, eps
      )
      corrected, cos, adv_norm = xsam_correction(
        adv_grads,
        eigvec,
        read_hyperparam(alpha, step, dtype),
        normalize_grad=normalize,
        correction=correction,
        eps=eps,
      )
      grad_norm, perturbation_norm = device_mean(
        (grad_norm, tree_norm(perturbation)), axis_name, what="the gradient norm"
      )
      out = cast_ascent(
        Ascent(corrected, grad_norm, perturbation_norm, adv_norm, curvature), params, dtype
      )
      return out, jnp.asarray(cos).astype(dtype)

    def skip():
      clean = device_mean(updates, axis_name)
      clean = normalize_tree(clean, eps)[0] if normalize else clean
      return cast_ascent(skipped_ascent(clean, updates, state, axis_name), params, dtype), state.cos

    if policy is None:
      ascent, cos = ascend()
      due = jnp.asarray(due)
    else:
      (ascent, cos), due = run_branch(due, static, ascend, skip)
    count = optax.safe_increment(state.count)
    ascent_steps = state.ascent_steps + due.astype(state.ascent_steps.dtype)
    new_state = XSAMState(
      count=count,
      eigvec=eigvec,
      eigval=eigval,
      cos=cos,
      grad_norm=ascent.grad_norm,
      perturbation_norm=ascent.perturbation_norm,
      adv_grad_norm=ascent.adv_grad_norm,
      ascent_curvature=ascent.ascent_curvature,
      skipped_refreshes=refreshed.skipped_refreshes,
      base_grad_mismatch=refreshed.base_grad_mismatch,
      ascended=due,
      ascent_steps=ascent_steps,
      ascent_fraction=ascent_steps.astype(dtype) / jnp.maximum(count, 1).astype(dtype),
      sq_norm_mean=mean,
      sq_norm_var=var,
      settings=state.settings,  # from init: the state keeps its structure
    )
    return ascent.grads, keep_dtypes(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
