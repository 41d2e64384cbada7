"""A small transformer on modular arithmetic (the "grokking" setting), trained with AdamW.

``python -m experiments.transformer --optimizers adamw,sam_adamw,xsam_adamw --seeds 0,1,2
--steps N --out experiments/figures/transformer.png`` trains one run per (optimizer, seed),
full batch, and writes a JSON of results next to the PNG (same stem) and a PNG of the
accuracy curves (mean ± std over seeds).

Task: every pair :math:`(a, b) \\in \\{0..p-1\\}^2` is the sequence ``[a, op, b, =]`` with
label :math:`(a \\circ b) \\bmod p`; a fixed random fraction of the :math:`p^2` pairs is the
training set, the rest the test set (Power et al., 2022). Model: a decoder-only transformer with
learned token and position embeddings, ``num_layers`` blocks of causal multi-head attention and
a ReLU MLP, no LayerNorm by default, read out at the last position (Nanda et al., 2023). The
split depends on the seed only, so every optimizer sees the same split and the same
initialisation for a given seed (paired comparison).

Optimisers: ``adamw``; ``sam_adamw``, ``xsam_adamw``, ``eigen_sam_adamw`` chain the
sharpness method before ``optax.adamw``. The eigenvector refresh is decided on the host
(``refresh=xsam_jax.is_due(step, p)``, a static argument of the jitted step: two programs,
no ``lax.cond`` around the HVPs).

References:
  Power, Burda, Edwards, Babuschkin & Misra, "Grokking: Generalization Beyond Overfitting on
  Small Algorithmic Datasets", 2022, arXiv:2201.02177.
  Nanda, Chan, Lieberum, Smith & Steinhardt, "Progress measures for grokking via mechanistic
  interpretability", ICLR 2023, arXiv:2301.05217.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_jax
from experiments.optimizers import OptimizerSpec, sharpness_method
from xsam_jax import hessian

OPTIMIZERS = ("adamw", "sam_adamw", "xsam_adamw", "eigen_sam_adamw")
OPERATIONS = ("add", "sub", "mul")
SEQ_LEN = 4
ACC_THRESHOLD = 0.9


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of one run (task, model, optimizer, logging).

  Defaults, and where they come from: the recipe of Nanda et al. (1 layer, 4 heads, ReLU MLP
  of width 4d, no LayerNorm, full batch, AdamW with b2 = 0.98, weight decay 1.0, 10 warmup
  steps), shrunk to run on 2 CPU cores in minutes: p = 47 instead of 113, d = 64 instead of
  128, half of the pairs for training instead of 30% (a larger fraction groks sooner; Power et
  al.), lr = 3e-3 instead of 1e-3 (at 1e-3 AdamW was still at 50% test accuracy after 2000
  steps; at 3e-3 it generalises after ~1000). rho = 0.05 is SAM's default (a seed-0 sweep over
  {0.02, 0.05, 0.1} showed the same ordering), alpha = 0.2 the X-SAM/Eigen-SAM papers';
  refresh every 10 steps with 3 warm-started HVPs (X-SAM's code: 3-5 and 5) keeps the
  eigenvector cost at 0.3 HVP per step.

  Attributes:
    modulus: the prime :math:`p`.
    operation: ``add``, ``sub`` or ``mul`` (mod :math:`p`).
    train_fraction: fraction of the :math:`p^2` pairs used for training.
    d_model: residual width.
    num_heads: attention heads (``d_model`` must be divisible by it).
    num_layers: transformer blocks.
    d_mlp: hidden width of the MLP.
    layer_norm: pre-LayerNorm in every block and before the readout.
    steps: full-batch optimizer steps.
    lr: AdamW peak learning rate.
    warmup_steps: linear warmup from 0 (then constant).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    weight_decay: AdamW's decoupled weight decay (multiplied by the learning rate).
    rho: SAM radius, shared by SAM, Eigen-SAM and X-SAM (all ascend by the same rho).
    alpha: X-SAM correction / Eigen-SAM tilt strength.
    refresh_every: eigenvector refresh period :math:`p` of X-SAM/Eigen-SAM.
    power_iters: HVPs per refresh :math:`q`.
    eval_every: steps between evaluations (and the last step).
    lambda_max_iters: Lanczos steps (or power iterations) of the final, independent
      lambda_max estimate; 0 skips it (recorded as None).
    lambda_max_method: ``lanczos`` (largest eigenvalue) or ``power`` (largest in magnitude).
  """

  modulus: int = 47
  operation: str = "add"
  train_fraction: float = 0.5
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 1
  d_mlp: int = 256
  layer_norm: bool = False
  steps: int = 1500
  lr: float = 3e-3
  warmup_steps: int = 10
  b1: float = 0.9
  b2: float = 0.98
  weight_decay: float = 1.0
  rho: float = 0.05
  alpha: float = 0.2
  refresh_every: int = 10
  power_iters: int = 3
  eval_every: int = 50
  lambda_max_iters: int = 20
  lambda_max_method: str = "lanczos"


# --------------------------------------------------------------------------------------------
# Data.


class Split(NamedTuple):
  """Train/test split of all :math:`p^2` sequences.

  Attributes:
    x_train: int32 ``[n_train, 4]`` token sequences ``[a, op, b, =]``.
    y_train: int32 ``[n_train]`` answers in ``[0, p)``.
    x_test: int32 ``[n_test, 4]``.
    y_test: int32 ``[n_test]``.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def vocab_size(modulus: int) -> int:
  """Tokens ``0..p-1`` are the numbers, ``p`` is the operation, ``p + 1`` is ``=``."""
  return modulus + 2


def all_pairs(modulus: int, operation: str) -> tuple[np.ndarray, np.ndarray]:
  """Every sequence ``[a, op, b, =]`` (row ``a * p + b``) and its answer."""
  if operation not in OPERATIONS:
    raise ValueError(f"`operation` must be one of {OPERATIONS}, got {operation!r}.")
  a, b = np.divmod(np.arange(modulus * modulus), modulus)
  if operation == "add":
    y = (a + b) % modulus
  elif operation == "sub":
    y = (a - b) % modulus
  else:
    y = (a * b) % modulus
  x = np.stack([a, np.full_like(a, modulus), b, np.full_like(a, modulus + 1)], axis=1)
  return x.astype(np.int32), y.astype(np.int32)


def make_split(modulus: int, operation: str, train_fraction: float, seed: int) -> Split:
  """A deterministic random split: a permutation from ``seed``, the first ``round(f p^2)`` rows
  for training, the rest for testing (disjoint, together all :math:`p^2` pairs)."""
  if not 0.0 < train_fraction < 1.0:
    raise ValueError(f"`train_fraction` must be in (0, 1), got {train_fraction}.")
  x, y = all_pairs(modulus, operation)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_train = round(train_fraction * len(x))
  tr, te = perm[:n_train], perm[n_train:]
  return Split(x[tr], y[tr], x[te], y[te])


# --------------------------------------------------------------------------------------------
# Model.


class Block(nn.Module):
  """Causal multi-head self-attention and a ReLU MLP, residual, optional pre-LayerNorm.

  With ``last_only`` the block returns the last position only (its query attends to every
  position, so no mask is needed): the final block of a model read out at the last token.
  """

  d_model: int
  num_heads: int
  d_mlp: int
  layer_norm: bool
  last_only: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    head_dim = self.d_model // self.num_heads
    dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim), use_bias=False)
    h = nn.LayerNorm()(x) if self.layer_norm else x
    resid = x[:, -1:] if self.last_only else x
    q = dense(name="query")(h[:, -1:] if self.last_only else h)
    k = dense(name="key")(h)
    v = dense(name="value")(h)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    if not self.last_only:
      t = x.shape[1]
      scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
    attn = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
    resid = resid + nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False, name="out")(out)
    h = nn.LayerNorm()(resid) if self.layer_norm else resid
    h = nn.Dense(self.d_model, name="mlp_out")(nn.relu(nn.Dense(self.d_mlp, name="mlp_in")(h)))
    return resid + h


class Transformer(nn.Module):
  """Decoder-only transformer; logits over the :math:`p` answers at the last position.

  Token and position embeddings are learned, initialised :math:`\\mathcal N(0, 1/d)` as in
  Nanda et al.; dense layers use Flax's LeCun-normal default.
  """

  modulus: int
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 1
  d_mlp: int = 512
  layer_norm: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}.")
    init = nn.initializers.normal(1.0 / math.sqrt(self.d_model))
    x = nn.Embed(vocab_size(self.modulus), self.d_model, embedding_init=init, name="embed")(tokens)
    x = x + self.param("pos_embed", init, (tokens.shape[1], self.d_model))
    for i in range(self.num_layers):
      x = Block(
        self.d_model,
        self.num_heads,
        self.d_mlp,
        self.layer_norm,
        last_only=i == self.num_layers - 1,
        name=f"block_{i}",
      )(x)
    x = x[:, -1]
    if self.layer_norm:
      x = nn.LayerNorm()(x)
    return nn.Dense(self.modulus, use_bias=False, name="unembed")(x)


def make_model(config: Config) -> Transformer:
  return Transformer(
    modulus=config.modulus,
    d_model=config.d_model,
    num_heads=config.num_heads,
    num_layers=config.num_layers,
    d_mlp=config.d_mlp,
    layer_norm=config.layer_norm,
  )


def init_params(config: Config, seed: int) -> Any:
  """Parameters of :func:`make_model` from ``seed``."""
  return _init(make_model(config), jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0)
def _init(model: Transformer, key: jax.Array) -> Any:
  return model.init(key, jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]


def loss_and_accuracy(apply_fn, params, x, y) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy, in float32."""
  logits = apply_fn({"params": params}, x).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == y)


# --------------------------------------------------------------------------------------------
# Optimizers and the training step.


def build_optimizer(name: str, config: Config, seed: int = 0) -> OptimizerSpec:
  """``optax.chain(sharpness method, optax.adamw(...))``, or plain AdamW for ``adamw``."""
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")
  schedule = optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1))
  base = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  method = "adamw" if name == "adamw" else name.removesuffix("_adamw")
  sharp = sharpness_method(
    method,
    rho=config.rho,
    alpha=config.alpha,
    refresh_every=config.refresh_every,
    num_iters=config.power_iters,
    key=seed,
  )
  return OptimizerSpec(
    tx=base if sharp is None else optax.chain(sharp, base),
    needs_grad_fn=sharp is not None,
    tracks_eigvec=method in ("eigen_sam", "xsam"),
    refresh_every=config.refresh_every,
  )


def make_train_step(apply_fn, spec: OptimizerSpec):
  """The jitted full-batch step ``(params, opt_state, x, y, *, refresh) -> (params, opt_state,
  metrics)``; ``refresh`` (a host-side bool) is static, so a method with an eigenvector compiles
  two programs and neither has control flow around its HVPs.

  ``metrics``: ``loss`` and ``accuracy`` of the clean pass (at the params before the update)
  and ``grad_norm``, the global norm of the clean gradient.
  """

  @functools.partial(jax.jit, static_argnames=("refresh",), donate_argnums=(0, 1))
  def train_step(params, opt_state, x, y, *, refresh=False):
    loss_fn = lambda p: loss_and_accuracy(apply_fn, p, x, y)
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    extra: dict[str, Any] = {}
    if spec.needs_grad_fn:
      extra["grad_fn"] = jax.grad(lambda p: loss_fn(p)[0])
    if spec.tracks_eigvec:
      extra["refresh"] = refresh
    updates, opt_state = spec.tx.update(grads, opt_state, params, **extra)
    metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads)}
    return optax.apply_updates(params, updates), opt_state, metrics

  return train_step


@functools.cache
def _cached_train_step(optimizer: str, config: Config):
  """One compiled step per (optimizer, config), shared by every seed: the methods' ``seed``
  only sets the initial eigenvector (``init``), never ``update``."""
  return make_train_step(make_model(config).apply, build_optimizer(optimizer, config))


# Static arguments are the (hashable, compared by value) modules, not their bound ``apply``
# methods, which compare by identity and would recompile for every run.
@functools.partial(jax.jit, static_argnums=0)
def _evaluate(model: Transformer, params, x, y):
  return loss_and_accuracy(model.apply, params, x, y)


@functools.partial(jax.jit, static_argnames=("model", "num_iters", "solver"))
def lambda_max(
  model: Transformer, params, x, y, key, num_iters: int, solver: str = "lanczos"
) -> jax.Array:
  """Independent top Hessian eigenvalue of the training loss (without the weight-decay term) on
  ``(x, y)``: :func:`xsam_jax.hessian.top_eigenvalue` from a random start, not the optimizer's
  cached estimate. A transformer has no convolutions, so the compiled loop is fine on XLA:CPU.
  """
  grad_fn = jax.grad(lambda p: loss_and_accuracy(model.apply, p, x, y)[0])
  return hessian.top_eigenvalue(grad_fn, params, key, num_iters=num_iters, solver=solver)


def first_step_at_or_above(steps: Sequence[int], values: Sequence[float], level: float):
  """The first logged step whose value is >= ``level``, or None."""
  for s, v in zip(steps, values, strict=True):
    if v >= level:
      return int(s)
  return None


def train_run(
  optimizer: str, seed: int, config: Config, *, log: bool = False, split: Split | None = None
) -> dict[str, Any]:
  """Trains one (optimizer, seed) run; returns its curves and summary numbers."""
  split = split or make_split(config.modulus, config.operation, config.train_fraction, seed)
  model = make_model(config)
  params = init_params(config, seed)
  spec = build_optimizer(optimizer, config, seed)
  opt_state = spec.tx.init(params)
  step_fn = _cached_train_step(optimizer, config)
  x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in split)

  keys = ("step", "train_loss", "train_acc", "grad_norm", "test_loss", "test_acc")
  curves: dict[str, list] = {k: [] for k in keys}
  has_adv_norm = hasattr(opt_state[0], "adv_grad_norm") if spec.needs_grad_fn else False
  if has_adv_norm:  # X-SAM: the norm its normalisation removes
    curves["adv_grad_norm"] = []
  if spec.tracks_eigvec:
    curves["eigval"] = []
  start = time.perf_counter()
  for step in range(config.steps):
    refresh = spec.tracks_eigvec and xsam_jax.is_due(step, config.refresh_every)
    params, opt_state, metrics = step_fn(params, opt_state, x_tr, y_tr, refresh=refresh)
    if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
      test_loss, test_acc = _evaluate(model, params, x_te, y_te)
      # Train loss/accuracy/gradient norm of the clean pass, at the params before this update.
      row = {
        "step": step + 1,
        "train_loss": float(metrics["loss"]),
        "train_acc": float(metrics["accuracy"]),
        "grad_norm": float(metrics["grad_norm"]),
        "test_loss": float(test_loss),
        "test_acc": float(test_acc),
      }
      if has_adv_norm:
        row["adv_grad_norm"] = float(opt_state[0].adv_grad_norm)
      if spec.tracks_eigvec:
        row["eigval"] = float(optax.tree.get(opt_state, "eigval"))
      for k, v in row.items():
        curves[k].append(v)
      if log:
        print(
          f"  [{optimizer} seed={seed}] step {step + 1:5d} train {row['train_acc']:.3f} "
          f"loss {row['train_loss']:.2e} |g| {row['grad_norm']:.1e} test {row['test_acc']:.3f} "
          f"({time.perf_counter() - start:.0f}s)",
          flush=True,
        )
  jax.block_until_ready(params)
  wall = time.perf_counter() - start
  final_train_loss, final_train_acc = _evaluate(model, params, x_tr, y_tr)
  lam = None
  if config.lambda_max_iters > 0:
    lam = lambda_max(
      model,
      params,
      x_tr,
      y_tr,
      jax.random.key(10_000 + seed),
      config.lambda_max_iters,
      config.lambda_max_method,
    )
  return {
    "optimizer": optimizer,
    "seed": seed,
    "final_train_acc": float(final_train_acc),
    "final_train_loss": float(final_train_loss),
    "final_test_acc": curves["test_acc"][-1],
    "best_test_acc": max(curves["test_acc"]),
    "step_test_acc_90": first_step_at_or_above(curves["step"], curves["test_acc"], ACC_THRESHOLD),
    "step_train_acc_99": first_step_at_or_above(curves["step"], curves["train_acc"], 0.99),
    "lambda_max": None if lam is None else float(lam),
    "wall_time_s": wall,
    "curves": curves,
  }


# --------------------------------------------------------------------------------------------
# Aggregation, figure and CLI.


def _mean_std(values: Sequence[float]) -> dict[str, float]:
  arr = np.asarray(values, dtype=np.float64)
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Mean ± std (sample std, ddof=1) over seeds, per optimizer. ``step_test_acc_90`` averages
  the runs that reached 90% and reports how many did."""
  out: dict[str, dict[str, Any]] = {}
  for name in dict.fromkeys(r["optimizer"] for r in runs):
    rs = [r for r in runs if r["optimizer"] == name]
    row: dict[str, Any] = {"num_seeds": len(rs)}
    for key in ("final_test_acc", "best_test_acc", "final_train_acc", "lambda_max", "wall_time_s"):
      values = [r[key] for r in rs if r[key] is not None]
      row[key] = _mean_std(values) if values else None
    reached = [r["step_test_acc_90"] for r in rs if r["step_test_acc_90"] is not None]
    row["step_test_acc_90"] = _mean_std(reached) if reached else None
    row["reached_test_acc_90"] = f"{len(reached)}/{len(rs)}"
    out[name] = row
  return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
  """A Markdown table of :func:`summarize`'s output."""

  def ms(d, scale=1.0, fmt=".1f"):
    return "—" if d is None else f"{d['mean'] * scale:{fmt}} ± {d['std'] * scale:{fmt}}"

  lines = [
    "| optimizer | final test acc (%) | best test acc (%) | final train acc (%) | "
    "step test ≥ 90% | λ_max (final) | wall time (s) |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, row in summary.items():
    step90 = ms(row["step_test_acc_90"], fmt=".0f") + f" ({row['reached_test_acc_90']})"
    lines.append(
      f"| {name} | {ms(row['final_test_acc'], 100)} | {ms(row['best_test_acc'], 100)} | "
      f"{ms(row['final_train_acc'], 100)} | {step90} | {ms(row['lambda_max'], fmt='.2g')} | "
      f"{ms(row['wall_time_s'], fmt='.0f')} |"
    )
  return "\n".join(lines)


_SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}


def plot_title(config: Config, num_seeds: int) -> str:
  """Two lines: the task and model, then the optimizer hyperparameters."""
  return (
    f"(a {_SYMBOLS[config.operation]} b) mod {config.modulus}, "
    f"{config.train_fraction:.0%} of pairs for training, "
    f"{config.num_layers}-layer transformer d={config.d_model}, full batch\n"
    f"AdamW lr={config.lr:g} wd={config.weight_decay:g} b2={config.b2:g}; rho={config.rho:g}, "
    f"alpha={config.alpha:g}, p={config.refresh_every}, q={config.power_iters}; "
    f"mean ± std over {num_seeds} seeds"
  )


def plot(runs: Sequence[dict[str, Any]], path: Path, title: str) -> None:
  """Test accuracy (solid) and train accuracy (dashed), mean ± std over seeds."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i, name in enumerate(dict.fromkeys(r["optimizer"] for r in runs)):
    rs = [r for r in runs if r["optimizer"] == name]
    steps = np.asarray(rs[0]["curves"]["step"])
    color = f"C{i}"
    for key, style, label in (("test_acc", "-", f"{name} test"), ("train_acc", "--", None)):
      vals = np.asarray([r["curves"][key] for r in rs]) * 100
      mean, std = vals.mean(0), vals.std(0)
      ax.plot(steps, mean, style, color=color, label=label, lw=1.5 if style == "-" else 1.0)
      if key == "test_acc":
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
  ax.set_xlabel("step (full batch)")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 101)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right", title="solid: test, dashed: train", title_fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=130)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.transformer", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--optimizers", default="adamw,sam_adamw,xsam_adamw")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default="experiments/figures/transformer.png", type=Path)
  parser.add_argument("--quiet", action="store_true")
  defaults = Config()
  for field in dataclasses.fields(Config):
    value = getattr(defaults, field.name)
    if isinstance(value, bool):
      parser.add_argument(f"--{field.name}", type=lambda s: s.lower() in ("1", "true", "yes"))
    else:
      parser.add_argument(f"--{field.name}", type=type(value))
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs every (optimizer, seed), writes ``<out>.json`` and ``<out>.png``; returns the JSON."""
  args = parse_args(argv)
  overrides = {
    f.name: getattr(args, f.name)
    for f in dataclasses.fields(Config)
    if getattr(args, f.name) is not None
  }
  config = Config(**overrides)
  optimizers = [s for s in args.optimizers.split(",") if s]
  for name in optimizers:
    if name not in OPTIMIZERS:
      raise SystemExit(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")
  seeds = [int(s) for s in args.seeds.split(",") if s]
  runs = []
  start = time.perf_counter()
  for seed in seeds:
    split = make_split(config.modulus, config.operation, config.train_fraction, seed)
    for name in optimizers:
      run = train_run(name, seed, config, log=not args.quiet, split=split)
      runs.append(run)
      print(
        f"{name} seed={seed}: test {run['final_test_acc']:.3f} (best {run['best_test_acc']:.3f}) "
        f"train {run['final_train_acc']:.3f} step90 {run['step_test_acc_90']} "
        f"lambda_max {run['lambda_max']} {run['wall_time_s']:.0f}s",
        flush=True,
      )
  summary = summarize(runs)
  table = format_table(summary)
  print(table)
  result = {
    "config": dataclasses.asdict(config),
    "optimizers": optimizers,
    "seeds": seeds,
    "backend": jax.default_backend(),
    "total_wall_time_s": time.perf_counter() - start,
    "summary": summary,
    "table": table,
    "runs": runs,
  }
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=1))
  title = plot_title(config, len(seeds))
  plot(runs, out, title)
  return result


if __name__ == "__main__":
  main()
