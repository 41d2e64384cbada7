"""Model zoo for the experiments (Flax Linen): CIFAR ResNets, WRN-28-10, AlexNet, SimpleCNN.

Every model maps NHWC float images to float32 logits ``(batch, num_classes)`` (float64 for a
float64 computation dtype) through ``model.apply(variables, x, train=...)``; models with
BatchNorm keep running statistics in the ``batch_stats`` collection (pass
``mutable=["batch_stats"]`` when ``train=True``), and models with
dropout need a ``'dropout'`` rng when training with a positive rate.

Example:
  >>> import jax
  >>> from experiments.models import count_params, get_model, init_model
  >>> model = get_model("simple_cnn", num_classes=10)
  >>> params, batch_stats = init_model(model, (1, 8, 8, 1), jax.random.key(0))
  >>> count_params(params)
  99178
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.alexnet import AlexNet
from experiments.models.resnet import BasicBlock, Bottleneck, ResNet, ResNet18, ResNet34, ResNet50
from experiments.models.simple_cnn import SimpleCNN
from experiments.models.wide_resnet import WideBlock, WideResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
  "resnet18": ResNet18,
  "resnet34": ResNet34,
  "resnet50": ResNet50,
  "wrn28_10": functools.partial(WideResNet, depth=28, widen_factor=10),
  "alexnet": AlexNet,
  "simple_cnn": SimpleCNN,
  # The SimpleCNN before issue 9, with PyTorch's default init: reproduces the earlier plateau.
  "simple_cnn_torch_init": functools.partial(SimpleCNN, kernel_init="torch"),
}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Build a model of the zoo by name.

  Args:
    name: one of ``MODELS`` (``resnet18``, ``resnet34``, ``resnet50``, ``wrn28_10``, ``alexnet``,
      ``simple_cnn``).
    num_classes: number of output logits.
    **kwargs: further attributes of the model, e.g. ``dtype=jnp.bfloat16``,
      ``dropout_rate=0.3`` (WRN, AlexNet) or ``use_bn=True`` (SimpleCNN).

  Returns:
    The (unbound) Flax Linen module.

  Raises:
    ValueError: if ``name`` is not in ``MODELS``.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes, **kwargs)


def init_model(
  model: nn.Module, input_shape: Sequence[int], key: jax.Array
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Initialise a model on a zero batch of ``input_shape`` (NHWC) in eval mode.

  Args:
    model: a module of the zoo (any Linen module called as ``model(x, train=...)``).
    input_shape: shape of the example batch, e.g. ``(1, 32, 32, 3)``.
    key: PRNG key for the parameter initialisers.

  Returns:
    ``(params, batch_stats)``; ``batch_stats`` is ``{}`` for models without BatchNorm.
  """
  x = jnp.zeros(tuple(input_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(key, x)
  return variables["params"], variables.get("batch_stats", {})


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (or of ``jax.ShapeDtypeStruct``s)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


__all__ = [
  "MODELS",
  "AlexNet",
  "BasicBlock",
  "Bottleneck",
  "ResNet",
  "ResNet18",
  "ResNet34",
  "ResNet50",
  "SimpleCNN",
  "WideBlock",
  "WideResNet",
  "count_params",
  "get_model",
  "init_model",
]
