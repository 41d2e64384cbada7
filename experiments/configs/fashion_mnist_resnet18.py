"""Fashion-MNIST (all 60,000 + 10,000 images of 28x28x1) with the CIFAR-variant ResNet-18.

The GPU-scale study's model (``make study-gpu``, :mod:`experiments.analysis.study_gpu`): the
papers' recipe, SGD with momentum 0.9, lr 0.1 with a per-step cosine decay, weight decay 5e-4,
batch 256 (the SAM paper's Fashion-MNIST batch), rho 0.05 (SAM's Fashion-MNIST value), alpha
0.2 and p = q = 5 (the X-SAM / Eigen-SAM defaults). The ResNet's 3x3 stride-1 stem and its
global average pool take 28x28x1 as they are (28 -> 14 -> 7 -> 4 pixels over the stages), so
nothing is padded to 32. The study sets ``compute_dtype=bfloat16`` on an accelerator (float32
parameters, bfloat16 convolutions); on a CPU this config stays float32.

Usage: `python -m experiments.train --config experiments/configs/fashion_mnist_resnet18.py:sam
--set data_dir=DIR` (DIR: the four IDX files; default Debian's /usr/share/datasets/fashion-mnist).
"""

import dataclasses

from experiments.configs.base import TrainConfig, validate


def get_config(optimizer: str = "xsam") -> TrainConfig:
  return validate(
    dataclasses.replace(
      TrainConfig(),
      optimizer=optimizer,
      dataset="fashion_mnist",
      data_dir=None,
      label_noise=0.0,
      model="resnet18",
      epochs=2,  # what fits the GPU study's 9 minutes (experiments/RESULTS.md)
      batch_size=256,
      lr=0.1,
      lr_schedule="cosine",
      momentum=0.9,
      weight_decay=5e-4,
      rho=0.05,
      alpha=0.2,
      # The Theorem 5.1 operator, which keeps SAM's gradient scale, so that every method shares
      # lr 0.1 (as in the digits and Fashion-MNIST SimpleCNN configs).
      normalize=False,
      refresh_every=5,
      power_iters=5,
      lambda_max_every=0,  # only at the end
      lambda_max_examples=256,
      log_every=100,
    )
  )
