"""What the benchmarks measure on: models on random batches, the optimizers compared and the
jitted train step of ``experiments/train.py``, plus a standalone gradient and HVP.

For each model (random data, BatchNorm in train mode through
:func:`xsam_jax.training.linen_grad_fns`, exactly as ``experiments/train.py`` builds its step),
every step is one jitted function of ``(state, images, labels)``. Models come from
``experiments.models`` (plus a small MLP); ``dtype`` is the computation dtype (parameters stay
float32, as ``experiments/train.py``'s ``compute_dtype``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import xsam_jax
from benchmarks._harness import Log, timed_call
from experiments.models import MODELS, count_params, get_model, init_model
from xsam_jax import hessian, is_due, training

PyTree = Any

NUM_CLASSES = 10
LEARNING_RATE = 0.1
MOMENTUM = 0.9
RHO = 0.05
ALPHA = 0.2
# Inputs: the MLP sees digits-sized 8x8x1 images (flattened to 64 features), the CNNs CIFAR's.
INPUT_SHAPES = {"mlp": (8, 8, 1)}
CIFAR_SHAPE = (32, 32, 3)


class MLP(nn.Module):
  """ReLU MLP on flattened inputs (8x8x1 digits: 64 -> 128 -> 128 -> classes)."""

  num_classes: int = NUM_CLASSES
  hidden: Sequence[int] = (128, 128)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of shape ``(batch, num_classes)``; ``train`` is accepted for a uniform API."""
    del train
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass
class Problem:
  """One model on one random batch."""

  name: str
  apply_fn: Callable[..., Any]
  params: PyTree
  batch_stats: PyTree | None
  images: jax.Array
  labels: jax.Array

  @property
  def num_params(self) -> int:
    """Number of trainable scalars."""
    return count_params(self.params)


def make_problem(
  name: str,
  batch: int,
  seed: int = 0,
  *,
  dtype: str = "float32",
  input_shape: Sequence[int] | None = None,
) -> Problem:
  """Builds ``name`` (``mlp`` or a model of ``experiments.models``) computing in ``dtype``, and
  a random batch of ``input_shape`` images (default: 8x8x1 for the MLP, CIFAR's otherwise)."""
  if name == "mlp":
    model = MLP()
  elif name in MODELS:
    kwargs = {} if dtype == "float32" else {"dtype": jnp.dtype(dtype)}
    model = get_model(name, NUM_CLASSES, **kwargs)
  else:
    raise ValueError(f"unknown model {name!r}; choose 'mlp' or one of {sorted(MODELS)}")
  shape = tuple(input_shape or INPUT_SHAPES.get(name, CIFAR_SHAPE))
  key_init, key_x, key_y = jax.random.split(jax.random.key(seed), 3)
  params, batch_stats = init_model(model, (1, *shape), key_init)
  images = jax.random.normal(key_x, (batch, *shape), jnp.float32)
  labels = jax.random.randint(key_y, (batch,), 0, NUM_CLASSES)
  return Problem(name, model.apply, params, batch_stats or None, images, labels)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy in float32."""
  logits = logits.astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# Whether the library offers finite-difference HVPs (one gradient per product).
HAS_FINITE_DIFFERENCE = "hvp_method" in inspect.signature(xsam_jax.xsam).parameters


def make_optimizers(
  refresh_every: int, power_iters: int
) -> dict[str, optax.GradientTransformation]:
  """The transforms compared, all with SGD (lr 0.1, momentum 0.9) as the base optimizer;
  ``xsam_fd`` (X-SAM with finite-difference HVPs) where the library offers it."""

  def sgd() -> optax.GradientTransformation:
    return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

  def contrib_sam(opaque: bool) -> optax.GradientTransformation:
    # The drop-in SAM of the optax.contrib docstring: one normalised ascent step of length rho.
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
    return optax.contrib.sam(sgd(), adv, sync_period=2, opaque_mode=opaque)

  return {
    "sgd": sgd(),
    "sam": optax.chain(xsam_jax.sam(rho=RHO), sgd()),
    "optax_sam_opaque": contrib_sam(True),
    "optax_sam_transparent": contrib_sam(False),
    "xsam": optax.chain(
      xsam_jax.xsam(rho=RHO, alpha=ALPHA, refresh_every=refresh_every, num_iters=power_iters),
      sgd(),
    ),
  } | (
    {
      "xsam_fd": optax.chain(
        xsam_jax.xsam(
          rho=RHO,
          alpha=ALPHA,
          refresh_every=refresh_every,
          num_iters=power_iters,
          hvp_method="forward_difference",
        ),
        sgd(),
      )
    }
    if HAS_FINITE_DIFFERENCE
    else {}
  )


@dataclasses.dataclass
class TrainStep:
  """A jitted train step ``(state, images, labels, *, refresh=None) -> (state, loss)`` that
  counts how often it is traced."""

  kind: str
  fn: Callable[..., Any] = dataclasses.field(init=False)
  traces: int = 0

  def __post_init__(self):
    self.fn = jax.jit(self._step, static_argnames=("refresh",))

  def _step(self, state, images, labels, *, refresh=None):
    self.traces += 1  # runs at trace time only
    out = training.linen_grad_fns(state, cross_entropy, images, labels)
    extra: dict[str, Any] = {}
    if self.kind in ("sam", "xsam", "xsam_fd"):
      extra["grad_fn"] = out.grad_fn
    elif self.kind == "optax_sam_opaque":
      extra["grad_fn"] = lambda p, _: out.grad_fn(p)  # optax's (params, adv_step) signature
    if self.kind.startswith("xsam"):
      # As experiments/train.py with its default eig_eval_mode=True.
      extra.update(refresh=refresh, eig_grad_fn=out.eig_grad_fn)
    state = state.apply_gradients(grads=out.grads, batch_stats=out.batch_stats, **extra)
    return state, out.loss


def create_state(problem: Problem, tx: optax.GradientTransformation) -> training.TrainState:
  """The initial train state of ``problem`` with optimizer ``tx``, built by one jitted program
  (op-by-op, the optimizer state's initialisation compiles many small programs)."""

  def make(params, batch_stats):
    return training.TrainState.create(
      apply_fn=problem.apply_fn, params=params, tx=tx, batch_stats=batch_stats
    )

  return jax.jit(make)(problem.params, problem.batch_stats)


def with_count(state: training.TrainState, count: int) -> training.TrainState:
  """``state`` with the X-SAM step counter set to ``count`` (picks the cond branch)."""

  def is_xsam(node: Any) -> bool:
    return isinstance(node, xsam_jax.XSAMState)

  def fix(node: Any) -> Any:
    return node._replace(count=jnp.asarray(count, jnp.int32)) if is_xsam(node) else node

  return state.replace(opt_state=jax.tree.map(fix, state.opt_state, is_leaf=is_xsam))


# --------------------------------------------------------------------------------------------
# Standalone gradient and HVP, at top level and under control flow.


def make_loss(apply_fn: Callable[..., Any], train: bool) -> Callable[..., jax.Array]:
  """``loss(params, batch_stats, images, labels)`` as :func:`training.linen_grad_fns` builds
  it: train mode (batch statistics, updates thrown away) or eval mode (running averages)."""

  def loss(params, batch_stats, images, labels):
    variables = {"params": params}
    if batch_stats is not None:
      variables["batch_stats"] = batch_stats
    if train and batch_stats is not None:
      logits, _ = apply_fn(variables, images, train=True, mutable=["batch_stats"])
    else:
      logits = apply_fn(variables, images, train=train)
    return cross_entropy(logits, labels)

  return loss


def make_primitive(op: str, placement: str, apply_fn: Callable[..., Any], train: bool):
  """A function ``(params, v, batch_stats, images, labels, pred, n) -> pytree`` computing one
  gradient (``op="grad"``), one HVP (``op="hvp"``) or one finite-difference HVP (``op="hvp_fd"``,
  where the library offers it) at ``placement``: ``"top"`` (top level),
  ``"cond"`` (the taken branch of a ``lax.cond`` on the traced ``pred``) or ``"fori"`` (the body
  of a ``lax.fori_loop`` whose traced bound ``n`` is 1, i.e. a ``while`` loop).

  The gradient is taken at ``params + 1e-6 v`` so that, like the HVP, it depends on the loop
  carry and cannot be hoisted out of the loop.
  """
  loss = make_loss(apply_fn, train)

  def fn(params, v, batch_stats, images, labels, pred, n):
    grad_fn = jax.grad(lambda p: loss(p, batch_stats, images, labels))

    def body(carry):
      if op == "grad":
        return grad_fn(jax.tree.map(lambda w, c: w + 1e-6 * c, params, carry))
      if op == "hvp_fd":  # finite differences: the base gradient and one more per product
        return hessian.hvp(grad_fn, params, carry, hvp_method="forward_difference")
      return hessian.hvp(grad_fn, params, carry)

    if placement == "top":
      return body(v)
    if placement == "cond":
      return jax.lax.cond(pred, body, lambda carry: carry, v)
    return jax.lax.fori_loop(0, n, lambda _, carry: body(carry), v)

  return fn


def primitive_args(problem: Problem) -> tuple[Any, ...]:
  """The arguments of a :func:`make_primitive` function on ``problem``: a fixed random unit
  direction, the taken ``lax.cond`` branch and one ``lax.fori_loop`` iteration."""
  direction = optax.tree.random_like(jax.random.key(7), problem.params)
  direction = optax.tree.scale(1.0 / optax.tree.norm(direction), direction)
  return (
    problem.params,
    direction,
    problem.batch_stats,
    problem.images,
    problem.labels,
    jnp.asarray(True),
    jnp.asarray(1, jnp.int32),
  )


def run_steps(
  step: TrainStep, state, problem: Problem, num_steps: int, refresh_every: int | None, log: Log
) -> tuple[list[tuple[float, float]], training.TrainState]:
  """Runs ``num_steps`` real steps from ``state``, threading it: the static path
  (``refresh=is_due(i, refresh_every)``) or, with ``refresh_every=None``, the cond path.
  Returns the (wall, CPU) seconds of each blocked call (the first call of each program
  includes its trace and compile) and the final state."""
  seconds = []
  for i in range(num_steps):
    refresh = None if refresh_every is None else is_due(i, refresh_every)
    dt, cpu, (state, _) = timed_call(
      lambda s=state, r=refresh: step.fn(s, problem.images, problem.labels, refresh=r)
    )
    seconds.append((dt, cpu))
    log(f"    step {i} ({'cond' if refresh is None else f'refresh={refresh}'}): {dt:.3f}s")
  return seconds, state
