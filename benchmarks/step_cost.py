"""Cost of one training step: SGD, SAM, ``optax.contrib.sam`` and X-SAM on both refresh paths.

``python -m benchmarks.step_cost [--models mlp,simple_cnn,resnet18] [--batch 16] [--repeats 7]
[--out benchmarks/RESULTS.md]``

For each model (float32, random data, BatchNorm in train mode through
:func:`xsam_jax.training.linen_grad_fns`, exactly as ``experiments/train.py`` builds its step),
every step is one jitted function of ``(state, images, labels)``. Measured, after compilation,
with ``jax.block_until_ready`` around every call, as the median over repeats:

* steps: SGD; SAM (``optax.chain(xsam_jax.sam(), sgd)``); ``optax.contrib.sam`` in opaque mode
  (one call = one full SAM update) and in transparent mode (two calls = one full SAM update);
  X-SAM without refresh, and its refresh step on the static path (``refresh=True``,
  straight-line HVPs) and on the ``lax.cond`` path (traced ``count % p == 0``);
* one gradient and one Hessian-vector product (``jax.jvp`` over ``jax.grad``), each at top
  level, inside a ``lax.cond`` and inside a ``lax.fori_loop`` (one iteration, traced bound), to
  show the XLA:CPU control-flow slowdown (jax-ml/jax#12868);
* compile counts: traces of the jitted X-SAM step over 10 real steps on each path (the cond
  path compiles once, the static path twice), and the compile time of each program.

Measurements of all variants are interleaved (round robin, shuffled every round) so that load
from other processes affects them alike; report ratios from one run, not absolute times across
runs. A variant stops repeating once its time spent would exceed ``--budget`` seconds (always at
least one sample), so slow cases (the cond path on XLA:CPU) are measured once. Nothing here is
specific to a backend: on a GPU the same command measures the GPU (the backend is printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import optax

import xsam_jax
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
DEFAULT_MODELS = "mlp,simple_cnn,resnet18"
# A sample of a fast call repeats it until at least this long, so milliseconds are resolved.
MIN_SAMPLE_S = 0.2
# A first execution at least this long is kept as a sample (one-time costs are negligible).
KEEP_FIRST_S = 1.0


# --------------------------------------------------------------------------------------------
# Models, data, optimizers and the train step.


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


def make_problem(name: str, batch: int, seed: int = 0) -> Problem:
  """Builds ``name`` (``mlp`` or a model of ``experiments.models``) and a random batch."""
  if name == "mlp":
    model = MLP()
  elif name in MODELS:
    model = get_model(name, NUM_CLASSES)
  else:
    raise ValueError(f"unknown model {name!r}; choose 'mlp' or one of {sorted(MODELS)}")
  shape = INPUT_SHAPES.get(name, CIFAR_SHAPE)
  key_init, key_x, key_y = jax.random.split(jax.random.key(seed), 3)
  params, batch_stats = init_model(model, (1, *shape), key_init)
  images = jax.random.normal(key_x, (batch, *shape), jnp.float32)
  labels = jax.random.randint(key_y, (batch,), 0, NUM_CLASSES)
  return Problem(name, model.apply, params, batch_stats or None, images, labels)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy in float32."""
  logits = logits.astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_optimizers(
  refresh_every: int, power_iters: int
) -> dict[str, optax.GradientTransformation]:
  """The transforms compared, all with SGD (lr 0.1, momentum 0.9) as the base optimizer."""

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
      xsam_jax.xsam(rho=RHO, alpha=ALPHA, refresh_every=refresh_every, power_iters=power_iters),
      sgd(),
    ),
  }


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
    if self.kind in ("sam", "xsam"):
      extra["grad_fn"] = out.grad_fn
    elif self.kind == "optax_sam_opaque":
      extra["grad_fn"] = lambda p, _: out.grad_fn(p)  # optax's (params, adv_step) signature
    if self.kind == "xsam":
      # As experiments/train.py with its default eig_eval_mode=True.
      extra.update(refresh=refresh, eig_grad_fn=out.eig_grad_fn)
    state = state.apply_gradients(grads=out.grads, batch_stats=out.batch_stats, **extra)
    return state, out.loss


def create_state(problem: Problem, tx: optax.GradientTransformation) -> training.TrainState:
  """The initial train state of ``problem`` with optimizer ``tx``."""
  return training.TrainState.create(
    apply_fn=problem.apply_fn, params=problem.params, tx=tx, batch_stats=problem.batch_stats
  )


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
  gradient (``op="grad"``) or one HVP (``op="hvp"``) at ``placement``: ``"top"`` (top level),
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
      return hessian.hvp(grad_fn, params, carry)

    if placement == "top":
      return body(v)
    if placement == "cond":
      return jax.lax.cond(pred, body, lambda carry: carry, v)
    return jax.lax.fori_loop(0, n, lambda _, carry: body(carry), v)

  return fn


# --------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Variant:
  """One measured computation: ``call()`` runs it once and returns something to block on.

  Each sample records the wall-clock seconds per call (the measurement) and the process CPU
  seconds per call (all threads; on a CPU backend a measure of the work done that is not
  inflated when other processes take the cores).
  """

  name: str
  call: Callable[[], Any]
  inner: int = 1  # calls per sample
  samples: list[tuple[float, float]] = dataclasses.field(default_factory=list)
  seeds: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # 10-step runs
  spent_s: float = 0.0
  last_s: float = 0.0  # wall time of the last sample (all inner calls)
  compile_s: float | None = None
  lower_s: float | None = None

  def sample(self) -> None:
    """Times ``inner`` blocked calls and records the mean wall and CPU seconds per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(self.inner):
      jax.block_until_ready(self.call())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    self.spent_s += wall
    self.last_s = wall
    self.samples.append((wall / self.inner, cpu / self.inner))

  def wants_more(self, repeats: int, budget_s: float) -> bool:
    """Whether another sample fits: fewer than ``repeats`` and within ``budget_s`` seconds."""
    if len(self.samples) >= repeats:
      return False
    if not self.samples and not self.seeds:
      return True
    return self.spent_s + self.last_s <= budget_s

  def data(self, clock: str = "wall") -> list[float]:
    """Seconds per call on ``clock`` (``"wall"`` or ``"cpu"``): the round-robin samples, or
    the 10-step-run samples when there are none."""
    index = 0 if clock == "wall" else 1
    return [sample[index] for sample in self.samples or self.seeds]

  def median(self, clock: str = "wall") -> float:
    """Median seconds per call."""
    data = self.data(clock)
    return statistics.median(data) if data else math.nan

  def minimum(self, clock: str = "wall") -> float:
    """Fastest seconds per call."""
    data = self.data(clock)
    return min(data) if data else math.nan

  @property
  def count(self) -> int:
    """Number of samples behind :meth:`median`."""
    return len(self.samples or self.seeds)

  def add_seed(self, wall: float, cpu: float) -> None:
    """Adds a post-compile single-call timing taken elsewhere (the 10-step runs)."""
    self.seeds.append((wall, cpu))
    self.spent_s += wall
    self.last_s = wall
    self.calibrate(statistics.median(w for w, _ in self.seeds))

  def calibrate(self, per_call_s: float) -> None:
    """Sets ``inner`` so that one sample lasts at least ``MIN_SAMPLE_S``."""
    self.inner = max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(per_call_s, 1e-7))))


def timed_call(fn: Callable[[], Any]) -> tuple[float, float, Any]:
  """``(wall seconds, CPU seconds, result)`` of one blocked call."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - wall, time.process_time() - cpu, out


class CompileEvents:
  """Records jax's compile-pipeline events (``jax.monitoring``): every trace to a jaxpr,
  lowering to MLIR and backend compile, with its duration."""

  PREFIX = "/jax/core/compile/"

  def __init__(self):
    self.events: list[tuple[str, float]] = []
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event: str, duration: float, **kwargs: Any) -> None:
    del kwargs
    if event.startswith(self.PREFIX):
      self.events.append((event[len(self.PREFIX) :], duration))

  def mark(self) -> int:
    """A position to summarise from."""
    return len(self.events)

  def since(self, mark: int) -> dict[str, Any]:
    """Backend compiles after ``mark`` (count, seconds of each in order, total) and the
    seconds spent tracing and lowering."""
    events = self.events[mark:]
    compiles = [d for name, d in events if name == "backend_compile_duration"]
    front = [d for name, d in events if name != "backend_compile_duration"]
    return {
      "compiles": len(compiles),
      "compile_each_s": compiles,
      "compile_s": sum(compiles),
      "trace_lower_s": sum(front),
    }


_COMPILE_EVENTS: CompileEvents | None = None


def compile_events() -> CompileEvents:
  """The process-wide :class:`CompileEvents` (registered once)."""
  global _COMPILE_EVENTS
  if _COMPILE_EVENTS is None:
    _COMPILE_EVENTS = CompileEvents()
  return _COMPILE_EVENTS


def compile_ahead(jitted: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, float, float]:
  """``(compiled, lower_s, compile_s)``: ``jitted`` lowered and compiled for ``args``."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lower_s, time.perf_counter() - start


def first_run(variant: Variant, log) -> Variant:
  """Runs ``variant`` once; a run of at least ``KEEP_FIRST_S`` seconds is kept as a sample
  (its one-time costs are negligible then). After a shorter one, ``variant`` runs for about
  ``MIN_SAMPLE_S`` to calibrate ``inner`` and that warm-up is discarded."""
  seconds, cpu_seconds, _ = timed_call(variant.call)
  if seconds >= KEEP_FIRST_S:
    variant.calibrate(seconds)
    variant.samples.append((seconds, cpu_seconds))
    variant.spent_s = variant.last_s = seconds
  else:
    calls, start = 0, time.perf_counter()
    while calls < 1000 and time.perf_counter() - start < MIN_SAMPLE_S:
      jax.block_until_ready(variant.call())
      calls += 1
    variant.calibrate((time.perf_counter() - start) / calls)
  log(
    f"  {variant.name}: lower {variant.lower_s:.2f}s, compile {variant.compile_s:.2f}s, "
    f"first run {seconds:.4f}s"
  )
  return variant


def run_steps(
  step: TrainStep, state, problem: Problem, num_steps: int, refresh_every: int | None, log
) -> list[tuple[float, float]]:
  """Runs ``num_steps`` real steps from ``state``, threading it: the static path
  (``refresh=is_due(i, refresh_every)``) or, with ``refresh_every=None``, the cond path.
  Returns the (wall, CPU) seconds of each blocked call; the first call of each program
  includes its trace and compile."""
  seconds = []
  for i in range(num_steps):
    refresh = None if refresh_every is None else is_due(i, refresh_every)
    dt, cpu, (state, _) = timed_call(
      lambda s=state, r=refresh: step.fn(s, problem.images, problem.labels, refresh=r)
    )
    seconds.append((dt, cpu))
    log(f"    step {i} ({'cond' if refresh is None else f'refresh={refresh}'}): {dt:.3f}s")
  return seconds


def interleave(variants: Sequence[Variant], repeats: int, budget_s: float, seed: int, log):
  """Round robin over ``variants``, shuffled every round, until each has ``repeats`` samples
  or would exceed ``budget_s`` seconds."""
  rng = random.Random(seed)
  for round_index in range(repeats):
    order = list(variants)
    rng.shuffle(order)
    for variant in order:
      if variant.wants_more(repeats, budget_s):
        variant.sample()
    log(f"  round {round_index + 1}/{repeats} done")


# --------------------------------------------------------------------------------------------
# One model.


def xsam_path_variants(
  problem: Problem, state, p: int, num_steps: int, log
) -> tuple[list[Variant], dict[str, Any]]:
  """The X-SAM step on both refresh paths. Runs ``num_steps`` real steps on each path first
  (counting traces and programs; the post-compile calls become the first samples), then
  returns variants that call the compiled programs on a fixed state: ``count = 0`` (refresh
  due) or ``count = 1`` (not due)."""
  static, cond = TrainStep("xsam"), TrainStep("xsam")
  events = compile_events()
  log(f"  X-SAM static path, {num_steps} steps")
  mark = events.mark()
  static_s = run_steps(static, state, problem, num_steps, p, log)
  static_events = events.since(mark)
  log(f"  X-SAM cond path, {num_steps} steps")
  mark = events.mark()
  cond_s = run_steps(cond, state, problem, num_steps, None, log)
  cond_events = events.since(mark)

  data = (problem.images, problem.labels)
  state0, state1 = state, with_count(state, 1)
  refresh_static = Variant("xsam_refresh_static", lambda: static.fn(state0, *data, refresh=True))
  plain_static = Variant("xsam_norefresh_static", lambda: static.fn(state0, *data, refresh=False))
  refresh_cond = Variant("xsam_refresh_cond", lambda: cond.fn(state0, *data))
  plain_cond = Variant("xsam_norefresh_cond", lambda: cond.fn(state1, *data))

  due = [is_due(i, p) for i in range(num_steps)]
  first_plain = due.index(False) if False in due else None
  for i in range(num_steps):
    if due[i]:
      if i > 0:  # step 0 compiled the refresh program on both paths
        refresh_static.add_seed(*static_s[i])
        refresh_cond.add_seed(*cond_s[i])
    else:
      if i != first_plain:  # the first step without refresh compiled the static one
        plain_static.add_seed(*static_s[i])
      plain_cond.add_seed(*cond_s[i])
  # Step 0 compiles the refresh program (both paths), the first step without refresh the
  # static path's second program; the cond path's one program serves both of its variants.
  for variant, compiles, index in (
    (refresh_static, static_events, 0),
    (plain_static, static_events, 1),
    (refresh_cond, cond_events, 0),
  ):
    if len(compiles["compile_each_s"]) > index:
      variant.compile_s = compiles["compile_each_s"][index]
  info = {
    "steps": num_steps,
    "cond_traces": cond.traces,
    "cond_events": cond_events,
    "static_traces": static.traces,
    "static_events": static_events,
    "cond_first_call_s": cond_s[0][0],
    "static_first_calls_s": [static_s[0][0]]
    + ([] if first_plain is None else [static_s[first_plain][0]]),
  }
  return [refresh_static, plain_static, refresh_cond, plain_cond], info


def step_variants(problem: Problem, states: dict[str, Any], log) -> list[Variant]:
  """SGD, SAM and ``optax.contrib.sam`` steps, compiled ahead of time.

  ``optax.contrib.sam`` in opaque mode does a whole SAM update per call (the clean gradient
  comes in, ``grad_fn`` gives the adversarial one); in transparent mode one update is two
  calls (ascent, then the outer step), so its variant is two chained, blocked calls.
  """
  data = (problem.images, problem.labels)
  variants = []
  for kind in ("sgd", "sam", "optax_sam_opaque", "optax_sam_transparent"):
    state = states[kind]
    compiled, lower_s, compile_s = compile_ahead(TrainStep(kind).fn, (state, *data))
    if kind == "optax_sam_transparent":

      def call(compiled=compiled, state=state):
        new_state, _ = jax.block_until_ready(compiled(state, *data))
        return compiled(new_state, *data)

      name = "optax_sam_transparent_pair"
    else:
      call = lambda compiled=compiled, state=state: compiled(state, *data)
      name = kind
    variant = Variant(name, call, lower_s=lower_s, compile_s=compile_s)
    variants.append(first_run(variant, log))
  return variants


def primitive_variants(problem: Problem, log) -> list[Variant]:
  """One gradient and one HVP of the train-mode loss at top level, in ``lax.cond`` and in
  ``lax.fori_loop``; for BatchNorm models also the eval-mode ones (what the refresh uses)."""
  direction = optax.tree.random_like(jax.random.key(7), problem.params)
  direction = optax.tree.scale(1.0 / optax.tree.norm(direction), direction)
  args = (
    problem.params,
    direction,
    problem.batch_stats,
    problem.images,
    problem.labels,
    jnp.asarray(True),
    jnp.asarray(1, jnp.int32),
  )
  cases = [(op, place, True) for op in ("grad", "hvp") for place in ("top", "cond", "fori")]
  if problem.batch_stats is not None:
    cases += [("grad", "top", False), ("hvp", "top", False)]
  variants = []
  for op, place, train in cases:
    jitted = jax.jit(make_primitive(op, place, problem.apply_fn, train))
    compiled, lower_s, compile_s = compile_ahead(jitted, args)
    name = f"{op}_{place}" + ("" if train else "_eval")
    variant = Variant(name, lambda c=compiled: c(*args), lower_s=lower_s, compile_s=compile_s)
    variants.append(first_run(variant, log))
  return variants


def benchmark_model(name: str, args: argparse.Namespace, log) -> dict[str, Any]:
  """Every measurement of one model: medians (seconds), sample counts, compile data, ratios."""
  p, q = args.refresh_every, args.power_iters
  problem = make_problem(name, args.batch)
  has_bn = problem.batch_stats is not None
  log(f"== {name}: {problem.num_params:,} params, input {problem.images.shape}, BN={has_bn}")
  states = {kind: create_state(problem, tx) for kind, tx in make_optimizers(p, q).items()}

  variants, compile_info = xsam_path_variants(problem, states["xsam"], p, args.count_steps, log)
  log("  compiling the other steps and the standalone gradients/HVPs")
  variants += step_variants(problem, states, log)
  variants += primitive_variants(problem, log)
  log(f"  interleaved timing: {args.repeats} rounds, budget {args.budget:.0f}s per variant")
  interleave(variants, args.repeats, args.budget, args.seed, log)

  medians = {v.name: v.median() for v in variants}
  minima = {v.name: v.minimum() for v in variants}
  cpu_medians = {v.name: v.median("cpu") for v in variants}
  return {
    "model": name,
    "num_params": problem.num_params,
    "input_shape": list(problem.images.shape),
    "batch_norm": has_bn,
    "medians_s": medians,
    "minima_s": minima,
    "cpu_medians_s": cpu_medians,
    "samples": {v.name: v.count for v in variants},
    "inner": {v.name: v.inner for v in variants},
    "raw_samples_s": {v.name: v.data() for v in variants},
    "raw_cpu_samples_s": {v.name: v.data("cpu") for v in variants},
    "aot_compile_s": {
      v.name: {"lower": v.lower_s, "compile": v.compile_s}
      for v in variants
      if v.compile_s is not None
    },
    "compile": compile_info,
    "ratios": derive_ratios(medians, p, q, has_bn),
    "ratios_of_minima": derive_ratios(minima, p, q, has_bn),
    "ratios_of_cpu_time": derive_ratios(cpu_medians, p, q, has_bn),
  }


# --------------------------------------------------------------------------------------------
# Ratios and goals.

# (key, label, goal): goals are upper bounds (from the issue); None marks information rows.
GOALS: list[tuple[str, str, float | None]] = [
  ("sam_over_sgd", "SAM step / SGD step", 2.05),
  ("xsam_norefresh_over_sam", "X-SAM step w/o refresh (static) / SAM step", 1.03),
  ("xsam_norefresh_cond_over_sam", "X-SAM step w/o refresh (cond path) / SAM step", 1.03),
  ("amortised_static_over_model", "X-SAM amortised (static) / (SAM + q·HVP/p)", 1.05),
  ("amortised_cond_over_model", "X-SAM amortised (cond path) / (SAM + q·HVP/p)", 1.05),
  ("hvp_over_grad", "HVP / gradient (top level)", 2.0),
  ("refresh_static_over_sam", "refresh of q HVPs (static) / SAM step", 5.0),
  ("refresh_cond_over_sam", "refresh of q HVPs (cond path) / SAM step", 5.0),
  ("sam_over_optax_opaque", "xsam_jax SAM / optax.contrib.sam (opaque)", 1.0),
  ("sam_over_optax_transparent", "xsam_jax SAM / optax.contrib.sam (transparent, 2 calls)", 1.0),
  ("cond_over_static_refresh", "cond / static: refresh step", None),
  ("cond_over_static_norefresh", "cond / static: step w/o refresh", None),
  ("cond_over_static_amortised", "cond / static: amortised step", None),
  ("refresh_step_static_over_sam", "whole refresh step (static) / SAM step", None),
  ("hvp_refresh_over_grad", "HVP of the refresh (eval-mode BN) / gradient", None),
  ("grad_cond_over_top", "gradient in lax.cond / top level", None),
  ("grad_fori_over_top", "gradient in lax.fori_loop / top level", None),
  ("hvp_cond_over_top", "HVP in lax.cond / top level", None),
  ("hvp_fori_over_top", "HVP in lax.fori_loop / top level", None),
]


def derive_ratios(t: dict[str, float], p: int, q: int, has_bn: bool) -> dict[str, float]:
  """The ratios of :data:`GOALS` from the median times ``t`` (seconds).

  The amortised model step is ``SAM + q·HVP/p`` with the HVP the refresh actually computes
  (eval-mode BatchNorm for BN models, as ``experiments/train.py``'s default). The refresh cost
  is the refresh step minus the step without refresh, on the same path.
  """
  hvp_refresh = t["hvp_top_eval"] if has_bn else t["hvp_top"]
  model_step = t["sam"] + q * hvp_refresh / p
  amortised_static = (t["xsam_refresh_static"] + (p - 1) * t["xsam_norefresh_static"]) / p
  amortised_cond = (t["xsam_refresh_cond"] + (p - 1) * t["xsam_norefresh_cond"]) / p
  return {
    "sam_over_sgd": t["sam"] / t["sgd"],
    "xsam_norefresh_over_sam": t["xsam_norefresh_static"] / t["sam"],
    "xsam_norefresh_cond_over_sam": t["xsam_norefresh_cond"] / t["sam"],
    "amortised_static_over_model": amortised_static / model_step,
    "amortised_cond_over_model": amortised_cond / model_step,
    "hvp_over_grad": t["hvp_top"] / t["grad_top"],
    "refresh_static_over_sam": (t["xsam_refresh_static"] - t["xsam_norefresh_static"]) / t["sam"],
    "refresh_cond_over_sam": (t["xsam_refresh_cond"] - t["xsam_norefresh_cond"]) / t["sam"],
    "sam_over_optax_opaque": t["sam"] / t["optax_sam_opaque"],
    "sam_over_optax_transparent": t["sam"] / t["optax_sam_transparent_pair"],
    "cond_over_static_refresh": t["xsam_refresh_cond"] / t["xsam_refresh_static"],
    "cond_over_static_norefresh": t["xsam_norefresh_cond"] / t["xsam_norefresh_static"],
    "cond_over_static_amortised": amortised_cond / amortised_static,
    "refresh_step_static_over_sam": t["xsam_refresh_static"] / t["sam"],
    "hvp_refresh_over_grad": hvp_refresh / t["grad_top"],
    "grad_cond_over_top": t["grad_cond"] / t["grad_top"],
    "grad_fori_over_top": t["grad_fori"] / t["grad_top"],
    "hvp_cond_over_top": t["hvp_cond"] / t["hvp_top"],
    "hvp_fori_over_top": t["hvp_fori"] / t["hvp_top"],
    "amortised_static_s": amortised_static,
    "amortised_cond_s": amortised_cond,
    "model_step_s": model_step,
  }


def verdict(value: float, goal: float | None) -> str:
  """``PASS``/``FAIL`` against an upper bound; empty for information rows."""
  if goal is None or not math.isfinite(value):
    return ""
  return "PASS" if value <= goal else "FAIL"


# --------------------------------------------------------------------------------------------
# Report.

# (variant, description) rows of the per-model table of absolute times.
MEASUREMENTS = [
  ("sgd", "SGD step (grad + optax.sgd)"),
  ("sam", "SAM step (`chain(xsam_jax.sam(), sgd)`)"),
  ("optax_sam_opaque", "optax.contrib.sam, opaque mode: 1 call = 1 SAM update"),
  ("optax_sam_transparent_pair", "optax.contrib.sam, transparent: 2 calls = 1 SAM update"),
  ("xsam_norefresh_static", "X-SAM step, `refresh=False` (static path)"),
  ("xsam_refresh_static", "X-SAM refresh step, `refresh=True` (static, straight-line HVPs)"),
  ("xsam_norefresh_cond", "X-SAM step, cond path, `count % p != 0`"),
  ("xsam_refresh_cond", "X-SAM refresh step, cond path, `count % p == 0`"),
  ("grad_top", "gradient, top level"),
  ("hvp_top", "HVP (`jax.jvp` over `jax.grad`), top level"),
  ("grad_top_eval", "gradient, eval-mode BN, top level"),
  ("hvp_top_eval", "HVP, eval-mode BN (what the refresh computes), top level"),
  ("grad_cond", "gradient inside `lax.cond`"),
  ("hvp_cond", "HVP inside `lax.cond`"),
  ("grad_fori", "gradient inside `lax.fori_loop` (1 iteration)"),
  ("hvp_fori", "HVP inside `lax.fori_loop` (1 iteration)"),
]


def machine_info() -> dict[str, Any]:
  """CPU model, cores, backend, devices and library versions."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      cpu = names[0]
  except OSError:
    pass
  devices = jax.devices()
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": f"{len(devices)} x {devices[0].device_kind}",
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "python": platform.python_version(),
  }


def _fmt_ms(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "–"
  ms = seconds * 1e3
  return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def _fmt_s(seconds: float | None) -> str:
  return "–" if seconds is None else f"{seconds:.1f}"


def _fmt_ratio(value: float) -> str:
  return "–" if not math.isfinite(value) else (f"{value:.3f}" if value < 10 else f"{value:.1f}")


def _cell(value: float, goal: float | None) -> str:
  mark = verdict(value, goal)
  return f"{_fmt_ratio(value)} {'**FAIL**' if mark == 'FAIL' else mark}".strip()


def summary_table(results: Sequence[dict[str, Any]], key: str = "ratios") -> list[str]:
  """Markdown rows, one ratio per line and one column per model, with PASS/FAIL; ``key``
  picks the times behind the ratios: ``"ratios"`` (wall-clock medians, the measurement),
  ``"ratios_of_minima"`` (fastest wall-clock samples) or ``"ratios_of_cpu_time"``."""
  header = "| ratio | goal | " + " | ".join(r["model"] for r in results) + " |"
  lines = [header, "|---|---|" + "---|" * len(results)]
  for name, label, goal in GOALS:
    cells = " | ".join(_cell(r[key][name], goal) for r in results)
    lines.append(f"| {label} | {'≤ ' + str(goal) if goal else 'info'} | {cells} |")
  return lines


def robustness_table(results: Sequence[dict[str, Any]], with_cpu: bool) -> list[str]:
  """The goal ratios again from the fastest wall-clock samples and (``with_cpu``) from the
  median process CPU time: ``min · CPU`` per model."""
  header = "| ratio | goal | " + " | ".join(r["model"] for r in results) + " |"
  lines = [header, "|---|---|" + "---|" * len(results)]
  for name, label, goal in GOALS:
    if goal is None:
      continue
    cells = []
    for r in results:
      cell = _cell(r["ratios_of_minima"][name], goal)
      if with_cpu:
        cell += " · " + _cell(r["ratios_of_cpu_time"][name], goal)
      cells.append(cell)
    lines.append(f"| {label} | ≤ {goal} | {' | '.join(cells)} |")
  return lines


def model_section(r: dict[str, Any], p: int, q: int, with_cpu: bool) -> list[str]:
  """Markdown of one model: absolute medians, compile data, the derived step models."""
  t, n, aot = r["medians_s"], r["samples"], r["aot_compile_s"]
  fastest, cpu = r["minima_s"], r["cpu_medians_s"]
  c, ratios = r["compile"], r["ratios"]
  shape = "×".join(str(d) for d in r["input_shape"])
  lines = [
    f"#### {r['model']}: {r['num_params']:,} parameters, input {shape}"
    + (", BatchNorm (train mode)" if r["batch_norm"] else ""),
    "",
    "| measurement | median (ms) | min (ms) | "
    + ("CPU time, median (ms) | " if with_cpu else "")
    + "samples | compile (s) |",
    "|---|---|---|---|---|" + ("---|" if with_cpu else ""),
  ]
  for key, label in MEASUREMENTS:
    if key not in t:
      continue
    compile_s = aot.get(key, {}).get("compile")
    lines.append(
      f"| {label} | {_fmt_ms(t[key])} | {_fmt_ms(fastest[key])} | "
      + (f"{_fmt_ms(cpu[key])} | " if with_cpu else "")
      + f"{n[key]} | {_fmt_s(compile_s)} |"
    )
  lines += [
    "",
    f"Amortised X-SAM step over p={p}: static {_fmt_ms(ratios['amortised_static_s'])} ms, "
    f"cond path {_fmt_ms(ratios['amortised_cond_s'])} ms; cost model SAM + q·HVP/p "
    f"(q={q}) = {_fmt_ms(ratios['model_step_s'])} ms.",
    "",
    f"Compile counts over {c['steps']} real X-SAM steps (jitted train step, refresh every {p}):",
    "",
    "| path | traces | backend compiles | compile (s), each program | trace + lower (s) | "
    "first call of each program (s) |",
    "|---|---|---|---|---|---|",
    *(
      f"| {label} | {c[path + '_traces']} | {c[path + '_events']['compiles']} | "
      + " + ".join(_fmt_s(x) for x in c[path + "_events"]["compile_each_s"])
      + f" | {_fmt_s(c[path + '_events']['trace_lower_s'])} | "
      + " + ".join(_fmt_s(x) for x in first_calls)
      + " |"
      for label, path, first_calls in (
        ("cond (`refresh=None`)", "cond", [c["cond_first_call_s"]]),
        ("static (`refresh=is_due(step, p)`)", "static", c["static_first_calls_s"]),
      )
    ),
    "",
    "Static path: the first program is the refresh step, the second the step without "
    "refresh. The cond path's single program serves both of its rows in the table above "
    "(its compile time is shown once). A first call includes trace, lowering, compile and "
    "one execution.",
    "",
  ]
  return lines


def reading(results: Sequence[dict[str, Any]], backend: str) -> list[str]:
  """Data-driven remarks: every failed goal with its numbers, the verdicts that depend on the
  statistic (noise), the control-flow effect and the trace counts."""
  lines = []
  for r in results:
    x, t, c = r["ratios"], r["medians_s"], r["compile"]
    fails = [(label, x[key], goal) for key, label, goal in GOALS if verdict(x[key], goal) == "FAIL"]
    head = f"- **{r['model']}**: "
    if fails:
      head += "fails " + "; ".join(f"{label} = {v:.3g} (goal ≤ {g})" for label, v, g in fails)
      head += "."
    else:
      head += "every goal passes."
    x_min, x_cpu = r["ratios_of_minima"], r["ratios_of_cpu_time"]
    use_cpu = backend == "cpu"
    flips = [
      f"{label} ({x[key]:.3g} by medians, {x_min[key]:.3g} by minima"
      + (f", {x_cpu[key]:.3g} by CPU time)" if use_cpu else ")")
      for key, label, goal in GOALS
      if len(
        {verdict(x[key], goal), verdict(x_min[key], goal)}
        | ({verdict(x_cpu[key], goal)} if use_cpu else set())
      )
      > 1
    ]
    if flips:
      head += " Verdict depends on the statistic (within the noise): " + "; ".join(flips) + "."
    lines.append(head)
    lines.append(
      f"  Control flow on {backend}: an HVP costs {x['hvp_cond_over_top']:.3g}× in `lax.cond` "
      f"and {x['hvp_fori_over_top']:.3g}× in `lax.fori_loop` what it costs at top level "
      f"(gradient: {x['grad_cond_over_top']:.3g}×, {x['grad_fori_over_top']:.3g}×); the cond-path"
      f" refresh step takes {x['cond_over_static_refresh']:.3g}× the static one "
      f"({_fmt_ms(t['xsam_refresh_cond'])} vs {_fmt_ms(t['xsam_refresh_static'])} ms)."
    )
    counts = (
      c["cond_traces"],
      c["cond_events"]["compiles"],
      c["static_traces"],
      c["static_events"]["compiles"],
    )
    lines.append(
      f"  Over {c['steps']} steps the cond path traced {counts[0]}× and compiled {counts[1]}×, "
      f"the static path traced {counts[2]}× and compiled {counts[3]}× "
      f"({'as expected' if counts == (1, 1, 2, 2) else 'NOT the expected 1 and 2'})."
    )
  return lines


def render_markdown(
  results: Sequence[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace
) -> str:
  """This benchmark's section of ``RESULTS.md``, between its begin and end markers."""
  m = meta["machine"]
  p, q = args.refresh_every, args.power_iters
  with_cpu = m["backend"] == "cpu"
  lines = [
    BEGIN_MARK,
    "## Step cost: SGD, SAM, optax.contrib.sam, X-SAM",
    "",
    "Generated by `benchmarks/step_cost.py`; rerunning it regenerates this section only (up "
    "to the end marker) and keeps the other sections of the file.",
    "",
    f"- Date: {meta['date']} (took {meta['elapsed_s'] / 60:.1f} min)",
    f"- Command: `{meta['command']}`",
    f"- Backend: **{m['backend']}**, devices: {m['devices']}",
    f"- Machine: {m['cpu']}, {m['cores']} cores; load average at start/end "
    f"{meta['load_start']} / {meta['load_end']} (the machine is shared: compare ratios within "
    "this run, not absolute times across runs)",
    f"- Versions: jax {m['jax']}, jaxlib {m['jaxlib']}, optax {m['optax']}, flax {m['flax']}, "
    f"Python {m['python']}",
    f"- Setup: batch {args.batch}, float32, random data; SGD lr {LEARNING_RATE} momentum "
    f"{MOMENTUM}; ρ = {RHO}, α = {ALPHA}, refresh every p = {p} steps, q = {q} HVPs per refresh; "
    "HVPs of the refresh in eval-mode BatchNorm (`eig_grad_fn`, the default of "
    "`experiments/train.py`); every step jitted; medians of interleaved repeats "
    f"(up to {args.repeats}, at most ~{args.budget:.0f} s per measurement, at least one).",
    "",
    "### Ratios against the goals",
    "",
    "Ratios of wall-clock medians; PASS/FAIL against the goal (an upper bound).",
    "",
    *summary_table(results),
    "",
    "The same goal ratios from the fastest wall-clock sample of each measurement"
    + (
      " · and from the median process CPU time (all threads; on a CPU backend it counts the "
      "work done and is not inflated while other processes hold the cores, so on a shared "
      "machine it is the steadier statistic):"
      if with_cpu
      else ":"
    ),
    "",
    *robustness_table(results, with_cpu),
    "",
    "Definitions. *Amortised* = (refresh step + (p−1)·step without refresh)/p on one path. "
    "*Refresh of q HVPs* = refresh step − step without refresh (the extra work of a refresh: "
    "one eval-mode gradient and q HVPs, as the official code's refresh), over the SAM step. "
    "The HVP in `SAM + q·HVP/p` is the one the refresh computes (eval-mode BN). "
    "`optax.contrib.sam` is compared in its two standard usages with the docstring's drop-in "
    "SAM (`sam(sgd, chain(normalize(), sgd(rho)), sync_period=2)`): opaque mode does one whole "
    "SAM update per call (clean gradient in, one adversarial `grad_fn` call), the same work as "
    "`xsam_jax.sam`; transparent mode needs two train-step calls (ascent, then descent), each "
    "with its own forward/backward, so one SAM update is two calls.",
    "",
    "### Reading",
    "",
    *reading(results, m["backend"]),
    "",
    "### Per model",
    "",
  ]
  for r in results:
    lines += model_section(r, p, q, with_cpu)
  lines += [
    "### Method",
    "",
    "- Each step is the real train step of `experiments/train.py`: "
    "`training.linen_grad_fns` (train-mode BatchNorm, statistics of perturbed passes thrown "
    "away) + `TrainState.apply_gradients(..., grad_fn=..., eig_grad_fn=..., refresh=...)`, "
    "one `jax.jit` per step kind. SGD, SAM, optax and the standalone gradient/HVP functions "
    "are compiled ahead of time (`jit(...).lower(...).compile()`), so their compile time is "
    "exact. The X-SAM step goes through the ordinary `jax.jit` call path for "
    f"{args.count_steps} real steps on each path, as in a training loop; traces are counted "
    "by the step function itself, backend compiles and their durations by "
    "`jax.monitoring` events. No buffer donation (`experiments/train.py` donates the state; "
    "that only saves copying pass-through state such as the eigenvector).",
    "- Every call is followed by `jax.block_until_ready`; a sample of a fast call repeats it "
    f"until it lasts ≥ {MIN_SAMPLE_S * 1e3:.0f} ms and divides. The X-SAM variants call the "
    "compiled programs on a fixed state (step counter 0 for a refresh, 1 for none); their "
    "post-compile calls from the real-step runs count as samples too (used when the budget "
    "allows no further sample, e.g. the cond path on XLA:CPU, measured once).",
    "- Control-flow cases: the gradient/HVP is the taken branch of a `lax.cond` on a traced "
    "predicate, or the body of a `lax.fori_loop` with a traced bound of 1 (a `while` loop that "
    "XLA cannot unroll). The gradient there is taken at `params + 1e-6·carry` so that it "
    "depends on the carry and cannot be hoisted. Upstream issue: jax-ml/jax#12868.",
    "- What the arithmetic predicts. For dense and convolution layers a gradient costs about "
    "3 forward passes (F + 2F backward) and a forward-over-reverse HVP about 9 (the primal "
    "gradient 3F plus its tangent 6F), so HVP/gradient ≈ 3 by FLOPs, less in practice (the "
    "first layer needs no input gradient; the SimpleCNN's compiled HVP has 26 convolutions "
    "to its gradient's 11, 2.4×). A refresh costs one primal gradient shared by the q HVPs "
    "(XLA's CSE merges their identical primal parts) "
    "plus q tangent passes, ≈ (3 + 6q)F = 33F for q = 5, against 6F for a SAM step: ≈ 5.5 SAM "
    "steps. A SAM step is two gradients: ≈ 2 SGD steps.",
    END_MARK,
  ]
  return "\n".join(lines) + "\n"


BEGIN_MARK = "<!-- benchmarks.step_cost: begin (generated; edits inside are overwritten) -->"
END_MARK = "<!-- benchmarks.step_cost: end -->"
_OWN_HEADINGS = ("Ratios against the goals", "Reading", "Per model", "Method")


def merge_report(existing: str | None, section: str) -> str:
  """The results file with this benchmark's ``section`` in place and every other section kept.

  ``section`` replaces the text between the begin/end markers, or the unmarked report an
  older version of this script wrote at the top of the file (everything up to the first
  ``## `` heading that is not one of its own); otherwise it goes first, under a ``# Benchmarks``
  title, before the existing text.
  """
  if not existing:
    return "# Benchmarks\n\n" + section
  if BEGIN_MARK in existing and END_MARK in existing:
    head, rest = existing.split(BEGIN_MARK, 1)
    tail = rest.split(END_MARK, 1)[1]
    return head + section.rstrip("\n") + tail
  lines = existing.splitlines(keepends=True)
  if lines and lines[0].startswith("# Step-cost benchmark"):
    for i, line in enumerate(lines):
      if line.startswith("## ") and line[3:].strip() not in _OWN_HEADINGS:
        return "# Benchmarks\n\n" + section + "\n" + "".join(lines[i:])
    return "# Benchmarks\n\n" + section
  if lines and lines[0].startswith("# "):
    return lines[0] + "\n" + section + "\n" + "".join(lines[1:]).lstrip("\n")
  return "# Benchmarks\n\n" + section + "\n" + existing


# --------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command-line flags."""
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.step_cost", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--models",
    default=DEFAULT_MODELS,
    help=f"comma-separated: mlp and/or {', '.join(sorted(MODELS))} (default: {DEFAULT_MODELS})",
  )
  parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
  parser.add_argument(
    "--budget",
    type=float,
    default=150.0,
    help="seconds of repeats per measurement before it stops repeating (default 150)",
  )
  parser.add_argument("--refresh-every", type=int, default=5, help="p (default 5)")
  parser.add_argument("--power-iters", type=int, default=5, help="q (default 5)")
  parser.add_argument(
    "--count-steps", type=int, default=10, help="real X-SAM steps per path (default 10)"
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the round-robin order")
  parser.add_argument("--out", default="benchmarks/RESULTS.md", help="markdown report path")
  parser.add_argument("--json", default=None, help="also write the raw results as JSON here")
  args = parser.parse_args(argv)
  args.models = [name.strip() for name in args.models.split(",") if name.strip()]
  if args.count_steps < args.refresh_every + 1:
    parser.error("--count-steps must exceed --refresh-every (two refreshes are needed)")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmark and writes the report."""
  args = parse_args(argv)
  start = time.time()

  def log(message: str) -> None:
    print(f"[{time.time() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

  compile_events()  # listen from the start
  machine = machine_info()
  log(f"backend {machine['backend']} ({machine['devices']}), jax {machine['jax']}")
  load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
  results = [benchmark_model(name, args, log) for name in args.models]
  meta = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y"),
    "command": "python -m benchmarks.step_cost"
    + ("" if argv is None and len(sys.argv) == 1 else " " + shlex.join(argv or sys.argv[1:])),
    "machine": machine,
    "load_start": load_start,
    "load_end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    "elapsed_s": time.time() - start,
  }
  report = render_markdown(results, meta, args)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(merge_report(out.read_text() if out.exists() else None, report))
  if args.json:
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
  print("\n".join(summary_table(results)))
  log(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
