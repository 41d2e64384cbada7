r"""Flax glue: the clean pass, ``grad_fn`` and ``eig_grad_fn`` for NNX and Linen models.

Every sharpness method in :mod:`xsam_jax` needs, besides the clean minibatch gradient,
``grad_fn(params) -> grads``: the gradient of the *same* minibatch loss at other parameters.
With BatchNorm and dropout "the same loss" needs care, and this module is the one place that
takes it. The conventions, those of the SAM paper's and the Eigen-SAM/X-SAM authors' code:

* The clean pass runs in train mode (batch statistics, dropout on) and is the only pass whose
  BatchNorm updates are kept in the model's running averages.
* ``grad_fn`` (the perturbed pass) also runs in train mode, so it normalises with the batch
  statistics at the perturbed weights, and uses the dropout randomness of the clean pass; its
  BatchNorm updates land on a throwaway copy.
* ``eig_grad_fn`` (for the Hessian-vector products of Eigen-SAM/X-SAM) runs in eval mode:
  BatchNorm with the running averages held *before* this step's update, no dropout. Pass it as
  ``eig_grad_fn=`` to use it; without it the HVPs come from ``grad_fn``.

NNX models are switched with ``Module.train()``/``Module.eval()`` (the ``deterministic`` and
``use_running_average`` attributes) on throwaway copies, so the caller's model keeps its mode.
Linen models are called as ``apply_fn({'params': p, 'batch_stats': s}, x, train=...)``.

* :func:`nnx_grad_fns` -- the clean pass of an NNX model and its ``grad_fn``/``eig_grad_fn``;
  use with ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, grad_fn=...)``.
* :class:`TrainState` -- a Linen ``TrainState`` with ``batch_stats`` whose ``apply_gradients``
  forwards ``grad_fn``, ``eig_grad_fn``, ``refresh``... to ``tx.update``.
* :func:`linen_grad_fns` -- the clean pass of a Linen model and its ``grad_fn``/``eig_grad_fn``.
* :func:`select_sharp_examples` -- ESAM's sharpness-sensitive data selection: the fraction of a
  batch whose loss rose most from :math:`w` to :math:`w + \epsilon`.
* :func:`sharp_examples_grad_fn` -- a ``grad_fn`` on those examples only, for
  :func:`xsam_jax.esam` (ESAM's other half) or any other method.
* :func:`nnx_refresh_eigenvector` -- :func:`xsam_jax.refresh_eigenvector` for the state of an
  ``nnx.Optimizer`` (whose leaves are wrapped in Flax variables).
* MESA (Du et al. 2022), SAM's effect from a KL term towards an EMA of the weights:
  :func:`mesa_loss` (cross-entropy + :func:`trajectory_kl`), the EMA teacher
  (:class:`MESAState`, :func:`mesa_init`, :func:`mesa_update`, :func:`ema_update`), and its
  glue: :class:`MESATrainState` (Linen: keeps and updates the EMA, ``teacher_logits``),
  :func:`nnx_mesa_init`/:func:`nnx_mesa_update`/:func:`nnx_teacher` (NNX).

A whole training step compiles once under ``nnx.jit`` or ``jax.jit``.

References:
  Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
  Generalization", ICLR 2021, arXiv:2010.01412 (BatchNorm statistics from the clean pass only).
  Du, Zhou, Feng, Tan & Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022,
  arXiv:2205.14083 (MESA; official code github.com/AngusDujw/SAF).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

try:
  from flax import nnx, struct
  from flax.training import train_state
except ImportError as e:  # flax is an optional dependency of the library
  raise ImportError(
    "xsam_jax.training needs flax, which `pip install xsam_jax` does not install: "
    "pip install 'xsam_jax[flax]' (the rest of xsam_jax works without it)"
  ) from e

PyTree = Any
GradFn = Callable[[PyTree], PyTree]

__all__ = [
  "LinenGradFns",
  "MESAState",
  "MESATrainState",
  "NNXGradFns",
  "SharpExamples",
  "TrainState",
  "ema_update",
  "linen_grad_fns",
  "mesa_init",
  "mesa_loss",
  "mesa_update",
  "nnx_grad_fns",
  "nnx_mesa_init",
  "nnx_mesa_update",
  "nnx_refresh_eigenvector",
  "nnx_teacher",
  "select_sharp_examples",
  "sharp_examples_grad_fn",
  "trajectory_kl",
]


def _split_aux(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
  """``(loss, aux)`` from a loss function's output; ``aux`` is None when ``has_aux`` is False."""
  if not has_aux:
    return out, None
  if not (isinstance(out, tuple) and len(out) == 2):
    raise ValueError(
      "With has_aux=True the loss function must return a pair (loss, aux), got "
      f"{type(out).__name__}."
    )
  return out


# --------------------------------------------------------------------------------------------
# NNX


class NNXGradFns(NamedTuple):
  """What :func:`nnx_grad_fns` returns.

  Attributes:
    loss: the clean minibatch loss (train mode).
    aux: the auxiliary output of the loss function with ``has_aux=True``, else None.
    grads: the clean gradient, an ``nnx.State`` of ``wrt`` variables like ``nnx.grad`` returns;
      hand it to ``nnx.Optimizer.update``.
    grad_fn: ``params -> grads`` of the same loss in train mode (same dropout randomness,
      BatchNorm updates discarded). Returns the structure it is given: pure arrays for the
      ``nnx.as_pure`` state ``nnx.Optimizer`` passes, ``Param`` variables for a split state.
    eig_grad_fn: ``params -> grads`` of the same loss in eval mode (running averages from
      before this step, no dropout), for Hessian-vector products.
  """

  loss: jax.Array
  aux: Any
  grads: nnx.State
  grad_fn: GradFn
  eig_grad_fn: GradFn


def nnx_grad_fns(
  model: nnx.Module,
  loss_fn: Callable[..., Any],
  *args: Any,
  wrt: Any = nnx.Param,
  has_aux: bool = False,
) -> NNXGradFns:
  """Runs the clean pass of an NNX model and builds ``grad_fn``/``eig_grad_fn`` for it.

  The model is split once, ``graphdef, params, rest = nnx.split(model, wrt, ...)``, and
  ``rest`` (BatchNorm statistics, RNG counters, everything not in ``wrt``) is snapshotted.
  Every pass merges a throwaway copy from that snapshot:

  * clean pass: train mode; its updated ``rest`` (new running averages, advanced RNG
    counters) is written back into ``model``, the only side effect of this function;
  * ``grad_fn(p)``: train mode, from the snapshot, so dropout draws the same masks as the clean
    pass (and as every other call) and BatchNorm updates are thrown away with the copy;
  * ``eig_grad_fn(p)``: eval mode (``Module.eval()``): BatchNorm running averages from the
    snapshot, dropout off.

  ``model``'s own mode attributes are not changed. Call it inside the jitted step (``nnx.jit``,
  or ``jax.jit`` around ``nnx.merge``/``nnx.split``); the step compiles once.

  Args:
    model: the NNX model; its non-``wrt`` state is updated in place by the clean pass.
    loss_fn: ``loss_fn(model, *args) -> loss`` (or ``(loss, aux)`` with ``has_aux=True``), a
      scalar loss of one minibatch, as for ``nnx.value_and_grad``.
    *args: passed to ``loss_fn`` after the model (e.g. the inputs and labels).
    wrt: filter of the differentiated variables; must match ``nnx.Optimizer(..., wrt=...)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    An :class:`NNXGradFns` ``(loss, aux, grads, grad_fn, eig_grad_fn)``.

  References:
    Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021, arXiv:2010.01412.

  Example:
    >>> import jax.numpy as jnp, optax, xsam_jax
    >>> from flax import nnx
    >>> from xsam_jax import training
    >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 1, rngs=nnx.Rngs(1)))
    >>> tx = optax.chain(xsam_jax.xsam(rho=0.05, alpha=0.2), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   out = training.nnx_grad_fns(model, loss_fn, x, y)
    ...   optimizer.update(model, out.grads, grad_fn=out.grad_fn, eig_grad_fn=out.eig_grad_fn)
    ...   return out.loss
    >>> x, y = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), jnp.ones((4, 1))
    >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(3)]
    >>> losses[0] > losses[1] > losses[2]  # it trains
    True
  """
  graphdef, params, rest = nnx.split(model, wrt, ...)
  # Plain arrays: every merge below builds fresh variables, never aliasing the model's.
  rest = nnx.as_pure(rest)

  def loss_at(p: PyTree, train: bool) -> tuple[jax.Array, tuple[Any, nnx.State]]:
    copy = nnx.merge(graphdef, nnx.as_pure(p), rest)
    if train:
      copy.train()
    else:
      copy.eval()
    loss, aux = _split_aux(loss_fn(copy, *args), has_aux)
    return loss, (aux, nnx.split(copy, wrt, ...)[2])

  (loss, (aux, new_rest)), grads = jax.value_and_grad(lambda p: loss_at(p, True), has_aux=True)(
    params
  )
  nnx.update(model, new_rest)

  def grad_fn(p: PyTree) -> PyTree:
    return jax.grad(lambda q: loss_at(q, True)[0])(p)

  def eig_grad_fn(p: PyTree) -> PyTree:
    return jax.grad(lambda q: loss_at(q, False)[0])(p)

  return NNXGradFns(loss=loss, aux=aux, grads=grads, grad_fn=grad_fn, eig_grad_fn=eig_grad_fn)


# --------------------------------------------------------------------------------------------
# Linen


class TrainState(train_state.TrainState):
  """A Linen ``TrainState`` with ``batch_stats`` whose ``apply_gradients`` feeds the transform.

  Flax's stock ``apply_gradients`` calls ``tx.update(grads, opt_state, params)`` with no extra
  arguments, so ``grad_fn`` never reaches a sharpness method. Here every keyword argument that
  is not a field of the state is forwarded to ``tx.update``; fields (``batch_stats`` and any a
  subclass adds) are replaced, as in the stock class.

  Attributes:
    batch_stats: the model's ``'batch_stats'`` collection (BatchNorm running averages), or
      None for a model without one.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> import flax.linen as nn
    >>> from xsam_jax import training
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     return nn.Dense(1)(nn.relu(x))
    >>> x, y = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), jnp.ones((4, 1))
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> state = training.TrainState.create(
    ...   apply_fn=Net().apply, params=variables["params"],
    ...   batch_stats=variables["batch_stats"],
    ...   tx=optax.chain(xsam_jax.xsam(rho=0.05), optax.sgd(0.1)))
    >>> mse = lambda out, y: jnp.mean((out - y) ** 2)
    >>> @jax.jit
    ... def train_step(state, x, y):
    ...   out = training.linen_grad_fns(state, mse, x, y)
    ...   state = state.apply_gradients(grads=out.grads, batch_stats=out.batch_stats,
    ...                                 grad_fn=out.grad_fn, eig_grad_fn=out.eig_grad_fn)
    ...   return state, out.loss
    >>> losses = []
    >>> for _ in range(3):
    ...   state, loss = train_step(state, x, y)
    ...   losses.append(float(loss))
    >>> losses[0] > losses[1] > losses[2], int(state.step)  # it trains
    (True, 3)
  """

  batch_stats: Any = None

  def apply_gradients(self, *, grads: PyTree, **kwargs: Any) -> TrainState:
    """Applies one optimizer step, forwarding extra arguments to ``tx.update``.

    Computes ``updates, opt_state = tx.update(grads, opt_state, params, **extra_args)`` and
    ``params = optax.apply_updates(params, updates)``, increments ``step``, and replaces the
    fields named in ``kwargs``.

    Args:
      grads: the clean gradient, shaped like ``params``.
      **kwargs: keyword arguments named like a field of the state (``batch_stats``, or fields
        of a subclass) replace that field; all others (``grad_fn``, ``eig_grad_fn``,
        ``refresh``, ...) are passed to ``tx.update``.

    Returns:
      The updated state.

    Example:
      >>> import jax, jax.numpy as jnp, optax, xsam_jax
      >>> from xsam_jax import training
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> state = training.TrainState.create(
      ...   apply_fn=None, params=jnp.zeros(2),
      ...   tx=optax.chain(xsam_jax.sam(rho=0.05), optax.sgd(0.1)))
      >>> state = state.apply_gradients(grads=jax.grad(loss)(state.params),
      ...                               grad_fn=jax.grad(loss))
      >>> # One SAM step (SGD alone would reach 0.2), and the step count advanced:
      >>> bool(jnp.allclose(state.params, 0.1 * 2 * (1 + 0.05 / 2**0.5))), int(state.step)
      (True, 1)
    """
    fields = {f.name for f in dataclasses.fields(self)}
    replace = {k: v for k, v in kwargs.items() if k in fields}
    extra_args = {k: v for k, v in kwargs.items() if k not in fields}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      opt_state=opt_state,
      **replace,
    )


class LinenGradFns(NamedTuple):
  """What :func:`linen_grad_fns` returns.

  Attributes:
    loss: the clean minibatch loss (train mode).
    aux: the auxiliary output of the loss function with ``has_aux=True``, else None.
    grads: the clean gradient, shaped like ``state.params``.
    batch_stats: the ``'batch_stats'`` collection after the clean pass (``state.batch_stats``
      unchanged, e.g. None, for a model without one); hand it to
      ``TrainState.apply_gradients(batch_stats=...)``.
    grad_fn: ``params -> grads`` of the same loss in train mode (same dropout key, BatchNorm
      updates discarded).
    eig_grad_fn: ``params -> grads`` of the same loss in eval mode (``train=False``: running
      averages of ``state.batch_stats``, no dropout), for Hessian-vector products.
  """

  loss: jax.Array
  aux: Any
  grads: PyTree
  batch_stats: PyTree
  grad_fn: GradFn
  eig_grad_fn: GradFn


def linen_grad_fns(
  state: TrainState,
  loss_fn: Callable[[Any, Any], Any],
  inputs: Any,
  targets: Any,
  *,
  dropout_rng: jax.Array | None = None,
  has_aux: bool = False,
) -> LinenGradFns:
  """Runs the clean pass of a Linen model and builds ``grad_fn``/``eig_grad_fn`` for it.

  The model is called as ``state.apply_fn(variables, inputs, train=..., ...)`` with
  ``variables = {'params': p, 'batch_stats': state.batch_stats}`` (no ``'batch_stats'`` entry
  when ``state.batch_stats`` is None or empty):

  * clean pass and ``grad_fn(p)``: ``train=True, mutable=['batch_stats'],
    rngs={'dropout': dropout_rng}``; the statistics of the clean pass are returned, those of
    ``grad_fn`` thrown away; both draw the same dropout masks;
  * ``eig_grad_fn(p)``: ``train=False``: BatchNorm with the running averages in
    ``state.batch_stats`` (before this step's update), no dropout.

  Args:
    state: a :class:`TrainState` (anything with ``apply_fn``, ``params``, ``batch_stats``).
    loss_fn: ``loss_fn(outputs, targets) -> loss`` (or ``(loss, aux)`` with ``has_aux=True``),
      with ``outputs`` the model's output on ``inputs``, e.g.
      ``optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``.
    inputs: the model's input batch.
    targets: passed to ``loss_fn`` (labels).
    dropout_rng: the key of the ``'dropout'`` stream for this step, or None for a model without
      dropout.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A :class:`LinenGradFns` ``(loss, aux, grads, batch_stats, grad_fn, eig_grad_fn)``.

  References:
    Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021, arXiv:2010.01412.

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> import flax.linen as nn
    >>> from xsam_jax import training
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool):
    ...     x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))
    ...     return nn.Dense(3)(nn.Dropout(0.1, deterministic=not train)(x))
    >>> x, labels = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> state = training.TrainState.create(
    ...   apply_fn=Net().apply, params=variables["params"],
    ...   batch_stats=variables["batch_stats"],
    ...   tx=optax.chain(xsam_jax.sam(rho=0.05), optax.sgd(0.1)))
    >>> def loss_fn(logits, labels):
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    >>> out = training.linen_grad_fns(state, loss_fn, x, labels,
    ...                               dropout_rng=jax.random.key(1))
    >>> state = state.apply_gradients(grads=out.grads, batch_stats=out.batch_stats,
    ...                               grad_fn=out.grad_fn)
    >>> # The clean pass's batch statistics were kept: the running mean left its zeros.
    >>> bool(jnp.any(state.batch_stats["BatchNorm_0"]["mean"] != 0))
    True
  """
  batch_stats = state.batch_stats
  has_stats = bool(jax.tree.leaves(batch_stats))  # None or {}: a model without BatchNorm
  rngs = None if dropout_rng is None else {"dropout": dropout_rng}

  def variables(params: PyTree) -> dict[str, PyTree]:
    if has_stats:
      return {"params": params, "batch_stats": batch_stats}
    return {"params": params}

  def train_loss(params: PyTree) -> tuple[jax.Array, tuple[Any, PyTree]]:
    if has_stats:
      outputs, mutated = state.apply_fn(
        variables(params), inputs, train=True, mutable=["batch_stats"], rngs=rngs
      )
      new_stats = mutated["batch_stats"]
    else:
      outputs = state.apply_fn(variables(params), inputs, train=True, rngs=rngs)
      new_stats = batch_stats
    loss, aux = _split_aux(loss_fn(outputs, targets), has_aux)
    return loss, (aux, new_stats)

  def eval_loss(params: PyTree) -> jax.Array:
    outputs = state.apply_fn(variables(params), inputs, train=False)
    return _split_aux(loss_fn(outputs, targets), has_aux)[0]

  (loss, (aux, new_stats)), grads = jax.value_and_grad(train_loss, has_aux=True)(state.params)

  def grad_fn(p: PyTree) -> PyTree:
    return jax.grad(lambda q: train_loss(q)[0])(p)

  return LinenGradFns(
    loss=loss,
    aux=aux,
    grads=grads,
    batch_stats=new_stats,
    grad_fn=grad_fn,
    eig_grad_fn=jax.grad(eval_loss),
  )


def nnx_refresh_eigenvector(
  optimizer: nnx.Optimizer, model: nnx.Module, grad_fn: GradFn, **kwargs: Any
) -> None:
  """Refreshes the cached eigenvector(s) in an ``nnx.Optimizer``'s state, in place.

  :func:`xsam_jax.refresh_eigenvector` works on plain pytrees; an ``nnx.Optimizer`` keeps its
  state in Flax variables. This converts to the pure form, refreshes, and writes back.

  Args:
    optimizer: an ``nnx.Optimizer`` whose transform contains :func:`xsam_jax.xsam` or
      :func:`xsam_jax.eigen_sam`.
    model: the model whose parameters (filtered by ``optimizer.wrt``) the Hessian is taken at.
    grad_fn: ``params -> grads`` on the pure parameter state (e.g. ``out.eig_grad_fn`` of
      :func:`nnx_grad_fns`).
    **kwargs: forwarded to :func:`xsam_jax.refresh_eigenvector` (``num_iters``, ``solver``,
      ``unroll``, ...).

  Example:
    >>> import jax.numpy as jnp, optax, xsam_jax
    >>> from flax import nnx
    >>> from xsam_jax import training
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.chain(xsam_jax.xsam(), optax.sgd(0.1)),
    ...                           wrt=nnx.Param)
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> out = training.nnx_grad_fns(model, loss_fn, jnp.ones((4, 3)), jnp.zeros((4, 1)))
    >>> training.nnx_refresh_eigenvector(optimizer, model, out.eig_grad_fn, num_iters=10)
    >>> # The loss is 0.5 theta^T H theta with H = 2 z z^T, z = (1, 1, 1, 1): top eigenvalue 8.
    >>> round(float(optax.tree.get(nnx.as_pure(optimizer.opt_state), "eigval")), 3)
    8.0
  """
  import xsam_jax

  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  new_state = xsam_jax.refresh_eigenvector(
    nnx.as_pure(optimizer.opt_state), params, grad_fn, **kwargs
  )
  nnx.update(optimizer.opt_state, nnx.state(new_state))


# --------------------------------------------------------------------------------------------
# ESAM's sharpness-sensitive data selection


class SharpExamples(NamedTuple):
  r"""What :func:`select_sharp_examples` returns.

  Attributes:
    indices: int32 ``(k,)``, the selected examples, largest loss rise first (ties: lower index
      first), with ``k = floor(fraction * n)``.
    mask: bool ``(n,)``, True on the selected examples (``mask.mean()`` is ``k / n``): the
      weights of a weighted-mean loss, for a caller that keeps the whole batch.
    sharpness: float ``(n,)``, the per-example loss rise
      :math:`\ell_i(w + \epsilon) - \ell_i(w)`.
  """

  indices: jax.Array
  mask: jax.Array
  sharpness: jax.Array


def _selected_count(n: int, fraction: Any) -> int:
  """``floor(fraction * n)``; raises ``ValueError`` for a bad ``fraction`` or an empty pick."""
  ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
  if not ok or not 0.0 < fraction <= 1.0:
    raise ValueError(
      "ESAM data selection: `fraction` (the paper's gamma) must be a float in (0, 1], the share "
      f"of the batch whose gradient is taken (the official code uses 0.5), got {fraction!r}."
    )
  k = int(fraction * n)
  if k < 1:
    raise ValueError(
      f"ESAM data selection: `fraction`={fraction} of a batch of {n} examples selects none "
      f"(floor({fraction} * {n}) = 0). Use a fraction >= {1 / n:.3g} or a larger batch."
    )
  return k


def select_sharp_examples(
  clean_losses: jax.Array, perturbed_losses: jax.Array, fraction: float
) -> SharpExamples:
  r"""ESAM's sharpness-sensitive data selection: the examples whose loss rose most.

  With per-example losses :math:`\ell_i(w)` and :math:`\ell_i(w + \epsilon)` of a batch of
  :math:`n`, the sharpness of example :math:`i` is
  :math:`s_i = \ell_i(w + \epsilon) - \ell_i(w)`, and the selection
  :math:`B^+` is the :math:`k = \lfloor\gamma n\rfloor` examples with the largest :math:`s_i`
  (``jax.lax.top_k``; ties go to the lower index). :math:`k` is a Python int fixed by the
  batch shape, so the selection has a static size and a jitted step compiles once.

  The official code (``dydjw9/Efficient_SAM``, ``utils/Esam.py``) takes the :math:`k`-th largest
  :math:`s_i` as a cutoff and keeps the examples *strictly* above it, i.e. :math:`k - 1` of
  them when there are no ties, and all of them when :math:`\gamma \ge 0.99`; here exactly
  :math:`k` are kept (for :math:`\gamma = 1`, all).

  Where each half of ESAM lives: the stochastic weight perturbation is the transform
  :func:`xsam_jax.esam`; this selection needs per-example losses, which a transform never sees,
  so it lives here and enters through ``grad_fn`` (:func:`sharp_examples_grad_fn`).

  Args:
    clean_losses: ``(n,)`` per-example losses at :math:`w` (from the clean pass).
    perturbed_losses: ``(n,)`` per-example losses at :math:`w + \epsilon`.
    fraction: :math:`\gamma \in (0, 1]`, the share of the batch to keep (the official scripts
      use 0.5).

  Returns:
    A :class:`SharpExamples` ``(indices, mask, sharpness)``.

  Raises:
    ValueError: for ``fraction`` outside (0, 1], a ``fraction`` that keeps no example of the
      batch, or losses that are not two 1-D arrays of the same length.

  References:
    Du, Yan, Feng, Zhou, Zhen, Goh & Tan, "Efficient Sharpness-aware Minimization for Improved
    Training of Neural Networks", ICLR 2022, arXiv:2110.03141.

  Example:
    >>> import jax.numpy as jnp
    >>> from xsam_jax import training
    >>> clean = jnp.array([1.0, 1.0, 1.0, 1.0])
    >>> perturbed = jnp.array([1.5, 1.1, 2.0, 0.9])
    >>> sel = training.select_sharp_examples(clean, perturbed, fraction=0.5)
    >>> sel.indices.tolist(), sel.mask.tolist()
    ([2, 0], [True, False, True, False])
  """
  clean_losses, perturbed_losses = jnp.asarray(clean_losses), jnp.asarray(perturbed_losses)
  if clean_losses.ndim != 1 or clean_losses.shape != perturbed_losses.shape:
    raise ValueError(
      "ESAM data selection: `clean_losses` and `perturbed_losses` must be 1-D per-example "
      f"losses of the same batch, got shapes {clean_losses.shape} and "
      f"{perturbed_losses.shape}. Return the unreduced loss (e.g. "
      "optax.softmax_cross_entropy_with_integer_labels(logits, labels), without .mean())."
    )
  n = clean_losses.shape[0]
  k = _selected_count(n, fraction)
  sharpness = perturbed_losses - clean_losses
  _, indices = jax.lax.top_k(sharpness, k)
  mask = jnp.zeros((n,), bool).at[indices].set(True)
  return SharpExamples(indices.astype(jnp.int32), mask, sharpness)


def sharp_examples_grad_fn(
  per_example_loss: Callable[[PyTree, Any], jax.Array],
  batch: Any,
  clean_losses: jax.Array,
  fraction: float,
) -> GradFn:
  r"""A ``grad_fn`` restricted to the examples whose loss rose most: ESAM's data selection.

  ``grad_fn(p)`` runs the model forward on the whole batch at ``p`` (the ascent point
  :math:`w + \epsilon` that the transform hands it), selects :math:`B^+` with
  :func:`select_sharp_examples` against ``clean_losses`` (no gradient flows through the
  selection), gathers those :math:`k = \lfloor\gamma n\rfloor` examples and returns the
  gradient of their mean loss,

  .. math::
     \tilde g = \nabla_w \frac1k \sum_{i \in B^+} \ell_i(w)\Big|_{w + \epsilon},

  as the official code does (one forward without gradient on the batch, then a forward and a
  backward on ``inputs[indices]``). Hand it to :func:`xsam_jax.esam` for the whole of ESAM, or
  to :func:`xsam_jax.sam` for the data selection alone.

  Cost: the gather has a static size :math:`k`, so unlike the stochastic weight perturbation
  (see :func:`xsam_jax.esam`) this half really saves work in JAX: the second gradient costs a
  forward on :math:`n` examples plus a forward and backward on :math:`k`, instead of a forward
  and backward on :math:`n`.

  BatchNorm and dropout: whatever ``per_example_loss`` does. The selected subset is a smaller
  batch, so its BatchNorm statistics and dropout masks are the subset's own (as in the official
  code); use a ``per_example_loss`` that discards statistic updates, as ``grad_fn`` does in
  :func:`linen_grad_fns`. Under ``shard_map``/``pmap`` each device selects within its own
  shard (as the official code does under DDP).

  Args:
    per_example_loss: ``per_example_loss(params, batch) -> (n,)`` unreduced losses, for any
      ``batch`` with a leading example axis (it is called on the whole batch and on the
      gathered subset).
    batch: a pytree of arrays whose leading axis indexes the ``n`` examples (e.g.
      ``(inputs, labels)``).
    clean_losses: ``(n,)`` per-example losses at the current parameters :math:`w` (from the
      clean pass: return them as the auxiliary output of ``jax.value_and_grad``).
    fraction: :math:`\gamma \in (0, 1]` (the official scripts use 0.5).

  Returns:
    ``grad_fn(params) -> grads``.

  Raises:
    ValueError: as :func:`select_sharp_examples`, and for a ``batch`` whose leaves do not all
      have ``n = len(clean_losses)`` examples.

  References:
    Du, Yan, Feng, Zhou, Zhen, Goh & Tan, "Efficient Sharpness-aware Minimization for Improved
    Training of Neural Networks", ICLR 2022, arXiv:2110.03141; official code
    github.com/dydjw9/Efficient_SAM (``utils/Esam.py``, ``ESAM.step``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, xsam_jax
    >>> from xsam_jax import training
    >>> def per_example_loss(w, batch):
    ...   x, y = batch
    ...   return (x @ w - y) ** 2
    >>> x, y = jnp.eye(4, 2), jnp.array([1.0, -1.0, 0.0, 0.0])
    >>> w = jnp.zeros(2)
    >>> tx = optax.chain(xsam_jax.esam(rho=0.05, beta=1.0), optax.sgd(0.1))
    >>> state = tx.init(w)
    >>> (loss, clean), grads = jax.value_and_grad(
    ...   lambda p: (jnp.mean(per_example_loss(p, (x, y))), per_example_loss(p, (x, y))),
    ...   has_aux=True)(w)
    >>> grad_fn = training.sharp_examples_grad_fn(per_example_loss, (x, y), clean, 0.5)
    >>> updates, state = tx.update(grads, state, w, grad_fn=grad_fn)
    >>> # Rows 2 and 3 of x are zero: their loss cannot rise, so examples 0 and 1 are kept.
    >>> w = optax.apply_updates(w, updates)
    >>> bool(w[0] > 0) and bool(w[1] < 0)
    True
  """
  clean_losses = jnp.asarray(clean_losses)
  if clean_losses.ndim != 1:
    raise ValueError(
      "sharp_examples_grad_fn: `clean_losses` must be the 1-D per-example losses of the clean "
      f"pass, got shape {clean_losses.shape}."
    )
  n = clean_losses.shape[0]
  _selected_count(n, fraction)
  sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(batch)}
  if sizes != {n}:
    raise ValueError(
      f"sharp_examples_grad_fn: every leaf of `batch` must have the {n} examples of "
      f"`clean_losses` on its leading axis, got leading sizes {sorted(sizes, key=str)}."
    )

  def grad_fn(params: PyTree) -> PyTree:
    perturbed = jax.lax.stop_gradient(per_example_loss(params, batch))
    selected = select_sharp_examples(clean_losses, perturbed, fraction)
    subset = jax.tree.map(lambda a: jnp.take(a, selected.indices, axis=0), batch)
    return jax.grad(lambda p: jnp.mean(per_example_loss(p, subset)))(params)

  return grad_fn


# --------------------------------------------------------------------------------------------
# MESA (Du, Zhou, Feng, Tan & Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022,
# arXiv:2205.14083): the loss term and the EMA teacher, then their Linen and NNX glue.
#
# Settings of the official code (github.com/AngusDujw/SAF, MESA_train.py and run.sh): the EMA is
# timm's ModelEmaV2 (parameters *and* BatchNorm buffers, a copy of the initial model, updated
# after every optimizer step, decay 0.9998; the teacher runs in eval mode), temperature 5,
# weight 0.8 in the ImageNet command (argument default 0.3), and the term is on when
# `epoch > kl_start_epoch` with kl_start_epoch = 5 (0-based epochs: from the seventh epoch). The
# KL is summed over classes, averaged over the batch and multiplied by temperature**2.
# The official code's settings (see above).
DEFAULT_DECAY = 0.9998
DEFAULT_TEMPERATURE = 5.0
DEFAULT_WEIGHT = 0.8


def _concrete(value: Any) -> float | None:
  """The Python float behind ``value``, or None for a traced array."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def _check_decay(decay: Any) -> None:
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
  _check_decay(decay)

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


# MESA glue for Linen and NNX.


def _linen_variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  """``{'params': params, 'batch_stats': batch_stats}``, without the second for no BatchNorm."""
  if jax.tree.leaves(batch_stats):
    return {"params": params, "batch_stats": batch_stats}
  return {"params": params}


class MESATrainState(TrainState):
  r"""A :class:`TrainState` that keeps MESA's teacher: an EMA of the weights and BatchNorm stats.

  ``mesa.ema`` holds the moving average of the model's variables, ``{'params': ...,
  'batch_stats': ...}`` (no ``'batch_stats'`` for a model without BatchNorm), started as a copy
  of the initial ones and moved after every :meth:`apply_gradients`, once the new parameters and
  the ``batch_stats`` passed with them are in place:
  :math:`\bar w \leftarrow \beta \bar w + (1-\beta) w` (the official code's timm ``ModelEmaV2``).
  :meth:`teacher_logits` runs the teacher in eval mode. The EMA is part of the state, so it is
  sharded, checkpointed and restored with it.

  Attributes:
    mesa: the :class:`MESAState` (``count``, ``ema``).
    mesa_decay: :math:`\beta` in [0, 1), a static field (official code: 0.9998).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> from xsam_jax import training
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     return nn.Dense(3)(nn.relu(x))
    >>> x, labels = jnp.linspace(-1.0, 1.0, 20).reshape(4, 5), jnp.array([0, 1, 2, 0])
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> state = training.MESATrainState.create(
    ...   apply_fn=Net().apply, params=variables["params"],
    ...   batch_stats=variables["batch_stats"], tx=optax.sgd(0.1), mesa_decay=0.9)
    >>> @jax.jit
    ... def train_step(state, x, labels):
    ...   teacher = state.teacher_logits(x)  # the extra forward pass, eval mode
    ...   loss_fn = lambda logits, t: training.mesa_loss(logits, t[1], t[0], weight=0.8)
    ...   out = training.linen_grad_fns(state, loss_fn, x, (labels, teacher))
    ...   return state.apply_gradients(grads=out.grads, batch_stats=out.batch_stats), out.loss
    >>> losses = []
    >>> for _ in range(3):
    ...   state, loss = train_step(state, x, labels)
    ...   losses.append(float(loss))
    >>> losses[0] > losses[1] > losses[2], int(state.mesa.count)  # it trains; the EMA moved
    (True, 3)
  """

  mesa: Any = None
  mesa_decay: float = struct.field(pytree_node=False, default=DEFAULT_DECAY)

  @classmethod
  def create(
    cls,
    *,
    apply_fn: Callable[..., Any],
    params: PyTree,
    tx: optax.GradientTransformation,
    mesa_decay: float = DEFAULT_DECAY,
    **kwargs: Any,
  ) -> MESATrainState:
    """A new state whose teacher is a copy of the initial variables.

    Args:
      apply_fn: the Linen model's ``apply``.
      params: the initial parameters.
      tx: the optimizer (any optax transform; MESA needs no ``grad_fn``).
      mesa_decay: the EMA's :math:`\\beta` in [0, 1).
      **kwargs: other fields (``batch_stats``).

    Raises:
      ValueError: if ``mesa_decay`` is outside [0, 1).
    """
    _check_decay(mesa_decay)
    state = super().create(
      apply_fn=apply_fn, params=params, tx=tx, mesa_decay=float(mesa_decay), **kwargs
    )
    return state.replace(mesa=mesa_init(_linen_variables(state.params, state.batch_stats)))

  def apply_gradients(self, *, grads: PyTree, **kwargs: Any) -> MESATrainState:
    """:meth:`TrainState.apply_gradients`, then one EMA step towards the new variables."""
    new = super().apply_gradients(grads=grads, **kwargs)
    variables = _linen_variables(new.params, new.batch_stats)
    return new.replace(mesa=mesa_update(new.mesa, variables, decay=new.mesa_decay))

  def teacher_logits(self, inputs: Any, **kwargs: Any) -> jax.Array:
    """The teacher's output on ``inputs``: ``apply_fn(mesa.ema, inputs, train=False)``.

    Eval mode (BatchNorm with the averaged running statistics, no dropout), as the official
    code's EMA model; wrapped in ``stop_gradient``.

    Args:
      inputs: the model's input batch.
      **kwargs: passed to ``apply_fn``.
    """
    return jax.lax.stop_gradient(self.apply_fn(self.mesa.ema, inputs, train=False, **kwargs))


# The NNX variables the teacher averages: weights and BatchNorm statistics (not RNG counters).
NNX_EMA_VARIABLES = (nnx.Param, nnx.BatchStat)


def nnx_mesa_init(model: nnx.Module) -> MESAState:
  """MESA's teacher for an NNX model: a copy of its ``Param`` and ``BatchStat`` variables.

  Args:
    model: the NNX model.

  Returns:
    A :class:`MESAState` whose ``ema`` is the pure state (plain arrays) of those variables.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from xsam_jax import training
    >>> model = nnx.Sequential(nnx.Linear(5, 8, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    >>> mesa = training.nnx_mesa_init(model)
    >>> def loss_fn(model, x, labels, teacher):
    ...   return training.mesa_loss(model(x), teacher, labels, weight=0.8)
    >>> @nnx.jit
    ... def train_step(model, optimizer, mesa, x, labels):
    ...   teacher = training.nnx_teacher(model, mesa)(x)  # the extra forward pass, eval mode
    ...   out = training.nnx_grad_fns(model, loss_fn, x, labels, teacher)
    ...   optimizer.update(model, out.grads)
    ...   return training.nnx_mesa_update(mesa, model, decay=0.9), out.loss
    >>> x, labels = jnp.linspace(-1.0, 1.0, 20).reshape(4, 5), jnp.array([0, 1, 2, 0])
    >>> losses = []
    >>> for _ in range(3):
    ...   mesa, loss = train_step(model, optimizer, mesa, x, labels)
    ...   losses.append(float(loss))
    >>> losses[0] > losses[1] > losses[2], int(mesa.count)  # it trains; the EMA moved
    (True, 3)
  """
  return mesa_init(nnx.as_pure(nnx.state(model, NNX_EMA_VARIABLES)))


def nnx_mesa_update(state: MESAState, model: nnx.Module, *, decay: float) -> MESAState:
  r""":func:`mesa_update` towards the model's current ``Param``/``BatchStat`` variables.

  Call it after ``optimizer.update`` (the official code moves the EMA after the step).

  Args:
    state: from :func:`nnx_mesa_init`.
    model: the NNX model after the step.
    decay: :math:`\beta` in [0, 1).

  Raises:
    ValueError: if a concrete ``decay`` is outside [0, 1).
  """
  return mesa_update(state, nnx.as_pure(nnx.state(model, NNX_EMA_VARIABLES)), decay=decay)


def nnx_teacher(model: nnx.Module, state: MESAState) -> nnx.Module:
  """An eval-mode copy of ``model`` at the teacher's variables (``model`` is not changed).

  Its outputs carry no gradient to ``model`` (:func:`mesa_loss` stops it in any case).

  Args:
    model: the NNX model (its structure and non-averaged variables are used).
    state: from :func:`nnx_mesa_init`/:func:`nnx_mesa_update`.

  Returns:
    A new module in eval mode (BatchNorm with the averaged statistics, no dropout).
  """
  graphdef, _, rest = nnx.split(model, NNX_EMA_VARIABLES, ...)
  teacher = nnx.merge(graphdef, jax.lax.stop_gradient(state.ema), nnx.as_pure(rest))
  teacher.eval()
  return teacher
