"""Pieces shared by the model zoo: initialisers and the BatchNorm the papers' code uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

# PyTorch's default for `nn.Conv2d` and `nn.Linear` weights: kaiming_uniform(a=sqrt(5)), that is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1/(3 fan_in). The reference models (kuangliu
# ResNets, the CIFAR AlexNet) rely on it, so the ports start from the same distribution.
# Biases start at zero here (PyTorch draws them from the same interval; with BN it is moot).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# LeCun normal, variance 1/fan_in (Flax's default for Dense and Conv). The SimpleCNN default:
# see `experiments.models.simple_cnn` for why it replaced PyTorch's default there.
lecun_normal = nn.initializers.lecun_normal()

# Kaiming normal, fan_out, as `WideResNet-pytorch` initialises its convolutions.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Dtype, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5).

  Args:
    train: use batch statistics and update the running ones when True.
    dtype: computation dtype; parameters and running statistics stay float32.
    name: optional submodule name.

  Returns:
    An ``nn.BatchNorm`` to call on an NHWC or NC array.
  """
  return nn.BatchNorm(
    use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
  )


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding of ``kernel_size // 2`` per side, as PyTorch's ``padding=k//2``.

  Flax's ``'SAME'`` pads asymmetrically for stride 2 (0 before, 1 after on 32x32), which shifts the
  sampling grid by one pixel relative to the PyTorch references; explicit padding does not.
  """
  p = kernel_size // 2
  return ((p, p), (p, p))


def logits(x: jnp.ndarray) -> jnp.ndarray:
  """Return the head output in float32 (float64 for a float64 model), for a stable loss."""
  return jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))


def conv(
  features: int,
  kernel_size: int,
  stride: int,
  dtype: Dtype,
  name: str,
  kernel_init: Callable[..., jnp.ndarray] | None = None,
) -> nn.Conv:
  """A bias-free square convolution with PyTorch's symmetric padding (ResNet and WRN layers)."""
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(stride, stride),
    padding=torch_padding(kernel_size),
    use_bias=False,
    kernel_init=kernel_init or torch_default_kernel_init,
    dtype=dtype,
    name=name,
  )
