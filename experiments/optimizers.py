"""Builds the optax chain of a run from its config: [sharpness method] -> base optimizer."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

import xsam_jax
from experiments.configs.base import TrainConfig


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """The transform of a run and what its training step must feed it.

  Attributes:
    tx: the full optax chain.
    needs_grad_fn: the first link is a sharpness method (pass ``grad_fn``).
    tracks_eigvec: the first link caches a Hessian eigenvector (pass ``eig_grad_fn`` and,
      on the static path, ``refresh``).
    refresh_every: the eigenvector refresh period in steps, as the transform uses it (the
      host-side static path must decide with the same number: ``is_due(step, refresh_every)``).
    mesa_start_step: for ``mesa``/``mesa_adamw``, the first step whose loss has MESA's KL term
      (``mesa_start_epoch`` epochs in); the step must then keep the EMA teacher
      (:class:`xsam_jax.training.MESATrainState`). None for every other optimizer.
    ascent_policy: for the variants whose ascent a host can decide (``sam_every``, ``rst``,
      ``looksam``), the keyword arguments of :func:`xsam_jax.ascent_due` that twin the
      transform's policy (the static ascent path passes ``ascend=ascent_due(step,
      **ascent_policy)``). None for every other optimizer (``ae_sam`` decides in the step).
    esam_fraction: for ``esam`` with ``esam_gamma < 1``, ESAM's data selection: the step's
      ``grad_fn`` takes the second gradient on that share of the batch, the examples whose
      loss rose most (:func:`xsam_jax.training.sharp_examples_grad_fn`). None otherwise.
  """

  tx: optax.GradientTransformationExtraArgs
  needs_grad_fn: bool
  tracks_eigvec: bool
  refresh_every: int
  mesa_start_step: int | None = None
  ascent_policy: dict[str, Any] | None = None
  esam_fraction: float | None = None


# ASAM's official code (SamsungLabs/ASAM, ``asam.py``) applies T_w = |w| + eta only to the
# parameters whose PyTorch name contains 'weight': ``nn.Conv2d``/``nn.Linear`` weights, BatchNorm
# (and LayerNorm) weights, and ``nn.Embedding`` weights. Flax Linen names those leaves:
ASAM_SCALED_LEAVES = ("kernel", "scale", "embedding")


def _leaf_name(path: tuple[Any, ...]) -> str | None:
  """The last key of a pytree path (``'kernel'`` for ``params['conv1']['kernel']``)."""
  if not path:
    return None
  last = path[-1]
  for attr in ("key", "name", "idx"):
    if hasattr(last, attr):
      return str(getattr(last, attr))
  return str(last)


def asam_mask(params: Any) -> Any:
  r"""Which leaves ASAM rescales, as the official code: a pytree of bools shaped like params.

  True on Flax Linen leaves named ``kernel`` (convolution and dense weights), ``scale``
  (BatchNorm/LayerNorm weights) and ``embedding`` (``nn.Embed``): the parameters whose PyTorch
  name contains ``'weight'``, which the official ASAM code rescales by :math:`T_w = |w|+\eta`.
  False elsewhere (``bias``, and parameters declared with ``self.param`` under other names, such
  as a positional embedding), where :math:`T = 1`. A bare array (no name) is rescaled, like the
  library's default. Pass it as ``xsam_jax.sam(adaptive=True, adaptive_mask=asam_mask)``.

  Example:
    >>> import jax.numpy as jnp
    >>> asam_mask({"conv": {"kernel": jnp.ones(3)}, "bn": {"scale": jnp.ones(2),
    ...            "bias": jnp.zeros(2)}})
    {'bn': {'bias': False, 'scale': True}, 'conv': {'kernel': True}}
  """

  def scaled(path: tuple[Any, ...], _: Any) -> bool:
    name = _leaf_name(path)
    return name is None or name in ASAM_SCALED_LEAVES

  return jax.tree_util.tree_map_with_path(scaled, params)


def sharpness_method(
  method: str,
  *,
  rho: float | optax.Schedule,
  alpha: float = 0.2,
  eta: float = 0.01,
  refresh_every: int = 5,
  num_iters: int = 5,
  normalize: bool = True,
  correction: str = "projection",
  key: int = 0,
  solver: str = "power",
  sam_every_k: int = 5,
  sam_prob: float | optax.Schedule = 0.5,
  ae_decay: float = 0.9,
  ae_threshold: float | optax.Schedule = 0.0,
  looksam_k: int = 5,
  looksam_alpha: float = 0.7,
  looksam_adaptive: bool = False,
  esam_beta: float = 0.5,
) -> optax.GradientTransformationExtraArgs | None:
  """The first link of the chain for ``method`` (``sgd``/``adamw``/``mesa``: None, no ascent;
  MESA's term is in the loss, :func:`build_optimizer`'s ``mesa_start_step``).

  ``asam`` rescales only the leaves :func:`asam_mask` selects (weights, not biases), as the
  official ASAM code does. The cheaper SAM variants (issue 21):

  * ``sam_every``: :func:`xsam_jax.sometimes_sam` ``when="every"``, ``k=sam_every_k``
    (:math:`1 + 1/k` gradients per step).
  * ``rst``: ``when="random"``, ``prob=sam_prob``, ``key=key`` (RST, :math:`1 + p`).
  * ``ae_sam``: ``when="adaptive"``, ``decay=ae_decay``, ``threshold=ae_threshold`` (AE-SAM;
    :func:`build_optimizer` passes the linear :math:`c_t` schedule).
  * ``looksam``: :func:`xsam_jax.looksam` with ``k=looksam_k``, ``alpha=looksam_alpha``;
    ``looksam_adaptive`` takes ASAM's neighbourhood on refresh steps (``eta``,
    :func:`asam_mask`), Adaptive LookSAM.
  * ``esam``: ESAM's stochastic weight perturbation (tensors drawn with probability
    ``esam_beta`` from ``key``); its data selection (``esam_gamma < 1``) needs per-example
    losses and lives in the train step (:attr:`OptimizerSpec.esam_fraction`).
  """
  if method in ("sgd", "adamw", "mesa"):
    return None
  if method == "sam":
    return xsam_jax.sam(rho=rho)
  if method == "asam":
    return xsam_jax.sam(rho=rho, adaptive=True, eta=eta, adaptive_mask=asam_mask)
  if method == "sam_every":
    return xsam_jax.sometimes_sam(rho, when="every", k=sam_every_k)
  if method == "rst":
    return xsam_jax.sometimes_sam(rho, when="random", prob=sam_prob, key=key)
  if method == "ae_sam":
    return xsam_jax.sometimes_sam(rho, when="adaptive", decay=ae_decay, threshold=ae_threshold)
  if method == "looksam":
    adaptive = dict(adaptive=True, eta=eta, adaptive_mask=asam_mask) if looksam_adaptive else {}
    return xsam_jax.looksam(rho, k=looksam_k, alpha=looksam_alpha, **adaptive)
  if method == "esam":
    return xsam_jax.esam(rho=rho, beta=esam_beta, key=key)
  eig = dict(
    rho=rho,
    alpha=alpha,
    refresh_every=refresh_every,
    num_iters=num_iters,
    key=key,
    solver=solver,
  )
  if method == "eigen_sam":
    return xsam_jax.eigen_sam(**eig)
  if method == "xsam":
    return xsam_jax.xsam(**eig, normalize=normalize, correction=correction)
  raise ValueError(
    f"unknown sharpness method {method!r}; choose one of sgd, sam, asam, eigen_sam, xsam, "
    "sam_every, rst, ae_sam, looksam, esam, mesa"
  )


def learning_rate(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule over steps.

  ``cosine``: per-step cosine decay to 0 (SAM JAX reference). ``cosine_epoch``: constant within
  epoch ``e``, :math:`\\eta_0 (1 + \\cos(\\pi e / E)) / 2` (torch ``CosineAnnealingLR`` stepped
  per epoch, the Eigen-SAM/X-SAM code). ``constant``.
  """
  total = config.epochs * steps_per_epoch
  if config.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, total)
  if config.lr_schedule == "cosine_epoch":
    return lambda step: (
      config.lr * 0.5 * (1 + jnp.cos(jnp.pi * (step // steps_per_epoch) / config.epochs))
    )
  return optax.constant_schedule(config.lr)


def build_optimizer(config: TrainConfig, steps_per_epoch: int) -> OptimizerSpec:
  """``optax.chain(sharpness method?, base optimizer)`` for ``config.optimizer``.

  SGD family: ``add_decayed_weights(wd)`` then ``sgd(lr, momentum)`` (torch's coupled weight
  decay, as in the papers' code). AdamW family: ``optax.adamw`` (decoupled decay). The
  sharpness method always comes first, so it sees the raw minibatch gradient. The method is
  the name without ``_adamw`` (``looksam_adamw``: :func:`xsam_jax.looksam` then AdamW); its
  hyperparameters are the config fields of :func:`sharpness_method`'s arguments. ``mesa`` is the
  base optimizer alone; its KL term is added to the loss from ``mesa_start_step`` on.
  """
  schedule = learning_rate(config, steps_per_epoch)
  adamw = config.optimizer.endswith("adamw")
  method = config.optimizer.removesuffix("_adamw") if adamw else config.optimizer
  method = "adamw" if method == "adamw" else method
  refresh_every = steps_per_epoch if config.refresh_once_per_epoch else config.refresh_every
  if adamw:
    base = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  else:
    base = optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    )
  rho: float | optax.Schedule = config.rho
  if config.rho_warmup_epochs > 0:  # linear from 0 to rho, then constant
    rho = optax.linear_schedule(0.0, config.rho, round(config.rho_warmup_epochs * steps_per_epoch))
  sharp = sharpness_method(
    method,
    rho=rho,
    alpha=config.alpha,
    eta=config.eta,
    refresh_every=refresh_every,
    num_iters=config.power_iters,
    normalize=config.normalize,
    correction=config.correction,
    key=config.seed,
    solver=config.tracker,
    sam_every_k=config.sam_every_k,
    sam_prob=config.sam_prob,
    ae_decay=config.ae_decay,
    # AE-SAM's c_t, linear from lambda_1 to lambda_2 over the run (Jiang et al., Algorithm 1).
    ae_threshold=optax.linear_schedule(
      config.ae_threshold_start, config.ae_threshold_end, config.epochs * steps_per_epoch
    ),
    looksam_k=config.looksam_k,
    looksam_alpha=config.looksam_alpha,
    looksam_adaptive=config.looksam_adaptive,
    esam_beta=config.esam_beta,
  )
  tx = base if sharp is None else optax.chain(sharp, base)
  policies = {
    "sam_every": {"when": "every", "k": config.sam_every_k},
    "rst": {"when": "random", "prob": config.sam_prob, "key": config.seed},
    "looksam": {"when": "every", "k": config.looksam_k},
  }
  return OptimizerSpec(
    tx=tx,
    needs_grad_fn=sharp is not None,
    tracks_eigvec=method in ("eigen_sam", "xsam"),
    refresh_every=refresh_every,
    mesa_start_step=config.mesa_start_epoch * steps_per_epoch if method == "mesa" else None,
    ascent_policy=policies.get(method),
    esam_fraction=config.esam_gamma if method == "esam" and config.esam_gamma < 1 else None,
  )


def _is_sharpness_state(node: Any) -> bool:
  return isinstance(node, tuple) and "perturbation_norm" in getattr(node, "_fields", ())


def sharpness_state(opt_state: Any) -> Any | None:
  """The state of the chain's sharpness method: the first NamedTuple with ``perturbation_norm``.

  Every sharpness transform of the library (``SAMState``, ``EigenSAMState``, ``XSAMState``,
  ``SometimesSAMState``, ``LookSAMState``) has that field and the base optimizers' states do
  not, so it is found wherever the chain (or a wrapper such as ``optax.apply_if_finite``) puts
  it. None for a chain without one (SGD, AdamW).

  Example:
    >>> import jax.numpy as jnp, optax, xsam_jax
    >>> tx = optax.chain(xsam_jax.looksam(0.05), optax.sgd(0.1))
    >>> type(sharpness_state(tx.init(jnp.ones(2)))).__name__
    'LookSAMState'
  """
  nodes = jax.tree.leaves(opt_state, is_leaf=_is_sharpness_state)
  return next((n for n in nodes if _is_sharpness_state(n)), None)


def gradient_evaluations(steps: int, opt_state: Any, refresh_every: int) -> dict[str, int]:
  r"""The gradient evaluations a run made, counted from its optimizer state (host values).

  * ``grad_evals_clean``: one minibatch gradient per step, ``steps``.
  * ``grad_evals_ascent``: the second gradient at :math:`w + \epsilon`: the state's
    ``ascent_steps`` where it has one (:func:`xsam_jax.sometimes_sam`, :func:`xsam_jax.looksam`:
    the steps that really ascended), else its ``count`` (SAM, ASAM, Eigen-SAM, X-SAM ascend on
    every ``update`` call).
  * ``hvps``: Eigen-SAM/X-SAM: ``num_iters`` Hessian-vector products per refresh (0 with
    ``solver="random"``), the refreshes being the ``update`` calls :math:`t < \mathrm{count}`
    with :math:`t \bmod p = 0` (:func:`xsam_jax.is_due`, the rule of both refresh paths); the
    solver and ``num_iters`` are read from the state's ``settings``.
  * ``grad_evals``: the sum, one HVP counted as one gradient evaluation (an exact HVP costs
    ~1.5-3x a gradient in wall time: ``benchmarks/RESULTS.md``).

  Read it between steps (at epoch end): it converts device scalars to Python ints, a host sync.

  Args:
    steps: the optimizer steps taken (``TrainState.step``).
    opt_state: the chain's state.
    refresh_every: the eigenvector refresh period :math:`p` the transform uses.

  Returns:
    ``{"grad_evals_clean", "grad_evals_ascent", "hvps", "grad_evals"}``, Python ints.

  Example:
    >>> import jax.numpy as jnp, optax, xsam_jax
    >>> tx = optax.chain(xsam_jax.sometimes_sam(0.05, when="every", k=2), optax.sgd(0.1))
    >>> w, state = jnp.ones(2), tx.init(jnp.ones(2))
    >>> for _ in range(3):  # ascends on steps 0 and 2
    ...   _, state = tx.update(w, state, w, grad_fn=lambda p: p)
    >>> gradient_evaluations(3, state, refresh_every=1)["grad_evals"]
    5
  """
  sharp = sharpness_state(opt_state)
  ascent = hvps = 0
  if sharp is not None:
    calls = int(jax.device_get(sharp.count))
    field = "ascent_steps" if "ascent_steps" in sharp._fields else "count"
    ascent = int(jax.device_get(getattr(sharp, field)))
    settings = getattr(sharp, "settings", None)
    if "eigvec" in sharp._fields and settings is not None and settings.solver != "random":
      hvps = -(-calls // refresh_every) * settings.num_iters  # ceil(calls / p) refreshes
  steps = int(steps)
  return {
    "grad_evals_clean": steps,
    "grad_evals_ascent": ascent,
    "hvps": hvps,
    "grad_evals": steps + ascent + hvps,
  }
