"""``train_examples`` and ``validation_fraction``: a smaller training set and a validation split
carved from it (experiments.data.subset_and_holdout), as the benchmark protocol uses them."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import data
from experiments.configs.base import TrainConfig, apply_overrides


@pytest.fixture(scope="module")
def noisy():
  return data.load_dataset("digits", label_noise=0.4, seed=3)


def _rows(images: np.ndarray) -> set[bytes]:
  return {bytes(x) for x in images}


def test_validation_split_is_carved_from_the_training_set_and_replaces_the_test_set(noisy):
  ds = data.load_dataset("digits", label_noise=0.4, seed=3, validation_fraction=0.2)
  assert ds.num_test == round(0.2 * 1437) and ds.num_train == 1437 - ds.num_test
  train, val, full = _rows(ds.train_images), _rows(ds.test_images), _rows(noisy.train_images)
  assert not train & val and train | val == full  # disjoint, and together the training set
  assert not val & _rows(noisy.test_images)  # the real test images are not in it
  # The held-out labels are the (noisy) labels a user would have, not the clean ones.
  lookup = {bytes(x): y for x, y in zip(noisy.train_images, noisy.train_labels, strict=True)}
  assert [lookup[bytes(x)] for x in ds.test_images] == ds.test_labels.tolist()
  assert (
    ds.test_labels
    != np.array(
      [
        dict(zip(map(bytes, noisy.train_images), noisy.clean_train_labels, strict=True))[bytes(x)]
        for x in ds.test_images
      ]
    )
  ).mean() == pytest.approx(0.4, abs=0.08)


def test_the_same_seed_keeps_the_label_noise_draw_and_the_split(noisy):
  a = data.load_dataset("digits", label_noise=0.4, seed=3, validation_fraction=0.2)
  b = data.load_dataset("digits", label_noise=0.4, seed=3, validation_fraction=0.2)
  np.testing.assert_array_equal(a.test_images, b.test_images)
  # The subset stream is separate: the noisy labels of the same seed are unchanged.
  full = dict(zip(map(bytes, noisy.train_images), noisy.train_labels, strict=True))
  assert [full[bytes(x)] for x in a.train_images] == a.train_labels.tolist()


def test_small_training_set_keeps_the_test_set_and_the_normalisation(noisy):
  clean = data.load_dataset("digits")
  small = data.load_dataset("digits", train_examples=300, seed=1)
  assert small.num_train == 300 and small.num_test == 360
  np.testing.assert_array_equal(small.test_images, clean.test_images)
  assert small.mean == clean.mean and small.std == clean.std
  assert _rows(small.train_images) <= _rows(clean.train_images)


def test_config_fields_are_validated():
  config = apply_overrides(TrainConfig(), ["validation_fraction=0.2", "train_examples=300"])
  assert (config.validation_fraction, config.train_examples) == (0.2, 300)
  with pytest.raises(ValueError, match="validation_fraction"):
    apply_overrides(TrainConfig(), ["validation_fraction=1.0"])
  with pytest.raises(ValueError, match="train_examples"):
    apply_overrides(TrainConfig(), ["train_examples=-1"])
