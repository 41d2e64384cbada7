"""Tests for experiments.data: loading, label noise, augmentation, batching and sharding."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from launch_processes import xla_flags

from experiments import data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
  return data.load_dataset("digits")


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh interpreter at the repository root."""
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    cwd=REPO,
    env={**os.environ, "PYTHONPATH": str(REPO), **env},
    capture_output=True,
    text=True,
    timeout=120,
  )


# --------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize(
  ("name", "shape", "num_classes"),
  [
    ("cifar10", (32, 32, 3), 10),
    ("cifar100", (32, 32, 3), 100),
    ("fashion_mnist", (28, 28, 1), 10),
    ("svhn", (32, 32, 3), 10),
  ],
)
def test_tfds_datasets_load_uint8_images_and_int32_labels_from_mock_data(
  tmp_path, name, shape, num_classes
):
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_dataset(name, data_dir=str(tmp_path))
  assert ds.name == name
  assert ds.train_images.shape == (12, *shape) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (12, *shape) and ds.test_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
  assert ds.train_labels.shape == (12,) and ds.test_labels.shape == (12,)
  assert ds.num_classes == num_classes
  assert ds.image_shape == shape
  assert ((ds.train_labels >= 0) & (ds.train_labels < num_classes)).all()
  assert len(ds.mean) == len(ds.std) == shape[-1]
  np.testing.assert_array_equal(ds.train_labels, ds.clean_train_labels)


def test_cifar_uses_the_eigen_sam_normalisation_constants(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    c10 = data.load_dataset("cifar10", data_dir=str(tmp_path))
    c100 = data.load_dataset("cifar100", data_dir=str(tmp_path))
  assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2023, 0.1994, 0.2010)
  assert c100.mean == (0.5071, 0.4867, 0.4408) and c100.std == (0.2675, 0.2565, 0.2761)


def test_fashion_mnist_statistics_are_computed_from_the_training_images(tmp_path):
  with tfds.testing.mock_data(num_examples=16):
    ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  x = ds.train_images.astype(np.float64) / 255.0
  np.testing.assert_allclose(ds.mean, [x.mean()], rtol=1e-10)
  np.testing.assert_allclose(ds.std, [x.std()], rtol=1e-10)


def test_missing_tfds_dataset_raises_with_preparation_instructions(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.load_dataset("cifar10", data_dir=tmp_path)  # A pathlib.Path works too.
  assert isinstance(info.value, FileNotFoundError)
  message = str(info.value)
  assert f"tfds build cifar10 --data_dir {tmp_path} --file_format=array_record" in message
  assert "tfds.data_source('cifar10'" in message
  # The train CLI's spelling (it has no --data_dir flag; `tfds build` has).
  assert f"--set data_dir={tmp_path} to python -m experiments.train" in message


def test_missing_tfds_dataset_in_the_default_directory_raises_the_same_error(tmp_path):
  # tfds reads TFDS_DATA_DIR at import time, hence a fresh interpreter.
  result = _run_python(
    """
    from experiments import data
    try:
      data.load_dataset("svhn")
    except data.DatasetNotPreparedError as e:
      print("OK", "tfds build svhn_cropped" in str(e))
    """,
    TFDS_DATA_DIR=str(tmp_path),
    JAX_PLATFORMS="cpu",
  )
  assert result.stdout.split() == ["OK", "True"], result.stderr


# --------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files (the reader is the real one; the files are written here)


def _idx_bytes(array: np.ndarray, magic: bytes | None = None) -> bytes:
  """An IDX file of unsigned bytes, written from the format's definition (LeCun's MNIST page)."""
  magic = bytes([0, 0, 0x08, array.ndim]) if magic is None else magic
  return magic + np.asarray(array.shape, ">u4").tobytes() + np.asarray(array, np.uint8).tobytes()


def _write_fashion_mnist(
  directory: Path, *, gz: bool = True, num_train: int = 12, num_test: int = 6
):
  """The four files with random 28x28 images and labels 0..9; returns what was written."""
  rng = np.random.default_rng(0)
  directory.mkdir(parents=True, exist_ok=True)
  written = {}
  for split, count in (("train", num_train), ("t10k", num_test)):
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
      raw = _idx_bytes(array)
      name = f"{split}-{kind}-ubyte" + (".gz" if gz else "")
      (directory / name).write_bytes(gzip.compress(raw) if gz else raw)
      written[f"{split}-{kind}"] = array
  return written


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_fashion_mnist_is_read_from_the_four_idx_files_gzipped_or_not(tmp_path, gz):
  written = _write_fashion_mnist(tmp_path, gz=gz)
  ds = data.load_dataset("fashion_mnist", data_dir=tmp_path)
  assert ds.train_images.shape == (12, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (6, 28, 28, 1) and ds.test_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images[..., 0], written["train-images-idx3"])
  np.testing.assert_array_equal(ds.train_labels, written["train-labels-idx1"])
  np.testing.assert_array_equal(ds.test_images[..., 0], written["t10k-images-idx3"])
  np.testing.assert_array_equal(ds.test_labels, written["t10k-labels-idx1"])
  x = written["train-images-idx3"].astype(np.float64) / 255.0
  np.testing.assert_allclose((ds.mean[0], ds.std[0]), (x.mean(), x.std()), rtol=1e-10)
  assert (ds.num_classes, ds.augment_pad, ds.augment_flip) == (10, 4, True)


def test_fashion_mnist_idx_files_get_label_noise_and_a_validation_split_like_any_dataset(tmp_path):
  _write_fashion_mnist(tmp_path, num_train=40)
  ds = data.load_dataset(
    "fashion_mnist", data_dir=tmp_path, label_noise=0.5, seed=3, validation_fraction=0.25
  )
  assert ds.num_train == 30 and ds.num_test == 10  # the test split is carved from training
  assert ds.noisy_mask.sum() > 0
  batch = next(data.train_batches(ds, batch_size=8, seed=0, epoch=0))
  assert batch["image"].shape == (8, 28, 28, 1) and batch["image"].dtype == np.float32


def test_idx_files_in_data_dir_are_read_before_tfds_is_tried(tmp_path):
  written = _write_fashion_mnist(tmp_path)
  with tfds.testing.mock_data(num_examples=3):  # tfds would give 3 random examples
    ds = data.load_dataset("fashion_mnist", data_dir=tmp_path)
  np.testing.assert_array_equal(ds.train_labels, written["train-labels-idx1"])


def test_an_idx_file_with_a_wrong_magic_number_is_refused_by_name(tmp_path):
  _write_fashion_mnist(tmp_path)
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  # An images header (3 dimensions) where labels (1 dimension) belong.
  path.write_bytes(gzip.compress(_idx_bytes(np.zeros(12, np.uint8), magic=b"\x00\x00\x08\x03")))
  with pytest.raises(data.DatasetFileError, match="magic number 0x00000803") as info:
    data.load_dataset("fashion_mnist", data_dir=tmp_path)
  assert str(path) in str(info.value)
  assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_image_and_label_counts_that_disagree_are_refused_naming_both_files(tmp_path):
  _write_fashion_mnist(tmp_path, gz=False)
  labels = tmp_path / "t10k-labels-idx1-ubyte"
  labels.write_bytes(_idx_bytes(np.zeros(5, np.uint8)))  # 6 test images, 5 labels
  with pytest.raises(data.DatasetFileError, match=r"holds 6 images but .* holds 5 labels") as info:
    data.load_dataset("fashion_mnist", data_dir=tmp_path)
  assert str(labels) in str(info.value)
  assert str(tmp_path / "t10k-images-idx3-ubyte") in str(info.value)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_a_truncated_idx_file_is_refused_by_name(tmp_path, gz):
  _write_fashion_mnist(tmp_path, gz=gz)
  path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) - 100])  # an interrupted download
  with pytest.raises(data.DatasetFileError, match="truncated") as info:
    data.load_dataset("fashion_mnist", data_dir=tmp_path)
  assert str(path) in str(info.value)


def test_images_that_are_not_28_by_28_or_labels_outside_0_to_9_are_refused(tmp_path):
  _write_fashion_mnist(tmp_path, gz=False)
  images = tmp_path / "train-images-idx3-ubyte"
  images.write_bytes(_idx_bytes(np.zeros((12, 32, 32), np.uint8)))
  with pytest.raises(data.DatasetFileError, match=re.escape(f"{images}: images of 32x32 pixels")):
    data.load_dataset("fashion_mnist", data_dir=tmp_path)
  images.write_bytes(_idx_bytes(np.zeros((12, 28, 28), np.uint8)))
  labels = tmp_path / "train-labels-idx1-ubyte"
  labels.write_bytes(_idx_bytes(np.full(12, 10, np.uint8)))
  with pytest.raises(data.DatasetFileError, match=re.escape(f"{labels}: label 10 outside 0..9")):
    data.load_dataset("fashion_mnist", data_dir=tmp_path)


def test_a_missing_idx_file_names_the_directory_the_package_the_site_and_the_flag(tmp_path):
  _write_fashion_mnist(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.load_dataset("fashion_mnist", data_dir=tmp_path)
  message = str(info.value)
  assert f"{tmp_path} lacks t10k-labels-idx1-ubyte.gz" in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert data.FASHION_MNIST_URL in message and "--set data_dir=DIR" in message


def test_a_directory_without_idx_files_or_tfds_data_says_how_to_get_the_idx_files(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.load_dataset("fashion_mnist", data_dir=tmp_path / "nowhere")
  message = str(info.value)
  assert f"{tmp_path / 'nowhere'} does not exist" in message
  assert "tensorflow-datasets" in message
  assert "apt-get install dataset-fashion-mnist" in message and "--set data_dir=DIR" in message


def test_the_real_fashion_mnist_files_hold_60000_and_10000_images_of_ten_classes():
  if not os.path.isdir(data.FASHION_MNIST_DIR):
    pytest.skip(
      f"Fashion-MNIST is not in {data.FASHION_MNIST_DIR}: `apt-get install "
      "dataset-fashion-mnist` (or `make fashion-mnist`) to run this test"
    )
  ds = data.load_dataset("fashion_mnist")  # the default data_dir: the Debian package's
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
  np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))
  np.testing.assert_allclose((ds.mean[0], ds.std[0]), (0.2860, 0.3530), atol=5e-4)


def test_unknown_dataset_name_lists_the_choices():
  with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; choose one of \['digits'"):
    data.load_dataset("mnist")


def test_digits_split_is_stratified_80_20_and_deterministic(digits):
  assert digits.train_images.shape == (1437, 8, 8, 1)
  assert digits.test_images.shape == (360, 8, 8, 1)
  assert digits.train_images.dtype == np.float32
  assert digits.train_images.min() == 0.0 and digits.train_images.max() == 1.0
  assert digits.num_classes == 10 and digits.augment_pad == 1 and not digits.augment_flip
  train_counts = np.bincount(digits.train_labels, minlength=10)
  test_counts = np.bincount(digits.test_labels, minlength=10)
  np.testing.assert_allclose(test_counts, 0.2 * (train_counts + test_counts), atol=1)
  again = data.load_dataset("digits", seed=123)  # The seed drives label noise, not the split.
  np.testing.assert_array_equal(again.train_images, digits.train_images)
  np.testing.assert_array_equal(again.test_labels, digits.test_labels)


# --------------------------------------------------------------------------------------------
# Label noise


def test_label_noise_flips_exact_fraction_of_train_labels_only(digits):
  noisy = data.load_dataset("digits", label_noise=0.4, seed=3)
  changed = noisy.train_labels != digits.train_labels
  assert changed.sum() == round(0.4 * 1437)  # Every chosen label moved to another class.
  np.testing.assert_array_equal(noisy.noisy_mask, changed)
  np.testing.assert_array_equal(noisy.clean_train_labels, digits.train_labels)
  np.testing.assert_array_equal(noisy.test_labels, digits.test_labels)
  np.testing.assert_array_equal(noisy.train_images, digits.train_images)
  assert noisy.train_labels.dtype == np.int32 and noisy.train_labels.max() < 10


def test_label_noise_is_reproducible_per_seed(digits):
  a = data.load_dataset("digits", label_noise=0.2, seed=5)
  b = data.load_dataset("digits", label_noise=0.2, seed=5)
  c = data.load_dataset("digits", label_noise=0.2, seed=6)
  np.testing.assert_array_equal(a.train_labels, b.train_labels)
  assert (a.train_labels != c.train_labels).any()


def test_noisy_labels_are_uniform_over_the_other_classes():
  labels = np.zeros(90_000, np.int32)
  noisy = data.add_symmetric_label_noise(labels, num_classes=10, label_noise=0.5, seed=0)
  counts = np.bincount(noisy, minlength=10)
  assert counts[0] == 45_000
  np.testing.assert_allclose(counts[1:], 5_000, rtol=0.06)  # ~8 sigma for a binomial.


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan")])
def test_label_noise_outside_unit_interval_is_rejected(bad):
  with pytest.raises(ValueError, match="label_noise"):
    data.load_dataset("digits", label_noise=bad)


# --------------------------------------------------------------------------------------------
# Augmentation and normalisation


def test_augmentation_preserves_shape_and_dtype():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
  out = data.augment_batch(images, np.random.default_rng(1), pad=4, flip=True)
  assert out.shape == images.shape and out.dtype == np.uint8
  floats = rng.random((3, 8, 8, 1), dtype=np.float32)
  out = data.augment_batch(floats, np.random.default_rng(1), pad=1, flip=False)
  assert out.shape == floats.shape and out.dtype == np.float32


def test_augmentation_without_pad_or_flip_is_identity():
  images = np.random.default_rng(0).integers(0, 256, size=(4, 6, 7, 3), dtype=np.uint8)
  out = data.augment_batch(images, np.random.default_rng(0), pad=0, flip=False)
  np.testing.assert_array_equal(out, images)


def test_flip_mirrors_left_right_for_about_half_the_images():
  image = np.arange(5 * 7, dtype=np.uint8).reshape(1, 5, 7, 1)  # No symmetry at all.
  batch = np.repeat(image, 64, axis=0)
  out = data.augment_batch(batch, np.random.default_rng(0), pad=0, flip=True)
  same = (out == image).all(axis=(1, 2, 3))
  mirrored = (out == image[:, :, ::-1]).all(axis=(1, 2, 3))
  assert (same ^ mirrored).all()
  assert 16 <= mirrored.sum() <= 48


def test_crop_is_a_window_of_the_zero_padded_image():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(16, 6, 6, 2), dtype=np.uint8)
  out = data.augment_batch(images, np.random.default_rng(2), pad=2, flip=True)
  offsets = set()
  for x, y in zip(images, out, strict=True):
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))  # Zeros, unlike every real pixel here.
    found = [
      (dy, dx, f)
      for dy in range(5)
      for dx in range(5)
      for f in (False, True)
      if np.array_equal(y, (lambda w: w[:, ::-1] if f else w)(padded[dy : dy + 6, dx : dx + 6]))
    ]
    assert found, "output is not a (flipped) window of the padded image"
    offsets.add(found[0][:2])
  assert len(offsets) > 4  # The offsets vary across the batch.


def test_reflect_padding_never_introduces_zeros():
  images = np.random.default_rng(0).integers(1, 256, size=(32, 8, 8, 3), dtype=np.uint8)
  out = data.augment_batch(images, np.random.default_rng(0), pad=4, pad_mode="reflect")
  assert out.min() > 0
  out = data.augment_batch(images, np.random.default_rng(0), pad=4, pad_mode="constant")
  assert out.min() == 0


def test_normalisation_gives_zero_mean_unit_std_on_the_train_set(digits):
  x = data.normalize(digits.train_images, digits.mean, digits.std)
  assert x.dtype == np.float32
  np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_uint8_normalisation_divides_by_255_first():
  images = np.full((1, 2, 2, 3), 51, np.uint8)  # 51 / 255 = 0.2
  out = data.normalize(images, data.CIFAR10_MEAN, data.CIFAR10_STD)
  expected = (0.2 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Batching


def test_steps_per_epoch_drops_or_keeps_the_remainder():
  assert data.steps_per_epoch(1437, 128) == 11
  assert data.steps_per_epoch(1437, 128, drop_last=False) == 12
  assert data.steps_per_epoch(50_000, 256) == 195


def test_train_batches_have_fixed_shape_and_dtypes(digits):
  batches = list(data.train_batches(digits, 100, seed=0, epoch=0))
  assert len(batches) == data.steps_per_epoch(1437, 100) == 14
  for b in batches:
    assert b["image"].shape == (100, 8, 8, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (100,) and b["label"].dtype == np.int32


def test_shuffling_is_deterministic_per_seed_and_epoch(digits):
  def labels(seed, epoch):
    return np.concatenate([b["label"] for b in data.train_batches(digits, 64, seed, epoch)])

  def images(seed, epoch):
    return np.concatenate([b["image"] for b in data.train_batches(digits, 64, seed, epoch)])

  np.testing.assert_array_equal(labels(0, 3), labels(0, 3))
  np.testing.assert_array_equal(images(0, 3), images(0, 3))
  assert (labels(0, 3) != labels(0, 4)).any()
  assert (labels(0, 3) != labels(1, 3)).any()


def test_resuming_mid_epoch_reproduces_the_remaining_batches(digits):
  full = list(data.train_batches(digits, 64, seed=7, epoch=2))
  resumed = list(data.train_batches(digits, 64, seed=7, epoch=2, start_step=5))
  assert len(resumed) == len(full) - 5
  for a, b in zip(full[5:], resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_an_unaugmented_epoch_visits_distinct_training_examples(digits):
  batches = list(data.train_batches(digits, 64, seed=0, epoch=0, augment=False))
  order = data.epoch_permutation(digits.num_train, seed=0, epoch=0)[: 64 * len(batches)]
  np.testing.assert_array_equal(
    np.concatenate([b["label"] for b in batches]), digits.train_labels[order]
  )
  expected = data.normalize(digits.train_images[order], digits.mean, digits.std)
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), expected)
  assert len(np.unique(order)) == len(order)


def test_train_batches_use_the_noisy_labels():
  noisy = data.load_dataset("digits", label_noise=0.3, seed=1)
  batches = list(data.train_batches(noisy, 64, seed=0, epoch=0, augment=False))
  order = data.epoch_permutation(noisy.num_train, seed=0, epoch=0)[: 64 * len(batches)]
  np.testing.assert_array_equal(
    np.concatenate([b["label"] for b in batches]), noisy.train_labels[order]
  )


def test_batch_size_larger_than_the_training_set_is_rejected(digits):
  with pytest.raises(ValueError, match="batch_size"):
    next(data.train_batches(digits, 2000, seed=0, epoch=0))


def test_test_batches_cover_every_test_example_exactly_once_via_the_mask(digits):
  batches = list(data.test_batches(digits, 64))
  assert len(batches) == 6  # 360 = 5 * 64 + 40
  for b in batches:
    assert b["image"].shape == (64, 8, 8, 1) and b["mask"].dtype == np.float32
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 360 and set(np.unique(mask)) == {0.0, 1.0}
  keep = mask > 0
  np.testing.assert_array_equal(
    np.concatenate([b["label"] for b in batches])[keep], digits.test_labels
  )
  images = np.concatenate([b["image"] for b in batches])[keep]
  np.testing.assert_array_equal(images, data.normalize(digits.test_images, digits.mean, digits.std))
  # Exact accuracy of a classifier that always answers 0, padding included.
  correct = np.concatenate([(b["label"] == 0) * b["mask"] for b in batches])
  assert correct.sum() / mask.sum() == pytest.approx(np.mean(digits.test_labels == 0))


# --------------------------------------------------------------------------------------------
# Devices


def test_shard_batch_places_the_batch_along_the_data_axis(digits):
  batch = next(data.test_batches(digits, 2 * jax.device_count()))
  sharded = data.shard_batch(batch)
  assert set(sharded) == {"image", "label", "mask"}
  for key, value in sharded.items():
    assert isinstance(value, jax.Array)
    assert value.sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(value), batch[key])


def test_batch_size_not_divisible_by_device_count_is_rejected():
  with pytest.raises(ValueError, match=r"batch_size 6 is not divisible by the device count 4"):
    data.check_batch_size(6, 4)
  data.check_batch_size(8, 4)


@pytest.mark.multidevice
def test_shard_batch_splits_over_two_devices_and_rejects_odd_batches():
  result = _run_python(
    """
    import jax, numpy as np
    from experiments import data
    assert jax.device_count() == 2
    out = data.shard_batch({"image": np.zeros((4, 3, 3, 1), np.float32),
                            "label": np.arange(4, dtype=np.int32)})
    shards = out["label"].addressable_shards
    print(len(shards), [s.data.tolist() for s in shards])
    try:
      data.shard_batch({"label": np.arange(3, dtype=np.int32)})
    except ValueError as e:
      print("REJECTED", e)
    """,
    XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
    JAX_PLATFORMS="cpu",
  )
  lines = result.stdout.splitlines()
  assert lines[0] == "2 [[0, 1], [2, 3]]", result.stderr
  assert lines[1].startswith("REJECTED batch_size 3 is not divisible by the device count 2")


def test_process_shares_of_a_batch_put_together_are_the_whole_batch(digits):
  # Each process of a multi-process run reads, augments and normalises only its rows; the
  # random crops of its rows must be those the whole batch would get.
  whole = list(data.train_batches(digits, 64, seed=3, epoch=1))
  halves = [slice(0, 32), slice(32, 64)]
  shares = [list(data.train_batches(digits, 64, seed=3, epoch=1, rows=r)) for r in halves]
  assert len(shares[0]) == len(whole)
  for step, batch in enumerate(whole):
    for key in ("image", "label"):
      joined = np.concatenate([share[step][key] for share in shares])
      np.testing.assert_array_equal(joined, batch[key])
  whole_test = list(data.test_batches(digits, 64))
  test_shares = [list(data.test_batches(digits, 64, rows=r)) for r in halves]
  for step, batch in enumerate(whole_test):
    for key in ("image", "label", "mask"):
      joined = np.concatenate([share[step][key] for share in test_shares])
      np.testing.assert_array_equal(joined, batch[key])


def test_a_single_process_reads_every_row_and_builds_the_global_batch_from_them(digits):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  sharding = data.data_sharding(mesh)
  batch_size = 2 * jax.device_count()
  assert data.process_rows(sharding, batch_size) == slice(0, batch_size)
  batch = next(data.test_batches(digits, batch_size))
  placed = data.make_global_batch(batch, sharding, batch_size)
  for key, value in placed.items():
    assert value.shape == batch[key].shape and value.sharding == sharding
    np.testing.assert_array_equal(np.asarray(value), batch[key])
