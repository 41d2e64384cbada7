"""Can a curvature signal tell when X-SAM's cached eigenvector is stale? (issue 21, item 5)

``python -m benchmarks.drift [--steps 240] [--ref-every 3]``

Trains the digits SimpleCNN with SAM (rho 0.05, SGD lr 0.05, momentum 0.9, batch 64: the
trajectory of ``benchmarks/tracking.py``) and records, along it, for the papers' fixed rule
(power iteration, q = 5 exact HVPs every p = 5 steps, through the library's refresh):

* two drift signals since the cached vector's last refresh: **A** (free) the relative change of
  SAM's ``ascent_curvature`` :math:`c_t = \\langle\\hat g, g_{adv}-g\\rangle/\\rho`,
  :math:`|c_t - c_r|/|c_r|`; **B** (one HVP) the relative drop of the curvature along the cached
  :math:`v`, :math:`1 - v^\\top H_t v/\\lambda_r`;
* the staleness: :math:`1 - |\\cos(v, v_{new})|` with :math:`v_{new}` what a refresh would
  return now (q warm-started power steps from :math:`v` on this minibatch), and, every
  ``--ref-every`` steps (at a random step of each block), :math:`|\\cos|` with the
  minibatch's converged top eigenvector (``--ref-iters``-step Lanczos from a fresh start), and a
  few times with that of the loss over ``--full-examples`` fixed training examples;
* Spearman correlations of each signal (and of the age since the refresh, the fixed rule's own
  knowledge) with the staleness.

Then tracking quality against HVP budget: fixed p in ``--ps``, a drift-A trigger (refresh when
signal A exceeds tau; free) and a drift-B trigger (one check HVP each step, reused as the first
power step of a refresh), all with q = 5, compared with the same references. Prints the numbers;
the reading is hand-written in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import xsam_jax
from benchmarks import _report as report
from benchmarks._problems import cross_entropy
from benchmarks.tracking import comparison_steps, library_refresh
from experiments import data as data_lib
from experiments.models import get_model, init_model
from xsam_jax import hessian

LR, MOMENTUM, RHO, Q = 0.05, 0.9, 0.05, 5


def spearman(a, b) -> float:
  """Spearman rank correlation of two sequences (average ranks not needed: continuous data)."""
  ra = np.argsort(np.argsort(np.asarray(a, float)))
  rb = np.argsort(np.argsort(np.asarray(b, float)))
  return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.drift")
  parser.add_argument("--steps", type=int, default=240)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--ref-every", type=int, default=3)
  parser.add_argument("--ref-iters", type=int, default=20)
  parser.add_argument("--full-examples", type=int, default=512)
  parser.add_argument("--full-every", type=int, default=30)
  parser.add_argument("--ps", default="2,3,5,10,20")
  parser.add_argument("--taus-a", default="0.25,0.5,1,2")
  parser.add_argument("--taus-b", default="0.7,0.9,0.97")
  args = parser.parse_args(argv)
  run = report.Run("benchmarks.drift", argv)
  t0 = time.time()

  dataset = data_lib.load_dataset("digits")
  images = data_lib.normalize(dataset.train_images, dataset.mean, dataset.std)
  labels = dataset.train_labels.astype(np.int32)
  model = get_model("simple_cnn", dataset.num_classes)
  params, _ = init_model(model, (1, *images.shape[1:]), jax.random.key(0))
  w0, unravel = ravel_pytree(params)

  def loss(w, x, y):
    return cross_entropy(model.apply({"params": unravel(w)}, x, train=False), y)

  grad_flat = jax.jit(jax.grad(loss))
  hvp = jax.jit(lambda w, v, x, y: hessian.hvp(lambda u: jax.grad(loss)(u, x, y), w, v))
  tx = optax.chain(xsam_jax.sam(rho=RHO), optax.sgd(LR, momentum=MOMENTUM))

  @jax.jit
  def sam_step(w, opt_state, x, y):
    grad_fn = lambda u: jax.grad(loss)(u, x, y)
    updates, opt_state = tx.update(grad_fn(w), opt_state, w, grad_fn=grad_fn)
    return optax.apply_updates(w, updates), opt_state

  order = np.random.default_rng(0).permutation(len(labels))

  def batch_at(step):
    start = (step * args.batch) % (len(labels) - args.batch)
    idx = order[start : start + args.batch]
    return jnp.asarray(images[idx]), jnp.asarray(labels[idx])

  # Pass 1: the trajectory and SAM's free curvature at every step.
  ws, curv = [], []
  w, opt_state = w0, tx.init(w0)
  for step in range(args.steps):
    x, y = batch_at(step)
    ws.append(w)
    w, opt_state = sam_step(w, opt_state, x, y)
    curv.append(float(opt_state[0].ascent_curvature))
  print(f"trajectory: {time.time() - t0:.0f}s", flush=True)

  def hess_at(step):
    x, y = batch_at(step)
    return lambda v: hvp(ws[step], v, x, y)

  def refresh(step, v):
    x, y = batch_at(step)
    return library_refresh(lambda u: grad_flat(u, x, y), ws[step], v, Q, "power", "exact")

  def unit(v):
    return v / (jnp.linalg.norm(v) + 1e-12)

  def rq(v, hv):
    return float(jnp.vdot(v, hv))

  # References: the minibatch's converged top eigenvector every --ref-every steps.
  # One step drawn at random in each block of --ref-every steps, so that every rule's cached
  # vector is seen at every age since its refresh (a regular grid aligned with p would not).
  ref_steps = sorted(comparison_steps(args.steps, args.ref_every))
  refs = {}
  for s in ref_steps:
    fresh = jax.random.normal(jax.random.key(1000 + s), w0.shape)
    _, vecs = hessian.top_k_eigenpairs(hess_at(s), fresh, 1, num_iters=args.ref_iters, unroll=True)
    refs[s] = unit(vecs[0])
  # The loss over --full-examples fixed training examples: its top eigenvector, a few times.
  full_idx = order[: args.full_examples]
  full = jnp.asarray(images[full_idx]), jnp.asarray(labels[full_idx])
  full_refs = {}
  for s in sorted(comparison_steps(args.steps, args.full_every, seed=1)):
    if s < args.steps // 4:
      continue
    fresh = jax.random.normal(jax.random.key(2000 + s), w0.shape)
    hfull = lambda v, s=s: hvp(ws[s], v, *full)
    _, vecs = hessian.top_k_eigenpairs(hfull, fresh, 1, num_iters=args.ref_iters, unroll=True)
    full_refs[s] = unit(vecs[0])
  print(f"references: {time.time() - t0:.0f}s", flush=True)

  # Pass 2: the fixed rule p = 5 with both signals and the staleness at every step.
  v0 = unit(jax.random.normal(jax.random.key(1), w0.shape))
  v, lam_r, c_r, age = v0, 1.0, 1.0, 0
  rows = []  # (step, age, A, B, stale_new, cos_ref or nan)
  for step in range(args.steps):
    if step % 5 == 0:
      v = refresh(step, v)
      lam_r, c_r, age = rq(v, hess_at(step)(v)), curv[step], 0
    hv = hess_at(step)(v)
    sig_b = 1 - rq(v, hv) / lam_r
    sig_a = abs(curv[step] - c_r) / (abs(c_r) + 1e-12)
    u = unit(hv)
    for _ in range(Q - 1):
      u = unit(hess_at(step)(u))
    stale = 1 - abs(float(jnp.vdot(v, u)))
    cos_ref = abs(float(jnp.vdot(v, refs[step]))) if step in refs else np.nan
    rows.append((step, age, sig_a, sig_b, stale, cos_ref))
    age += 1
  print(f"signals: {time.time() - t0:.0f}s", flush=True)
  arr = np.array(rows)
  lines = []
  half = args.steps // 4
  for label, sel in (("all steps", arr[:, 0] >= 0), (f"steps >= {half}", arr[:, 0] >= half)):
    # Steps right at a refresh have age 0 and staleness ~0 by construction: leave them out.
    sub = arr[sel & (arr[:, 1] > 0)]
    with_ref = sub[~np.isnan(sub[:, 5])]
    lines.append(
      f"{label}: n={len(sub)}; Spearman with staleness 1-|cos(v, v_new)|: "
      f"age {spearman(sub[:, 1], sub[:, 4]):+.3f}, A {spearman(sub[:, 2], sub[:, 4]):+.3f}, "
      f"B {spearman(sub[:, 3], sub[:, 4]):+.3f}; with 1-|cos(v, top of minibatch)| "
      f"(n={len(with_ref)}): age {spearman(with_ref[:, 1], 1 - with_ref[:, 5]):+.3f}, "
      f"A {spearman(with_ref[:, 2], 1 - with_ref[:, 5]):+.3f}, "
      f"B {spearman(with_ref[:, 3], 1 - with_ref[:, 5]):+.3f}; median staleness "
      f"{np.median(sub[:, 4]):.3f}, median |cos| to top {np.median(with_ref[:, 5]):.3f}"
    )
  late = arr[(arr[:, 0] >= half) & (arr[:, 1] > 0)]
  for name, col in (("A", 2), ("B", 3)):
    qs = np.quantile(late[:, col], [0.1, 0.25, 0.5, 0.75, 0.9])
    lines.append(f"signal {name} quantiles 10/25/50/75/90%: " + " ".join(f"{q:.3g}" for q in qs))
  for line in lines:
    print(line, flush=True)

  # Pass 3: tracking quality against HVP budget for each refresh rule.
  def track(rule):
    """``rule(step, v, state) -> (refresh?, hvps spent on the check, hv or None)``."""
    v, spent, n_ref, coss, coss_full, state = v0, 0, 0, [], [], {}
    for step in range(args.steps):
      do, cost, hv = rule(step, v, state)
      spent += cost
      if do:
        if hv is None:
          v = refresh(step, v)
          spent += Q
        else:  # the check's HVP is the first power step
          u = unit(hv)
          for _ in range(Q - 1):
            u = unit(hess_at(step)(u))
          v = u
          spent += Q - 1
        n_ref += 1
        state["lam"] = rq(v, hess_at(step)(v)) if "b" in state.get("kind", "") else None
        state["c"], state["last"] = curv[step], step
      if step in refs and step >= half:
        coss.append(abs(float(jnp.vdot(v, refs[step]))))
      if step in full_refs:
        coss_full.append(abs(float(jnp.vdot(v, full_refs[step]))))
    return (
      spent / args.steps,
      n_ref,
      float(np.mean(coss)),
      float(np.median(coss)),
      float(np.median(coss_full)),
    )

  results = []
  for p in [int(x) for x in args.ps.split(",")]:
    results.append((f"fixed p={p}", *track(lambda s, v, st, p=p: (s % p == 0, 0, None))))
    print(results[-1], flush=True)
  for tau in [float(x) for x in args.taus_a.split(",")]:

    def rule_a(s, v, st, tau=tau):
      if s == 0:
        return True, 0, None
      return abs(curv[s] - st["c"]) / (abs(st["c"]) + 1e-12) > tau, 0, None

    results.append((f"drift A tau={tau}", *track(rule_a)))
    print(results[-1], flush=True)
  for tau in [float(x) for x in args.taus_b.split(",")]:

    def rule_b(s, v, st, tau=tau):
      st["kind"] = "b"
      if s == 0:
        return True, 0, None
      hv = hess_at(s)(v)
      return 1 - rq(v, hv) / st["lam"] > tau, 1, hv

    # The refresh's eigenvalue estimate for rule B costs one more HVP, not counted: it is
    # the Rayleigh quotient the library's power refresh returns for free.
    results.append((f"drift B tau={tau}", *track(rule_b)))
    print(results[-1], flush=True)
  print(
    "| rule | HVPs / step | refreshes | mean \\|cos\\| minibatch | median \\|cos\\| minibatch "
    f"| median \\|cos\\| {args.full_examples} ex. ({len(full_refs)}) |"
  )
  print("|---|---|---|---|---|---|")
  for name, budget, n, mean, med, full_med in results:
    print(f"| {name} | {budget:.2f} | {n} | {mean:.3f} | {med:.3f} | {full_med:.3f} |")
  meta = run.meta()
  print(meta)
  print(f"took {(time.time() - t0) / 60:.1f} min")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
