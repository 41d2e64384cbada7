"""One-command accelerator benchmark: ``python -m benchmarks.gpu [--tiny] [--out FILE]``.

Runs offline with what an accelerator machine already has (JAX, Flax, optax, chex; PyTorch
optional): it imports neither tensorflow-datasets nor tensorboardX and downloads nothing. One
Markdown report (``--out``, default ``benchmarks/GPU_RESULTS.md``) with:

(a) **cond vs static path**: the X-SAM train step run for ``2p + 1`` steps from one state on the
    ``lax.cond`` path (``refresh=None``) and on the host-decided static path
    (``refresh=is_due(step, p)``) must agree: the parameters to a small fraction of the distance
    they travelled, the cached eigenvectors to ``|cos| >= 0.99``.
(b) **step costs** of each model at each computation dtype (float32, bfloat16 with float32
    parameters): SGD, SAM, X-SAM on the cond path with and without a refresh (and with
    finite-difference HVPs where the library offers them), one gradient and one HVP; medians of
    interleaved repeats and the ratios between them.
(c) **training throughput** (images/s) of ``experiments/train.py``'s own jitted step
    (``make_train_step``, the refresh path it picks on this backend) on a synthetic CIFAR-shaped
    batch, for SGD, SAM and X-SAM, over whole refresh periods.
(d) where PyTorch is importable, a PyTorch SAM and Eigen-SAM step on the same model shapes
    (:mod:`benchmarks.torch_sam`), as a side-by-side row; skipped otherwise.

Defaults: ResNet-18 and WRN-28-10, batch 128, sized to finish in under 8 minutes on one GPU;
``--max-minutes`` stops starting new measurements once that much time has passed (the report
says what was skipped). ``--tiny`` is the CPU mode that CI runs so the script cannot rot: a
SimpleCNN on 8x8 images, batch 4, two repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _harness as harness
from benchmarks import _problems as problems
from benchmarks import _report as report
from experiments import data as data_lib
from experiments import train as train_lib
from experiments.configs.base import TrainConfig, validate
from experiments.optimizers import build_optimizer

NAME = "benchmarks.gpu"
# Agreement of the two refresh paths: parameter difference over the distance travelled, and
# the eigenvectors' |cos|.
PARAM_TOLERANCE = 1e-2
COS_TOLERANCE = 0.99


@dataclasses.dataclass(frozen=True)
class Size:
  """What one mode measures."""

  models: tuple[str, ...]
  batch: int
  input_shape: tuple[int, int, int]
  repeats: int
  budget_s: float
  throughput_periods: int  # refresh periods per throughput sample
  refresh_every: int  # default p
  power_iters: int  # default q
  steps: tuple[str, ...]  # X-SAM steps timed on the cond path besides SGD and SAM
  primitives: tuple[str, ...]  # standalone computations timed besides the steps


FULL = Size(
  models=("resnet18", "wrn28_10"),
  batch=128,
  input_shape=(32, 32, 3),
  repeats=10,
  budget_s=10.0,
  throughput_periods=2,
  refresh_every=5,
  power_iters=5,
  steps=("xsam", "xsam_fd"),
  primitives=("grad", "hvp", "hvp_fd"),
)
# Fewest compiles (XLA:CPU compiles dominate a tiny run); the finite-difference X-SAM step and
# HVP are left to the library's tests.
TINY = Size(
  models=("simple_cnn",),
  batch=4,
  input_shape=(8, 8, 3),
  repeats=2,
  budget_s=1.0,
  throughput_periods=1,
  refresh_every=2,
  power_iters=1,
  steps=("xsam",),
  primitives=("grad", "hvp"),
)


class Deadline:
  """Stops new measurements after ``minutes``; records what was skipped."""

  def __init__(self, minutes: float, log: harness.Log):
    self.end = time.time() + 60 * minutes
    self.log = log
    self.skipped: list[str] = []

  def allows(self, what: str) -> bool:
    if time.time() < self.end:
      return True
    self.skipped.append(what)
    self.log(f"skipped (time limit): {what}")
    return False


# --------------------------------------------------------------------------------------------
# (a) The cond path and the static path agree.


def tree_distance(a: Any, b: Any) -> float:
  """Global L2 distance between two pytrees, in float64 on the host."""
  leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return float(np.sqrt(sum(np.sum((np.float64(x) - np.float64(y)) ** 2) for x, y in leaves)))


def path_agreement(problem: problems.Problem, p: int, q: int, log: harness.Log) -> dict[str, Any]:
  """Runs ``2p + 1`` X-SAM steps on both refresh paths from one state; compares the results."""
  steps = 2 * p + 1
  state = problems.create_state(problem, problems.make_optimizers(p, q)["xsam"])
  log(f"(a) {problem.name}: X-SAM, {steps} steps on each refresh path")
  _, static = problems.run_steps(problems.TrainStep("xsam"), state, problem, steps, p, log)
  _, cond = problems.run_steps(problems.TrainStep("xsam"), state, problem, steps, None, log)
  travelled = tree_distance(static.params, problem.params)
  params_diff = tree_distance(cond.params, static.params) / max(travelled, 1e-30)
  v_static, v_cond = (optax.tree.get(s.opt_state, "eigvec") for s in (static, cond))
  cos = abs(float(optax.tree.vdot(v_static, v_cond))) / float(
    optax.tree.norm(v_static) * optax.tree.norm(v_cond)
  )
  eigvals = [float(optax.tree.get(s.opt_state, "eigval")) for s in (cond, static)]
  ok = params_diff <= PARAM_TOLERANCE and cos >= COS_TOLERANCE
  return {
    "model": problem.name,
    "steps": steps,
    "params_diff": params_diff,
    "eigvec_cos": cos,
    "eigval_cond": eigvals[0],
    "eigval_static": eigvals[1],
    "ok": ok,
  }


# --------------------------------------------------------------------------------------------
# (b) Step costs.


def cond_path_variants(
  problem: problems.Problem, state, kind: str, log: harness.Log
) -> list[harness.Variant]:
  """The X-SAM step on the cond path, one compiled program called with the step counter at 0
  (refresh due) and at 1 (not due)."""
  data = (problem.images, problem.labels)
  compiled, lower_s, compile_s = harness.compile_ahead(problems.TrainStep(kind).fn, (state, *data))
  due, not_due = state, problems.with_count(state, 1)
  return [
    harness.first_run(
      harness.Variant(
        f"{kind}_refresh", lambda: compiled(due, *data), lower_s=lower_s, compile_s=compile_s
      ),
      log,
    ),
    harness.first_run(harness.Variant(f"{kind}_norefresh", lambda: compiled(not_due, *data)), log),
  ]


def step_costs(
  problem: problems.Problem, size: Size, p: int, q: int, seed: int, log: harness.Log
) -> dict:
  """Medians (seconds) of every step and primitive of ``problem``, and their ratios."""
  optimizers = problems.make_optimizers(p, q)
  data = (problem.images, problem.labels)
  variants = []
  for kind in ("sgd", "sam"):
    state = problems.create_state(problem, optimizers[kind])
    variants.append(
      harness.compiled_variant(kind, problems.TrainStep(kind).fn, (state, *data), log)
    )
  for kind in ("xsam", "xsam_fd"):
    if kind in optimizers and kind in size.steps:
      variants += cond_path_variants(
        problem, problems.create_state(problem, optimizers[kind]), kind, log
      )
  args = problems.primitive_args(problem)
  for op in size.primitives:
    if op == "hvp_fd" and not problems.HAS_FINITE_DIFFERENCE:
      continue
    jitted = jax.jit(problems.make_primitive(op, "top", problem.apply_fn, True))
    variants.append(harness.compiled_variant(op, jitted, args, log))
  harness.interleave(variants, size.repeats, size.budget_s, seed, log)
  t = harness.summarize(variants)["medians_s"]
  ratios = {
    "SAM / SGD": t["sam"] / t["sgd"],
    "X-SAM w/o refresh / SAM": t["xsam_norefresh"] / t["sam"],
    "X-SAM refresh step / SAM": t["xsam_refresh"] / t["sam"],
    f"X-SAM amortised (p={p}) / SAM": amortised(t, "xsam", p) / t["sam"],
    "HVP / gradient": t["hvp"] / t["grad"],
  }
  if "xsam_fd_refresh" in t:
    ratios[f"X-SAM finite-diff. amortised (p={p}) / SAM"] = amortised(t, "xsam_fd", p) / t["sam"]
  if "hvp_fd" in t:
    ratios["finite-difference HVP / gradient"] = t["hvp_fd"] / t["grad"]
  return {"medians_s": t, "ratios": ratios, "num_params": problem.num_params}


def amortised(t: dict[str, float], kind: str, p: int) -> float:
  """Seconds per step over one refresh period: one refresh step and ``p - 1`` without."""
  return (t[f"{kind}_refresh"] + (p - 1) * t[f"{kind}_norefresh"]) / p


# --------------------------------------------------------------------------------------------
# (c) Throughput of experiments/train.py's step.


def synthetic_dataset(size: Size) -> data_lib.Dataset:
  """A CIFAR-shaped (or, tiny, 8x8) dataset of random uint8 images: only its shape and class
  count matter to the train step."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (size.batch, *size.input_shape), dtype=np.uint8)
  labels = rng.integers(0, problems.NUM_CLASSES, size.batch).astype(np.int32)
  channels = size.input_shape[-1]
  return data_lib.Dataset(
    name="cifar10",
    train_images=images,
    train_labels=labels,
    test_images=images,
    test_labels=labels,
    num_classes=problems.NUM_CLASSES,
    mean=(0.5,) * channels,
    std=(0.25,) * channels,
    clean_train_labels=labels,
  )


def train_step_variant(
  model: str, optimizer: str, dtype: str, size: Size, p: int, q: int, log: harness.Log
) -> tuple[harness.Variant, str]:
  """A variant whose call runs ``throughput_periods`` refresh periods of ``p`` steps of
  ``experiments.train.make_train_step``, threading its (donated) state; and the refresh path
  that ``experiments/train.py`` picks on this backend."""
  config = validate(
    TrainConfig(
      model=model,
      optimizer=optimizer,
      compute_dtype=dtype,
      batch_size=size.batch,
      refresh_every=p,
      power_iters=q,
      progress=False,
      tensorboard=False,
    )
  )
  dataset = synthetic_dataset(size)
  spec = build_optimizer(config, steps_per_epoch=100)
  step = train_lib.make_train_step(config, spec)
  static = spec.tracks_eigvec and train_lib.use_static_refresh(config)
  images = data_lib.normalize(dataset.train_images, dataset.mean, dataset.std)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(dataset.train_labels)}
  holder = {"state": train_lib.create_state(config, dataset, spec), "step": 0}

  def call():
    for _ in range(size.throughput_periods * p):
      refresh = (holder["step"] % p == 0) if static else None
      holder["state"], metrics = step(holder["state"], batch, refresh=refresh)
      holder["step"] += 1
    return metrics["loss"]

  variant = harness.Variant(f"train_{optimizer}_{dtype}", call)
  start = time.perf_counter()
  jax.block_until_ready(call())  # compiles every program of the period
  variant.compile_s = time.perf_counter() - start
  path = ("static" if static else "cond") if spec.tracks_eigvec else "–"
  return harness.first_run(variant, log), path


def throughput(
  size: Size, dtypes: Sequence[str], p: int, q: int, seed: int, log: harness.Log, deadline
):
  """Images per second of SGD, SAM and X-SAM through ``experiments/train.py``'s step."""
  rows = []
  for model in size.models[:1]:
    for dtype in dtypes:
      if not deadline.allows(f"(c) throughput {model} {dtype}"):
        continue
      log(f"(c) {model} {dtype}: experiments.train step throughput")
      optimizers = ("sgd", "sam", "xsam")
      runs = [train_step_variant(model, opt, dtype, size, p, q, log) for opt in optimizers]
      harness.interleave([v for v, _ in runs], size.repeats, size.budget_s, seed, log)
      images = size.batch * size.throughput_periods * p
      sgd = images / runs[0][0].median()
      for (variant, path), opt in zip(runs, optimizers, strict=True):
        rate = images / variant.median()
        rows.append((model, dtype, opt, path, rate, rate / sgd, variant.count))
  return rows


# --------------------------------------------------------------------------------------------
# (d) PyTorch, where it is installed.


def torch_rows(
  size: Size, dtypes: Sequence[str], p: int, q: int, log: harness.Log, deadline
) -> dict:
  """PyTorch SAM / Eigen-SAM step times, or why there are none."""
  try:
    from benchmarks import torch_sam
  except Exception as exc:  # absent (ImportError) or broken (e.g. a missing CUDA library)
    return {"skipped": f"PyTorch is not importable here ({type(exc).__name__}: {exc})"}
  rows = []
  try:
    for model in size.models:
      for dtype in dtypes:
        if deadline.allows(f"(d) PyTorch {model} {dtype}"):
          log(f"(d) PyTorch {model} {dtype}")
          rows.append(torch_sam.benchmark(model, dtype, size.batch, size.input_shape, p, q))
  except Exception:  # a bug or an unsupported setup must not lose the JAX results
    return {"rows": rows, "error": traceback.format_exc(limit=3)}
  return {"rows": rows}


# --------------------------------------------------------------------------------------------
# Report.


def render(results: dict[str, Any], meta: dict[str, Any], args: argparse.Namespace) -> str:
  """The report: agreement, step costs, throughput, PyTorch, skipped measurements."""
  p, q, size = args.refresh_every, args.power_iters, args.size
  lines = [
    f"- Setup: {'TINY CPU mode (CI smoke run, numbers meaningless); ' if args.tiny else ''}"
    f"models {', '.join(size.models)}, batch {size.batch}, input "
    f"{'×'.join(map(str, size.input_shape))}, random data, BatchNorm in train mode, HVPs in "
    f"eval mode (as `experiments/train.py`); p = {p}, q = {q}; medians of {size.repeats} "
    "interleaved repeats. bfloat16 = computation dtype with float32 parameters "
    "(`compute_dtype`).",
    "",
    "### (a) X-SAM: cond path and static path agree",
    "",
    *report.table(
      [
        "model",
        "steps",
        "‖θ_cond − θ_static‖ / ‖θ − θ₀‖",
        "eigvec \\|cos\\|",
        "λ cond / static",
        "verdict",
      ],
      [
        (
          a["model"],
          a["steps"],
          f"{a['params_diff']:.2e} (≤ {PARAM_TOLERANCE:g})",
          f"{a['eigvec_cos']:.6f} (≥ {COS_TOLERANCE:g})",
          f"{a['eigval_cond']:.4g} / {a['eigval_static']:.4g}",
          "PASS" if a["ok"] else "**FAIL**",
        )
        for a in results["agreement"]
      ],
    ),
    "",
    "### (b) Step costs",
    "",
  ]
  costs = results["costs"]
  if costs:
    names = list(next(iter(costs.values()))["medians_s"])
    columns = [f"{m} {d}" for m, d in costs]
    lines += report.table(
      ["step (ms, median)", *columns],
      [(n, *(report.fmt_ms(c["medians_s"].get(n)) for c in costs.values())) for n in names],
    )
    lines += [
      "",
      *report.table(
        ["ratio", *columns],
        [
          (r, *(report.fmt_ratio(c["ratios"].get(r)) for c in costs.values()))
          for r in next(iter(costs.values()))["ratios"]
        ],
      ),
    ]
    lines += [
      "",
      "`xsam_refresh` / `xsam_norefresh`: the cond-path program with a refresh due / not due; "
      '`_fd`: finite-difference HVPs (`hvp_method="forward_difference"`). Amortised = '
      "(refresh step + (p − 1) · step without) / p.",
    ]
  lines += ["", "### (c) Training throughput of `experiments/train.py`'s step", ""]
  rows = [
    (m, d, o, path, f"{rate:,.0f}", f"{rel:.3f}", n)
    for m, d, o, path, rate, rel, n in results["throughput"]
  ]
  columns = ["model", "dtype", "optimizer", "refresh path", "images/s", "vs SGD", "samples"]
  lines += report.table(columns, rows) if rows else ["None measured."]
  lines += ["", "### (d) PyTorch SAM / Eigen-SAM, same model shapes", ""]
  torch = results["torch"]
  if "skipped" in torch:
    lines.append(f"Skipped: {torch['skipped']}.")
  if torch.get("rows"):
    lines += report.table(
      [
        "model",
        "dtype",
        "device",
        "SGD (ms)",
        "SAM (ms)",
        "Eigen-SAM w/o refresh (ms)",
        f"Eigen-SAM refresh, q={q} (ms)",
        f"Eigen-SAM amortised p={p} / SAM",
      ],
      [
        (
          r["model"],
          r["dtype"],
          r["device"],
          *(report.fmt_ms(r[k]) for k in ("sgd_s", "sam_s", "eigen_sam_s", "eigen_sam_refresh_s")),
          report.fmt_ratio(
            (r["eigen_sam_refresh_s"] + (p - 1) * r["eigen_sam_s"]) / p / r["sam_s"]
          ),
        )
        for r in torch["rows"]
      ],
    )
  if "error" in torch:
    lines += ["", "PyTorch part failed:", "", "```", torch["error"].rstrip(), "```"]
  if results["skipped"]:
    lines += ["", f"Skipped for the time limit: {'; '.join(results['skipped'])}."]
  lines.append("")
  title = "Accelerator benchmark" + (" (tiny CPU mode)" if args.tiny else "")
  return report.section(NAME, title, meta, lines)


# --------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command-line flags."""
  parser = argparse.ArgumentParser(prog=f"python -m {NAME}", description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="tiny CPU smoke mode (CI)")
  parser.add_argument("--dtypes", default="bfloat16,float32", help="computation dtypes")
  parser.add_argument("--refresh-every", type=int, default=None, help="p (default 5; tiny 2)")
  parser.add_argument("--power-iters", type=int, default=None, help="q (default 5; tiny 1)")
  parser.add_argument("--max-minutes", type=float, default=7.0, help="start nothing after this")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
  parser.add_argument("--seed", type=int, default=0, help="seed of the round-robin order")
  parser.add_argument("--out", default="benchmarks/GPU_RESULTS.md", help="markdown report")
  args = parser.parse_args(argv)
  args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  args.size = TINY if args.tiny else FULL
  args.refresh_every = args.refresh_every or args.size.refresh_every
  args.power_iters = args.power_iters or args.size.power_iters
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Runs every part and writes the report; exits 1 if the refresh paths disagree."""
  args = parse_args(argv)
  run = report.Run(NAME, argv)
  harness.compile_events()
  log, size = run.log, args.size
  p, q = args.refresh_every, args.power_iters
  deadline = Deadline(args.max_minutes, log)
  problem = lambda model, dtype: problems.make_problem(
    model, size.batch, dtype=dtype, input_shape=size.input_shape
  )
  results: dict[str, Any] = {"agreement": [], "costs": {}}
  results["agreement"].append(path_agreement(problem(size.models[0], "float32"), p, q, log))

  def measure_costs(models: Sequence[str]) -> None:
    for model in models:
      for dtype in args.dtypes:
        if deadline.allows(f"(b) step costs {model} {dtype}"):
          log(f"(b) {model} {dtype}: step costs")
          costs = step_costs(problem(model, dtype), size, p, q, args.seed, log)
          results["costs"][model, dtype] = costs

  # Most wanted first, so that the time limit cuts the least wanted: the first model's costs,
  # the throughput, then the other models and PyTorch.
  measure_costs(size.models[:1])
  results["throughput"] = throughput(size, args.dtypes, p, q, args.seed, log, deadline)
  measure_costs(size.models[1:])
  results["torch"] = (
    {"skipped": "--no-torch"}
    if args.no_torch
    else torch_rows(size, args.dtypes, p, q, log, deadline)
  )
  results["skipped"] = deadline.skipped
  report.write_section(args.out, render(results, run.meta(), args), NAME)
  log(f"wrote {args.out}")
  return 0 if all(a["ok"] for a in results["agreement"]) else 1


if __name__ == "__main__":
  sys.exit(main())
