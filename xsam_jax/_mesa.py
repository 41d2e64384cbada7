r"""MESA: SAM's effect from a KL term towards an exponential moving average of the weights.

MESA ("memory-efficient sharpness-aware training", the EMA variant of SAF) adds to the
cross-entropy a distillation term towards the predictions of a teacher whose weights are an
exponential moving average (EMA) of the trained weights:

.. math::

  \bar w_{t+1} = \beta \bar w_t + (1 - \beta) w_{t+1}, \qquad
  L(w) = \mathrm{CE}(f_w(x), y)
    + \lambda \tau^2 \, \mathrm{KL}\big(\mathrm{softmax}(f_{\bar w}(x)/\tau) \,\|\,
      \mathrm{softmax}(f_w(x)/\tau)\big).

One extra forward pass (the teacher's, no gradient through it), no second gradient. The pieces
here need only JAX; the Flax glue (the teacher's forward pass, a ``TrainState`` that keeps the
EMA) is in :mod:`xsam_jax.training`, which re-exports these names.

Settings of the official code (``AngusDujw/SAF``, ``MESA_train.py`` and ``run.sh``): the EMA is
timm's ``ModelEmaV2`` (parameters *and* BatchNorm buffers, a copy of the initial model, updated
after every optimizer step, decay 0.9998; the teacher runs in eval mode), temperature
:math:`\tau = 5`, :math:`\lambda = 0.8` in the ImageNet command (argument default 0.3), and the
term is on when ``epoch > kl_start_epoch`` with ``kl_start_epoch = 5`` (0-based epochs: from the
seventh epoch). The KL is summed over classes, averaged over the batch and multiplied by
:math:`\tau^2`.

References:
  Du, Zhou, Feng, Tan & Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022,
  arXiv:2205.14083 (MESA: Section 4 and the official code, github.com/AngusDujw/SAF).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

# The official code's settings (module docstring).
DEFAULT_DECAY = 0.9998
DEFAULT_TEMPERATURE = 5.0
DEFAULT_WEIGHT = 0.8


def _concrete(value: Any) -> float | None:
  """The Python float behind ``value``, or None for a traced array."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def check_decay(decay: Any) -> None:
  """Raises ``ValueError`` unless a concrete ``decay`` lies in [0, 1)."""
  x = _concrete(decay)
  if x is not None and not 0.0 <= x < 1.0:  # also catches NaN
    raise ValueError(
      f"`decay` must be in [0, 1), got {decay!r}: the EMA keeps `decay` of its value per step "
      "(the official MESA code uses 0.9998; 1 would never move, a value >= 1 or < 0 diverges)."
    )


def _check_loss_args(weight: Any, temperature: Any) -> None:
  w = _concrete(weight)
  if w is not None and not (w >= 0.0 and math.isfinite(w)):
    raise ValueError(
      f"`weight` must be a finite number >= 0, got {weight!r}: it scales the KL term "
      "(0 turns MESA off; the official code uses 0.8)."
    )
  t = _concrete(temperature)
  if t is not None and not (t > 0.0 and math.isfinite(t)):
    raise ValueError(
      f"`temperature` must be a finite number > 0, got {temperature!r}: the logits are divided "
      "by it (the official MESA code uses 5)."
    )


class MESAState(NamedTuple):
  """The teacher of MESA: an exponential moving average of the model's variables.

  Attributes:
    count: number of :func:`mesa_update` calls so far (int32 scalar).
    ema: the moving average, shaped like the tracked tree (for a Linen model the variables
      ``{'params': ..., 'batch_stats': ...}``, for NNX the pure state of ``nnx.Param`` and
      ``nnx.BatchStat``); dtypes are those of the tree it was initialised from.
  """

  count: jax.Array
  ema: PyTree


def ema_update(ema: PyTree, new: PyTree, decay: float | jax.Array) -> PyTree:
  r"""One step of an exponential moving average, leaf by leaf.

  .. math:: \bar w \leftarrow \beta \bar w + (1 - \beta) w

  computed in at least float32 and cast back to the dtype of each ``ema`` leaf. Integer and
  boolean leaves (counters) take the new value.

  Args:
    ema: the average so far.
    new: the new value, shaped like ``ema``.
    decay: :math:`\beta` in [0, 1) (a traced scalar is accepted unchecked).

  Returns:
    The updated average, with the dtypes of ``ema``.

  Raises:
    ValueError: if a concrete ``decay`` is outside [0, 1).

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax import training
    >>> training.ema_update(jnp.array([1.0, 2.0]), jnp.array([3.0, 0.0]), 0.75)
    Array([1.5, 1.5], dtype=float32)
  """
  check_decay(decay)

  def one(e: jax.Array, w: jax.Array) -> jax.Array:
    e, w = jnp.asarray(e), jnp.asarray(w)
    if not jnp.issubdtype(e.dtype, jnp.inexact):
      return w.astype(e.dtype)
    dtype = jnp.promote_types(e.dtype, jnp.float32)
    d = jnp.asarray(decay, dtype)
    out = d * e.astype(dtype) + (1 - d) * w.astype(dtype)
    return out.astype(e.dtype)

  return jax.tree.map(one, ema, new)


def mesa_init(tree: PyTree) -> MESAState:
  """The teacher at step 0: a copy of ``tree`` (timm's ``ModelEmaV2`` copies the initial model).

  Args:
    tree: what to average (model variables).

  Returns:
    A :class:`MESAState` with ``count = 0`` and ``ema`` a copy of ``tree``.

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax import training
    >>> state = training.mesa_init({"w": jnp.ones(2)})
    >>> int(state.count), state.ema["w"].tolist()
    (0, [1.0, 1.0])
  """
  return MESAState(count=jnp.zeros([], jnp.int32), ema=jax.tree.map(jnp.array, tree))


def mesa_update(state: MESAState, tree: PyTree, *, decay: float | jax.Array) -> MESAState:
  r"""Moves the teacher towards ``tree``: :math:`\bar w \leftarrow \beta\bar w + (1-\beta) w`.

  Call it after each optimizer step with the new variables (the official code updates the EMA
  after ``optimizer.step()``, BatchNorm buffers included).

  Args:
    state: the teacher so far.
    tree: the model's current variables, shaped like ``state.ema``.
    decay: :math:`\beta` in [0, 1).

  Returns:
    The new :class:`MESAState` (``count`` + 1).

  Raises:
    ValueError: if a concrete ``decay`` is outside [0, 1).

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax import training
    >>> state = training.mesa_update(training.mesa_init(jnp.zeros(2)), jnp.ones(2), decay=0.9)
    >>> int(state.count), [round(x, 6) for x in state.ema.tolist()]
    (1, [0.1, 0.1])
  """
  return MESAState(count=state.count + 1, ema=ema_update(state.ema, tree, decay))


def trajectory_kl(
  logits: jax.Array, ema_logits: jax.Array, *, temperature: float | jax.Array
) -> jax.Array:
  r"""MESA's KL term, :math:`\tau^2` times the batch mean of the KL from teacher to student.

  .. math::

    \tau^2 \frac{1}{B} \sum_{b} \sum_{c} q_{bc} (\log q_{bc} - \log p_{bc}), \quad
    q = \mathrm{softmax}(f_{\bar w}(x)/\tau), \; p = \mathrm{softmax}(f_w(x)/\tau),

  over the last axis (classes), averaged over all others, in at least float32. No gradient
  flows into ``ema_logits`` (``stop_gradient``). The factor :math:`\tau^2` keeps the gradient's
  scale independent of :math:`\tau`, as in the official code.

  Args:
    logits: the student's logits :math:`f_w(x)`, shape ``(..., classes)``.
    ema_logits: the teacher's logits :math:`f_{\bar w}(x)`, same shape.
    temperature: :math:`\tau > 0`.

  Returns:
    A scalar.

  Raises:
    ValueError: if a concrete ``temperature`` is not > 0, or the shapes differ.

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax import training
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> float(training.trajectory_kl(z, z, temperature=5.0))  # same predictions: no penalty
    0.0
  """
  _check_loss_args(0.0, temperature)
  if jnp.shape(logits) != jnp.shape(ema_logits):
    raise ValueError(
      f"`logits` {jnp.shape(logits)} and `ema_logits` {jnp.shape(ema_logits)} must have the "
      "same shape: the teacher's logits on the same inputs."
    )
  dtype = jnp.promote_types(jnp.result_type(logits), jnp.float32)
  tau = jnp.asarray(temperature, dtype)
  log_p = jax.nn.log_softmax(jnp.asarray(logits, dtype) / tau, axis=-1)
  log_q = jax.nn.log_softmax(jax.lax.stop_gradient(jnp.asarray(ema_logits, dtype)) / tau, axis=-1)
  kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  return tau**2 * jnp.mean(kl)


def mesa_loss(
  logits: jax.Array,
  ema_logits: jax.Array,
  labels: jax.Array,
  *,
  weight: float | jax.Array = DEFAULT_WEIGHT,
  temperature: float | jax.Array = DEFAULT_TEMPERATURE,
) -> jax.Array:
  r"""MESA's loss: cross-entropy plus ``weight`` times :func:`trajectory_kl`.

  .. math::

    L = \frac{1}{B}\sum_b \mathrm{CE}(f_w(x_b), y_b)
      + \lambda \tau^2 \frac{1}{B}\sum_b \mathrm{KL}\big(\mathrm{softmax}(f_{\bar w}(x_b)/\tau)
        \,\|\, \mathrm{softmax}(f_w(x_b)/\tau)\big)

  in at least float32. ``weight`` may be traced, e.g. ``jnp.where(step >= start, λ, 0.)`` to
  switch the term on at a start epoch inside a compiled step; with ``weight = 0`` the gradient
  is that of the cross-entropy.

  Args:
    logits: the student's logits, shape ``(batch, classes)``.
    ema_logits: the teacher's logits on the same inputs (no gradient flows into them).
    labels: integer labels, shape ``(batch,)``.
    weight: :math:`\lambda \ge 0` (official code: 0.8).
    temperature: :math:`\tau > 0` (official code: 5).

  Returns:
    The scalar loss.

  Raises:
    ValueError: if a concrete ``weight`` is negative or ``temperature`` not positive.

  References:
    Du, Zhou, Feng, Tan & Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022,
    arXiv:2205.14083.

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax import training
    >>> z, labels = jnp.array([[2.0, 0.0]]), jnp.array([0])
    >>> ce = float(training.mesa_loss(z, z, labels, weight=0.8))  # teacher agrees: CE alone
    >>> round(ce, 4)
    0.1269
    >>> float(training.mesa_loss(z, -z, labels, weight=0.8)) > ce  # teacher disagrees
    True
  """
  _check_loss_args(weight, temperature)
  dtype = jnp.promote_types(jnp.result_type(logits), jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits, dtype), labels).mean()
  kl = trajectory_kl(logits, ema_logits, temperature=temperature)
  return ce + jnp.asarray(weight, dtype) * kl
