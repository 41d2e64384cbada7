"""Eigenvector trackers: HVPs needed to reach a given accuracy, power iteration vs Lanczos.

``python -m benchmarks.tracker [--models simple_cnn,resnet18] [--no-timing]
[--out benchmarks/RESULTS.md]``

For each model (eval-mode loss on a fixed batch) it computes a reference top eigenvector with a
long reorthogonalised Lanczos run, then counts the Hessian-vector products each tracker needs to
reach ``|cos(v, v_ref)| >= 0.99``:

* **cold**: from a random start (what the first refresh does);
* **warm**: from the converged vector of the previous parameters, after ``--drift_steps`` SGD
  steps moved the parameters (what every later refresh does; the reference is recomputed).

Power iteration is the papers' tracker; "Lanczos" is ``solver="lanczos"`` of
:func:`xsam_jax.xsam`: a warm-started ``m``-step Lanczos run returning the top Ritz vector.
One Lanczos run of ``M`` steps yields the ``m``-step answers for every ``m <= M`` (the Krylov
bases are nested; full reorthogonalisation keeps them exact), so the sweep costs ``M`` HVPs.
The amortised X-SAM step ``SAM + q HVP / p`` uses HVP and SAM step times measured in the same
run (interleaved repeats of the shared harness, :mod:`benchmarks._harness`); ``--no-timing``
skips them and reports the HVP counts only, which do not depend on the machine's load (times
taken on a loaded shared machine are not worth reporting). Loops run on the
host around one jitted HVP (the fast choice on XLA:CPU). With ``--out`` the section is written
into that file between its markers (:mod:`benchmarks._report`), other sections kept.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax
from benchmarks import _report as report
from benchmarks._harness import compiled_variant, interleave, make_log
from benchmarks._problems import make_loss, make_problem
from xsam_jax import hessian

NAME = "benchmarks.tracker"

TARGET = 0.99


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _ritz_prefix_cosines(alphas, betas, basis, ref: np.ndarray) -> list[float]:
  """|cos| with ``ref`` of the top Ritz vector of every Lanczos prefix m = 1..M."""
  basis_flat = np.stack(
    [
      np.concatenate([np.ravel(np.asarray(x[i], np.float64)) for x in jax.tree.leaves(basis)])
      for i in range(len(alphas))
    ]
  )
  a, b = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
  out = []
  for m in range(1, len(a) + 1):
    t = np.diag(a[:m]) + np.diag(b[: m - 1], 1) + np.diag(b[: m - 1], -1)
    _, s = np.linalg.eigh(t)
    u = s[:, -1] @ basis_flat[:m]
    out.append(abs(u @ ref) / np.linalg.norm(u))
  return out


def _power_cosines(hvp_fn: Callable, v0, num_iters: int, ref: np.ndarray) -> list[float]:
  v, _ = xsam_jax._perturbation.normalize(v0)
  out = []
  for _ in range(num_iters):
    _, v = hessian.power_iteration(hvp_fn, v, 1, unroll=True)
    out.append(abs(_flat(v) @ ref))
  return out


def _first_reaching(cosines: list[float]) -> int | None:
  return next((i + 1 for i, c in enumerate(cosines) if c >= TARGET), None)


def bench_model(
  name: str,
  batch: int,
  ref_iters: int,
  max_iters: int,
  drift_steps: int,
  repeats: int = 5,
  timing: bool = True,
) -> dict:
  problem = make_problem(name, batch)
  params, batch_stats, images, labels = (
    problem.params,
    problem.batch_stats,
    problem.images,
    problem.labels,
  )
  loss = make_loss(problem.apply_fn, train=False)

  hvp_jit = jax.jit(
    lambda p, v: hessian.hvp(lambda q: jax.grad(loss)(q, batch_stats, images, labels), p, v)
  )
  grad_jit = jax.jit(lambda p: jax.grad(loss)(p, batch_stats, images, labels))
  sam_tx = xsam_jax.sam(rho=0.05)
  sam_step = jax.jit(
    lambda p, s: sam_tx.update(grad_jit(p), s, p, grad_fn=grad_jit)  # grad + SAM ascent grad
  )

  def reference(p):
    hvp_fn = functools.partial(hvp_jit, p)
    v0 = optax.tree.random_like(jax.random.key(123), p, jax.random.normal, dtype=jnp.float32)
    vals, vecs = hessian.top_k_eigenpairs(hvp_fn, v0, 1, num_iters=ref_iters, unroll=True)
    vec = jax.tree.map(lambda x: x[0], vecs)
    hv = _flat(hvp_fn(vec))
    v = _flat(vec)
    residual = np.linalg.norm(hv - float(vals[0]) * v) / abs(float(vals[0]))
    return float(vals[0]), vec, v, residual

  result: dict = {"model": name, "batch": batch}
  lam, vec_ref, ref, residual = reference(params)
  result.update(lambda_max=lam, residual=residual)
  hvp_fn = functools.partial(hvp_jit, params)
  v0 = optax.tree.random_like(jax.random.key(7), params, jax.random.normal, dtype=jnp.float32)
  cold_power = _power_cosines(hvp_fn, v0, max_iters, ref)
  alphas, betas, basis = hessian.lanczos(hvp_fn, v0, max_iters, unroll=True)
  cold_lanczos = _ritz_prefix_cosines(alphas, betas, basis, ref)

  # Move the parameters by a few SGD steps, then track from the old converged vector.
  moved = params
  for _ in range(drift_steps):
    moved = jax.tree.map(lambda w, g: w - 0.05 * g, moved, grad_jit(moved))
  lam2, _, ref2, residual2 = reference(moved)
  hvp_moved = functools.partial(hvp_jit, moved)
  warm_start_cos = abs(_flat(vec_ref) @ ref2)
  warm_power = _power_cosines(hvp_moved, vec_ref, max_iters, ref2)
  alphas, betas, basis = hessian.lanczos(hvp_moved, vec_ref, max_iters, unroll=True)
  warm_lanczos = _ritz_prefix_cosines(alphas, betas, basis, ref2)

  result.update(
    lambda_max_moved=lam2,
    residual_moved=residual2,
    warm_start_cos=warm_start_cos,
    cold_power=_first_reaching(cold_power),
    cold_lanczos=_first_reaching(cold_lanczos),
    warm_power=_first_reaching(warm_power),
    warm_lanczos=_first_reaching(warm_lanczos),
    cos_after_5={
      "cold_power": cold_power[4],
      "cold_lanczos": cold_lanczos[4],
      "warm_power": warm_power[4],
      "warm_lanczos": warm_lanczos[4],
    },
    max_iters=max_iters,
  )
  if not timing:
    return result
  log = make_log()
  variants = [
    compiled_variant("hvp", hvp_jit, (params, vec_ref), log),
    compiled_variant("grad", grad_jit, (params,), log),
    compiled_variant("sam", sam_step, (params, sam_tx.init(params)), log),
  ]
  interleave(variants, repeats, budget_s=60.0, seed=0, log=log)
  result.update({f"{v.name}_s": v.median() for v in variants})
  return result


def _fmt(n: int | None, cap: int) -> str:
  return str(n) if n is not None else f">{cap}"


def to_markdown(results: list[dict], meta: dict, ref_iters: int, timing: bool = True) -> str:
  """The RESULTS.md section of this benchmark, between its markers; without ``timing`` (the
  results hold no times) the time columns and the amortised costs are left out."""
  time_columns = " HVP / grad | HVP / SAM step |" if timing else ""
  lines = [
    "",
    "Cold: from a random vector. Warm: from the converged vector before a few SGD steps moved "
    f"the parameters. Reference: {ref_iters}-step reorthogonalised Lanczos (relative residual "
    "||Hv - λv|| / |λ| shown). Fixed random CIFAR-sized batch, eval-mode loss, models at init.",
    "",
    "| model | λ_max | residual | cold power | cold Lanczos | warm start cos | warm power | "
    "warm Lanczos | cos after 5 HVPs (warm power / warm Lanczos) |" + time_columns,
    "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if timing else ""),
  ]
  for r in results:
    c5 = r["cos_after_5"]
    lines.append(
      f"| {r['model']} (batch {r['batch']}) | {r['lambda_max']:.4g} | {r['residual']:.1e} | "
      f"{_fmt(r['cold_power'], r['max_iters'])} | {_fmt(r['cold_lanczos'], r['max_iters'])} | "
      f"{r['warm_start_cos']:.3f} | {_fmt(r['warm_power'], r['max_iters'])} | "
      f"{_fmt(r['warm_lanczos'], r['max_iters'])} | {c5['warm_power']:.3f} / "
      f"{c5['warm_lanczos']:.3f} |"
      + (f" {r['hvp_s'] / r['grad_s']:.2f} | {r['hvp_s'] / r['sam_s']:.2f} |" if timing else "")
    )
  if not timing:
    lines += [
      "",
      "Times not measured (`--no-timing`): HVP counts only. The step-cost section gives HVP / "
      "gradient and HVP / SAM step.",
    ]
    return report.section(NAME, "Eigenvector trackers: HVPs to reach |cos| >= 0.99", meta, lines)
  lines += [
    "",
    "Amortised X-SAM step / SAM step for a refresh every p=5 steps, with q the HVPs "
    "each tracker needs warm (SAM + q·HVP/p) / SAM:",
    "",
  ]
  for r in results:
    parts = []
    for tracker in ("power", "lanczos"):
      q = r[f"warm_{tracker}"]
      if q is not None:
        parts.append(f"{tracker} q={q}: {1 + q * r['hvp_s'] / (5 * r['sam_s']):.2f}")
    lines.append(f"- {r['model']}: " + "; ".join(parts))
  return report.section(NAME, "Eigenvector trackers: HVPs to reach |cos| >= 0.99", meta, lines)


def main(argv=None) -> None:
  """Runs the benchmark, prints the section and, with ``--out``, writes it there."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="simple_cnn,resnet18")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--ref_iters", type=int, default=60)
  parser.add_argument("--max_iters", type=int, default=40)
  parser.add_argument("--drift_steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument(
    "--no-timing",
    dest="timing",
    action="store_false",
    help="HVP counts only: skip the HVP, gradient and SAM-step times (for a loaded machine)",
  )
  parser.add_argument("--out", default=None, help="write the Markdown section into this file")
  args = parser.parse_args(argv)
  run = report.Run(NAME, argv)
  results = []
  for name in args.models.split(","):
    t = time.time()
    r = bench_model(
      name, args.batch, args.ref_iters, args.max_iters, args.drift_steps, args.repeats, args.timing
    )
    print(name, {k: v for k, v in r.items()}, f"{time.time() - t:.0f}s", flush=True)
    results.append(r)
  text = to_markdown(results, run.meta(), args.ref_iters, args.timing)
  print(text)
  if args.out:
    report.write_section(args.out, text, NAME, first=False)


if __name__ == "__main__":
  main()
