"""Cost per step of the cheaper-SAM variants against SGD and SAM, with the gradient evaluations
per step counted at run time.

``python -m benchmarks.variant_cost [--models mlp,simple_cnn] [--batch 32] [--window 10]
[--repeats 3] [--variants sgd,sam,every2,...] [--out benchmarks/RESULTS.md]``

Every variant is a real training step (the step of ``experiments/train.py``:
:func:`xsam_jax.training.linen_grad_fns` and ``TrainState.apply_gradients``, one ``jax.jit``,
float32, random data, BatchNorm in train mode), on the same path as training: the traced
decisions of ``lax.cond`` (``sometimes_sam``'s ascent, LookSAM's refresh, the eigenvector
refresh of Eigen-SAM and X-SAM with ``refresh=None``), one compiled program for every step.

Two passes over the same window of ``--window`` consecutive steps from the same initial state
(the state carried from step to step, so that every-k, random and adaptive schedules and the
refresh every p are averaged as in training):

* **counting pass** (not timed): the step is compiled with ``grad_fn`` and ``eig_grad_fn``
  wrapped by :func:`counting` and a run-time tick for the clean gradient; each evaluation that
  really runs adds one to a host counter through ``jax.debug.callback`` (a ``lax.cond`` branch
  that is not taken runs nothing), a Hessian-vector product (``jax.jvp`` over the gradient) is
  told apart from a gradient by a ``jax.custom_jvp`` marker. The counts are read after every
  step (``jax.effects_barrier``), and the states' own ``ascent_steps`` are read where they
  exist, as a cross-check.
* **timed pass**: the same window, compiled without the counters, timed by the shared harness
  (:mod:`benchmarks._harness`: interleaved rounds, shuffled every round, every call blocked), so
  that the ratios to SGD and to SAM come from one run. The time of a sample is the time of the
  window divided by its steps: an average over the schedule, not one step.

Two single steps of SAM every 2 steps are timed beside them: a step that skips the ascent
(step counter 1) and one that takes it (counter 0), to compare a skipped ascent with SGD's step
and a taken one with SAM's.

The variants are a registry, :data:`VARIANTS`; a new one is one :func:`register` call (its
transform, the extra arguments its ``update`` takes and its expected cost in words).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import xsam_jax
from benchmarks import _report as report
from benchmarks._harness import Variant, compile_ahead, first_run, interleave, summarize
from benchmarks._problems import (
  ALPHA,
  LEARNING_RATE,
  MODELS,
  MOMENTUM,
  RHO,
  Problem,
  create_state,
  cross_entropy,
  make_problem,
)
from xsam_jax import training

NAME = "benchmarks.variant_cost"
DEFAULT_MODELS = "mlp,simple_cnn"
# X-SAM and Eigen-SAM at the papers' tracking settings: a refresh of q HVPs every p steps.
REFRESH_EVERY = 5
POWER_ITERS = 5

Counts = collections.Counter  # "clean", "grad" (grad_fn/eig_grad_fn calls), "hvp"


# --------------------------------------------------------------------------------------------
# The registry of variants.


@dataclasses.dataclass(frozen=True)
class Method:
  """One optimizer variant of the benchmark.

  Attributes:
    name: short key (``--variants``, table rows).
    label: what it is, for the table (transform and settings).
    make: ``() -> GradientTransformation`` of the first link of the chain (``None`` for SGD);
      the benchmark appends SGD (lr 0.1, momentum 0.9).
    extra: the extra arguments its ``update`` takes: a subset of ``{"grad_fn",
      "eig_grad_fn"}``; ``refresh`` is left to the transform (``None``: the ``lax.cond``
      path, as in training).
    expected: its gradient evaluations per step in words (for the reader; the table shows the
      counted ones).
    ascent_due: the static path: ``step -> bool`` decided on the host
      (:func:`xsam_jax.ascent_due`), passed as ``update(..., ascend=...)`` to a step jitted
      with it static (two programs, no ``lax.cond`` around the ascent); None: the ``lax.cond``
      path.
  """

  name: str
  label: str
  make: Callable[[], optax.GradientTransformation] | None
  extra: frozenset[str] = frozenset({"grad_fn"})
  expected: str = ""
  ascent_due: Callable[[int], bool] | None = None


VARIANTS: dict[str, Method] = {}


def register(
  name: str,
  label: str,
  make: Callable[[], optax.GradientTransformation] | None,
  *,
  extra: Sequence[str] = ("grad_fn",),
  expected: str = "",
  ascent_due: Callable[[int], bool] | None = None,
) -> Method:
  """Adds a variant to :data:`VARIANTS` (the benchmark runs them in registration order).

  Args:
    name: its key, unique.
    label: its description in the table.
    make: builds the first link of the chain (the benchmark appends SGD); ``None`` for SGD.
    extra: the extra arguments its ``update`` takes (``"grad_fn"``, ``"eig_grad_fn"``).
    expected: the expected gradient evaluations per step, in words.
    ascent_due: for the static path, the host-side decision ``step -> bool``.

  Returns:
    The registered :class:`Method`.

  Raises:
    ValueError: for a name already registered or an unknown extra argument.
  """
  if name in VARIANTS:
    raise ValueError(f"variant {name!r} is already registered; pick another `name`.")
  unknown = set(extra) - {"grad_fn", "eig_grad_fn"}
  if unknown:
    raise ValueError(f"`extra` may hold 'grad_fn' and 'eig_grad_fn' only, got {sorted(unknown)}.")
  method = Method(name, label, make, frozenset(extra), expected, ascent_due)
  VARIANTS[name] = method
  return method


register("sgd", "SGD", None, extra=(), expected="1")
register("sam", "SAM: `sam()`", lambda: xsam_jax.sam(rho=RHO), expected="2")
for _k in (2, 5):
  register(
    f"every{_k}",
    f'`sometimes_sam(when="every", k={_k})`',
    lambda k=_k: xsam_jax.sometimes_sam(RHO, when="every", k=k),
    expected=f"1 + 1/{_k}",
  )
for _prob in (0.5, 0.2):
  register(
    f"random{_prob:g}",
    f'`sometimes_sam(when="random", prob={_prob:g})`',
    lambda prob=_prob: xsam_jax.sometimes_sam(RHO, when="random", prob=prob, key=0),
    expected=f"1 + {_prob:g} on average",
  )
register(
  "adaptive",
  '`sometimes_sam(when="adaptive")` (decay 0.9, threshold 0)',
  lambda: xsam_jax.sometimes_sam(RHO, when="adaptive"),
  expected="1 + fraction of ‖g‖² ≥ its running mean",
)
register("looksam5", "`looksam(k=5)`", lambda: xsam_jax.looksam(RHO, k=5), expected="1 + 1/5")
register(
  "eigen_sam",
  f"`eigen_sam(refresh_every={REFRESH_EVERY}, num_iters={POWER_ITERS})`, cond path",
  lambda: xsam_jax.eigen_sam(RHO, ALPHA, refresh_every=REFRESH_EVERY, num_iters=POWER_ITERS, key=0),
  extra=("grad_fn", "eig_grad_fn"),
  expected=f"2 + {POWER_ITERS}/{REFRESH_EVERY} HVPs",
)
register(
  "xsam",
  f"`xsam(refresh_every={REFRESH_EVERY}, num_iters={POWER_ITERS})`, cond path",
  lambda: xsam_jax.xsam(RHO, ALPHA, refresh_every=REFRESH_EVERY, num_iters=POWER_ITERS),
  extra=("grad_fn", "eig_grad_fn"),
  expected=f"2 + {POWER_ITERS}/{REFRESH_EVERY} HVPs",
)
# The static path of the same policies: the host decides (xsam_jax.ascent_due), no lax.cond.
register(
  "every5_static",
  '`sometimes_sam(when="every", k=5)`, static path (`ascend=ascent_due(...)`)',
  lambda: xsam_jax.sometimes_sam(RHO, when="every", k=5),
  expected="1 + 1/5",
  ascent_due=lambda t: xsam_jax.ascent_due(t, when="every", k=5),
)
register(
  "random0.2_static",
  '`sometimes_sam(when="random", prob=0.2)`, static path',
  lambda: xsam_jax.sometimes_sam(RHO, when="random", prob=0.2, key=0),
  expected="1 + 0.2 on average",
  ascent_due=lambda t: xsam_jax.ascent_due(t, when="random", prob=0.2, key=0),
)
register(
  "looksam5_static",
  "`looksam(k=5)`, static path",
  lambda: xsam_jax.looksam(RHO, k=5),
  expected="1 + 1/5",
  ascent_due=lambda t: xsam_jax.ascent_due(t, when="every", k=5),
)
register(
  "esam",
  "`esam(beta=0.5)` (stochastic weight perturbation)",
  lambda: xsam_jax.esam(RHO, beta=0.5, key=0),
  expected="2 (half the tensors perturbed; the backward pass is not cheaper in JAX)",
)
# More variants (X-SAM's schedules, ...) register here.

# The variant whose single skipped and taken ascent steps are timed beside the windows.
SKIP_PROBE = "every2"


def make_tx(method: Method) -> optax.GradientTransformation:
  """``method``'s transform chained with SGD (lr 0.1, momentum 0.9)."""
  sgd = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
  return sgd if method.make is None else optax.chain(method.make(), sgd)


# --------------------------------------------------------------------------------------------
# Counting gradient evaluations at run time.


def counting(grad_fn: Callable[[Any], Any], counts: Counts) -> Callable[[Any], Any]:
  """``grad_fn`` that adds one to ``counts["grad"]`` each time it runs and one to
  ``counts["hvp"]`` each time a Hessian-vector product through it runs.

  The count is a ``jax.debug.callback`` at run time, so an untaken ``lax.cond`` branch adds
  nothing and a loop body adds once per iteration. A ``jax.custom_jvp`` identity on one scalar
  of the parameters tells the two apart: evaluated plainly it ticks ``"grad"``; under
  ``jax.jvp`` (the HVP ``jax.jvp(grad_fn, (w,), (v,))``) its JVP rule runs instead and ticks
  ``"hvp"`` (a direction ``v`` that is exactly zero in that scalar is still counted: the
  tangent is not a symbolic zero).
  """

  def bump(kind: str) -> Callable[[], None]:
    def add() -> None:
      counts[kind] += 1

    return add

  @jax.custom_jvp
  def marker(x):
    jax.debug.callback(bump("grad"))
    return x

  @marker.defjvp
  def _(primals, tangents):
    jax.debug.callback(bump("hvp"))
    return primals[0], tangents[0]

  def counted(params):
    marker(jax.tree.leaves(params)[0].reshape(-1)[0])
    return grad_fn(params)

  return counted


def make_step(method: Method, counts: Counts | None = None) -> Callable[..., Any]:
  """The jitted train step ``(state, images, labels, ascend) -> (state, loss)`` of ``method``
  (``ascend`` static: None on the ``lax.cond`` path, a host-decided bool on the static one).

  With ``counts``: the clean gradient, ``grad_fn`` and ``eig_grad_fn`` are counted at run time
  (:func:`counting`; the clean pass is unconditional and ticks ``counts["clean"]``).
  """

  def step(state, images, labels, ascend):
    out = training.linen_grad_fns(state, cross_entropy, images, labels)
    fns = {"grad_fn": out.grad_fn, "eig_grad_fn": out.eig_grad_fn}
    if counts is not None:
      jax.debug.callback(lambda: counts.update(clean=1))
      fns = {name: counting(fn, counts) for name, fn in fns.items()}
    extra = {name: fn for name, fn in fns.items() if name in method.extra}
    if ascend is not None:
      extra["ascend"] = ascend
    state = state.apply_gradients(grads=out.grads, batch_stats=out.batch_stats, **extra)
    return state, out.loss

  return jax.jit(step, static_argnums=3)


def ascend_at(method: Method, step: int) -> bool | None:
  """The ``ascend`` argument of ``method``'s step ``step`` (None on the ``lax.cond`` path)."""
  return None if method.ascent_due is None else method.ascent_due(step)


def ascent_steps(state: training.TrainState) -> int | None:
  """The ``ascent_steps`` field of the state of the chain's first link, if it has one."""
  opt_state = state.opt_state
  first = opt_state[0] if isinstance(opt_state, tuple) and opt_state else None
  value = getattr(first, "ascent_steps", None)
  return None if value is None else int(value)


def count_window(method: Method, problem: Problem, state, steps: int) -> dict[str, Any]:
  """Runs ``steps`` real steps of ``method`` from ``state`` with counting (not timed).

  Returns:
    ``{"per_step": [(clean, grads, hvps) for each step], "grads_per_step", "hvps_per_step",
    "ascent_steps"}``: ``grads`` counts every gradient evaluation (the clean one included),
    ``hvps`` the Hessian-vector products; ``ascent_steps`` is the state's own count after the
    window (None where the state has none).
  """
  counts: Counts = collections.Counter()
  step = make_step(method, counts)
  per_step = []
  for t in range(steps):
    before = dict(counts)
    ascend = ascend_at(method, t)
    state, _ = jax.block_until_ready(step(state, problem.images, problem.labels, ascend))
    jax.effects_barrier()
    diff = {k: counts[k] - before.get(k, 0) for k in ("clean", "grad", "hvp")}
    per_step.append((diff["clean"], diff["clean"] + diff["grad"], diff["hvp"]))
  return {
    "per_step": per_step,
    "grads_per_step": sum(g for _, g, _ in per_step) / steps,
    "hvps_per_step": sum(h for _, _, h in per_step) / steps,
    "ascent_steps": ascent_steps(state),
  }


# --------------------------------------------------------------------------------------------
# Timing.


def window_variant(
  method: Method, problem: Problem, state, steps: int, log
) -> tuple[Variant, dict[str, Any]]:
  """A harness variant that runs ``steps`` consecutive steps of ``method`` from ``state`` (the
  state carried, the same window every call), compiled ahead of time, and a dict whose
  ``"state"`` is the state at the end of its last timed window."""
  data = (problem.images, problem.labels)
  jitted = make_step(method)
  choices = [ascend_at(method, t) for t in range(steps)]  # decided once, outside the timing
  programs, lower_s, compile_s = {}, 0.0, 0.0
  for ascend in dict.fromkeys(choices):  # one program per static value (None: the cond path)
    # The static `ascend` is baked into the compiled program, called with (state, *data).
    programs[ascend], lower, compile_ = compile_ahead(jitted, (state, *data, ascend))
    lower_s, compile_s = lower_s + lower, compile_s + compile_
  window_programs = [programs[a] for a in choices]
  last: dict[str, Any] = {}

  def call():
    s = state
    for program in window_programs:
      s, loss = program(s, *data)
    last["state"] = s
    return s, loss

  variant = Variant(method.name, call, lower_s=lower_s, compile_s=compile_s)
  return first_run(variant, log), last


def with_first_count(state: training.TrainState, count: int) -> training.TrainState:
  """``state`` with the step counter of its first link set to ``count``."""
  first = state.opt_state[0]
  first = first._replace(count=jnp.asarray(count, first.count.dtype))
  return state.replace(opt_state=(first, *state.opt_state[1:]))


def single_step_variants(
  problem: Problem, states: dict[str, Any], probe: str, log
) -> list[Variant]:
  """One step of ``probe`` (SAM every k steps) that skips the ascent (counter 1) and one that
  takes it (counter 0), same compiled program, timed on a fixed state."""
  data = (problem.images, problem.labels)
  jitted = make_step(VARIANTS[probe])
  compiled, lower_s, compile_s = compile_ahead(jitted, (states[probe], *data, None))
  variants = []
  for name, count in ((f"{probe}_skip_step", 1), (f"{probe}_ascent_step", 0)):
    state = with_first_count(states[probe], count)
    call = lambda state=state: compiled(state, *data)
    variants.append(first_run(Variant(name, call, lower_s=lower_s, compile_s=compile_s), log))
  return variants


def benchmark_model(name: str, args: argparse.Namespace, log) -> dict[str, Any]:
  """Counts and times every variant of ``args.variants`` on model ``name``."""
  problem = make_problem(name, args.batch)
  log(f"== {name}: {problem.num_params:,} params, input {problem.images.shape}")
  methods = [VARIANTS[v] for v in args.variants]
  states = {m.name: create_state(problem, make_tx(m)) for m in methods}
  counted = {}
  for m in methods:
    counted[m.name] = count_window(m, problem, states[m.name], args.window)
    c = counted[m.name]
    log(f"  {m.name}: {c['grads_per_step']:.3g} gradients, {c['hvps_per_step']:.3g} HVPs/step")
  log(f"  compiling the timed windows of {args.window} steps")
  windows = [window_variant(m, problem, states[m.name], args.window, log) for m in methods]
  variants = [variant for variant, _ in windows]
  if SKIP_PROBE in states:
    variants += single_step_variants(problem, states, SKIP_PROBE, log)
  log(f"  interleaved timing: {args.repeats} rounds, budget {args.budget:.0f}s per variant")
  interleave(variants, args.repeats, args.budget, args.seed, log)
  for m, (_, last) in zip(methods, windows, strict=True):
    # The timed program (no counters) must have made the counted pass's choices.
    counted[m.name]["timed_ascent_steps"] = ascent_steps(last["state"])
  times = summarize(variants)
  per_step = {}  # seconds per step: windows divided by their steps, single steps as they are
  for clock, key in (("wall", "medians_s"), ("cpu", "cpu_medians_s")):
    per_step[clock] = {v: t / (args.window if v in states else 1) for v, t in times[key].items()}
  return {
    "model": name,
    "num_params": problem.num_params,
    "input_shape": list(problem.images.shape),
    "batch_norm": problem.batch_stats is not None,
    "counts": counted,
    "per_step_s": per_step,
    "samples": times["samples"],
    "raw_samples_s": times["raw_samples_s"],
    "compile_s": {v.name: v.compile_s for v in variants},
  }


# --------------------------------------------------------------------------------------------
# Report.


def fmt_count(x: float) -> str:
  """A per-step count with up to three decimals and no trailing zeros."""
  return f"{x:.3f}".rstrip("0").rstrip(".")


def pattern(per_step: Sequence[tuple[int, int, int]]) -> str:
  """The gradients per step as a string of digits, with HVPs as ``+h`` where there are any."""
  return " ".join(f"{g}" + (f"+{h}h" if h else "") for _, g, h in per_step)


def model_table(r: dict[str, Any], window: int) -> list[str]:
  """Markdown table of one model: counts, ratios to SGD and SAM (wall · CPU), ms/step."""
  wall, cpu = r["per_step_s"]["wall"], r["per_step_s"]["cpu"]
  rows = []
  for name, c in r["counts"].items():
    method = VARIANTS[name]
    ratios = []
    for base in ("sgd", "sam"):
      if base in wall:
        ratios.append(
          f"{report.fmt_ratio(wall[name] / wall[base])} · {report.fmt_ratio(cpu[name] / cpu[base])}"
        )
      else:
        ratios.append("–")
    ascents = "–" if c["ascent_steps"] is None else str(c["ascent_steps"])
    if c.get("timed_ascent_steps", c["ascent_steps"]) != c["ascent_steps"]:
      ascents += f" (timed pass: {c['timed_ascent_steps']})"
    rows.append(
      [
        f"{method.label}",
        fmt_count(c["grads_per_step"]),
        fmt_count(c["hvps_per_step"]),
        method.expected,
        ascents,
        *ratios,
        report.fmt_ms(wall[name]),
        r["samples"][name],
        f"`{pattern(c['per_step'])}`",
      ]
    )
  shape = "×".join(str(d) for d in r["input_shape"])
  return [
    f"#### {r['model']}: {r['num_params']:,} parameters, input {shape}"
    + (", BatchNorm (train mode)" if r["batch_norm"] else ""),
    "",
    *report.table(
      [
        "variant",
        "gradients / step (counted)",
        "HVPs / step (counted)",
        "expected",
        f"state's `ascent_steps` after {window} (counting pass; timed pass if different)",
        "time / SGD (wall · CPU)",
        "time / SAM (wall · CPU)",
        "ms / step (wall)",
        "samples",
        "gradients per step, step by step",
      ],
      rows,
    ),
    "",
  ]


def skip_lines(results: Sequence[dict[str, Any]]) -> list[str]:
  """Does a skipped ascent cost one gradient? The single-step probes against SGD and SAM."""
  lines = []
  for r in results:
    wall, cpu = r["per_step_s"]["wall"], r["per_step_s"]["cpu"]
    skip, ascent = f"{SKIP_PROBE}_skip_step", f"{SKIP_PROBE}_ascent_step"
    if skip not in wall or "sgd" not in wall or "sam" not in wall:
      continue
    lines.append(
      f"- **{r['model']}**: a step of {VARIANTS[SKIP_PROBE].label} that skips the ascent takes "
      f"{report.fmt_ratio(wall[skip] / wall['sgd'])}× an SGD step "
      f"(CPU time {report.fmt_ratio(cpu[skip] / cpu['sgd'])}×; {report.fmt_ms(wall[skip])} vs "
      f"{report.fmt_ms(wall['sgd'])} ms); one that takes it "
      f"{report.fmt_ratio(wall[ascent] / wall['sam'])}× a SAM step "
      f"(CPU time {report.fmt_ratio(cpu[ascent] / cpu['sam'])}×; "
      f"{report.fmt_ms(wall[ascent])} vs {report.fmt_ms(wall['sam'])} ms)."
    )
  return lines


def render_markdown(
  results: Sequence[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace
) -> str:
  """This benchmark's section of ``RESULTS.md``, between its begin and end markers."""
  lines = [
    f"- Setup: batch {args.batch}, float32, random data (one fixed batch); SGD lr "
    f"{LEARNING_RATE} momentum {MOMENTUM} after every variant; ρ = {RHO}, α = {ALPHA}; "
    f"a window of {args.window} consecutive steps from the initial state, the state carried; "
    f"medians of interleaved rounds (up to {args.repeats}, at most ~{args.budget:.0f} s per "
    "variant, at least one), divided by the window's steps.",
    "",
    "Gradients and HVPs per step are **counted at run time** in a separate, untimed pass over "
    "the same window (a `jax.debug.callback` in the clean pass, in `grad_fn` and in "
    "`eig_grad_fn`; a `jax.custom_jvp` marker tells an HVP from a gradient), so a step whose "
    "`lax.cond` skipped the ascent counts one gradient. Ratios: medians of wall-clock time · "
    "of process CPU time (all threads), each variant over SGD and over SAM from the same run.",
    "",
    *skip_lines(results),
    "",
  ]
  for r in results:
    lines += model_table(r, args.window)
  lines += [
    "Method: every variant is the train step of `experiments/train.py` (`linen_grad_fns` + "
    "`apply_gradients`, `refresh=None`: the `lax.cond` path, one program for every step; "
    "the rows marked *static path* pass `ascend=xsam_jax.ascent_due(step, ...)`, decided "
    "on the host, to a step with `ascend` static: two programs, no `lax.cond`), "
    "compiled ahead of time; a timed sample runs the whole window (async dispatch, blocked "
    "at its end) and repeats it until it lasts ≥ 0.2 s. The last column lists the counted "
    "gradient evaluations of each step of the window (`+5h`: five HVPs in that step).",
  ]
  models = ", ".join(r["model"] for r in results)
  title = f"Variant cost: cheaper SAM variants against SGD and SAM ({models})"
  return report.section(section_name(args.models), title, meta, lines)


def section_name(models: Sequence[str]) -> str:
  """The results-file section of a run on ``models``: one per set of models, so that runs on
  different models (a quick MLP run, a long one on a CNN) keep each other's sections."""
  return f"{NAME}:{'+'.join(models)}"


# --------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command-line flags."""
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.variant_cost", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--models",
    default=DEFAULT_MODELS,
    help=f"comma-separated: mlp and/or {', '.join(sorted(MODELS))} (default: {DEFAULT_MODELS})",
  )
  parser.add_argument(
    "--variants",
    default=",".join(VARIANTS),
    help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)",
  )
  parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
  parser.add_argument(
    "--window", type=int, default=10, help="consecutive steps per timed sample (default 10)"
  )
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
  parser.add_argument(
    "--budget",
    type=float,
    default=60.0,
    help="seconds of repeats per variant before it stops repeating (default 60)",
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the round-robin order")
  parser.add_argument("--out", default="benchmarks/RESULTS.md", help="markdown report path")
  parser.add_argument("--json", default=None, help="also write the raw results as JSON here")
  args = parser.parse_args(argv)
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
  bad_models = [m for m in args.models if m != "mlp" and m not in MODELS]
  if bad_models:
    parser.error(f"--models: unknown {bad_models}; choose mlp or {', '.join(sorted(MODELS))}")
  if args.window < 1 or args.batch < 1 or args.repeats < 1:
    parser.error("--window, --batch and --repeats must be >= 1")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmark and writes its section of the report."""
  args = parse_args(argv)
  run = report.Run(NAME, argv)
  results = [benchmark_model(name, args, run.log) for name in args.models]
  meta = run.meta()
  text = render_markdown(results, meta, args)
  report.write_section(args.out, text, section_name(args.models), first=False)
  if args.json:
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
  run.log(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
