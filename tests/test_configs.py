"""Tests for experiments.configs: every config loads, the recipe's numbers, overrides."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import get_type_hints

import pytest

from experiments.configs import base
from experiments.configs.base import (
  OPTIMIZERS,
  TrainConfig,
  apply_overrides,
  config_differences,
  load_config,
  paper_recipe,
  validate,
)
from experiments.optimizers import build_optimizer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "base"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_file_loads_for_every_optimizer(path):
  for name in OPTIMIZERS:
    config = load_config(f"{path}:{name}")
    assert config.optimizer == name


def test_paper_recipe_numbers_follow_the_papers():
  c10 = paper_recipe("cifar10", "resnet18", "xsam")
  assert (c10.epochs, c10.batch_size, c10.lr, c10.momentum) == (200, 256, 0.1, 0.9)
  assert (c10.rho, c10.alpha, c10.refresh_every, c10.power_iters) == (0.05, 0.2, 3, 5)
  assert paper_recipe("cifar100", "resnet18", "sam").rho == 0.1
  assert paper_recipe("cifar10", "wrn28_10", "eigen_sam").refresh_every == 100


@pytest.mark.parametrize("optimizer", ["asam", "asam_adamw"])
def test_asam_recipe_uses_the_asam_readme_rho_and_the_class_default_eta(optimizer):
  assert paper_recipe("cifar10", "resnet18", optimizer).rho == 0.5
  assert paper_recipe("cifar100", "resnet18", optimizer).rho == 1.0
  assert paper_recipe("cifar10", "wrn28_10", optimizer).eta == 0.01
  assert paper_recipe("cifar10", "resnet18", optimizer.replace("asam", "sam")).rho == 0.05


def test_eigen_sam_recipe_refreshes_once_per_epoch_like_the_official_code():
  # Official code: `step % 100 == 0 and step > 0` on the batch index within the epoch, with
  # 50000 // 256 = 195 batches: once per epoch, not every 100 steps.
  for optimizer in ("eigen_sam", "eigen_sam_adamw"):
    config = paper_recipe("cifar100", "resnet18", optimizer)
    assert config.refresh_once_per_epoch and config.refresh_every == 100
    assert build_optimizer(config, steps_per_epoch=195).refresh_every == 195
  xsam = paper_recipe("cifar10", "resnet18", "xsam")
  assert not xsam.refresh_once_per_epoch
  assert build_optimizer(xsam, steps_per_epoch=195).refresh_every == 3


def test_overrides_are_typed_by_the_field():
  config = apply_overrides(
    TrainConfig(), ["epochs=3", "rho=0.1", "normalize=false", "data_dir=none", "model=resnet18"]
  )
  assert config.epochs == 3 and config.rho == 0.1 and config.normalize is False
  assert config.data_dir is None and config.model == "resnet18"
  assert apply_overrides(TrainConfig(), ["refresh_once_per_epoch=true"]).refresh_once_per_epoch


@pytest.mark.parametrize(
  ("override", "match"),
  [
    ("epochs", "name=value"),
    ("lr=fast", "lr"),
    ("normalize=maybe", "true or false"),
    ("tracker=oja", "unknown tracker"),
    ("bogus=1", "unknown config field"),
  ],
)
def test_bad_overrides_raise_value_error(override, match):
  with pytest.raises(ValueError, match=match):
    apply_overrides(TrainConfig(), [override])


def test_missing_config_file_raises_value_error():
  with pytest.raises(ValueError, match="no such file"):
    load_config("experiments/configs/nope.py:sgd")


def test_float64_compute_is_refused_without_64_bit_jax_and_says_how_to_enable_it():
  with pytest.raises(ValueError, match=r"'float64' needs 64-bit JAX.*JAX_ENABLE_X64=1"):
    apply_overrides(TrainConfig(), ["compute_dtype=float64"])


@pytest.mark.parametrize(
  "override",
  [
    "lambda_max_iters=0",
    "lambda_max_examples=0",
    "lambda_max_every=-1",
    "rho=-0.1",
    "rho=inf",
    "lr=-0.1",
    "lr=nan",
    "momentum=1.0",
    "momentum=-0.1",
    "weight_decay=-1e-4",
    "seed=-1",
    "label_noise=1.0",
    "validation_fraction=-0.1",
    "train_examples=-1",
    "rho_warmup_epochs=-1",
    "alpha=2.5",
    "eta=-1",
    "esam_beta=0",
    "esam_beta=1.5",
    "refresh_every=0",
    "power_iters=0",
    "b1=1.0",
    "b2=-0.5",
    "dropout_rate=1.0",
    "batch_size=0",
    "checkpoint_every=0",
    "sam_every_k=0",
    "sam_prob=1.5",
    "sam_prob=-0.1",
    "ae_decay=1.1",
    "ae_threshold_start=nan",
    "ae_threshold_end=inf",
    "looksam_k=0",
    "looksam_alpha=-0.5",
    "mesa_weight=-0.1",
    "mesa_decay=1.0",
    "mesa_decay=-0.1",
    "mesa_temperature=0",
    "mesa_start_epoch=-1",
  ],
)
def test_every_out_of_range_field_is_refused_by_name_with_the_way_to_set_it(override):
  name = override.partition("=")[0]
  with pytest.raises(ValueError, match=rf"`{name}` must be .*got .*--set {name}=VALUE"):
    apply_overrides(TrainConfig(), [override])


def test_every_numeric_config_field_has_a_checked_range():
  hints = get_type_hints(TrainConfig)
  numeric = {f.name for f in dataclasses.fields(TrainConfig) if hints[f.name] in (int, float)}
  assert numeric == {name for name, _, _ in base._RANGES}
  validate(TrainConfig())  # the defaults are in range


def test_unknown_correction_is_refused_with_the_choices():
  with pytest.raises(ValueError, match=r"unknown correction 'exact'.*'official', 'projection'"):
    apply_overrides(TrainConfig(), ["correction=exact"])


def test_a_saved_config_without_a_newer_field_reads_it_as_its_default():
  saved = json.loads(TrainConfig(rho=0.1).to_json())
  del saved["refresh_once_per_epoch"]
  assert config_differences(TrainConfig(rho=0.1), saved) == {}
  assert config_differences(TrainConfig(rho=0.2), saved) == {"rho": (0.1, 0.2)}
  assert config_differences(TrainConfig(rho=0.1, mesh="data=2"), saved) == {}  # RESUME_FREE
