"""CIFAR-10 × ResNet-18: Eigen-SAM main table; X-SAM 'ResNet' rows (paper claims 95.68% C10 /
77.56% C100).

Usage: `python -m experiments.train --config experiments/configs/cifar10_resnet18.py:OPT` with
OPT one of sgd, sam, asam, eigen_sam, xsam (and the *_adamw variants). Every number comes from
:func:`experiments.configs.base.paper_recipe`, which names its source."""

from experiments.configs.base import TrainConfig, paper_recipe


def get_config(optimizer: str = "xsam") -> TrainConfig:
  return paper_recipe("cifar10", "resnet18", optimizer)
