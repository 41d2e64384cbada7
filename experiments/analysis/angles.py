r"""Angle between the minibatch gradient and the top Hessian eigenvector during training.

``python -m experiments.analysis.angles --config experiments/configs/digits_simple_cnn.py
--optimizers sgd,sam,xsam --every 20 --out experiments/figures/angles.png [--set k=v ...]``

Each optimizer is trained with the building blocks of :mod:`experiments.train` (same data
order, model, optimizer chain and jitted step as ``python -m experiments.train``). Every
``--every`` steps, *before* the update, on the minibatch :math:`B` that step is about to use and
at the current parameters :math:`w`, the tool measures:

* :math:`g = \nabla L_B(w)`, the clean minibatch gradient (train-mode loss, as the optimizer
  sees it);
* :math:`g_{adv} = \nabla L_B(w + \rho\, g/\|g\|)`, SAM's perturbed gradient with the config's
  :math:`\rho` (measured for every optimizer, SGD included, so the runs are comparable);
* :math:`v`, the top eigenvector of the Hessian :math:`H = \nabla^2 L_B(w)` of the eval-mode
  loss (BatchNorm running averages, no dropout; ``--set eig_eval_mode=false`` for the
  train-mode loss), by Lanczos with full reorthogonalisation from a random start. It is
  independent of the eigenvector an Eigen-SAM/X-SAM optimizer caches; the agreement
  :math:`|\langle v, v_{cached}\rangle|` is recorded as a diagnostic.

Angles (the sign of an eigenvector is arbitrary, so only :math:`|\cos|` is meaningful):

.. math:: \cos(a, b) = \frac{\langle a, b\rangle}{\|a\|\,\|b\|},\qquad
   \theta = \arccos |\cos| \in [0^\circ, 90^\circ].

The signed cosines are kept in the records (their sign is that of the random Lanczos start).

Per-layer angles, as in X-SAM's angle analysis (paper section 4.1, which normalises per layer
and concatenates): the parameters are split into the groups of
:func:`xsam_jax.hessian.layer_masks` (one per module: ``conv1``, ..., ``head``), every
vector is normalised within each group and the groups are concatenated,
:math:`N(x) = (x_1/\|x_1\|, \dots, x_L/\|x_L\|)`, so :math:`\cos(N(a), N(b)) = \frac1L\sum_l
\cos(a_l, b_l)`: each layer counts equally, whatever its size or gradient scale. Two choices
of per-layer eigenvector, both recorded:

* ``layer_block`` (the default figure row): :math:`u_l` is the top eigenvector of the layer's
  own Hessian block :math:`H_{ll}` (Lanczos on :func:`xsam_jax.hessian.masked_hvp`), i.e.
  the sharpest direction *within* layer :math:`l`. This is the reading of "the eigenvector is a
  layer-wise concatenation" that the X-SAM text suggests. Each :math:`u_l` has its own
  arbitrary sign; it is oriented to agree with the slice :math:`v_l` of the full eigenvector,
  so that :math:`N(u)` has one global sign like :math:`v`. Cost: ``--layer_iters`` HVPs per
  layer per measurement.
* ``layer_slice`` (free): :math:`u_l = v_l/\|v_l\|`, the layer-wise normalisation of the
  full-Hessian eigenvector. It shows how the *global* sharpest direction sits in each layer,
  but a layer where :math:`v` is tiny gets a direction that is mostly noise, with full
  weight; that is why the block version is the default. ``--per_layer slice`` skips the block
  eigenvectors (about 6x cheaper on the SimpleCNN).

Outputs next to ``--out`` (``angles.png``): ``angles.jsonl`` (one record per optimizer and
measured step, per-layer lists included), ``angles.csv`` (the scalar fields), and
``angles_summary.md`` (mean and median angles per optimizer, test accuracy).

On XLA:CPU convolutions inside compiled loops run ~30x slower than at top level, so the
Lanczos loop runs on the host around one jitted HVP (parameters and batch are arguments,
never closed-over constants), as ``experiments.train.lambda_max`` does.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import data as data_lib
from experiments import train as train_lib
from experiments.analysis import common
from experiments.configs.base import TrainConfig
from experiments.optimizers import build_optimizer
from xsam_jax import hessian, is_due, training

EPS = 1e-12
PER_LAYER_MODES = ("block", "slice")
DEFAULT_OPTIMIZERS = "sgd,sam,xsam"
# (record prefix, figure row title)
VARIANTS = (
  ("", "full parameter vector"),
  ("layer_block", "per layer: block eigenvectors of H_ll"),
  ("layer_slice", "per layer: slices of the full eigenvector"),
)

FlatHVP = Callable[[jax.Array], jax.Array]
Segments = list[tuple[str, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Vector geometry (NumPy, float64, on the host).


def layer_segments(params: Any) -> Segments:
  """The layer groups of :func:`xsam_jax.hessian.layer_masks` as masks over the flat vector.

  The flat vector is ``jax.flatten_util.ravel_pytree(params)[0]`` (leaves in tree order).

  Args:
    params: the parameter pytree.

  Returns:
    ``[(name, bool mask of shape (num_params,)), ...]`` in the order of ``layer_masks``.
  """
  leaves = jax.tree.leaves(params)
  segments = []
  for name, mask in hessian.layer_masks(params).items():
    flags = jax.tree.leaves(mask)
    segments.append(
      (
        name,
        np.concatenate([np.full(np.size(p), bool(m)) for m, p in zip(flags, leaves, strict=True)]),
      )
    )
  return segments


def cosine(a: np.ndarray, b: np.ndarray, eps: float = EPS) -> float:
  """Signed cosine similarity of two flat vectors, in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + eps))


def angle_degrees(cos: float) -> float:
  """The angle to the nearer of :math:`\\pm v`: ``degrees(arccos(|cos|))`` in [0, 90]."""
  return math.degrees(math.acos(min(1.0, abs(float(cos)))))


def layerwise_normalize(x: np.ndarray, segments: Segments, eps: float = EPS) -> np.ndarray:
  """:math:`N(x)`: each layer's part divided by its own norm, concatenated (float64)."""
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for _, index in segments:
    part = x[index]
    out[index] = part / (np.linalg.norm(part) + eps)
  return out


def layerwise_cosine(a: np.ndarray, b: np.ndarray, segments: Segments, eps: float = EPS) -> float:
  """:math:`\\cos(N(a), N(b))`, the mean over layers of the per-layer cosines."""
  return cosine(layerwise_normalize(a, segments, eps), layerwise_normalize(b, segments, eps), eps)


# --------------------------------------------------------------------------------------------
# Eigenvectors.


def top_eigenpair(
  hvp_fn: FlatHVP,
  v0: jax.Array,
  num_iters: int,
  *,
  mask: np.ndarray | None = None,
  eps: float = EPS,
) -> tuple[float, np.ndarray, float]:
  r"""Top (largest algebraic) eigenpair of a flat symmetric operator, and its residual.

  Lanczos with full reorthogonalisation (:func:`xsam_jax.hessian.top_k_eigenpairs`,
  ``k=1``) driven from the host (``unroll=True``), so ``hvp_fn`` may be one jitted function.
  With ``mask`` the operator is the block :math:`P H P` of :func:`xsam_jax.hessian.masked_hvp`
  and the start is masked. One extra HVP gives the relative residual

  .. math:: r = \|H u - \lambda u\| / |\lambda| ,

  which is small (say < 0.1) once the pair has converged.

  Args:
    hvp_fn: ``v -> H v`` on flat float32 arrays.
    v0: the start vector (flat); it need not be normalised.
    num_iters: Lanczos steps (capped at the dimension of the (masked) space).
    mask: optional bool mask over the flat vector (one layer).
    eps: added to every norm before division.

  Returns:
    ``(eigval, unit eigvec as float64 NumPy array, residual)``.
  """
  op, start, dim = hvp_fn, v0, int(v0.size)
  if mask is not None:
    jmask = jnp.asarray(mask)
    op = hessian.masked_hvp(hvp_fn, jmask)
    start = hessian.apply_mask(v0, jmask)
    dim = int(np.sum(mask))
  num_iters = max(1, min(int(num_iters), dim))
  vals, vecs = hessian.top_k_eigenpairs(op, start, 1, num_iters=num_iters, unroll=True, eps=eps)
  vec = np.asarray(vecs[0], np.float64)
  if mask is not None:  # a Lanczos restart after breakdown may step outside the block
    vec = np.where(mask, vec, 0.0)
  vec /= np.linalg.norm(vec) + eps
  eigval = float(vals[0])
  hv = np.asarray(op(jnp.asarray(vec, v0.dtype)), np.float64)
  residual = float(np.linalg.norm(hv - eigval * vec) / max(abs(eigval), eps))
  return eigval, vec, residual


def measure(
  hvp_fn: FlatHVP,
  grad: np.ndarray,
  adv_grad: np.ndarray,
  segments: Segments,
  key: jax.Array,
  *,
  num_iters: int = 30,
  layer_iters: int = 12,
  per_layer: str = "block",
  eps: float = EPS,
) -> tuple[dict[str, Any], np.ndarray]:
  """All angles of one measurement, from a flat HVP and the two flat gradients.

  Args:
    hvp_fn: ``v -> H v`` on flat float32 arrays (the Hessian whose eigenvectors are wanted).
    grad: the clean gradient :math:`g` (flat).
    adv_grad: the perturbed gradient :math:`g_{adv}` (flat).
    segments: the layer groups (:func:`layer_segments`).
    key: PRNG key of the random Lanczos starts.
    num_iters: Lanczos steps for the full Hessian.
    layer_iters: Lanczos steps for each layer block (``per_layer="block"``).
    per_layer: ``"block"`` (block eigenvectors and slices) or ``"slice"`` (slices only).
    eps: added to every norm before division.

  Returns:
    ``(record, v)``: ``record`` has ``lambda_max``, ``residual``,
    ``cos_{clean,adv}[_{layer_block,layer_slice}]`` (signed), the matching ``angle_*`` in
    degrees, and per-layer lists ``layer_names``, ``layer_lambda``, ``layer_residual``,
    ``layer_abs_cos_{clean,adv}`` (block only); ``v`` is the unit top eigenvector (float64).
  """
  if per_layer not in PER_LAYER_MODES:
    raise ValueError(f"per_layer must be one of {PER_LAYER_MODES}, got {per_layer!r}")
  grad = np.asarray(grad, np.float64)
  adv_grad = np.asarray(adv_grad, np.float64)
  keys = jax.random.split(key, len(segments) + 1)
  v0 = jax.random.normal(keys[0], grad.shape, jnp.float32)
  eigval, v, residual = top_eigenpair(hvp_fn, v0, num_iters, eps=eps)
  record: dict[str, Any] = {"lambda_max": eigval, "residual": residual}

  def add(prefix: str, direction: np.ndarray, layerwise: bool) -> None:
    for name, vec in (("clean", grad), ("adv", adv_grad)):
      if layerwise:
        cos = layerwise_cosine(vec, direction, segments, eps)
      else:
        cos = cosine(vec, direction, eps)
      field = f"{name}_{prefix}" if prefix else name
      record[f"cos_{field}"] = cos
      record[f"angle_{field}"] = angle_degrees(cos)

  add("", v, layerwise=False)
  add("layer_slice", v, layerwise=True)
  if per_layer == "block":
    blocks = np.zeros_like(v)
    names, lams, residuals, abs_clean, abs_adv = [], [], [], [], []
    for (name, index), k in zip(segments, keys[1:], strict=True):
      start = jax.random.normal(k, grad.shape, jnp.float32)
      lam, u, res = top_eigenpair(hvp_fn, start, layer_iters, mask=index, eps=eps)
      if np.dot(u[index], v[index]) < 0:
        u = -u
      blocks[index] = u[index]
      names.append(name)
      lams.append(lam)
      residuals.append(res)
      abs_clean.append(abs(cosine(grad[index], u[index], eps)))
      abs_adv.append(abs(cosine(adv_grad[index], u[index], eps)))
    add("layer_block", blocks, layerwise=True)
    record.update(
      layer_names=names,
      layer_lambda=lams,
      layer_residual=residuals,
      layer_abs_cos_clean=abs_clean,
      layer_abs_cos_adv=abs_adv,
    )
  return record, v


# --------------------------------------------------------------------------------------------
# The model side: jitted flat gradients and HVPs (parameters and batch are arguments).


class _StateView(NamedTuple):
  """What :func:`xsam_jax.training.linen_grad_fns` reads from a train state."""

  apply_fn: Any
  params: Any
  batch_stats: Any


def _grad_fns(params, batch_stats, apply_fn, images, labels, dropout_rng):
  state = _StateView(apply_fn, params, batch_stats)
  return training.linen_grad_fns(
    state, train_lib.cross_entropy, images, labels, dropout_rng=dropout_rng, has_aux=True
  )


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _flat_gradients(params, batch_stats, apply_fn, images, labels, rho, dropout_rng):
  """Clean loss, flat clean gradient and flat SAM-perturbed gradient (train mode)."""
  out = _grad_fns(params, batch_stats, apply_fn, images, labels, dropout_rng)
  scale = rho / (optax.tree.norm(out.grads) + EPS)
  adv_params = jax.tree.map(lambda p, g: p + scale * g, params, out.grads)
  adv = out.grad_fn(adv_params)
  return out.loss, ravel_pytree(out.grads)[0], ravel_pytree(adv)[0]


@functools.partial(jax.jit, static_argnames=("apply_fn", "eval_mode"))
def _flat_hvp(params, batch_stats, apply_fn, images, labels, dropout_rng, v, *, eval_mode):
  """:math:`Hv` on flat vectors, of the eval-mode (or train-mode) minibatch loss."""
  out = _grad_fns(params, batch_stats, apply_fn, images, labels, dropout_rng)
  grad_fn = out.eig_grad_fn if eval_mode else out.grad_fn
  unravel = ravel_pytree(params)[1]
  return ravel_pytree(hessian.hvp(grad_fn, params, unravel(v)))[0]


def measure_state(
  state: training.TrainState,
  batch: dict[str, jax.Array],
  config: TrainConfig,
  segments: Segments,
  key: jax.Array,
  *,
  num_iters: int = 30,
  layer_iters: int = 12,
  per_layer: str = "block",
) -> dict[str, Any]:
  r""":func:`measure` at a train state, on one batch (the batch the next step will use).

  Adds ``loss``, ``grad_norm`` and ``adv_grad_norm`` and, when the optimizer caches an
  eigenvector (Eigen-SAM, X-SAM), ``cached_eigval`` and ``cached_eigvec_abs_cos``
  :math:`= |\langle v, v_{cached}\rangle|`: how well the optimizer's warm-started power steps
  (last refresh, possibly on another minibatch) track the top eigenvector of this minibatch.
  """
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed + 1), state.step)
  args = (state.params, state.batch_stats, state.apply_fn, batch["image"], batch["label"])
  loss, grad, adv = _flat_gradients(*args, jnp.float32(config.rho), dropout_rng)

  def hvp_fn(v):
    return _flat_hvp(*args, dropout_rng, v, eval_mode=config.eig_eval_mode)

  grad = np.asarray(grad, np.float64)
  adv = np.asarray(adv, np.float64)
  record, v = measure(
    hvp_fn,
    grad,
    adv,
    segments,
    key,
    num_iters=num_iters,
    layer_iters=layer_iters,
    per_layer=per_layer,
  )
  record.update(
    loss=float(loss),
    grad_norm=float(np.linalg.norm(grad)),
    adv_grad_norm=float(np.linalg.norm(adv)),
  )
  try:
    cached = optax.tree.get(state.opt_state, "eigvec")
  except (KeyError, ValueError):
    cached = None
  if cached is not None:
    record["cached_eigval"] = float(optax.tree.get(state.opt_state, "eigval"))
    record["cached_eigvec_abs_cos"] = abs(cosine(np.asarray(ravel_pytree(cached)[0]), v))
  return record


# --------------------------------------------------------------------------------------------
# Training with measurements.


def run_optimizer(
  config: TrainConfig,
  *,
  every: int = 20,
  num_iters: int = 30,
  layer_iters: int = 12,
  per_layer: str = "block",
  max_steps: int | None = None,
  log: Callable[[str], None] | None = print,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Trains one config like ``experiments.train`` and measures the angles every ``every`` steps.

  Args:
    config: the run's config (its ``optimizer``, ``rho``, ``seed``, ``epochs``...).
    every: measure at steps ``0, every, 2 * every, ...`` (before the update).
    num_iters: Lanczos steps for the full Hessian.
    layer_iters: Lanczos steps per layer block.
    per_layer: ``"block"`` or ``"slice"`` (see the module docstring).
    max_steps: stop after this many steps (for quick checks); ``None`` trains all epochs.
    log: progress lines (``None``: silent).

  Returns:
    ``(records, summary)``: one record per measurement (see :func:`measure`, plus
    ``optimizer``, ``step``, ``epoch``, ``loss``, ``grad_norm``, ``adv_grad_norm``, ``seconds``
    and, for Eigen-SAM/X-SAM, ``cached_eigvec_abs_cos`` and ``cached_eigval``), and a summary
    with the clean test accuracy after training and the wall time.
  """
  if every < 1:
    raise ValueError(f"--every must be >= 1, got {every}")
  start_time = time.time()
  dataset = data_lib.load_dataset(
    config.dataset, data_dir=config.data_dir, label_noise=config.label_noise, seed=config.seed
  )
  mesh = Mesh(np.array(jax.devices()), ("data",))
  steps_per_epoch = data_lib.steps_per_epoch(dataset.num_train, config.batch_size)
  spec = build_optimizer(config, steps_per_epoch)
  state = jax.device_put(train_lib.create_state(config, dataset, spec), NamedSharding(mesh, P()))
  segments = layer_segments(state.params)
  train_step = train_lib.make_train_step(config, spec)
  static = spec.tracks_eigvec and train_lib.use_static_refresh(config)
  key = jax.random.key(config.seed + 3)
  total = config.epochs * steps_per_epoch if max_steps is None else max_steps
  records: list[dict[str, Any]] = []
  measure_seconds = 0.0
  step = 0
  for epoch in range(config.epochs):
    batches = data_lib.train_batches(
      dataset, config.batch_size, config.seed, epoch, augment=config.augment
    )
    for i, host_batch in enumerate(batches):
      step = epoch * steps_per_epoch + i
      if step >= total:
        break
      batch = data_lib.shard_batch(host_batch, mesh)
      if step % every == 0:
        tic = time.time()
        record = measure_state(
          state,
          batch,
          config,
          segments,
          jax.random.fold_in(key, step),
          num_iters=num_iters,
          layer_iters=layer_iters,
          per_layer=per_layer,
        )
        seconds = time.time() - tic
        measure_seconds += seconds
        records.append(
          {
            "optimizer": config.optimizer,
            "step": step,
            "epoch": epoch,
            **record,
            "seconds": seconds,
          }
        )
        if log is not None:
          log(
            f"  {config.optimizer:>9} step {step:5d}: lambda={record['lambda_max']:.4g} "
            f"(res {record['residual']:.2g}) angle clean {record['angle_clean']:.1f} "
            f"adv {record['angle_adv']:.1f} deg  [{seconds:.1f}s]"
          )
      refresh = is_due(step, spec.refresh_every) if static else None
      state, _ = train_step(state, batch, refresh=refresh)
    if step >= total - 1:
      break
  test = train_lib.evaluate(state, dataset, config.batch_size, mesh)
  summary = {
    "optimizer": config.optimizer,
    "steps": min(total, config.epochs * steps_per_epoch),
    "measurements": len(records),
    **test,
    "wall_seconds": time.time() - start_time,
    "measure_seconds": measure_seconds,
  }
  return records, summary


# --------------------------------------------------------------------------------------------
# Summary and figure.


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per optimizer: count, mean and median of every ``angle_*`` field, mean λ and residual."""
  rows = []
  for opt in dict.fromkeys(r["optimizer"] for r in records):
    rs = [r for r in records if r["optimizer"] == opt]
    row: dict[str, Any] = {"optimizer": opt, "n": len(rs)}
    for field in sorted({k for r in rs for k in r if k.startswith("angle_")}):
      values = np.array([r[field] for r in rs if field in r])
      row[f"mean_{field}"] = float(values.mean())
      row[f"median_{field}"] = float(np.median(values))
    row["mean_lambda_max"] = float(np.mean([r["lambda_max"] for r in rs]))
    row["median_residual"] = float(np.median([r["residual"] for r in rs]))
    cached = [r["cached_eigvec_abs_cos"] for r in rs if "cached_eigvec_abs_cos" in r]
    if cached:
      row["mean_cached_eigvec_abs_cos"] = float(np.mean(cached))
    rows.append(row)
  return rows


def summary_markdown(
  rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]] | None = None
) -> str:
  """A Markdown table: mean (median) angle per optimizer for each variant and gradient."""
  accuracy = {r["optimizer"]: r.get("test_accuracy") for r in runs or ()}
  columns = [
    ("angle_clean", "g, full"),
    ("angle_adv", "g_adv, full"),
    ("angle_clean_layer_block", "g, per-layer block"),
    ("angle_adv_layer_block", "g_adv, per-layer block"),
    ("angle_clean_layer_slice", "g, per-layer slice"),
    ("angle_adv_layer_slice", "g_adv, per-layer slice"),
  ]
  columns = [c for c in columns if any(f"mean_{c[0]}" in r for r in rows)]
  head = ["optimizer", "n", *[f"{title} (°)" for _, title in columns], "mean λ_max (batch)"]
  head += ["median Lanczos residual", "|cos(v, cached v)|", "test acc (clean)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["optimizer"], str(r["n"])]
    cells += [f"{r[f'mean_{f}']:.1f} ({r[f'median_{f}']:.1f})" for f, _ in columns]
    cells.append(f"{r['mean_lambda_max']:.3g}")
    cells.append(f"{r['median_residual']:.2g}")
    cached = r.get("mean_cached_eigvec_abs_cos")
    cells.append("–" if cached is None else f"{cached:.2f}")
    acc = accuracy.get(r["optimizer"])
    cells.append("–" if acc is None else f"{100 * acc:.1f}%")
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append("Cells: mean (median) over the measured steps; angles are arccos|cos| in [0, 90].")
  return "\n".join(lines) + "\n"


def plot(records: Sequence[dict[str, Any]], out: str | Path, title: str = "") -> None:
  """Histograms of the angles per optimizer (rows: variants; columns: clean, perturbed),
  and a last row with the perturbed angle and the minibatch λ_max over training."""
  plt = common.pyplot()
  optimizers = list(dict.fromkeys(r["optimizer"] for r in records))
  variants = [
    (p, t) for p, t in VARIANTS if any(f"angle_clean{'_' + p if p else ''}" in r for r in records)
  ]
  rows = len(variants) + 1
  fig, axes = plt.subplots(rows, 2, figsize=(11, 3.0 * rows), squeeze=False)
  colors = {opt: f"C{i}" for i, opt in enumerate(optimizers)}
  for row, (prefix, row_title) in enumerate(variants):
    for col, (grad, grad_title) in enumerate((("clean", "clean g"), ("adv", "perturbed g_adv"))):
      field = f"angle_{grad}_{prefix}" if prefix else f"angle_{grad}"
      ax = axes[row][col]
      values = [r[field] for r in records if field in r]
      lo = max(0.0, math.floor(min(values)) - 1.0) if values else 0.0
      bins = np.linspace(lo, 90.0, 31)
      for opt in optimizers:
        xs = [r[field] for r in records if r["optimizer"] == opt and field in r]
        if xs:
          ax.hist(
            xs,
            bins=bins,
            histtype="stepfilled",
            alpha=0.35,
            color=colors[opt],
            edgecolor=colors[opt],
            linewidth=1.2,
            label=f"{opt} (median {np.median(xs):.1f}°)",
          )
      ax.set_title(f"{row_title}\nangle({grad_title}, top eigenvector)", fontsize=9)
      ax.set_xlabel("angle (degrees, arccos|cos|)")
      ax.set_ylabel("count")
      ax.legend(fontsize=8)
  ax_angle, ax_lam = axes[-1]
  for opt in optimizers:
    rs = [r for r in records if r["optimizer"] == opt]
    steps = [r["step"] for r in rs]
    ax_angle.plot(steps, [r["angle_adv"] for r in rs], ".-", color=colors[opt], label=opt)
    ax_lam.plot(steps, [r["lambda_max"] for r in rs], ".-", color=colors[opt], label=opt)
  ax_angle.set_title("angle(g_adv, v), full vector, over training", fontsize=9)
  ax_angle.set_xlabel("step")
  ax_angle.set_ylabel("degrees")
  ax_lam.set_title("top eigenvalue of the minibatch Hessian", fontsize=9)
  ax_lam.set_xlabel("step")
  ax_lam.set_ylabel("λ_max")
  ax_lam.set_yscale("log")
  for ax in (ax_angle, ax_lam):
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI.


def output_paths(out: str | Path) -> dict[str, Path]:
  """The files written next to the figure ``out``: png, jsonl, csv and the Markdown summary."""
  out = Path(out)
  return {
    "png": out,
    "jsonl": out.with_suffix(".jsonl"),
    "csv": out.with_suffix(".csv"),
    "summary": out.with_name(out.stem + "_summary.md"),
  }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.analysis.angles", description=__doc__.split("\n\n")[0]
  )
  common.add_run_args(parser)
  parser.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, help="comma-separated")
  parser.add_argument("--every", type=int, default=20, help="measure every N steps")
  parser.add_argument("--lanczos_iters", type=int, default=30, help="Lanczos steps, full H")
  parser.add_argument("--layer_iters", type=int, default=12, help="Lanczos steps per layer")
  parser.add_argument("--per_layer", choices=PER_LAYER_MODES, default="block")
  parser.add_argument("--max_steps", type=int, default=None, help="stop each run early")
  parser.add_argument("--out", default="experiments/figures/angles.png")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  common.enable_compilation_cache(args.jax_cache)
  paths = output_paths(args.out)
  paths["png"].parent.mkdir(parents=True, exist_ok=True)
  records: list[dict[str, Any]] = []
  runs: list[dict[str, Any]] = []
  for optimizer in common.parse_list(args.optimizers):
    try:
      config = common.make_config(args.config, optimizer, args.overrides)
    except ValueError as exc:
      print(f"error: {exc}", file=sys.stderr)
      return 2
    print(f"[{optimizer}] {common.config_summary(config, ('epochs', 'rho', 'alpha', 'seed'))}")
    recs, summary = run_optimizer(
      config,
      every=args.every,
      num_iters=args.lanczos_iters,
      layer_iters=args.layer_iters,
      per_layer=args.per_layer,
      max_steps=args.max_steps,
    )
    print(f"[{optimizer}] {json.dumps(summary)}")
    records.extend(recs)
    runs.append(summary)
  common.write_jsonl(paths["jsonl"], records)
  common.write_csv(paths["csv"], records)
  rows = summarize(records)
  paths["summary"].write_text(summary_markdown(rows, runs))
  title = f"{Path(args.config).stem}: {', '.join(args.overrides) or 'config defaults'}"
  plot(records, paths["png"], title=title)
  print(summary_markdown(rows, runs))
  print("wrote " + ", ".join(str(p) for p in paths.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
