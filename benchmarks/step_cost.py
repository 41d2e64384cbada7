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
The harness (:mod:`benchmarks._harness`), the problems (:mod:`benchmarks._problems`) and the
report writer (:mod:`benchmarks._report`) are shared with the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from benchmarks import _report as report
from benchmarks._harness import (
  MIN_SAMPLE_S,
  Variant,
  compile_ahead,
  compile_events,
  compiled_variant,
  first_run,
  interleave,
  summarize,
)
from benchmarks._problems import (
  ALPHA,
  LEARNING_RATE,
  MODELS,
  MOMENTUM,
  RHO,
  Problem,
  TrainStep,
  create_state,
  make_optimizers,
  make_primitive,
  make_problem,
  primitive_args,
  run_steps,
  with_count,
)
from xsam_jax import is_due

DEFAULT_MODELS = "mlp,simple_cnn,resnet18"
# The train steps compared (of :func:`benchmarks._problems.make_optimizers`).
STEP_KINDS = ("sgd", "sam", "optax_sam_opaque", "optax_sam_transparent", "xsam")
NAME = "benchmarks.step_cost"


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
  static_s, _ = run_steps(static, state, problem, num_steps, p, log)
  static_events = events.since(mark)
  log(f"  X-SAM cond path, {num_steps} steps")
  mark = events.mark()
  cond_s, _ = run_steps(cond, state, problem, num_steps, None, log)
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
  args = primitive_args(problem)
  cases = [(op, place, True) for op in ("grad", "hvp") for place in ("top", "cond", "fori")]
  if problem.batch_stats is not None:
    cases += [("grad", "top", False), ("hvp", "top", False)]
  variants = []
  for op, place, train in cases:
    jitted = jax.jit(make_primitive(op, place, problem.apply_fn, train))
    name = f"{op}_{place}" + ("" if train else "_eval")
    variants.append(compiled_variant(name, jitted, args, log))
  return variants


def benchmark_model(name: str, args: argparse.Namespace, log) -> dict[str, Any]:
  """Every measurement of one model: medians (seconds), sample counts, compile data, ratios."""
  p, q = args.refresh_every, args.power_iters
  problem = make_problem(name, args.batch)
  has_bn = problem.batch_stats is not None
  log(f"== {name}: {problem.num_params:,} params, input {problem.images.shape}, BN={has_bn}")
  optimizers = make_optimizers(p, q)
  states = {kind: create_state(problem, optimizers[kind]) for kind in STEP_KINDS}

  variants, compile_info = xsam_path_variants(problem, states["xsam"], p, args.count_steps, log)
  log("  compiling the other steps and the standalone gradients/HVPs")
  variants += step_variants(problem, states, log)
  variants += primitive_variants(problem, log)
  log(f"  interleaved timing: {args.repeats} rounds, budget {args.budget:.0f}s per variant")
  interleave(variants, args.repeats, args.budget, args.seed, log)

  times = summarize(variants)
  medians, minima, cpu_medians = times["medians_s"], times["minima_s"], times["cpu_medians_s"]
  return {
    "model": name,
    "num_params": problem.num_params,
    "input_shape": list(problem.images.shape),
    "batch_norm": has_bn,
    **times,
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


def summary_table(results: Sequence[dict[str, Any]], key: str = "ratios") -> list[str]:
  """Markdown rows, one ratio per line and one column per model, with PASS/FAIL; ``key``
  picks the times behind the ratios: ``"ratios"`` (wall-clock medians, the measurement),
  ``"ratios_of_minima"`` (fastest wall-clock samples) or ``"ratios_of_cpu_time"``."""
  header = "| ratio | goal | " + " | ".join(r["model"] for r in results) + " |"
  lines = [header, "|---|---|" + "---|" * len(results)]
  for name, label, goal in GOALS:
    cells = " | ".join(report.cell(r[key][name], goal) for r in results)
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
      cell = report.cell(r["ratios_of_minima"][name], goal)
      if with_cpu:
        cell += " · " + report.cell(r["ratios_of_cpu_time"][name], goal)
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
      f"| {label} | {report.fmt_ms(t[key])} | {report.fmt_ms(fastest[key])} | "
      + (f"{report.fmt_ms(cpu[key])} | " if with_cpu else "")
      + f"{n[key]} | {report.fmt_s(compile_s)} |"
    )
  lines += [
    "",
    f"Amortised X-SAM step over p={p}: static {report.fmt_ms(ratios['amortised_static_s'])} ms, "
    f"cond path {report.fmt_ms(ratios['amortised_cond_s'])} ms; cost model SAM + q·HVP/p "
    f"(q={q}) = {report.fmt_ms(ratios['model_step_s'])} ms.",
    "",
    f"Compile counts over {c['steps']} real X-SAM steps (jitted train step, refresh every {p}):",
    "",
    "| path | traces | backend compiles | compile (s), each program | trace + lower (s) | "
    "first call of each program (s) |",
    "|---|---|---|---|---|---|",
    *(
      f"| {label} | {c[path + '_traces']} | {c[path + '_events']['compiles']} | "
      + " + ".join(report.fmt_s(x) for x in c[path + "_events"]["compile_each_s"])
      + f" | {report.fmt_s(c[path + '_events']['trace_lower_s'])} | "
      + " + ".join(report.fmt_s(x) for x in first_calls)
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
    fails = [
      (label, x[key], goal) for key, label, goal in GOALS if report.verdict(x[key], goal) == "FAIL"
    ]
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
        {report.verdict(x[key], goal), report.verdict(x_min[key], goal)}
        | ({report.verdict(x_cpu[key], goal)} if use_cpu else set())
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
      f"({report.fmt_ms(t['xsam_refresh_cond'])} vs {report.fmt_ms(t['xsam_refresh_static'])} ms)."
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
  ]
  return report.section(NAME, "Step cost: SGD, SAM, optax.contrib.sam, X-SAM", meta, lines)


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
  run = report.Run(NAME, argv)
  compile_events()  # listen from the start
  results = [benchmark_model(name, args, run.log) for name in args.models]
  meta = run.meta()
  report.write_section(args.out, render_markdown(results, meta, args), NAME)
  if args.json:
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
  print("\n".join(summary_table(results)))
  run.log(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
