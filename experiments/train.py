"""One training run: ``python -m experiments.train --config CONFIG.py[:OPT] [--set k=v ...]``.

Reads top to bottom: data -> model -> optimizer -> one jitted train step of
``(state, batch) -> (state, metrics)`` -> epoch loop with evaluation, an independent
lambda_max estimate, JSONL/TensorBoard metrics and orbax checkpoints with exact resume.

Outputs in ``--workdir``: ``config.json`` (the resolved config), ``metrics.jsonl`` (one record
per logged step and per epoch), ``tb/`` (TensorBoard), ``checkpoints/`` and, at the end,
``summary.json`` (test accuracy, or validation accuracy with ``validation_fraction > 0``,
final lambda_max, wall time, and the gradient evaluations the run made, counted from the
optimizer state: ``grad_evals_clean``, ``grad_evals_ascent``, ``hvps``, their sum
``grad_evals`` and ``grad_evals_per_step``; every epoch record has the running counts).

Exit status: 0 finished (or stopped by ``--max_epochs_this_run``), 2 bad input (nothing
written), 75 (:data:`EXIT_PREEMPTED`) stopped by ``SIGTERM`` after saving ``preempted/``: rerun
the same command to resume, bit for bit.

Scaling out (see README "Scaling out"): the same command runs in every process of a
multi-process job on JAX's distributed runtime (``--coordinator``, ``--num_processes`` and
``--process_id`` for a local launch, or the cluster's environment). The mesh spans all
processes' devices; each process reads and augments only its rows of every batch, and
``jax.make_array_from_process_local_data`` assembles the global batch, which is the same as in
one process, so the result does not depend on the process count. ``--mesh data=N,model=M``
also splits the large weights (and their optimizer-state twins, ``eigvec`` included) over
``model`` (:mod:`experiments.sharding`). Process 0 writes ``config.json``, metrics, TensorBoard
and ``summary.json``; every process takes part in the orbax checkpoints, which restore under
any process count and mesh.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from experiments import data as data_lib
from experiments import distributed, saddle
from experiments import sharding as sharding_lib
from experiments.configs.base import TrainConfig, config_differences, load_config
from experiments.models import count_params, get_model, init_model
from experiments.optimizers import OptimizerSpec, build_optimizer, gradient_evaluations
from xsam_jax import ascent_due, hessian, is_due, training

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
PREEMPTED_DIR = "preempted"  # the checkpoint of a run stopped by SIGTERM within an epoch
# The exit status of a run stopped by SIGTERM after saving its checkpoint (sysexits.h
# EX_TEMPFAIL, "try again"): not 0, so a job script or retry loop can tell it from a finished
# run, and not 1 or 2, so it is not taken for a crash or bad input.
EXIT_PREEMPTED = 75
# Settings that may differ between the processes of one run (host-local paths, display).
PER_PROCESS = frozenset({"data_dir", "progress"})


# --------------------------------------------------------------------------------------------
# Model, loss and state.


def _at_least_float32(logits: jax.Array) -> jax.Array:
  """``logits`` in float32, or float64 when they are float64: the loss's precision."""
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy (the loss's aux), in float32 (float64 for float64 logits)."""
  logits = _at_least_float32(logits)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def cross_entropy_per_example(
  logits: jax.Array, labels: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """:func:`cross_entropy` with ``(accuracy, per-example losses)`` as aux (ESAM's selection)."""
  logits = _at_least_float32(logits)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return losses.mean(), (jnp.mean(jnp.argmax(logits, -1) == labels), losses)


def per_example_cross_entropy(state: training.TrainState, dropout_rng: jax.Array):
  """``(params, (images, labels)) -> (n,)`` losses of the train-mode forward (BatchNorm on the
  batch's statistics, which are thrown away; dropout from ``dropout_rng``), as ``grad_fn``'s."""

  def losses(params, batch):
    images, labels = batch
    variables = {"params": params}
    kwargs: dict[str, Any] = {"rngs": {"dropout": dropout_rng}}
    if state.batch_stats is not None:
      variables["batch_stats"] = state.batch_stats
      kwargs["mutable"] = ["batch_stats"]
    logits = state.apply_fn(variables, images, train=True, **kwargs)
    if state.batch_stats is not None:
      logits = logits[0]
    return optax.softmax_cross_entropy_with_integer_labels(_at_least_float32(logits), labels)

  return losses


def mesa_cross_entropy(
  logits: jax.Array, targets: tuple[jax.Array, jax.Array], *, weight: Any, temperature: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """MESA's loss (:func:`xsam_jax.training.mesa_loss`) and ``(accuracy, KL term)`` as aux.

  ``targets`` is ``(labels, teacher logits)``; the KL term is
  :func:`xsam_jax.training.trajectory_kl` (with its ``temperature**2``, before ``weight``).
  """
  labels, teacher = targets
  logits = _at_least_float32(logits)
  loss = training.mesa_loss(logits, teacher, labels, weight=weight, temperature=temperature)
  kl = training.trajectory_kl(logits, teacher, temperature=temperature)
  return loss, (jnp.mean(jnp.argmax(logits, -1) == labels), kl)


def create_state(
  config: TrainConfig, dataset: data_lib.Dataset, spec: OptimizerSpec
) -> training.TrainState:
  """The initial :class:`xsam_jax.training.TrainState` of a run (a
  :class:`~xsam_jax.training.MESATrainState`, which keeps the EMA teacher, for MESA)."""
  kwargs: dict[str, Any] = {}
  if config.compute_dtype != "float32":
    kwargs["dtype"] = jnp.dtype(config.compute_dtype)
  if config.dropout_rate and config.model in ("wrn28_10", "alexnet"):
    kwargs["dropout_rate"] = config.dropout_rate
  model = get_model(config.model, dataset.num_classes, **kwargs)
  params, batch_stats = init_model(model, (1, *dataset.image_shape), jax.random.key(config.seed))
  if config.compute_dtype == "float64":  # the float32 initial values, held in float64
    params, batch_stats = optax.tree.cast((params, batch_stats), jnp.float64)
  fields = dict(apply_fn=model.apply, params=params, tx=spec.tx, batch_stats=batch_stats or None)
  if spec.mesa_start_step is not None:
    return training.MESATrainState.create(**fields, mesa_decay=config.mesa_decay)
  return training.TrainState.create(**fields)


def init_state(
  config: TrainConfig, dataset: data_lib.Dataset, spec: OptimizerSpec, mesh: Mesh
) -> tuple[training.TrainState, Any]:
  """The initial state laid out on ``mesh`` by :func:`experiments.sharding.state_shardings`.

  It is created by one jitted program whose ``out_shardings`` are those shardings, so every
  process builds only its own pieces (no process ever holds a global array it cannot address)
  and the values are those of an unsharded initialisation. Returns ``(state, shardings)``.
  """
  make = functools.partial(create_state, config, dataset, spec)
  shardings = sharding_lib.state_shardings(jax.eval_shape(make), mesh)
  return jax.jit(make, out_shardings=shardings)(), shardings


def use_static_refresh(config: TrainConfig) -> bool:
  """Host-decided refresh on XLA:CPU, where control flow around convolutions is 25-30x slower
  (jax-ml/jax#12868); one program with ``lax.cond`` elsewhere."""
  if config.refresh_path == "auto":
    return jax.default_backend() == "cpu"
  return config.refresh_path == "static"


def use_static_ascent(config: TrainConfig, spec: OptimizerSpec) -> bool:
  """Host-decided ascent (:func:`xsam_jax.ascent_due`) for ``sam_every``/``rst``/``looksam`` on
  XLA:CPU (``ascent_path=auto``), where a gradient inside ``lax.cond`` is 20-30x slower; one
  program with ``lax.cond`` elsewhere and for every method without a host-decidable policy."""
  if spec.ascent_policy is None:
    return False
  if config.ascent_path == "auto":
    return jax.default_backend() == "cpu"
  return config.ascent_path == "static"


def make_train_step(
  config: TrainConfig,
  spec: OptimizerSpec,
  state_sharding: Any = None,
  batch_sharding: NamedSharding | None = None,
  eig_batch: tuple[Any, Any] | None = None,
):
  """The jitted step ``(state, batch, *, refresh, ascend) -> (state, metrics)``.

  With ``state_sharding`` (and the batch's sharding) the step's ``in_shardings`` and
  ``out_shardings`` pin the state to that layout: parameters, their optimizer-state twins and
  the ``eigvec`` the library returns keep their shardings from step to step, metrics come back
  replicated, and the step compiles once (once per ``refresh`` and per ``ascend`` value on the
  static paths: ``refresh`` for Eigen-SAM/X-SAM, ``ascend`` for ``spec.ascent_policy``).

  With ``eig_batch`` (``(images, labels)``, ``config.eig_examples > 0``: see
  :func:`fixed_train_examples`) the eigenvector's HVPs are those of the eval-mode loss on that
  fixed set (:func:`fixed_examples_grad_fn`), passed to the step as an argument (replicated),
  not the minibatch's.
  """
  dropout_key = jax.random.key(config.seed + 1)
  shardings: dict[str, Any] = {}
  if state_sharding is not None:
    replicated = sharding_lib.replicated(batch_sharding.mesh)
    shardings = dict(
      in_shardings=(state_sharding, batch_sharding, replicated),
      out_shardings=(state_sharding, replicated),
    )

  def step(state, batch, eig_batch, refresh, ascend):
    loss_fn, targets = cross_entropy, batch["label"]
    if spec.mesa_start_step is not None:  # MESA: CE + KL towards the EMA teacher's predictions
      # The weight is traced: one program for the steps before and after the start.
      weight = jnp.where(state.step >= spec.mesa_start_step, config.mesa_weight, 0.0)
      loss_fn = functools.partial(
        mesa_cross_entropy, weight=weight, temperature=config.mesa_temperature
      )
      targets = (batch["label"], state.teacher_logits(batch["image"]))
    if spec.esam_fraction is not None:  # ESAM's data selection needs per-example losses
      loss_fn = cross_entropy_per_example
    dropout_rng = jax.random.fold_in(dropout_key, state.step)
    out = training.linen_grad_fns(
      state, loss_fn, batch["image"], targets, dropout_rng=dropout_rng, has_aux=True
    )
    extra: dict[str, Any] = {}
    if spec.needs_grad_fn:
      extra["grad_fn"] = out.grad_fn
    if spec.esam_fraction is not None:
      # The second gradient on the share of the batch whose loss rose most from w to w + eps.
      extra["grad_fn"] = training.sharp_examples_grad_fn(
        per_example_cross_entropy(state, dropout_rng),
        (batch["image"], batch["label"]),
        jax.lax.stop_gradient(out.aux[1]),
        spec.esam_fraction,
      )
    if spec.ascent_policy is not None:
      extra["ascend"] = ascend
    if spec.tracks_eigvec:
      extra["refresh"] = refresh
      if eig_batch is not None:
        extra["eig_grad_fn"] = fixed_examples_grad_fn(state, *eig_batch)
      elif config.eig_eval_mode:
        extra["eig_grad_fn"] = out.eig_grad_fn
    # MESATrainState also moves its EMA teacher here, after the step.
    state = state.apply_gradients(grads=out.grads, batch_stats=out.batch_stats, **extra)
    mesa_or_esam = spec.mesa_start_step is not None or spec.esam_fraction is not None
    accuracy = out.aux[0] if mesa_or_esam else out.aux
    metrics = {"loss": out.loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(out.grads)}
    if spec.mesa_start_step is not None:
      metrics["mesa_kl"] = out.aux[1]
    if spec.tracks_eigvec:
      metrics["eigval"] = optax.tree.get(state.opt_state, "eigval")
      metrics["abs_cos"] = jnp.abs(optax.tree.get(state.opt_state, "cos"))
    return state, metrics

  # `refresh`, `ascend` are positional inside: jit accepts no keyword arguments with in_shardings.
  compiled = jax.jit(step, static_argnums=(3, 4), donate_argnums=(0,), **shardings)

  def train_step(state, batch, *, refresh=None, ascend=None):
    return compiled(state, batch, eig_batch, refresh, ascend)

  train_step.jitted = compiled  # for compile counts: train_step.jitted._cache_size()
  return train_step


def _eval_sums(state: training.TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Sums of loss, correct predictions and examples over the real (mask = 1) examples."""
  variables = {"params": state.params}
  if state.batch_stats is not None:
    variables["batch_stats"] = state.batch_stats
  logits = _at_least_float32(state.apply_fn(variables, batch["image"], train=False))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = jnp.argmax(logits, -1) == batch["label"]
  mask = batch["mask"]
  return {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask), "n": jnp.sum(mask)}


eval_step = jax.jit(_eval_sums)


@functools.cache
def _eval_step_on(mesh: Mesh):
  """:func:`eval_step` whose sums come back replicated on ``mesh`` (readable in every process)."""
  return jax.jit(_eval_sums, out_shardings=sharding_lib.replicated(mesh))


def evaluate(
  state, dataset: data_lib.Dataset, batch_size: int, mesh: Mesh, split: str = "test"
) -> dict[str, float]:
  """``{split}_loss`` and ``{split}_accuracy`` on ``dataset``'s held-out examples.

  ``split`` names them: ``"test"``, or ``"validation"`` when the run holds out part of the
  training set (``validation_fraction > 0``; the test set is then not loaded at all). Each
  process reads only its rows of every batch.
  """
  sharding = sharding_lib.batch_sharding(mesh)
  rows = data_lib.process_rows(sharding, batch_size)
  step = _eval_step_on(mesh)
  totals = None
  for batch in data_lib.test_batches(dataset, batch_size, rows=rows):
    out = step(state, data_lib.make_global_batch(batch, sharding, batch_size))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {
    f"{split}_loss": float(totals["loss"] / totals["n"]),
    f"{split}_accuracy": float(totals["correct"] / totals["n"]),
  }


def _eval_loss(params, batch_stats, apply_fn, images, labels):
  variables = {"params": params}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  return cross_entropy(apply_fn(variables, images, train=False), labels)[0]


def fixed_train_examples(
  dataset: data_lib.Dataset, n: int, mesh: Mesh | None = None
) -> tuple[Any, Any]:
  """The first ``min(n, num_train)`` training examples, normalised and unaugmented.

  The fixed set of the independent λ_max estimate and of ``eig_examples``. With ``mesh``, they
  come back as global arrays replicated on it (every process passes the same rows).

  Returns:
    ``(images, labels)``: float images and int32 labels.
  """
  n = min(n, dataset.num_train)
  images = data_lib.normalize(dataset.train_images[:n], dataset.mean, dataset.std)
  labels = dataset.train_labels[:n].astype(np.int32)
  if mesh is not None:
    replicated = sharding_lib.replicated(mesh)
    images, labels = (
      jax.make_array_from_process_local_data(replicated, x) for x in (images, labels)
    )
  return images, labels


def fixed_examples_grad_fn(state: training.TrainState, images: Any, labels: Any):
  """``params -> grads`` of the eval-mode loss on a fixed set (``eig_examples``'s ``eig_grad_fn``).

  BatchNorm uses the running averages in ``state.batch_stats`` (before the step's update), as
  the minibatch ``eig_grad_fn`` of :func:`xsam_jax.training.linen_grad_fns` does.
  """
  return jax.grad(lambda p: _eval_loss(p, state.batch_stats, state.apply_fn, images, labels))


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _eval_hvp(params, batch_stats, apply_fn, images, labels, v):
  grad_fn = jax.grad(lambda p: _eval_loss(p, batch_stats, apply_fn, images, labels))
  return hessian.hvp(grad_fn, params, v)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_iters"))
def _lambda_max_compiled(params, batch_stats, apply_fn, images, labels, key, num_iters):
  grad_fn = jax.grad(lambda p: _eval_loss(p, batch_stats, apply_fn, images, labels))
  return hessian.top_eigenvalue(grad_fn, params, key, num_iters=num_iters)


def lambda_max(state, dataset: data_lib.Dataset, config: TrainConfig) -> float:
  """Independent lambda_max estimate (Lanczos, eval-mode loss) on a fixed training subset.

  It does not read the optimizer's cached eigenvalue, so it can check it. On XLA:CPU the
  Lanczos loop runs on the host around one jitted HVP (HVPs inside a compiled loop run ~35x
  slower there, and an unrolled program takes ~45 s to compile); elsewhere it is one program.
  """
  shardings = {x.sharding for x in jax.tree.leaves(state.params)}
  # The same examples on every device, as global arrays of the parameters' mesh.
  mesh = next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)
  images, labels = fixed_train_examples(dataset, config.lambda_max_examples, mesh)
  key = jax.random.key(config.seed + 2)
  args = (state.params, state.batch_stats, state.apply_fn, images, labels)
  if jax.default_backend() != "cpu":
    return float(_lambda_max_compiled(*args, key, config.lambda_max_iters))
  num_iters = min(config.lambda_max_iters, count_params(state.params))
  v0 = optax.tree.random_like(key, state.params, jax.random.normal)
  eigvals, _ = hessian.top_k_eigenpairs(
    lambda v: _eval_hvp(*args, v), v0, 1, num_iters=num_iters, unroll=True
  )
  return float(eigvals[0])


# --------------------------------------------------------------------------------------------
# Run directory: config, metrics, checkpoints.


class RunDir:
  """The files of one run in ``workdir``; never overwrites another run's work.

  In a multi-process run every process checks the directory (read-only) at construction; after
  all agreed (``open_now=False``, then :meth:`open`), process 0 alone writes ``config.json``,
  metrics and TensorBoard, and every process takes part in the orbax checkpoints.
  """

  def __init__(
    self, workdir: Path, config: TrainConfig, tensorboard: bool, *, open_now: bool = True
  ):
    self.path = workdir
    self.config = config
    self.primary = distributed.is_primary()
    self._tensorboard = tensorboard and self.primary
    self._tb = None  # opened at the first record, so a failed resume writes nothing
    self.manager = None
    self._has_config = self._check_config()
    if open_now:
      self.open()

  def open(self) -> None:
    """Writes ``config.json`` (process 0) and opens the checkpoint managers (every process).

    Raises:
      OSError: in every process, if process 0 cannot create the directory or write there.
    """
    error = None
    if self.primary:
      try:
        self.path.mkdir(parents=True, exist_ok=True)
        if not self._has_config:
          (self.path / CONFIG_FILE).write_text(self.config.to_json())
      except OSError as exc:
        error = OSError(f"--workdir {self.path}: cannot write the run there ({exc})")
    distributed.agree(error)  # every process waits here, and stops if process 0 could not write
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
      (self.path / CHECKPOINT_DIR).absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )
    self.preempted = ocp.CheckpointManager(
      (self.path / PREEMPTED_DIR).absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False),
    )

  def _check_config(self) -> bool:
    """Raises unless ``workdir`` is new, empty or holds this config; True if it holds it."""
    if self.path.exists() and not self.path.is_dir():
      raise ValueError(
        f"--workdir {self.path} is a file, not a directory. Nothing was changed there; choose "
        "a new or empty directory."
      )
    config_path = self.path / CONFIG_FILE
    if config_path.exists():
      differ = config_differences(self.config, json.loads(config_path.read_text()))
      if differ:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
          f"--workdir {self.path} holds a run with another config ({details}). Nothing was "
          "changed there. Use a new --workdir, or the same config to resume that run."
        )
      return True
    leftovers = [p.name for p in self.path.iterdir()] if self.path.is_dir() else []
    if leftovers:
      raise ValueError(
        f"--workdir {self.path} is not empty ({', '.join(sorted(leftovers))}) and has no "
        f"{CONFIG_FILE}. Nothing was changed there; choose an empty or new --workdir."
      )
    return False

  def latest_epoch(self) -> int | None:
    return self.manager.latest_step()

  def last_epoch_record(self) -> dict[str, Any]:
    """The last ``kind == "epoch"`` record of ``metrics.jsonl`` ({} if none)."""
    path = self.path / METRICS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    return next((r for r in reversed(records) if r.get("kind") == "epoch"), {})

  def restore(self, state: training.TrainState, epoch: int) -> training.TrainState:
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    try:
      return self.manager.restore(epoch, args=self._ocp.args.StandardRestore(abstract))
    except Exception as exc:
      raise RuntimeError(
        f"the checkpoint of epoch {epoch} in {self.path / CHECKPOINT_DIR} could not be read "
        f"({type(exc).__name__}: {exc}). It was left untouched: move it away to restart from "
        "an earlier checkpoint, or use a new --workdir."
      ) from exc

  def save(self, state: training.TrainState, epoch: int) -> None:
    self.manager.save(epoch, args=self._ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()

  def save_preempted(self, state: training.TrainState, progress: dict[str, Any]) -> None:
    """Saves the state within an epoch, with ``progress`` (``step``, ``epoch``, sums so far)."""
    ocp = self._ocp
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
    )
    self.preempted.save(progress["step"], args=args, force=True)
    self.preempted.wait_until_finished()

  def restore_preempted(
    self, state: training.TrainState, after_step: int
  ) -> tuple[training.TrainState, dict[str, Any]] | None:
    """The state and progress saved at a preemption later than ``after_step``, or None."""
    step = self.preempted.latest_step()
    if step is None or step <= after_step:
      return None
    ocp = self._ocp
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()
    )
    try:
      restored = self.preempted.restore(step, args=args)
    except Exception as exc:
      raise RuntimeError(
        f"the checkpoint of step {step} in {self.path / PREEMPTED_DIR} could not be read "
        f"({type(exc).__name__}: {exc}). It was left untouched: move it away to restart from "
        "the last epoch's checkpoint, or use a new --workdir."
      ) from exc
    return restored["state"], restored["progress"]

  def log(self, record: dict[str, Any]) -> None:
    """Appends a record to ``metrics.jsonl`` and TensorBoard (process 0 only)."""
    if not self.primary:
      return
    with open(self.path / METRICS_FILE, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tensorboard and self._tb is None:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(self.path / "tb"))
    if self._tb is not None:
      step = record.get("step", 0)
      prefix = "epoch" if record.get("kind") == "epoch" else "step"
      for k, v in record.items():
        if isinstance(v, float | int) and k not in ("step", "epoch"):
          self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def write_summary(self, summary: dict[str, Any]) -> None:
    if self.primary:
      (self.path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))

  def close(self) -> None:
    if self.manager is not None:
      self.manager.close()
      self.preempted.close()
    if self._tb is not None:
      self._tb.close()


# --------------------------------------------------------------------------------------------
# The loop.


def _batch_split_error(config: TrainConfig, mesh: Mesh) -> str | None:
  """Why ``config.batch_size`` cannot be split evenly over the devices and processes, or None."""
  devices, processes = mesh.devices.size, jax.process_count()
  if config.batch_size % devices == 0:
    return None
  if processes == 1:
    return (
      f"batch_size {config.batch_size} is not divisible by the device count {devices}; use a "
      f"multiple of {devices}"
    )
  return (
    f"batch_size {config.batch_size} is not divisible by the device count {devices} of the "
    f"{processes} processes ({jax.local_device_count()} devices each): every process must "
    f"feed the same whole number of rows to each of its devices; use a multiple of {devices}"
  )


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped as asked)
  """A run stopped by ``SIGTERM`` after saving its state; the same command resumes it exactly.

  Attributes:
    step: training steps done (the checkpoint's step).
    epoch: the epoch (0-based) the run stopped in.
    workdir: the run directory.
  """

  def __init__(self, step: int, epoch: int, workdir: str | Path):
    super().__init__(step, epoch, workdir)
    self.step, self.epoch, self.workdir = step, epoch, workdir

  def __str__(self) -> str:
    return (
      f"preempted at step {self.step} (in epoch {self.epoch + 1}), checkpoint saved in "
      f"{Path(self.workdir) / PREEMPTED_DIR}; rerun the same command to resume"
    )


def eval_split(config: TrainConfig) -> str:
  """The split a run evaluates on: ``"validation"`` with ``validation_fraction > 0``, else
  ``"test"``; its metrics are ``{split}_accuracy`` and ``{split}_loss``."""
  return "validation" if config.validation_fraction > 0 else "test"


def train(config: TrainConfig, workdir: str | Path, *, max_epochs_this_run: int | None = None):
  """Trains (or resumes) one run; returns ``(summary, state)``, the summary also in summary.json.

  The summary is None when the run stopped early (``max_epochs_this_run``). A finished run
  returns its summary without training; if it was killed after its last checkpoint but before
  writing ``summary.json``, the rerun computes the summary from that checkpoint.

  In a multi-process run every process calls this with the same config: they first check that
  they agree (same config, a batch that splits over every device, a usable ``workdir``) and all
  stop with the same error, before anything is written, if one of them cannot go on.

  A ``SIGTERM`` (a ``kill``, a SLURM or TPU preemption) stops the run after the step at which
  every process learnt of it: the state and the epoch's running sums are saved in
  ``workdir/preempted`` and :class:`Preempted` is raised; the same call then resumes at that
  step, and the run ends with the parameters and summary of an uninterrupted run.

  Raises:
    Preempted: after saving, when the run was asked to stop.
  """
  with distributed.PreemptionWatch() as watch:  # SIGTERM: save and stop at the next step
    return _train(config, workdir, max_epochs_this_run, watch)


def _train(config, workdir, max_epochs_this_run, watch: distributed.PreemptionWatch):
  start_time = time.time()
  distributed.check_same_config(json.loads(config.to_json()), ignore=PER_PROCESS)
  error: Exception | None = None
  try:
    run = RunDir(Path(workdir), config, config.tensorboard, open_now=False)
    dataset = data_lib.load_dataset(
      config.dataset,
      data_dir=config.data_dir,
      label_noise=config.label_noise,
      seed=config.seed,
      train_examples=config.train_examples,
      validation_fraction=config.validation_fraction,
    )
    mesh = sharding_lib.make_mesh(config.mesh)
    if (message := _batch_split_error(config, mesh)) is not None:
      raise ValueError(message)
    steps_per_epoch = data_lib.steps_per_epoch(dataset.num_train, config.batch_size)
    if steps_per_epoch < 1:
      raise ValueError(
        f"`batch_size` {config.batch_size} exceeds the {dataset.num_train} training examples "
        f"of {config.dataset}; use a smaller batch_size."
      )
  except Exception as exc:  # any setup error in any process stops every process (none waits)
    error = exc
  distributed.agree(error)  # every process stops here if any of them cannot go on
  spec = build_optimizer(config, steps_per_epoch)
  state, state_sharding = init_state(config, dataset, spec, mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  rows = data_lib.process_rows(batch_sharding, config.batch_size)
  if jax.process_count() > 1:
    print(
      f"[{distributed.tag()}] {jax.local_device_count()} of {jax.device_count()} devices, mesh "
      f"{sharding_lib.describe(mesh)}, reading rows {rows.start}:{rows.stop} of every batch of "
      f"{config.batch_size}",
      file=sys.stderr,
      flush=True,
    )
  run.open()
  start_epoch = run.latest_epoch() or 0
  summary_path = Path(workdir) / SUMMARY_FILE
  static = spec.tracks_eigvec and use_static_refresh(config)
  static_ascent = use_static_ascent(config, spec)
  split = eval_split(config)
  eig_used = None  # the size of the fixed set of the eigenvector's HVPs (eig_examples)
  if spec.tracks_eigvec and config.eig_examples:
    eig_used = min(config.eig_examples, dataset.num_train)
  if start_epoch >= config.epochs:
    state = run.restore(state, start_epoch)
    if summary_path.exists():
      summary = json.loads(summary_path.read_text())
    else:
      # Killed after the last checkpoint but before the summary: finish it from that
      # checkpoint (evaluation and lambda_max are deterministic) without training again.
      record = {
        **run.last_epoch_record(),
        **evaluate(state, dataset, config.batch_size, mesh, split),
      }
      lam = lambda_max(state, dataset, config)
      summary = _summary(config, spec, static, state, record, lam, start_time, 0.0, mesh, eig_used)
      run.write_summary(summary)
    run.close()
    return summary, state
  first_step, first_sums = 0, {}  # where in start_epoch to begin, and its sums so far
  preempted = run.restore_preempted(state, start_epoch * steps_per_epoch)
  if preempted is not None:  # stopped by SIGTERM within an epoch after the last checkpoint
    state, saved = preempted
    start_epoch, first_step = saved["epoch"], saved["step"] - saved["epoch"] * steps_per_epoch
    first_sums = {k: jnp.asarray(v, saved["dtypes"][k]) for k, v in saved["sums"].items()}
    run.log({"kind": "resume", "epoch": start_epoch, "step": saved["step"]})
  elif start_epoch:
    state = run.restore(state, start_epoch)
    run.log({"kind": "resume", "epoch": start_epoch, "step": start_epoch * steps_per_epoch})
  eig_batch = None
  if spec.tracks_eigvec and config.eig_examples:
    eig_batch = fixed_train_examples(dataset, config.eig_examples, mesh)
  train_step = make_train_step(config, spec, state_sharding, batch_sharding, eig_batch)
  total_steps = config.epochs * steps_per_epoch
  progress = _progress(config, total_steps, start_epoch * steps_per_epoch + first_step)
  stop_epoch = config.epochs
  if max_epochs_this_run is not None:
    stop_epoch = min(stop_epoch, start_epoch + max_epochs_this_run)
  record: dict[str, Any] = {}
  lam = float("nan")
  train_seconds = 0.0
  saddle_warned = False
  for epoch in range(start_epoch, stop_epoch):
    epoch_start = time.time()
    first = first_step if epoch == start_epoch else 0
    sums: dict[str, jax.Array] = first_sums if epoch == start_epoch else {}
    batches = data_lib.train_batches(
      dataset,
      config.batch_size,
      config.seed,
      epoch,
      augment=config.augment,
      start_step=first,
      rows=rows,
    )
    for i, local_batch in enumerate(batches, start=first):
      step = epoch * steps_per_epoch + i
      refresh = is_due(step, spec.refresh_every) if static else None
      ascend = ascent_due(step, **spec.ascent_policy) if static_ascent else None
      batch = data_lib.make_global_batch(local_batch, batch_sharding, config.batch_size)
      state, metrics = train_step(state, batch, refresh=refresh, ascend=ascend)
      sums = metrics if not sums else jax.tree.map(jnp.add, sums, metrics)
      if step % config.log_every == 0:
        step_record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        run.log({"kind": "step", "step": step, "epoch": epoch, **step_record})
        if progress is not None:
          progress.set_postfix({k: f"{v:.3g}" for k, v in step_record.items()}, refresh=False)
      if progress is not None:
        progress.update(1)
      if watch.reached(step + 1):
        _stop_preempted(run, state, sums, step + 1, epoch, progress)
        raise Preempted(step + 1, epoch, workdir)
    epoch_means = {
      f"train_{k}": float(v) / steps_per_epoch for k, v in jax.device_get(sums).items()
    }
    epoch_seconds = time.time() - epoch_start
    train_seconds += epoch_seconds
    record = {
      "kind": "epoch",
      "epoch": epoch + 1,
      "step": (epoch + 1) * steps_per_epoch,
      "epoch_seconds": epoch_seconds,
      **epoch_means,
      # Since the start of the run, counted from the optimizer state (read here, not in a step).
      **gradient_evaluations(state.step, state.opt_state, spec.refresh_every),
    }
    record["stuck_at_initial_saddle"] = _initial_saddle(
      config, dataset.num_classes, record, progress, warned=saddle_warned
    )
    saddle_warned |= record["stuck_at_initial_saddle"]
    last = epoch + 1 == config.epochs
    if (epoch + 1) % config.eval_every == 0 or last:
      record.update(evaluate(state, dataset, config.batch_size, mesh, split))
    if last or (config.lambda_max_every and (epoch + 1) % config.lambda_max_every == 0):
      lam = lambda_max(state, dataset, config)
      record["lambda_max"] = lam
    run.log(record)
    if progress is not None:
      postfix = {
        k: f"{record[k]:.3g}"
        for k in ("train_loss", f"{split}_accuracy", "lambda_max")
        if k in record
      }
      if record["stuck_at_initial_saddle"]:
        postfix["saddle"] = "STUCK (loss = ln C): " + saddle.remedy(
          config.optimizer, config.epochs, config.rho_warmup_epochs
        )
      progress.set_postfix(postfix, refresh=True)
    if (epoch + 1) % config.checkpoint_every == 0 or last or epoch + 1 == stop_epoch:
      run.save(state, epoch + 1)
  if progress is not None:
    progress.close()
  summary = None
  if stop_epoch == config.epochs and record:
    summary = _summary(
      config, spec, static, state, record, lam, start_time, train_seconds, mesh, eig_used
    )
    run.write_summary(summary)
  run.close()
  return summary, state


def _stop_preempted(run: RunDir, state, sums, step: int, epoch: int, progress) -> None:
  """Saves the state and the epoch's running sums at ``step`` and closes the run's files."""
  sums = jax.device_get(sums)
  run.save_preempted(
    state,
    {
      "step": step,
      "epoch": epoch,
      "sums": {k: float(v) for k, v in sums.items()},  # exact: float32/float64 -> double
      "dtypes": {k: str(np.asarray(v).dtype) for k, v in sums.items()},
    },
  )
  run.log({"kind": "preempted", "epoch": epoch, "step": step})
  if progress is not None:
    progress.close()
  run.close()


def _summary(
  config: TrainConfig,
  spec: OptimizerSpec,
  static: bool,
  state: training.TrainState,
  record: dict[str, Any],
  lam: float,
  start_time: float,
  train_seconds: float,
  mesh: Mesh,
  eig_examples: int | None = None,
) -> dict[str, Any]:
  """The ``summary.json`` of a finished run from its last epoch ``record`` and lambda_max.

  ``eig_examples``: the size of the fixed set of the eigenvector's HVPs (None: minibatches).
  The gradient evaluations are counted from the final state
  (:func:`experiments.optimizers.gradient_evaluations`), over the whole run, resumed parts
  included.
  """
  counts = gradient_evaluations(state.step, state.opt_state, spec.refresh_every)
  steps = int(jax.device_get(state.step))
  return {
    "dataset": config.dataset,
    "model": config.model,
    "optimizer": config.optimizer,
    "label_noise": config.label_noise,
    "epochs": config.epochs,
    # The held-out split's metrics under its own name (test_* or validation_*).
    "eval_split": eval_split(config),
    **{
      f"{eval_split(config)}_{k}": record.get(f"{eval_split(config)}_{k}")
      for k in ("accuracy", "loss")
    },
    "final_lambda_max": lam,
    "final_train_loss": record.get("train_loss"),
    # The last epoch still on the initial saddle (experiments.saddle), and what to change.
    "stuck_at_initial_saddle": bool(record.get("stuck_at_initial_saddle", False)),
    "initial_saddle_remedy": (
      saddle.remedy(config.optimizer, config.epochs, config.rho_warmup_epochs)
      if record.get("stuck_at_initial_saddle")
      else None
    ),
    "num_params": count_params(state.params),
    "wall_seconds_this_run": time.time() - start_time,
    "train_seconds_this_run": train_seconds,
    "refresh_path": ("static" if static else "cond") if spec.tracks_eigvec else None,
    "refresh_every": spec.refresh_every if spec.tracks_eigvec else None,
    # sam_every/rst/looksam: whether the ascent was decided on the host (xsam_jax.ascent_due).
    "ascent_path": (
      ("static" if use_static_ascent(config, spec) else "cond")
      if spec.ascent_policy is not None
      else None
    ),
    # The fixed set of the eigenvector's HVPs (None: each step's minibatch).
    "eig_examples": eig_examples,
    # Gradient evaluations of the run, counted (not assumed): clean + ascent gradients + HVPs
    # (one HVP counted as one evaluation; with eig_examples an HVP is on that fixed set).
    "steps": steps,
    **counts,
    "grad_evals_per_step": counts["grad_evals"] / max(steps, 1),
    "backend": jax.default_backend(),
    "devices": jax.device_count(),
    "processes": jax.process_count(),
    "mesh": sharding_lib.describe(mesh),
  }


def _initial_saddle(
  config: TrainConfig, num_classes: int, record: dict[str, Any], progress, *, warned: bool
) -> bool:
  """:func:`experiments.saddle.at_initial_saddle` for an epoch ``record``; warns once per run.

  The warning (with the remedy) goes to the progress bar, or to stderr without one, in
  process 0 only.
  """
  stuck = saddle.at_initial_saddle(
    record["epoch"], record["train_loss"], record["train_accuracy"], num_classes
  )
  if stuck and not warned and distributed.is_primary():
    advice = saddle.remedy(config.optimizer, config.epochs, config.rho_warmup_epochs)
    text = "warning: " + saddle.message(record["epoch"], record["train_loss"], num_classes, advice)
    if progress is not None:
      progress.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)
  return stuck


def _progress(config: TrainConfig, total: int, initial: int):
  """A tqdm bar in process 0 (its label says ``process 0 of n`` in a multi-process run)."""
  if not config.progress or not distributed.is_primary():
    return None
  from tqdm.auto import tqdm

  desc = config.optimizer
  if jax.process_count() > 1:
    desc = f"{desc} [{distributed.tag()}]"
  return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=True)


def _mesh_flag(text: str) -> str:
  """``--mesh``'s syntax, checked by argparse (an error names the flag)."""
  try:
    sharding_lib.parse_mesh(text)
  except ValueError as exc:
    raise argparse.ArgumentTypeError(str(exc)) from exc
  return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.train", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument(
    "--config",
    default="experiments/configs/digits_simple_cnn.py:xsam",
    help="path/to/config.py[:OPTIMIZER] (default: the offline digits demo with X-SAM)",
  )
  parser.add_argument("--workdir", default=None, help="run directory (default: runs/<name>)")
  parser.add_argument(
    "--set",
    dest="overrides",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="override a config field, e.g. --set epochs=2 --set rho=0.1 (repeatable)",
  )
  parser.add_argument(
    "--max_epochs_this_run",
    type=int,
    default=None,
    help="stop cleanly (after checkpointing) once this many epochs ran in this invocation",
  )
  parser.add_argument(
    "--mesh",
    type=_mesh_flag,
    default=None,
    metavar="data=N,model=M",
    help="device mesh over all processes (same as --set mesh=...): the batch is split over "
    "all N*M devices and large weights over the M of `model` (default: data=<all devices>)",
  )
  scale = parser.add_argument_group(
    "multi-process (JAX distributed runtime; see README 'Scaling out')",
    "Start the same command once per process. On a cluster that JAX detects (SLURM, Open MPI, "
    "Cloud TPU pods, Kubernetes, or JAX_COORDINATOR_ADDRESS set) nothing else is needed; "
    "--distributed forces the detection.",
  )
  scale.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
  scale.add_argument("--num_processes", type=int, default=None, help="processes in the run")
  scale.add_argument("--process_id", type=int, default=None, help="this process, in [0, N)")
  scale.add_argument(
    "--distributed", action="store_true", help="join the job the cluster environment describes"
  )
  scale.add_argument(
    "--init_timeout",
    type=int,
    default=distributed.DEFAULT_TIMEOUT_S,
    metavar="SECONDS",
    help="give up (with an error) if the coordinator or the other processes do not answer",
  )
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  overrides = list(args.overrides)
  if args.mesh is not None:
    overrides.append(f"mesh={args.mesh}")
  try:
    config = load_config(args.config, overrides)
    distributed.initialize(
      args.coordinator,
      args.num_processes,
      args.process_id,
      auto=args.distributed,
      timeout_s=args.init_timeout,
    )
  except (ValueError, distributed.CoordinatorUnreachableError) as exc:
    print(f"error: {exc}", file=sys.stderr)
    return 2
  workdir = args.workdir
  if workdir is None:
    stem = Path(args.config.partition(":")[0]).stem
    workdir = Path("runs") / f"{stem}_{config.optimizer}"
  try:
    summary, _ = train(config, workdir, max_epochs_this_run=args.max_epochs_this_run)
  except Preempted as exc:
    print(f"[{distributed.tag()}] {exc}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED
  except (ValueError, RuntimeError, OSError) as exc:
    print(f"error: {exc}", file=sys.stderr)
    return 2
  if summary is not None:
    print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
