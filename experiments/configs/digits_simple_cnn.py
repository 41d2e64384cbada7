"""The offline default: scikit-learn's bundled digits, SimpleCNN, 40% symmetric label noise.

Runs on 2 CPU cores in well under a minute per optimizer. On clean digits every method reaches
~99% test accuracy, so the demo adds label noise (the SAM paper's Table 4 setting), where the
methods differ. Usage: `python -m experiments.train --config
experiments/configs/digits_simple_cnn.py:xsam`.
"""

import dataclasses

from experiments.configs.base import TrainConfig, validate


def get_config(optimizer: str = "xsam") -> TrainConfig:
  return validate(
    dataclasses.replace(
      TrainConfig(),
      optimizer=optimizer,
      dataset="digits",
      label_noise=0.4,  # SAM paper Table 4 uses 20-80%; 40% separates SGD and SAM here
      model="simple_cnn",
      epochs=30,
      batch_size=64,
      lr=0.05,
      rho=0.05,  # SAM's "solid default"
      alpha=0.2,  # X-SAM / Eigen-SAM default
      refresh_every=5,
      power_iters=5,
      lambda_max_every=5,
      lambda_max_examples=256,
    )
  )
