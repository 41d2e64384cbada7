"""AlexNet for 32x32 inputs (the common CIFAR-10 variant), the AlexNet of the X-SAM experiments.

X-SAM's repository imports ``models/alexnet.py`` but does not ship it, so the exact network is
unknown. This is the CIFAR AlexNet most PyTorch CIFAR code bases use (icpm/pytorch-cifar10
``models/AlexNet.py``, reproduced in many SAM-style repositories), layer for layer:

=====================  ===================================  ===============
layer                  definition                           output (32x32)
=====================  ===================================  ===============
conv1                  3x3, 64, stride 2, pad 1, ReLU       16x16x64
pool1                  max 2x2, stride 2                    8x8x64
conv2                  3x3, 192, pad 1, ReLU                8x8x192
pool2                  max 2x2, stride 2                    4x4x192
conv3                  3x3, 384, pad 1, ReLU                4x4x384
conv4                  3x3, 256, pad 1, ReLU                4x4x256
conv5                  3x3, 256, pad 1, ReLU                4x4x256
pool3                  max 2x2, stride 2                    2x2x256
fc1                    dropout, Dense 4096, ReLU            4096
fc2                    dropout, Dense 4096, ReLU            4096
head                   Dense num_classes                    num_classes
=====================  ===================================  ===============

All layers have biases; there is no BatchNorm and no local response normalisation. The reference
applies ``nn.Dropout()`` (rate 0.5) before fc1 and fc2; here the rate is ``dropout_rate``, default
0.0 (set 0.5 for the reference behaviour; it needs the ``'dropout'`` rng when training). The
flatten order is NHWC rather than PyTorch's NCHW, which only matters when porting weights.
Parameter count for 10 classes: 23,272,266 (2,251,584 in the convolutions).

References:
  Krizhevsky, Sutskever, Hinton. ImageNet Classification with Deep Convolutional Neural Networks.
  NeurIPS 2012.
  icpm/pytorch-cifar10, ``models/AlexNet.py`` (the 32x32 variant reproduced here).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from experiments.models._common import Dtype, logits, torch_default_kernel_init, torch_padding


class AlexNet(nn.Module):
  """Five 3x3 convolutions (64-192-384-256-256), three max-pools, three Dense layers.

  Attributes:
    num_classes: number of output logits.
    hidden: widths of the two hidden Dense layers.
    dropout_rate: dropout before each hidden Dense layer (0.5 in the reference, 0.0 here).
    dtype: computation dtype (parameters are created in float32; logits are float32, or
      float64 when the computation is float64).

  References:
    Krizhevsky et al. 2012; icpm/pytorch-cifar10 ``models/AlexNet.py``.
  """

  num_classes: int = 10
  hidden: Sequence[int] = (4096, 4096)
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Map NHWC images to logits of shape ``(batch, num_classes)``."""
    x = jnp.asarray(x, self.dtype)
    convs = [(64, 2, True), (192, 1, True), (384, 1, False), (256, 1, False), (256, 1, True)]
    for i, (features, stride, pool_after) in enumerate(convs):
      x = nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding=torch_padding(3),
        kernel_init=torch_default_kernel_init,
        dtype=self.dtype,
        name=f"conv{i + 1}",
      )(x)
      x = nn.relu(x)
      if pool_after:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.Dense(
        width, kernel_init=torch_default_kernel_init, dtype=self.dtype, name=f"fc{i + 1}"
      )(x)
      x = nn.relu(x)
    x = nn.Dense(
      self.num_classes, kernel_init=torch_default_kernel_init, dtype=self.dtype, name="head"
    )(x)
    return logits(x)
