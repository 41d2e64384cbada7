"""Fashion-MNIST (60,000 + 10,000 greyscale 28x28 images, offline) with the 6-layer SimpleCNN.

A real image benchmark that runs on a CPU: one of the SAM paper's own datasets (its Table 5
trains WRN-28-10 there, lr 0.1, weight decay 5e-4, rho 0.05, batch 256; test error 3.98% with SAM
against 4.57% without). Here the model is the small SimpleCNN (467,818 parameters at 28x28x1:
28 -> 14 -> 7 pixels before the Dense layers), so that a run fits a 2-core machine. The data are
the four IDX files of Debian's `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`
or `make fashion-mnist`), or any directory of them: `--set data_dir=DIR`. Augmentation is the
SAM code's "basic" one (4-pixel pad + crop, random flip), normalisation the training images'
own mean and std (0.2860, 0.3530).

Usage: `python -m experiments.train --config experiments/configs/fashion_mnist_simple_cnn.py:sam`;
a quick check: add `--set epochs=1 --set train_examples=2048`.
"""

import dataclasses

from experiments.configs.base import TrainConfig, validate


def get_config(optimizer: str = "xsam") -> TrainConfig:
  return validate(
    dataclasses.replace(
      TrainConfig(),
      optimizer=optimizer,
      dataset="fashion_mnist",
      data_dir=None,  # Debian's /usr/share/datasets/fashion-mnist (experiments.data)
      label_noise=0.0,
      model="simple_cnn",
      epochs=10,
      batch_size=128,
      lr=0.05,
      weight_decay=5e-4,  # SAM paper, Fashion-MNIST
      rho=0.05,  # SAM paper, Fashion-MNIST (WRN-28-10)
      alpha=0.2,  # X-SAM / Eigen-SAM default
      # As in the digits config: X-SAM as the Theorem 5.1 operator, which keeps SAM's gradient
      # scale, so that all methods share one learning rate.
      normalize=False,
      refresh_every=5,
      power_iters=5,
      lambda_max_every=0,  # only at the end
      lambda_max_examples=256,
      log_every=50,
    )
  )
