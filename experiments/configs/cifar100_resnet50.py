"""CIFAR-100 × ResNet-50: Eigen-SAM main table; X-SAM claims consistency over ResNet-50.

Usage: `python -m experiments.train --config experiments/configs/cifar100_resnet50.py:OPT` with
OPT one of sgd, sam, asam, eigen_sam, xsam (and the *_adamw variants). Every number comes from
:func:`experiments.configs.base.paper_recipe`, which names its source."""

from experiments.configs.base import TrainConfig, paper_recipe


def get_config(optimizer: str = "xsam") -> TrainConfig:
  return paper_recipe("cifar100", "resnet50", optimizer)
