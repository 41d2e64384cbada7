"""Tracking quality along real training: how close the cached eigenvector stays to the top one.

``python -m benchmarks.tracking [--model simple_cnn] [--steps 120] [--every 10] [--out
benchmarks/RESULTS.md]``

Trains the digits SimpleCNN (8x8x1, the offline dataset) or, with ``--model resnet18``, the
CIFAR ResNet-18 on the digits upsampled to CIFAR's shape (32x32x3: each pixel repeated 4x4,
the grey level copied to 3 channels; its BatchNorm uses the minibatch's statistics, as in
training, so the Hessian is that of the training loss of the minibatch) with SAM for
``--steps`` steps. Along
that one trajectory, every tracker setting keeps its own cached vector and refreshes it every
``p`` steps with ``q`` warm-started HVPs on the step's minibatch through the library's own
refresh function (:func:`library_refresh`, which calls what ``xsam``, ``eigen_sam`` and
``refresh_eigenvector`` call): power iteration (the papers' tracker) or a ``q``-step Lanczos run
returning the top Ritz vector (``solver="lanczos"``; with ``q = 1`` the library takes one power
step instead, since a one-vector Krylov space is the start vector itself), with exact
(forward-over-reverse) or finite-difference HVPs (one gradient each; the base gradient is the
step's clean gradient, free when the HVP loss is the training loss, as here). A third tracker,
not in the library, is measured here as a candidate: ``"averaged"``, power steps on a running
average of the minibatch HVPs (:func:`averaged_power_steps`, decay ``--average-decay``).
Once in every block of ``--every`` steps, at a random step of the block (so that the cached
vectors are seen at every age since their refresh, as X-SAM uses them), they are compared with
an independently converged top eigenvector of the same minibatch Hessian (``--ref-iters``-step
Lanczos from a fresh random start): ``|cos|`` and the Rayleigh-quotient ratio ``vᵀHv / λ_max``.

With ``--full-examples N`` each comparison also measures how much there is to track: the top
eigenvector of the loss over N fixed training examples (the first N of the shuffled order, the
same at every comparison), its ``|cos|`` with every cached vector, and, at the same weights,
the ``|cos|`` between the minibatch's top eigenvector and the next minibatch's and between the
minibatch's and the N-example one. If two minibatches' top eigenvectors are nearly orthogonal,
no vector refreshed on earlier minibatches can follow the current one.

The cost of each setting is the amortised X-SAM step over one SAM step, ``1 + q·t_HVP/(p·t_SAM)``,
from the HVP, gradient and SAM-step times measured in this run with the shared harness
(interleaved medians). All settings share one trajectory (SAM's), so they differ only in how
well they track it. Loops run on the host, on one flat vector: the library's refresh around
one jitted gradient of the flat parameters (its HVPs are products through that program, compiled
once, not one unrolled program per (tracker, q)), the references, comparisons and the averaged
tracker around one jitted HVP.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import xsam_jax
from benchmarks import _harness as harness
from benchmarks import _report as report
from benchmarks._problems import cross_entropy
from experiments import data as data_lib
from experiments.models import count_params, get_model, init_model
from xsam_jax import hessian
from xsam_jax._eigvec import _power_refresh
from xsam_jax._perturbation import DEFAULT_EPS

NAME = "benchmarks.tracking"
LR, MOMENTUM, RHO = 0.05, 0.9, 0.05


def parse_list(text: str, kind=int) -> list:
  """``"1,2,3"`` -> ``[1, 2, 3]``."""
  return [kind(x) for x in text.split(",") if x.strip()]


def comparison_steps(steps: int, every: int, seed: int = 0) -> set[int]:
  """One step drawn at random in each block of ``every`` steps.

  X-SAM uses the cached vector at every step, not only at the refreshes: a comparison at fixed
  multiples of ``every`` would always meet the settings whose ``p`` divides ``every`` right
  after a refresh, on the very minibatch it used, and never measure how the vector ages.
  """
  rng = np.random.default_rng(seed)
  return {start + int(rng.integers(min(every, steps - start))) for start in range(0, steps, every)}


TRACKERS = ("power", "lanczos", "averaged")


def library_refresh(grad_fn, params, v, q: int, tracker: str, hvp_method: str, base_grad=None):
  """``q`` warm-started HVPs from ``v`` at ``params``, as the library refreshes its eigenvector.

  Calls the refresh that :func:`xsam_jax.xsam`, :func:`xsam_jax.eigen_sam` and
  :func:`xsam_jax.refresh_eigenvector` call (``xsam_jax._eigvec._power_refresh``, static path:
  straight-line HVPs), so the benchmark measures the library's tracker and not a copy of it.
  In particular ``solver="lanczos"`` with ``q = 1`` is one power step there, not the start
  vector a one-step Lanczos run would return.

  Args:
    grad_fn: ``params -> grads`` of the loss whose Hessian is tracked.
    params: the point at which the Hessian is taken (a pytree).
    v: the cached vector, shaped like ``params``.
    q: number of HVPs, an int >= 1.
    tracker: ``"power"`` or ``"lanczos"``.
    hvp_method: ``"exact"`` or ``"forward_difference"``.
    base_grad: forward differences only: ``grad_fn(params)`` if at hand.

  Returns:
    The refreshed unit vector, shaped like ``params``.
  """
  _, new, _ = _power_refresh(
    v, params, grad_fn, q, DEFAULT_EPS, None, True, tracker, hvp_method, base_grad
  )
  return new


def averaged_power_steps(hvp, v, m, q: int, decay: float):
  r"""``q`` power steps on a running average of minibatch HVPs (benchmark-only tracker).

  .. math:: m \leftarrow \beta m + (1-\beta) H_B v, \qquad v \leftarrow m / \|m\|.

  Each refresh's HVPs use that step's minibatch :math:`B`, so :math:`m` estimates the HVP of the
  Hessian averaged over recent minibatches (about :math:`1/(1-\beta)` HVPs), not the current
  minibatch's: a tracker aimed at the whole training loss's top eigenvector, which plain power
  iteration, jumping to each new minibatch's eigenvector, does not follow. ``decay = 0`` is
  power iteration. Returns ``(v, m)``.
  """
  for _ in range(q):
    m = decay * m + (1.0 - decay) * hvp(v)
    v = m / (jnp.linalg.norm(m) + 1e-12)
  return v, m


def flat(v) -> np.ndarray:
  """A flat vector of the run (the trackers work on one) as float64 NumPy, for the dot products."""
  return np.asarray(v, np.float64)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the training, the tracking comparison and the timings; writes the section."""
  parser = argparse.ArgumentParser(prog=f"python -m {NAME}", description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--every", type=int, default=10, help="compare every k steps")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--ref-iters", type=int, default=40)
  parser.add_argument(
    "--full-examples",
    type=int,
    default=0,
    help="also compare with the top eigenvector of the loss over this many fixed training "
    "examples (at most all of them), and measure how minibatches' top eigenvectors differ "
    "(0: off)",
  )
  parser.add_argument(
    "--trackers", default="power,lanczos", help=f"comma-separated, of {', '.join(TRACKERS)}"
  )
  parser.add_argument(
    "--average-decay",
    type=float,
    default=0.9,
    help="β of the 'averaged' tracker's running average of HVPs (0: power iteration)",
  )
  parser.add_argument("--hvps", default="exact,forward_difference")
  parser.add_argument("--qs", default="1,2,3,5")
  parser.add_argument("--ps", default="1,5,20")
  parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
  parser.add_argument("--out", default=None, help="write the Markdown section into this file")
  parser.add_argument("--model", default="simple_cnn", choices=sorted(TITLES))
  parser.add_argument(
    "--figure", default=None, help="default: benchmarks/tracking_<digits|resnet18>.png"
  )
  args = parser.parse_args(argv)
  unknown = set(parse_list(args.trackers, str)) - set(TRACKERS)
  if unknown:
    parser.error(f"--trackers: unknown {sorted(unknown)}; choose from {', '.join(TRACKERS)}")
  if args.full_examples < 0:
    parser.error(f"--full-examples must be >= 0 (0: off), got {args.full_examples}")
  if not 0.0 <= args.average_decay < 1.0:
    parser.error(f"--average-decay must be in [0, 1), got {args.average_decay}")
  if args.figure is None:
    stem = "digits" if args.model == "simple_cnn" else args.model
    args.figure = f"benchmarks/tracking_{stem}.png"
  run = report.Run(NAME, argv)
  log = run.log

  dataset = data_lib.load_dataset("digits")
  images = data_lib.normalize(dataset.train_images, dataset.mean, dataset.std)
  if args.model != "simple_cnn":  # CIFAR-shaped: 8x8x1 -> 32x32x3
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2).repeat(3, axis=3)
  labels = dataset.train_labels.astype(np.int32)
  model = get_model(args.model, dataset.num_classes)
  params, batch_stats = init_model(model, (1, *images.shape[1:]), jax.random.key(0))

  def loss(p, x, y):
    if not batch_stats:
      return cross_entropy(model.apply({"params": p}, x, train=False), y)
    logits, _ = model.apply(
      {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return cross_entropy(logits, y)

  grad = jax.jit(jax.grad(loss))
  # The trackers run on the host on one flat vector: a pytree would make every eager vector
  # operation of the loops compile once per leaf shape (minutes for ResNet-18's 62 leaves). The
  # HVPs take and return that flat vector (one copy of it more than a pytree HVP: noise next to
  # an HVP), and they are the programs timed below.
  flat_params, unravel = ravel_pytree(params)

  def flat_hvp(p, v, x, y, **kwargs):
    grad_fn = lambda w: jax.grad(loss)(w, x, y)
    return ravel_pytree(hessian.hvp(grad_fn, p, unravel(v), **kwargs))[0]

  hvp_exact_flat = jax.jit(flat_hvp)
  hvp_fd_flat = jax.jit(
    lambda p, v, g, x, y: flat_hvp(p, v, x, y, hvp_method="forward_difference", base_grad=g)
  )
  # The library's refresh runs on the flat parameters, with this gradient as its grad_fn.
  grad_flat = jax.jit(lambda w, x, y: ravel_pytree(jax.grad(loss)(unravel(w), x, y))[0])

  tx = optax.chain(xsam_jax.sam(rho=RHO), optax.sgd(LR, momentum=MOMENTUM))

  @jax.jit
  def sam_step(p, opt_state, x, y):
    grad_fn = lambda w: jax.grad(loss)(w, x, y)
    updates, opt_state = tx.update(grad_fn(p), opt_state, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), opt_state

  settings = list(
    itertools.product(
      parse_list(args.trackers, str),
      parse_list(args.hvps, str),
      parse_list(args.qs),
      parse_list(args.ps),
    )
  )
  v0 = jax.random.normal(jax.random.key(1), flat_params.shape)
  cached = {s: v0 for s in settings}
  averaged_hvp = {s: jnp.zeros_like(v0) for s in settings}  # the 'averaged' tracker's m
  records: dict[tuple, list[tuple[int, float, float]]] = {s: [] for s in settings}
  refs: list[tuple[int, float]] = []
  opt_state = tx.init(params)
  compare_at = comparison_steps(args.steps, args.every)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(labels))

  def batch_at(step):
    start = (step * args.batch) % (len(labels) - args.batch)
    idx = order[start : start + args.batch]
    return jnp.asarray(images[idx]), jnp.asarray(labels[idx])

  def top(hvp, seed):
    """An independent top eigenpair: ``--ref-iters`` Lanczos steps from a fresh start."""
    fresh = jax.random.normal(jax.random.key(seed), flat_params.shape)
    vals, vecs = hessian.top_k_eigenpairs(hvp, fresh, 1, num_iters=args.ref_iters, unroll=True)
    return float(vals[0]), flat(vecs[0])

  args.full_examples = min(args.full_examples, len(labels))  # the report gives the count used
  full_idx = order[: args.full_examples]
  full = (jnp.asarray(images[full_idx]), jnp.asarray(labels[full_idx])) if len(full_idx) else None
  spread: list[tuple[int, float, float]] = []  # (step, |cos| next minibatch, |cos| full)
  for step in range(args.steps):
    x, y = batch_at(step)
    g = grad(params, x, y)
    hvps = {
      "exact": lambda v, x=x, y=y, p=params: hvp_exact_flat(p, v, x, y),
      "forward_difference": lambda v, x=x, y=y, p=params, g=g: hvp_fd_flat(p, v, g, x, y),
    }
    flat_at_step = None  # (params, gradient) as flat vectors
    for tracker, method, q, p in settings:
      if step % p:
        continue
      key = (tracker, method, q, p)
      if tracker == "averaged":
        cached[key], averaged_hvp[key] = averaged_power_steps(
          hvps[method], cached[key], averaged_hvp[key], q, args.average_decay
        )
      else:
        if flat_at_step is None:  # once per step, and only on a step that refreshes
          flat_at_step = (ravel_pytree(params)[0], ravel_pytree(g)[0])
        w, g_flat = flat_at_step
        cached[key] = library_refresh(
          lambda u, x=x, y=y: grad_flat(u, x, y),
          w,
          cached[key],
          q,
          tracker,
          method,
          g_flat if method == "forward_difference" else None,
        )
    if step in compare_at:
      lam, ref = top(hvps["exact"], 1000 + step)
      refs.append((step, lam))
      ref_full = None
      if full is not None:
        _, ref_full = top(lambda v, p=params: hvp_exact_flat(p, v, *full), 2000 + step)
        following = batch_at(step + 1)  # once, not on every HVP of the Lanczos run
        _, ref_next = top(lambda v, p=params: hvp_exact_flat(p, v, *following), 3000 + step)
        spread.append((step, abs(float(ref @ ref_next)), abs(float(ref @ ref_full))))
      for key in settings:
        v = flat(cached[key])
        norm = np.linalg.norm(v)
        rayleigh = float(v @ flat(hvps["exact"](cached[key]))) / norm**2
        cos_full = np.nan if ref_full is None else abs(float(v @ ref_full)) / norm
        records[key].append((step, abs(float(v @ ref)) / norm, rayleigh / lam, cos_full))
      log(f"step {step}: λ_max {lam:.4g}, {time.time() - run.start:.0f}s")
    params, opt_state = sam_step(params, opt_state, x, y)

  log("timing SAM step, gradient and HVPs")
  v = v0
  # The run above compiled these functions for these shapes (all but the finite-difference HVP,
  # compiled below): time those programs, not fresh ahead-of-time compilations of them, which
  # would cost as much again as the first.
  timed = {
    "sam": (sam_step, (params, opt_state, x, y)),
    "grad": (grad, (params, x, y)),
    "hvp_exact": (hvp_exact_flat, (params, v, x, y)),
    "hvp_fd": (hvp_fd_flat, (params, v, g, x, y)),
  }
  if "forward_difference" not in parse_list(args.hvps, str):  # not needed
    del timed["hvp_fd"]
  else:  # the refreshes have their own programs: compile this one outside the timings
    jax.block_until_ready(hvp_fd_flat(params, v, g, x, y))
  variants = [
    harness.first_run(harness.Variant(name, functools.partial(fn, *fn_args)), log)
    for name, (fn, fn_args) in timed.items()
  ]
  harness.interleave(variants, args.repeats, 30.0, 0, log)
  t = harness.summarize(variants)["medians_s"]
  hvp_time = {"exact": t["hvp_exact"], "forward_difference": t.get("hvp_fd")}
  half = args.steps // 2
  rows = []
  for key in settings:
    tracker, method, q, p = key
    late = [(c, r, f) for s, c, r, f in records[key] if s >= half]
    cost = 1 + q * hvp_time[method] / (p * t["sam"])
    rows.append(
      {
        "tracker": tracker,
        "hvp": method,
        "q": q,
        "p": p,
        "cos": statistics.median(c for c, _, _ in late),
        "cos_mean": statistics.mean(c for c, _, _ in late),
        "rq": statistics.median(r for _, r, _ in late),
        "cos_full": statistics.median(f for _, _, f in late),
        "cost": cost,
        # On ResNet-18 itself the measured cost; otherwise projected from its step-cost ratios.
        "cost_resnet18": cost
        if args.model == "resnet18"
        else 1 + q * RESNET18_HVP_OVER_SAM[method] / p,
      }
    )
  figure = plot(rows, args.figure, args.model)
  late_spread = [(n, f) for s, n, f in spread if s >= half]
  text = render(rows, refs, t, run.meta(), args, figure, count_params(params), late_spread)
  print(text)
  if args.out:
    report.write_section(args.out, text, section_name(args.model), first=False)
  return 0


# ResNet-18 HVP / SAM step from the step-cost section of RESULTS.md (2026-11-23, CPU, batch 16):
# eval-mode HVP 1,187 ms, eval-mode gradient 527 ms, SAM step 1,118 ms. A finite-difference HVP
# costs one gradient when the base gradient is shared.
RESNET18_HVP_OVER_SAM = {"exact": 1187 / 1118, "forward_difference": 527 / 1118}


TITLES = {
  "simple_cnn": "digits SimpleCNN",
  "resnet18": "ResNet-18, digits upsampled to 32×32×3",
}


def section_name(model: str) -> str:
  """The report section of a model's run (the SimpleCNN keeps the original name)."""
  return NAME if model == "simple_cnn" else f"{NAME}:{model}"


def plot(rows: list[dict], path: str | None, model: str = "simple_cnn") -> str | None:
  """Median |cos| against amortised cost, one marker per tracker, one colour per HVP; with
  ``--full-examples`` a second panel against the N-example loss's top eigenvector."""
  if not path:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("cos", "the same minibatch's top eigvec")]
  if not any(np.isnan(r["cos_full"]) for r in rows):
    panels.append(("cos_full", "the top eigvec of the fixed-examples loss"))
  fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
  styles = {"power": "o", "lanczos": "s", "averaged": "^"}
  colours = {"exact": "tab:blue", "forward_difference": "tab:orange"}
  for ax, (field, against) in zip(axes[0], panels, strict=True):
    for tracker, method in itertools.product(styles, colours):
      pts = [r for r in rows if r["tracker"] == tracker and r["hvp"] == method]
      if pts:
        ax.scatter(
          [r["cost"] for r in pts],
          [r[field] for r in pts],
          marker=styles[tracker],
          c=colours[method],
          label=f"{tracker}, {method.replace('_', ' ')}",
        )
        for r in pts:
          ax.annotate(f"q{r['q']}p{r['p']}", (r["cost"], r[field]), fontsize=6)
    ax.axhline(0.9, color="grey", lw=0.5, ls="--")
    ax.set_title(f"cached vector against {against}", fontsize=9)
    ax.set_xlabel(f"amortised X-SAM step / SAM step (measured, {TITLES[model]})", fontsize=8)
    ax.set_ylabel("median |cos|, 2nd half of training", fontsize=8)
    ax.legend(fontsize=7)
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


def render(rows, refs, t, meta, args, figure, num_params, spread=()) -> str:
  """The section: setup, table sorted by cost, best settings within cost bounds.

  ``spread`` holds, for the second half's comparisons with ``--full-examples``, the ``|cos|``
  of the minibatch's top eigenvector with the next minibatch's and with the N-example one.
  """
  on_resnet = args.model == "resnet18"
  with_full = bool(spread)
  lines = [
    f"- Setup: {TITLES[args.model]} ({num_params:,} parameters), SAM (ρ = {RHO}) + SGD "
    f"(lr {LR}, momentum {MOMENTUM}), batch {args.batch}, {args.steps} steps; compared once in "
    f"every {args.every} steps, at a random step of the block (so at every age of the cached "
    f"vector since its last refresh, as X-SAM uses it), with a {args.ref_iters}-step Lanczos "
    "top eigenvector of the same minibatch Hessian; "
    f"statistics over steps ≥ {args.steps // 2}"
    + (
      f"; the *averaged* tracker's decay β = {args.average_decay}"
      if "averaged" in parse_list(args.trackers, str)
      else ""
    )
    + ". λ_max along the run: "
    + ", ".join(f"{lam:.3g}" for _, lam in refs[:: max(1, len(refs) // 6)])
    + ".",
    f"- Measured here (medians): SAM step {report.fmt_ms(t['sam'])} ms, gradient "
    f"{report.fmt_ms(t['grad'])} ms, exact HVP {report.fmt_ms(t['hvp_exact'])} ms, "
    f"finite-difference HVP {report.fmt_ms(t.get('hvp_fd'))} ms.",
    "- *cost* = 1 + q·t_HVP/(p·t_SAM) with this run's times; "
    + (
      "here the model is ResNet-18, so *ResNet-18 cost* is that measured cost."
      if on_resnet
      else "*ResNet-18 cost* projects the same formula with the ResNet-18 ratios of the "
      "step-cost section (exact HVP/SAM 1.06, finite-difference HVP/SAM 0.47), not a "
      "ResNet-18 run."
    ),
    "",
  ]
  if with_full:
    lines += [
      f"- How much there is to track (steps ≥ {args.steps // 2}, medians over "
      f"{len(spread)} comparisons, same weights): the top eigenvectors of two consecutive "
      f"minibatches have |cos| {statistics.median(n for n, _ in spread):.3f} "
      f"(range {min(n for n, _ in spread):.3f}–{max(n for n, _ in spread):.3f}); a "
      f"minibatch's and that of the loss over {args.full_examples} fixed training examples "
      f"have {statistics.median(f for _, f in spread):.3f}. The column *\\|cos\\| vs "
      f"{args.full_examples} ex.* compares each cached vector with the latter.",
      "",
    ]
  if figure:
    lines += [f"![tracking quality against cost]({Path(figure).name})", ""]
  lines += report.table(
    [
      "tracker",
      "HVP",
      "q",
      "p",
      "median \\|cos\\|",
      "mean \\|cos\\|",
      "median vᵀHv/λ_max",
      *([f"median \\|cos\\| vs {args.full_examples} ex."] if with_full else []),
      "cost / SAM",
      "ResNet-18 cost / SAM",
    ],
    [
      (
        r["tracker"],
        r["hvp"].replace("forward_difference", "finite diff."),
        r["q"],
        r["p"],
        f"{r['cos']:.3f}",
        f"{r['cos_mean']:.3f}",
        f"{r['rq']:.3f}",
        *([f"{r['cos_full']:.3f}"] if with_full else []),
        f"{r['cost']:.2f}",
        f"{r['cost_resnet18']:.2f}",
      )
      for r in sorted(rows, key=lambda r: r["cost_resnet18"])
    ],
  )
  goal = [r for r in rows if r["cos"] >= 0.9 and r["cost_resnet18"] <= 1.3]
  best = max(rows, key=lambda r: r["cos"])
  lines += [
    "",
    f"Settings with median |cos| ≥ 0.9 and {'measured' if on_resnet else 'projected'} "
    "ResNet-18 cost ≤ 1.3× SAM: "
    + (
      ", ".join(
        f"{r['tracker']}/{r['hvp']} q={r['q']} p={r['p']} ({r['cos']:.3f}, "
        f"{r['cost_resnet18']:.2f}×)"
        for r in sorted(goal, key=lambda r: -r["cos"])
      )
      if goal
      else "none"
    )
    + f". Best |cos| overall: {best['tracker']}/{best['hvp']} q={best['q']} p={best['p']} "
    f"({best['cos']:.3f}, {best['cost_resnet18']:.2f}×).",
    "",
  ]
  title = f"Tracking quality along training ({TITLES[args.model]})"
  return report.section(section_name(args.model), title, meta, lines)


if __name__ == "__main__":
  sys.exit(main())
