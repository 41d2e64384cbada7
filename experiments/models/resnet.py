"""ResNet-18/34/50 in the CIFAR ("kuangliu") variant used by the Eigen-SAM and X-SAM code.

The variant differs from the ImageNet ResNet only in the stem: a 3x3, stride-1, 64-channel
convolution followed by BN and ReLU, with no 7x7 convolution and no max-pool, so a 32x32 input
reaches the last stage at 4x4. Stages have widths 64/128/256/512 and downsample by 2 at stages
2-4 (on the 3x3 convolution of the first block). A shortcut is a 1x1 convolution + BN whenever
the shape changes, the identity otherwise. Convolutions have no bias. The head is a global
average pool (``avg_pool2d(out, 4)`` on 4x4 in the reference) and a Dense layer with bias.

Parameter counts (``params`` collection only, CIFAR-10): ResNet-18 11,173,962; ResNet-34
21,282,122; ResNet-50 23,520,842, the same as ``sum(p.numel() for p in net.parameters())`` for
the PyTorch reference.

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016, arXiv 1512.03385.
  Liu, K. pytorch-cifar, ``models/resnet.py`` (the CIFAR variant copied into
  ``RitianLuo/EigenSAM/resnet.py`` and X-SAM's ``models/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from experiments.models._common import (
  Dtype,
  batch_norm,
  conv,
  logits,
  torch_default_kernel_init,
)


def _conv(features: int, kernel_size: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
  return conv(features, kernel_size, stride, dtype, name)


class Shortcut(nn.Module):
  """Identity, or a strided 1x1 convolution + BN when the output shape differs from the input.

  Attributes:
    features: output channels.
    stride: spatial stride of the residual branch.
    dtype: computation dtype.
  """

  features: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    if self.stride == 1 and x.shape[-1] == self.features:
      return x
    x = _conv(self.features, 1, self.stride, self.dtype, "conv")(x)
    return batch_norm(train, self.dtype, "bn")(x)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with a ReLU between them and after the residual sum.

  Attributes:
    planes: channels of both convolutions (expansion 1).
    stride: stride of the first convolution.
    dtype: computation dtype.
  """

  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    out = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
    out = nn.relu(batch_norm(train, self.dtype, "bn1")(out))
    out = _conv(self.planes, 3, 1, self.dtype, "conv2")(out)
    out = batch_norm(train, self.dtype, "bn2")(out)
    shortcut = Shortcut(self.planes, self.stride, self.dtype, name="shortcut")(x, train)
    return nn.relu(out + shortcut)


class Bottleneck(nn.Module):
  """1x1 (reduce) -> 3x3 (strided) -> 1x1 (expand x4) conv-BN layers with a residual sum.

  The stride sits on the 3x3 convolution, as in the kuangliu reference (ResNet "v1.5").

  Attributes:
    planes: channels of the inner convolutions; the block outputs ``4 * planes``.
    stride: stride of the 3x3 convolution.
    dtype: computation dtype.
  """

  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    out = _conv(self.planes, 1, 1, self.dtype, "conv1")(x)
    out = nn.relu(batch_norm(train, self.dtype, "bn1")(out))
    out = _conv(self.planes, 3, self.stride, self.dtype, "conv2")(out)
    out = nn.relu(batch_norm(train, self.dtype, "bn2")(out))
    out = _conv(self.expansion * self.planes, 1, 1, self.dtype, "conv3")(out)
    out = batch_norm(train, self.dtype, "bn3")(out)
    features = self.expansion * self.planes
    shortcut = Shortcut(features, self.stride, self.dtype, name="shortcut")(x, train)
    return nn.relu(out + shortcut)


class ResNet(nn.Module):
  """CIFAR ResNet: 3x3 stem without max-pool, four stages, global average pool, Dense head.

  Attributes:
    stage_sizes: number of blocks in each of the four stages.
    block_cls: ``BasicBlock`` or ``Bottleneck``.
    num_classes: number of output logits.
    widths: ``planes`` of each stage.
    dtype: computation dtype (parameters are created in float32; logits are float32, or
      float64 when the computation is float64).

  References:
    He et al. 2016, arXiv 1512.03385; kuangliu/pytorch-cifar ``models/resnet.py``.
  """

  stage_sizes: Sequence[int]
  block_cls: type[BasicBlock] | type[Bottleneck] = BasicBlock
  num_classes: int = 10
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Map NHWC images to logits of shape ``(batch, num_classes)``."""
    x = jnp.asarray(x, self.dtype)
    x = _conv(self.widths[0], 3, 1, self.dtype, "stem_conv")(x)
    x = nn.relu(batch_norm(train, self.dtype, "stem_bn")(x))
    for i, (num_blocks, planes) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        block = self.block_cls(planes, stride, self.dtype, name=f"stage{i + 1}_block{j + 1}")
        x = block(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes, kernel_init=torch_default_kernel_init, dtype=self.dtype, name="head"
    )(x)
    return logits(x)


def ResNet18(num_classes: int = 10, **kwargs: Any) -> ResNet:  # noqa: N802 (paper name)
  """ResNet-18 (BasicBlock, stages 2-2-2-2); 11,173,962 parameters for 10 classes."""
  return ResNet(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, num_classes=num_classes, **kwargs)


def ResNet34(num_classes: int = 10, **kwargs: Any) -> ResNet:  # noqa: N802 (paper name)
  """ResNet-34 (BasicBlock, stages 3-4-6-3); 21,282,122 parameters for 10 classes."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock, num_classes=num_classes, **kwargs)


def ResNet50(num_classes: int = 10, **kwargs: Any) -> ResNet:  # noqa: N802 (paper name)
  """ResNet-50 (Bottleneck x4, stages 3-4-6-3); 23,520,842 parameters for 10 classes."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, num_classes=num_classes, **kwargs)
