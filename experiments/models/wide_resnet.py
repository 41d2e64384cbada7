"""Wide ResNet (WRN-d-k) with pre-activation blocks, as used for SAM's and Eigen-SAM's tables.

WRN-28-10: a 3x3 stem convolution to 16 channels, three groups of (28 - 4) / 6 = 4 blocks with
widths 16k, 32k, 64k = 160, 320, 640 (stride 1, 2, 2), a final BN-ReLU, global average pool and
a Dense head. A block is BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut; when the
width or stride changes, the shortcut is a 1x1 convolution of the *pre-activated* input (as in
the reference code), otherwise the identity. Convolutions have no bias.

Parameter count for WRN-28-10 on CIFAR-10 (``params`` only): 36,479,194, identical to the PyTorch
reference ``WideResNet(28, 10, widen_factor=10)``.

References:
  Zagoruyko, Komodakis. Wide Residual Networks. BMVC 2016, arXiv 1605.07146.
  xternalz/WideResNet-pytorch ``wideresnet.py`` (block layout, shortcut and initialisation).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from experiments.models._common import (
  Dtype,
  batch_norm,
  conv,
  kaiming_normal_fan_out,
  logits,
  torch_default_kernel_init,
)


def _conv(features: int, kernel_size: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
  return conv(features, kernel_size, stride, dtype, name, kaiming_normal_fan_out)


class WideBlock(nn.Module):
  """Pre-activation residual block: BN-ReLU-conv-BN-ReLU-dropout-conv, plus a shortcut.

  Attributes:
    features: output channels.
    stride: stride of the first convolution (and of the projection shortcut).
    dropout_rate: dropout between the two convolutions; uses the ``'dropout'`` rng when training.
    dtype: computation dtype.
  """

  features: int
  stride: int = 1
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    preact = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    out = _conv(self.features, 3, self.stride, self.dtype, "conv1")(preact)
    out = nn.relu(batch_norm(train, self.dtype, "bn2")(out))
    out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
    out = _conv(self.features, 3, 1, self.dtype, "conv2")(out)
    if self.stride == 1 and x.shape[-1] == self.features:
      shortcut = x
    else:
      shortcut = _conv(self.features, 1, self.stride, self.dtype, "shortcut")(preact)
    return out + shortcut


class WideResNet(nn.Module):
  """WRN-depth-widen_factor for 32x32 inputs.

  Attributes:
    depth: total depth; ``(depth - 4)`` must be divisible by 6 (28 gives 4 blocks per group).
    widen_factor: width multiplier k of the three groups (16k, 32k, 64k channels).
    num_classes: number of output logits.
    dropout_rate: dropout inside each block (0 disables it and needs no rng).
    dtype: computation dtype (parameters are created in float32; logits are float32, or
      float64 when the computation is float64).

  References:
    Zagoruyko & Komodakis 2016, arXiv 1605.07146.
  """

  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Map NHWC images to logits of shape ``(batch, num_classes)``."""
    if (self.depth - 4) % 6 != 0:
      raise ValueError(f"WideResNet depth must be 6n + 4 (e.g. 16, 22, 28, 40), got {self.depth}")
    blocks_per_group = (self.depth - 4) // 6
    widths = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
    x = jnp.asarray(x, self.dtype)
    x = _conv(16, 3, 1, self.dtype, "stem_conv")(x)
    for i, width in enumerate(widths):
      for j in range(blocks_per_group):
        stride = 2 if i > 0 and j == 0 else 1
        x = WideBlock(
          width, stride, self.dropout_rate, self.dtype, name=f"group{i + 1}_block{j + 1}"
        )(x, train)
    x = nn.relu(batch_norm(train, self.dtype, "final_bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes,
      kernel_init=torch_default_kernel_init,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      name="head",
    )(x)
    return logits(x)
