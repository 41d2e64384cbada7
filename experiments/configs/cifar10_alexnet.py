"""CIFAR-10 × AlexNet (CIFAR size): X-SAM AlexNet rows.

Usage: `python -m experiments.train --config experiments/configs/cifar10_alexnet.py:OPT` with
OPT one of sgd, sam, asam, eigen_sam, xsam (and the *_adamw variants). Every number comes from
:func:`experiments.configs.base.paper_recipe`, which names its source."""

from experiments.configs.base import TrainConfig, paper_recipe


def get_config(optimizer: str = "xsam") -> TrainConfig:
  return paper_recipe("cifar10", "alexnet", optimizer)
