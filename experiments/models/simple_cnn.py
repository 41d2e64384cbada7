"""The 6-layer SimpleCNN of the Eigen-SAM / X-SAM analysis experiments, and of the CPU demo.

The papers mention a "6-layer CNN" for their eigenvector-alignment analysis but publish no
definition, so this one is ours: four 3x3 convolutions with ``width, width, 2*width, 2*width``
channels (32, 32, 64, 64 by default), ReLU after each, a 2x2 max-pool after every second
convolution, then Dense(``hidden``)-ReLU-Dense(``num_classes``). 'SAME' padding keeps the spatial
size through the convolutions, and a pool is skipped when the feature map is already smaller
than 2x2, so the network accepts inputs from 8x8x1 (scikit-learn digits: 8 -> 4 -> 2) to
32x32x3 (CIFAR: 32 -> 16 -> 8). With ``use_bn=True`` each convolution is followed by BatchNorm
(and loses its bias).

Initialisation: LeCun normal (variance 1/fan_in) for every kernel, zero biases. The earlier
default, PyTorch's ``kaiming_uniform(a=sqrt(5))`` (variance 1/(3 fan_in)), still available as
``kernel_init="torch"`` (model name ``simple_cnn_torch_init``), shrinks the signal by about
sqrt(1/6) per ReLU layer in a net without BatchNorm. Measured on a batch of 256 digits at init:
the per-layer activation RMS falls 0.37, 0.15, 0.077, 0.024, 0.016 and the logits have std
0.009, so the net starts as the constant predictor (loss 2.30) with a total gradient norm of
0.09. With lr 0.1, 40% label noise and SAM at rho = 0.05, it stayed at 10% test accuracy for
the first 4 epochs (SGD: 45% after 3). LeCun normal gives activation RMS 0.63 to 0.22 and logit
std 0.26 (gradient norm 1.2); SGD is at 86% and SAM at 68% after 3 epochs. He normal (variance
2/fan_in) keeps the scale (RMS ~0.9-1.4) but at lr 0.1 with momentum 0.9 its first steps
(gradient norm 32) knock the net onto the constant predictor. See experiments/RESULTS.md.

Parameter counts, width 32, hidden 128, 10 classes: 8x8x1 inputs 99,178; 32x32x3 inputs
591,274 (the first Dense layer depends on the flattened size).

References:
  Luo et al. Explicit Eigenvalue Regularization Improves Sharpness-Aware Minimization.
  NeurIPS 2024, arXiv 2501.12666 (the "6-layer CNN" of the analysis; definition not published).
  Duan, Chen, Guan. X-SAM. arXiv 2601.10251 (2026).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from experiments.models._common import (
  Dtype,
  batch_norm,
  lecun_normal,
  logits,
  torch_default_kernel_init,
)

KERNEL_INITS = {"lecun": lecun_normal, "torch": torch_default_kernel_init}
"""Kernel initialisers of :class:`SimpleCNN` by name (``kernel_init``)."""


class SimpleCNN(nn.Module):
  """Four 3x3 conv layers with two max-pools, then two Dense layers.

  Attributes:
    num_classes: number of output logits.
    width: channels of the first two convolutions; the last two have ``2 * width``.
    hidden: width of the hidden Dense layer.
    use_bn: add BatchNorm after every convolution (then ``batch_stats`` is a collection).
    dtype: computation dtype (parameters are created in float32; logits are float32, or
      float64 when the computation is float64).
    kernel_init: ``"lecun"`` (LeCun normal, the default) or ``"torch"`` (PyTorch's default
      uniform, which starts this net without BatchNorm on a long plateau; kept to reproduce
      the earlier runs).
  """

  num_classes: int = 10
  width: int = 32
  hidden: int = 128
  use_bn: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: str = "lecun"

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Map NHWC images to logits of shape ``(batch, num_classes)``."""
    if self.kernel_init not in KERNEL_INITS:
      raise ValueError(
        f"unknown kernel_init {self.kernel_init!r}; choose one of {sorted(KERNEL_INITS)}"
      )
    init = KERNEL_INITS[self.kernel_init]
    x = jnp.asarray(x, self.dtype)
    channels = (self.width, self.width, 2 * self.width, 2 * self.width)
    for i, features in enumerate(channels):
      x = nn.Conv(
        features,
        (3, 3),
        padding="SAME",
        use_bias=not self.use_bn,
        kernel_init=init,
        dtype=self.dtype,
        name=f"conv{i + 1}",
      )(x)
      if self.use_bn:
        x = batch_norm(train, self.dtype, f"bn{i + 1}")(x)
      x = nn.relu(x)
      if i % 2 == 1 and min(x.shape[1:3]) >= 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden, kernel_init=init, dtype=self.dtype, name="fc1")(x))
    x = nn.Dense(self.num_classes, kernel_init=init, dtype=self.dtype, name="head")(x)
    return logits(x)
