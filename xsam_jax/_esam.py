"""ESAM's stochastic weight perturbation (SWP): SAM's ascent on a random subset of the tensors.

The other half of ESAM, sharpness-sensitive data selection, needs per-example losses and so
lives in :mod:`xsam_jax.training` (:func:`~xsam_jax.training.select_sharp_examples`,
:func:`~xsam_jax.training.sharp_examples_grad_fn`): it is a ``grad_fn`` handed to this
transform, not part of it.
"""

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
  as_key,
  check_range,
  check_update_args,
  keep_dtypes,
  read_hyperparam,
  scalar_dtype,
  tree_cast_like,
  tree_norm,
)
from xsam_jax._policy import static_ascent
from xsam_jax._sam import ascent_fields, sam_ascent

PyTree = Any


class ESAMState(NamedTuple):
  r"""State of :func:`esam`.

  Attributes:
    count: number of ``update`` calls so far (int32 scalar), micro-batches included; the
      tensor draw and schedules read ``count // accumulation_steps``.
    grad_norm: global L2 norm of the clean gradient :math:`g` (``updates``, every tensor) at
      the last step. With ``axis_name``: the mean over devices of the local norms.
    perturbation_norm: global L2 norm of the ascent step :math:`\epsilon` at the last step:
      :math:`\rho/\beta` for SAM's ascent when at least one tensor was drawn (the Euclidean
      length of the adaptive step for ASAM), 0 when none was or ``rho = 0``. With
      ``axis_name``: the mean over devices of the local norms.
    adv_grad_norm: global L2 norm of the perturbed gradient :math:`g_{adv} = \nabla L_B(w +
      \epsilon)` at the last step. With ``axis_name``: the norm of the mean over devices.
    ascent_curvature: :math:`\langle \epsilon, g_{adv} - g\rangle / \|\epsilon\|^2 \approx
      \hat\epsilon^\top H \hat\epsilon` along the (masked) ascent step at the last step; 0 when
      :math:`\epsilon = 0`. With ``axis_name``: the mean over devices of each device's value.
    perturbed_fraction: fraction of the parameter *entries* that lie in the tensors drawn at
      the last step (1 for ``beta = 1``; on average about ``beta`` when tensors are of similar
      size).

  Every float scalar is float32, or float64 for float64 params; dtypes never change across
  steps.
  """

  count: chex.Array
  grad_norm: chex.Array
  perturbation_norm: chex.Array
  adv_grad_norm: chex.Array
  ascent_curvature: chex.Array
  perturbed_fraction: chex.Array


def _check_beta(beta: Any) -> None:
  """``beta`` must be a Python (or concrete) number in (0, 1]."""
  ok = isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0.0 < beta <= 1.0
  if not ok:
    raise ValueError(
      f"xsam_jax.esam: `beta` must be a float in (0, 1], the probability that a tensor is "
      f"perturbed (the official code uses 0.5-0.6; 1 is SAM), got {beta!r}. The perturbation "
      "is divided by beta, so 0 is refused: use xsam_jax.sam with rho=0 for no ascent."
    )


def draw_tensors(key: jax.Array, step: jax.Array, tree: PyTree, beta: float) -> PyTree:
  """The tensors ESAM perturbs at optimizer step ``step``: a pytree of bool scalars.

  Leaf :math:`i` (in ``jax.tree.leaves`` order) is kept when
  ``jax.random.bernoulli(jax.random.split(jax.random.fold_in(key, step), n)[i], beta)``, with
  ``n`` the number of leaves; ``beta = 1`` keeps every leaf without drawing. The draw depends
  only on ``key`` and ``step`` (not on the data or the device), so it is reproducible, the same
  for every micro-batch of one optimizer step and the same on every device.
  """
  leaves, treedef = jax.tree.flatten(tree)
  if beta == 1.0 or not leaves:
    return jax.tree.unflatten(treedef, [jnp.ones((), bool) for _ in leaves])
  keys = jax.random.split(jax.random.fold_in(key, step), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.bernoulli(k, beta) for k in keys])


@record_arguments
def esam(
  rho: ScalarOrSchedule = 0.05,
  *,
  beta: float = 0.5,
  key: Any = 0,
  adaptive: bool = False,
  eta: float = 0.01,
  adaptive_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
  eps: float = DEFAULT_EPS,
  axis_name: str | None = None,
  accumulation_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""ESAM's stochastic weight perturbation: SAM's ascent on a random subset of the tensors.

  At optimizer step :math:`t` each parameter tensor (pytree leaf) :math:`i` is drawn with
  probability :math:`\beta`, :math:`m_i \sim \mathrm{Bernoulli}(\beta)` (from ``key`` folded
  with :math:`t`; see :func:`draw_tensors`), and only the drawn tensors move:

  .. math::
     \epsilon = \frac{\rho}{\beta}\,\frac{m \odot g}{\|m \odot g\| + \mathrm{eps}}, \qquad
     \tilde g = \nabla L_B(w + \epsilon),

  and :math:`\tilde g` (every tensor's gradient at the ascent point) goes to the optimizer
  chained after it. ASAM (``adaptive=True``):
  :math:`\epsilon = \frac{\rho}{\beta} T^2 (m\odot g)/\|T (m\odot g)\|`,
  :math:`T = |w| + \eta`. With :math:`\beta = 1` it is exactly :func:`~xsam_jax.sam`.

  What the official code (``dydjw9/Efficient_SAM``, ``utils/Esam.py``) does, and where this
  follows it:

  * The draw is per *tensor* (``random.random() > beta`` per parameter turns its
    ``requires_grad`` off), not per entry: followed. (The paper writes a mask :math:`m`; the
    code draws whole tensors.)
  * Its gradient norm runs over the drawn tensors only (the others have no gradient in the
    first backward pass), and the step is scaled by :math:`\rho/((\|m\odot g\| + 10^{-7})
    \beta)`, so :math:`\|\epsilon\| = \rho/\beta`: followed (``eps`` in place of
    :math:`10^{-7}`).
  * The second backward pass computes every tensor's gradient at :math:`w + \epsilon` and the
    base optimizer steps on all of it: followed.
  * Timing: the code draws the tensors of step :math:`t` at the end of step :math:`t-1` and
    perturbs every tensor at step 0; here each step draws its own (step 0 included), which is
    the same rule up to that first step.
  * If no tensor is drawn, :math:`\epsilon = 0` and the step is the clean gradient (the code's
    scale multiplies zero gradients too); ``grad_fn`` is still called.

  Cost: the saving in the paper comes from PyTorch skipping the weight gradients of the
  undrawn tensors in the first backward pass. Here the clean gradient ``updates`` is computed
  by the caller before the draw, for every tensor, and ``grad_fn`` computes every tensor's
  gradient, so SWP saves **no** computation in JAX: a step costs two full gradient evaluations,
  like :func:`~xsam_jax.sam` (a jitted program cannot skip a weight gradient chosen by a
  traced draw). It is the update rule, offered for faithful comparisons. ESAM's other half,
  data selection, does save compute in JAX (the second backward runs on a gathered subset of
  static size): see :func:`xsam_jax.training.sharp_examples_grad_fn`, whose ``grad_fn`` this
  transform takes unchanged.

  Data parallel and accumulation: as :func:`~xsam_jax.sam` (``axis_name`` inside
  ``shard_map``/``pmap``: each device ascends along its own masked gradient, with the same
  tensors drawn on every device; :func:`~xsam_jax.accumulate` for accumulation: every
  micro-batch of one optimizer step uses the same tensors).

  Args:
    rho: neighbourhood radius :math:`\rho \ge 0`, a float or a schedule ``step -> rho``
      (before the division by :math:`\beta`; the official runs use 0.05-0.2).
    beta: probability :math:`\beta \in (0, 1]` that a tensor is perturbed, a Python float
      (the official scripts use 0.5-0.6).
    key: a PRNG key (``jax.random.key(0)``) or an int seed for the tensor draws.
    adaptive: use ASAM's scale-invariant neighbourhood on the drawn tensors.
    eta: ASAM's offset :math:`\eta \ge 0`.
    adaptive_mask: ASAM only: leaves marked False use :math:`T = 1` (see
      :func:`~xsam_jax.sam`).
    eps: added to every norm before division.
    axis_name: the mapped axis name inside ``shard_map``/``pmap``, or None under plain ``jit``.
    accumulation_steps: set by :func:`~xsam_jax.accumulate` only.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ESAMState`;
    ``update(updates, state, params, *, grad_fn, **extra)``.

  Raises:
    ValueError: for ``beta`` outside (0, 1] or not a number, ``rho < 0``, ``eta < 0``, a
      ``key`` that is neither a PRNG key nor an int, ``accumulation_steps`` as in
      :func:`~xsam_jax.sam`, a missing ``params`` or ``grad_fn``, an ``ascend=`` (ESAM
      ascends on every step), and the data-parallel misuse :func:`~xsam_jax.sam` refuses.

  References:
    Du, Yan, Feng, Zhou, Zhen, Goh & Tan, "Efficient Sharpness-aware Minimization for Improved
    Training of Neural Networks", ICLR 2022, arXiv:2110.03141; official code
    github.com/dydjw9/Efficient_SAM (``utils/Esam.py``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> loss = lambda p: jnp.sum((p["a"] - 1.0) ** 2) + jnp.sum((p["b"] + 1.0) ** 2)
    >>> tx = optax.chain(xsam_jax.esam(rho=0.05, beta=0.5, key=1), optax.sgd(0.1))
    >>> params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            grad_fn=jax.grad(loss))
    >>> # Key 1 draws tensor "a" only (3 of 5 entries), moved by rho / beta = 0.1:
    >>> round(float(state[0].perturbed_fraction), 3), round(float(state[0].perturbation_norm), 3)
    (0.6, 0.1)
    >>> # "b" was not perturbed and the loss is separable: its update is SGD's, -0.1 * 2.
    >>> bool(jnp.allclose(updates["a"], 0.1 * 2 * (1 + 0.1 / 3**0.5)))
    True
    >>> bool(jnp.allclose(updates["b"], -0.2))
    True
  """
  _check_beta(beta)
  check_range("rho", rho, 0.0, hint="Use rho=0 to recover the base optimizer.")
  check_range("eta", eta, 0.0)
  as_key(key, "xsam_jax.esam")
  check_accumulation_steps(accumulation_steps)
  method = "xsam_jax.esam"
  beta = float(beta)

  def init_fn(params: PyTree) -> ESAMState:
    dtype = scalar_dtype(params)
    state = ESAMState(
      **ascent_fields(dtype),
      perturbed_fraction=jnp.zeros((), dtype),
    )
    return place_state(state, params)

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    static_ascent(extra_args.get("ascend"), method, None)  # refused: no policy here
    del extra_args
    check_update_args(method, params, grad_fn)
    check_clean_gradient(updates, method, axis_name)
    dtype = scalar_dtype(params)
    step = state.count // accumulation_steps
    drawn = draw_tensors(as_key(key, method), step, updates, beta)
    masked = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), updates, drawn)
    # The ascent along the masked gradient. Its curvature <eps, g_adv - m*g>/|eps|^2 equals
    # <eps, g_adv - g>/|eps|^2, since eps is zero wherever m is; its grad_norm is that of m*g,
    # replaced below by the clean gradient's.
    ascent = sam_ascent(
      masked,
      params,
      grad_fn,
      read_hyperparam(rho, step, dtype) / beta,
      adaptive=adaptive,
      eta=eta,
      adaptive_mask=adaptive_mask,
      eps=eps,
      axis_name=axis_name,
    )
    sizes = [jnp.size(g) for g in jax.tree.leaves(updates)]
    kept = sum(s * m.astype(dtype) for s, m in zip(sizes, jax.tree.leaves(drawn), strict=True))
    new_state = ESAMState(
      count=optax.safe_increment(state.count),
      grad_norm=device_mean(tree_norm(updates), axis_name, what="the gradient norm"),
      perturbation_norm=ascent.perturbation_norm,
      adv_grad_norm=ascent.adv_grad_norm,
      ascent_curvature=ascent.ascent_curvature,
      perturbed_fraction=kept / max(sum(sizes), 1),
    )
    return tree_cast_like(ascent.grads, params), keep_dtypes(new_state, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
