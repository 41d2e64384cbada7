"""A prepared tfds directory on disk, as a user with CIFAR-10 has it, read by the CIFAR configs.

Until now the tfds path was covered only by ``tfds.testing.mock_data``, which never touches a
file. Here tfds's own builder machinery writes a small CIFAR-10-shaped dataset (64 train / 32
test random 32x32x3 images) in ArrayRecord format under the name ``cifar10``, offline: the
registered ``Cifar10`` builder with its download step replaced by a local generator. Then the
CIFAR-10 config trains on it through ``--set data_dir=...`` (SimpleCNN instead of ResNet-18, one
epoch of two steps, to stay fast on a CPU).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import data
from experiments import train as train_lib

NUM_TRAIN, NUM_TEST = 64, 32


def _images(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> io.BytesIO:
  """PNG bytes (tfds encodes arrays with TensorFlow, which is not installed; bytes it stores)."""
  from PIL import Image

  out = io.BytesIO()
  Image.fromarray(image).save(out, format="PNG")
  out.seek(0)
  return out


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  """``<dir>/cifar10/3.0.2/*.array_record`` written by tfds, with no network."""
  data_dir = tmp_path_factory.mktemp("tfds")

  class LocalCifar10(tfds.builder_cls("cifar10"), skip_registration=True):
    name = "cifar10"  # the files and the registry entry the CIFAR configs read

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      return {"train": self._examples(NUM_TRAIN, 0), "test": self._examples(NUM_TEST, 1)}

    def _examples(self, n, seed):
      for i, image in enumerate(_images(n, seed)):
        key = f"{seed}_{i:03d}"
        yield key, {"id": key, "image": _png(image), "label": i % 10}

  builder = LocalCifar10(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir


def test_the_builder_wrote_array_record_files_under_the_cifar10_name(prepared_dir):
  files = sorted(p.name for p in (prepared_dir / "cifar10").glob("*/*.array_record*"))
  assert files and all("cifar10-" in f for f in files)
  assert any("train" in f for f in files) and any("test" in f for f in files)


def test_load_dataset_reads_back_exactly_the_images_and_labels_written(prepared_dir):
  ds = data.load_dataset("cifar10", data_dir=str(prepared_dir))
  assert ds.train_images.shape == (NUM_TRAIN, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (NUM_TEST, 32, 32, 3)
  for got, written in (
    (ds.train_images, _images(NUM_TRAIN, 0)),
    (ds.test_images, _images(NUM_TEST, 1)),
  ):
    # tfds stores the examples in its own (hashed) order: compare as sets of images.
    assert sorted(map(bytes, got)) == sorted(map(bytes, written))
  np.testing.assert_array_equal(
    np.bincount(ds.train_labels, minlength=10), np.bincount(np.arange(NUM_TRAIN) % 10)
  )
  assert ds.mean == data.CIFAR10_MEAN and ds.num_classes == 10


@pytest.mark.slow
def test_cifar10_config_trains_on_the_prepared_directory_via_set_data_dir(prepared_dir, tmp_path):
  workdir = tmp_path / "run"
  code = train_lib.main(
    [
      "--config",
      "experiments/configs/cifar10_resnet18.py:sgd",
      "--workdir",
      str(workdir),
      "--set",
      f"data_dir={prepared_dir}",
      "--set",
      "model=simple_cnn",
      "--set",
      "epochs=1",
      "--set",
      "batch_size=32",
      "--set",
      "lambda_max_iters=2",
      "--set",
      "lambda_max_examples=8",
      "--set",
      "progress=false",
      "--set",
      "tensorboard=false",
    ]
  )
  assert code == 0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["dataset"] == "cifar10" and summary["epochs"] == 1
  # Evaluated on the 32 prepared test images: the accuracy is a multiple of 1/32.
  assert summary["test_accuracy"] * NUM_TEST == pytest.approx(
    round(summary["test_accuracy"] * NUM_TEST)
  )
  assert np.isfinite(summary["final_lambda_max"]) and np.isfinite(summary["final_train_loss"])
  config = json.loads((workdir / "config.json").read_text())
  assert config["data_dir"] == str(prepared_dir) and config["lr_schedule"] == "cosine_epoch"
