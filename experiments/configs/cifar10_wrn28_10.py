"""CIFAR-10 × WRN-28-10: SAM Table 1 (200 ep, basic aug: C10 err 2.7 / C100 16.5); Eigen-SAM and
X-SAM tables.

Usage: `python -m experiments.train --config experiments/configs/cifar10_wrn28_10.py:OPT` with
OPT one of sgd, sam, asam, eigen_sam, xsam (and the *_adamw variants). Every number comes from
:func:`experiments.configs.base.paper_recipe`, which names its source."""

from experiments.configs.base import TrainConfig, paper_recipe


def get_config(optimizer: str = "xsam") -> TrainConfig:
  return paper_recipe("cifar10", "wrn28_10", optimizer)
