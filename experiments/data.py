"""Host-side NumPy input pipeline for the paper reproductions.

The datasets are small enough to hold in host memory. They are read once into NumPy arrays
(uint8 images NHWC, int32 labels); batches are then augmented, normalised and shuffled with
NumPy on the host and placed on the devices with :func:`shard_batch` (one process) or
:func:`make_global_batch` (any number of processes: each builds only its :func:`process_rows`
of every batch, which together are exactly the single-process batch). TensorFlow is not needed.

Datasets:

* ``digits``: scikit-learn's bundled handwritten digits (1,797 images of 8×8 pixels, values
  0..16). It ships with scikit-learn, so it works offline; it is the default for quick runs.
  Images are float32 in [0, 1]; the split is a fixed stratified 80/20 split (1,437 / 360).
* ``fashion_mnist``: Zalando's Fashion-MNIST (60,000 training and 10,000 test greyscale images
  of 28×28, 10 classes of clothing), read from the four standard IDX files
  (:data:`FASHION_MNIST_FILES`, gzip-compressed or not) in ``data_dir``, by default
  :data:`FASHION_MNIST_DIR`, where Debian's package ``dataset-fashion-mnist`` installs them
  (``apt-get install dataset-fashion-mnist``; ``make fashion-mnist``). Neither TensorFlow nor
  tensorflow-datasets is needed. A directory without IDX files is tried as a prepared tfds
  directory (below). See :func:`load_fashion_mnist_idx`.
* ``cifar10``, ``cifar100``, ``fashion_mnist``, ``svhn`` (tfds ``svhn_cropped``): read through
  ``tfds.data_source`` (random-access ArrayRecord files) from a directory prepared beforehand.
  Nothing is ever downloaded at run time; a missing dataset raises
  :class:`DatasetNotPreparedError`, whose message says how to prepare it.

Conventions, in the order a training batch sees them:

1. Label noise (training labels only): see :func:`add_symmetric_label_noise`.
2. Shuffling: one permutation per ``(seed, epoch)``; the last incomplete batch is dropped.
3. Augmentation ("basic" in the SAM paper): pad by ``pad`` pixels, crop a random window of the
   original size, flip left-right with probability 1/2. The random numbers of step ``s`` of
   epoch ``e`` come from ``(seed, e, s)`` alone, so a run resumed at any step sees exactly the
   batches it would have seen.
4. Normalisation: ``(x / 255 - mean) / std`` per channel (``x - mean`` for the float digits).

Example:
  >>> ds = load_dataset("digits")
  >>> batch = next(train_batches(ds, batch_size=32, seed=0, epoch=0))
  >>> batch["image"].shape, batch["image"].dtype, batch["label"].dtype
  ((32, 8, 8, 1), dtype('float32'), dtype('int32'))
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

Batch = dict[str, np.ndarray]

DATASETS = ("digits", "cifar10", "cifar100", "fashion_mnist", "svhn")
"""Names accepted by :func:`load_dataset`."""

# Per-channel normalisation constants in [0, 1] pixel units, as in the Eigen-SAM and X-SAM
# code (`transforms.Normalize`). The CIFAR-10 std is the widely copied (0.2023, 0.1994, 0.2010)
# (the mean per-image std), not the pixel std (0.2470, 0.2435, 0.2616) that the SAM JAX code
# uses; we keep the Eigen-SAM values because those papers are the ones reproduced here.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` installs the IDX files: the default ``data_dir``."""
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""Where the dataset's authors publish the four files (https://github.com/zalandoresearch/fashion-mnist)."""
FASHION_MNIST_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""The (images, labels) IDX files of each split, without the optional ``.gz``."""
FASHION_MNIST_SHAPE = (28, 28)

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# Labels of the independent random streams derived from a user seed.
_SHUFFLE_STREAM, _AUGMENT_STREAM, _NOISE_STREAM, _SUBSET_STREAM = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  tfds_name: str
  num_classes: int
  mean: tuple[float, ...] | None  # None: computed from the training images.
  std: tuple[float, ...] | None


_TFDS_SPECS = {
  "cifar10": _TfdsSpec("cifar10", 10, CIFAR10_MEAN, CIFAR10_STD),
  "cifar100": _TfdsSpec("cifar100", 100, CIFAR100_MEAN, CIFAR100_STD),
  "fashion_mnist": _TfdsSpec("fashion_mnist", 10, None, None),
  # SAM (Table 5) trains on 'train' + 'extra' (604,388 images); we read 'train' (73,257) only.
  "svhn": _TfdsSpec("svhn_cropped", 10, None, None),
}


class DatasetNotPreparedError(FileNotFoundError):
  """A dataset's files are not in ``data_dir`` (they are never downloaded at run time)."""


class DatasetFileError(ValueError):
  """A dataset file is present but is not what it should be (header, size or contents)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A dataset held in host memory, with what the pipeline needs to feed it.

  Attributes:
    name: one of :data:`DATASETS`.
    train_images: (N, H, W, C) training images; uint8 in 0..255, or float32 in [0, 1] (digits).
    train_labels: (N,) int32 training labels, after label noise.
    test_images: (M, H, W, C) test images, same dtype as ``train_images``.
    test_labels: (M,) int32 test labels (never noisy).
    num_classes: number of classes.
    mean: per-channel mean in [0, 1] pixel units, used by :func:`normalize`.
    std: per-channel standard deviation in [0, 1] pixel units.
    clean_train_labels: (N,) int32 training labels before label noise.
    label_noise: fraction of training labels that were changed.
    augment_pad: default crop padding in pixels for :func:`train_batches`.
    augment_flip: default for random left-right flips in :func:`train_batches`.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  clean_train_labels: np.ndarray
  label_noise: float = 0.0
  augment_pad: int = 4
  augment_flip: bool = True

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    """Number of training examples."""
    return int(self.train_images.shape[0])

  @property
  def num_test(self) -> int:
    """Number of test examples."""
    return int(self.test_images.shape[0])

  @property
  def noisy_mask(self) -> np.ndarray:
    """(N,) bool, True where the training label was changed by label noise."""
    return self.train_labels != self.clean_train_labels


# --------------------------------------------------------------------------------------------
# Loading


def load_dataset(
  name: str,
  data_dir: str | os.PathLike | None = None,
  label_noise: float = 0.0,
  seed: int = 0,
  *,
  train_examples: int = 0,
  validation_fraction: float = 0.0,
) -> Dataset:
  """Loads a dataset into host memory.

  Args:
    name: one of :data:`DATASETS` (``"svhn_cropped"`` is accepted for ``"svhn"``).
    data_dir: directory of prepared tfds datasets; ``None`` uses tfds' default
      (``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``). For ``fashion_mnist``, a directory
      of the four IDX files (``None``: :data:`FASHION_MNIST_DIR`), else of a prepared tfds
      ``fashion_mnist`` (see :func:`load_fashion_mnist_idx`). Ignored for ``digits``.
    label_noise: fraction in [0, 1) of training labels to replace by a different class; see
      :func:`add_symmetric_label_noise`.
    seed: seed of the label noise. The digits train/test split does not depend on it.
    train_examples: keep only this many training examples (0: all), see
      :func:`subset_and_holdout`.
    validation_fraction: hold out this fraction of the training examples as the returned
      dataset's *test* split, see :func:`subset_and_holdout`.

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: for an unknown ``name`` or a ``label_noise`` outside [0, 1).
    DatasetNotPreparedError: when a tfds dataset is not prepared in ``data_dir``, or
      Fashion-MNIST's files are in neither form there.
    DatasetFileError: when a Fashion-MNIST IDX file is corrupt (it names the file).
  """
  name = "svhn" if name == "svhn_cropped" else name
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
  _check_label_noise(label_noise)
  if name == "digits":
    train_x, train_y, test_x, test_y = _load_digits()
    num_classes, pad, flip = 10, 1, False  # 8×8 digits: 1-pixel shifts; a flip changes digits.
    mean, std = channel_stats(train_x)
  else:
    spec = _TFDS_SPECS[name]
    data_dir = None if data_dir is None else os.fspath(data_dir)
    if name == "fashion_mnist":
      train_x, train_y, test_x, test_y = _load_fashion_mnist(data_dir)
    else:
      train_x, train_y, test_x, test_y = _load_tfds(name, spec.tfds_name, data_dir)
    # The SAM reference's "basic" augmentation for CIFAR, SVHN and Fashion-MNIST alike: a flip
    # and a 4-pixel pad + crop (sam_jax/datasets/augmentation.py, weak_image_augmentation, used
    # unchanged for FashionMnist). Fashion-MNIST's ten classes are all mirror-invariant (a
    # mirrored shirt or boot is still one), unlike digits; a 4-pixel shift of a 28-pixel image
    # (14%) is close to CIFAR's 4 of 32. Zero padding is Fashion-MNIST's own black background.
    num_classes, pad, flip = spec.num_classes, 4, True
    if spec.mean is None:
      mean, std = channel_stats(train_x)
    else:
      mean, std = spec.mean, spec.std
  noisy_y = add_symmetric_label_noise(train_y, num_classes, label_noise, seed)
  dataset = Dataset(
    name=name,
    train_images=train_x,
    train_labels=noisy_y,
    test_images=test_x,
    test_labels=test_y,
    num_classes=num_classes,
    mean=tuple(float(m) for m in mean),
    std=tuple(float(s) for s in std),
    clean_train_labels=train_y,
    label_noise=float(label_noise),
    augment_pad=pad,
    augment_flip=flip,
  )
  return subset_and_holdout(dataset, train_examples, validation_fraction, seed)


def subset_and_holdout(
  dataset: Dataset, train_examples: int = 0, validation_fraction: float = 0.0, seed: int = 0
) -> Dataset:
  """A smaller training set and/or a validation split carved from the training set.

  One permutation of the training examples per ``seed`` (its own random stream, so the label
  noise of the same seed is unchanged): the first ``train_examples`` (0: all) are kept, and of
  those the first ``round(validation_fraction * kept)`` become the *test* split of the result
  (images, and the labels the model would have trained on: noisy ones stay noisy, since a user
  does not know which are wrong). The real test set is then not in the result at all, so a
  hyperparameter search on it cannot touch the test set. Normalisation constants are kept.

  Raises:
    ValueError: for a ``validation_fraction`` outside [0, 1) or too few examples.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
  if train_examples == 0 and validation_fraction == 0.0:
    return dataset
  if not 0 <= train_examples <= dataset.num_train:
    raise ValueError(f"train_examples must be in [0, {dataset.num_train}], got {train_examples}")
  order = np.random.default_rng([seed, _SUBSET_STREAM]).permutation(dataset.num_train)
  order = order[: train_examples or dataset.num_train]
  num_val = round(validation_fraction * len(order))
  if validation_fraction and not 0 < num_val < len(order):
    raise ValueError(f"validation_fraction {validation_fraction} leaves no validation or train")
  val, train = np.sort(order[:num_val]), np.sort(order[num_val:])
  changes = dict(
    train_images=dataset.train_images[train],
    train_labels=dataset.train_labels[train],
    clean_train_labels=dataset.clean_train_labels[train],
  )
  if num_val:
    changes.update(test_images=dataset.train_images[val], test_labels=dataset.train_labels[val])
  return dataclasses.replace(dataset, **changes)


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn's bundled digits as float32 (N, 8, 8, 1) in [0, 1], stratified 80/20."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = train_test_split(
    images,
    labels,
    test_size=DIGITS_TEST_FRACTION,
    stratify=labels,
    random_state=DIGITS_SPLIT_SEED,
  )
  return train_x, train_y, test_x, test_y


def _load_tfds(
  name: str, tfds_name: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Reads the train and test splits of a prepared tfds dataset into NumPy arrays."""
  import tensorflow_datasets as tfds

  try:
    train_source, test_source = tfds.data_source(
      tfds_name, split=["train", "test"], data_dir=data_dir, download=False
    )
  except (KeyError, NotImplementedError, FileNotFoundError, ValueError) as exc:
    # tfds 4.9 with download=False raises KeyError ("splits is empty") for the default
    # directory, NotImplementedError (format TFRECORD) for an explicit empty data_dir, and the
    # same NotImplementedError for a dataset prepared in the non-random-access TFRecord format.
    raise DatasetNotPreparedError(_not_prepared_message(name, tfds_name, data_dir, exc)) from exc
  train_x, train_y = _read_source(train_source)
  test_x, test_y = _read_source(test_source)
  return train_x, train_y, test_x, test_y


def _not_prepared_message(name: str, tfds_name: str, data_dir: str | None, exc: Exception) -> str:
  where = data_dir if data_dir is not None else "$TFDS_DATA_DIR or ~/tensorflow_datasets"
  target = data_dir if data_dir is not None else "DATA_DIR"
  return (
    f"dataset {name!r} (tfds {tfds_name!r}) is not prepared in {where} in a random-access "
    "format, and it is never downloaded at run time. On a machine with network access and "
    "`pip install tensorflow tensorflow-datasets`, prepare it with\n"
    f"  tfds build {tfds_name} --data_dir {target} --file_format=array_record\n"
    "or\n"
    f'  python -c "import tensorflow_datasets as tfds; tfds.data_source({tfds_name!r}, '
    f"data_dir={target!r}, builder_kwargs={{'file_format': 'array_record'}})\"\n"
    f"then copy the directory {target}/{tfds_name} to the same place on this machine and pass "
    f"--set data_dir={target} to python -m experiments.train (data_dir= to load_dataset, or "
    "set TFDS_DATA_DIR). "
    "Without tfds data, use the offline dataset 'digits'. "
    f"(tfds said: {type(exc).__name__}: {exc})"
  )


def _read_source(source: Any) -> tuple[np.ndarray, np.ndarray]:
  """Reads every example of a tfds random-access source: uint8 images and int32 labels."""
  n = len(source)
  first = source[0]
  images = np.empty((n, *np.shape(first["image"])), np.uint8)
  labels = np.empty((n,), np.int32)
  # One example at a time: fine for these datasets (at most 73k small images).
  for i in range(n):
    example = first if i == 0 else source[i]
    images[i] = example["image"]
    labels[i] = example["label"]
  return images, labels


def channel_stats(
  images: np.ndarray, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and (population) std of images, in [0, 1] pixel units.

  Args:
    images: (N, H, W, C) uint8 images (divided by 255) or float images (used as they are).
    chunk: number of images converted to float64 at a time, to bound memory.

  Returns:
    ``(mean, std)``, tuples of C floats. A zero std is replaced by 1.
  """
  scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
  channels = images.shape[-1]
  total = np.zeros(channels)
  total_sq = np.zeros(channels)
  for start in range(0, images.shape[0], chunk):
    x = images[start : start + chunk].reshape(-1, channels).astype(np.float64) * scale
    total += x.sum(axis=0)
    total_sq += np.square(x).sum(axis=0)
  count = images.size // channels
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
  std = np.where(std > 0, std, 1.0)
  return tuple(mean.tolist()), tuple(std.tolist())


# --------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST)

_IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one MNIST-style files use


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
  """Reads one IDX file of unsigned bytes, gzip-compressed if its name ends in ``.gz``.

  The IDX format (LeCun's MNIST page): a 4-byte magic number ``0x00 0x00 0x08 ndim`` (``0x08``:
  unsigned bytes), then ``ndim`` big-endian uint32 sizes, then exactly ``prod(sizes)`` bytes.

  Args:
    path: the file.
    ndim: the number of dimensions the file must have (3 for images, 1 for labels).

  Returns:
    A uint8 array of the file's shape.

  Raises:
    FileNotFoundError: when ``path`` does not exist.
    DatasetFileError: naming ``path``, for a wrong magic number or number of dimensions, a file
      shorter or longer than its header says (a truncated download), or a broken gzip stream.

  Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
    >>> _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 9]))  # 3 labels: 7, 2, 9
    >>> read_idx(path, ndim=1)
    array([7, 2, 9], dtype=uint8)
  """
  path = Path(path)
  try:
    if path.name.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      raw = path.read_bytes()
  except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
    raise DatasetFileError(f"{path}: not a complete gzip file ({exc}); truncated?") from exc
  if len(raw) < 4:
    raise DatasetFileError(f"{path}: {len(raw)} bytes, too short for an IDX header")
  if raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
    raise DatasetFileError(
      f"{path}: magic number 0x{raw[:4].hex()}, expected 0x0000{_IDX_UBYTE:02x}{ndim:02x} (an IDX "
      f"file of unsigned bytes with {ndim} dimension{'s' if ndim > 1 else ''})"
    )
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DatasetFileError(f"{path}: {len(raw)} bytes, shorter than its {header}-byte header")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  expected = header + math.prod(shape)
  if len(raw) != expected:
    kind = "truncated" if len(raw) < expected else "has trailing bytes"
    raise DatasetFileError(
      f"{path}: {len(raw)} bytes, but its header (shape {shape}) says {expected}: the file {kind}"
    )
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


def _find_idx(directory: Path, stem: str) -> Path | None:
  """``stem.gz`` or ``stem`` in ``directory`` (the compressed file first), or None."""
  for candidate in (directory / f"{stem}.gz", directory / stem):
    if candidate.is_file():
      return candidate
  return None


def fashion_mnist_instructions(directory: str | os.PathLike | None = None) -> str:
  """How to get the Fashion-MNIST files onto any machine (part of every error about them)."""
  files = ", ".join(f"{stem}.gz" for pair in FASHION_MNIST_FILES.values() for stem in pair)
  where = f" (now {directory})" if directory is not None else ""
  return (
    "Get the four IDX files either way:\n"
    f"  - Debian/Ubuntu: `apt-get install {FASHION_MNIST_PACKAGE}` as root (or `make "
    f"fashion-mnist`) puts them in {FASHION_MNIST_DIR}, the default data_dir;\n"
    f"  - any machine: download {files} from {FASHION_MNIST_URL} (listed at "
    "https://github.com/zalandoresearch/fashion-mnist) into a directory DIR, gzipped or not,\n"
    f"then pass `--set data_dir=DIR`{where} to experiments.train (data_dir=DIR to "
    "load_dataset). A directory of a prepared tensorflow-datasets `fashion_mnist` works too."
  )


def load_fashion_mnist_idx(
  directory: str | os.PathLike = FASHION_MNIST_DIR,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Reads Fashion-MNIST from the four standard IDX files in ``directory``.

  Each file may be gzip-compressed (``train-images-idx3-ubyte.gz``, as published and as the
  Debian package installs them) or not (``train-images-idx3-ubyte``); the compressed one is
  read when both exist. Subsets of the 60,000 / 10,000 images are accepted; the images must be
  28×28 and every label in 0..9.

  Args:
    directory: the directory of the files.

  Returns:
    ``(train_images, train_labels, test_images, test_labels)``: uint8 (N, 28, 28, 1) images
    and int32 (N,) labels.

  Raises:
    DatasetNotPreparedError: when a file is missing; it names the directory, the missing
      files and how to get them (:func:`fashion_mnist_instructions`).
    DatasetFileError: naming the file, when a file is corrupt (see :func:`read_idx`), the
      images are not 28×28, the image and label counts of a split differ, or a label is
      outside 0..9. The message also says how to get intact files.

  Example:
    >>> import os
    >>> if os.path.isdir(FASHION_MNIST_DIR):  # apt-get install dataset-fashion-mnist
    ...   train_x, train_y, test_x, test_y = load_fashion_mnist_idx()
    ...   assert train_x.shape == (60000, 28, 28, 1) and test_y.shape == (10000,)
  """
  directory = Path(directory)
  paths = {
    stem: _find_idx(directory, stem) for pair in FASHION_MNIST_FILES.values() for stem in pair
  }
  missing = [stem for stem, path in paths.items() if path is None]
  if missing:
    state = (
      "is not a directory"
      if not directory.is_dir()
      else "lacks " + ", ".join(f"{stem}.gz" for stem in missing)
    )
    raise DatasetNotPreparedError(
      f"Fashion-MNIST: {directory} {state} (each file may also be uncompressed, without .gz). "
      + fashion_mnist_instructions(directory)
    )
  arrays = []
  try:
    for images_stem, labels_stem in FASHION_MNIST_FILES.values():
      images_path, labels_path = paths[images_stem], paths[labels_stem]
      images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
      if images.shape[1:] != FASHION_MNIST_SHAPE:
        raise DatasetFileError(
          f"{images_path}: images of {images.shape[1]}x{images.shape[2]} pixels, expected "
          f"{FASHION_MNIST_SHAPE[0]}x{FASHION_MNIST_SHAPE[1]}"
        )
      if images.shape[0] != labels.shape[0]:
        raise DatasetFileError(
          f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
          f"{labels.shape[0]} labels; the two files of a split must agree"
        )
      if labels.size and labels.max() >= 10:
        raise DatasetFileError(f"{labels_path}: label {int(labels.max())} outside 0..9")
      arrays += [images[..., None], labels.astype(np.int32)]
  except DatasetFileError as exc:
    raise DatasetFileError(
      f"Fashion-MNIST: {exc}. " + fashion_mnist_instructions(directory)
    ) from exc
  return tuple(arrays)


def _has_any_idx(directory: Path) -> bool:
  return any(
    _find_idx(directory, stem) is not None for pair in FASHION_MNIST_FILES.values() for stem in pair
  )


def _load_fashion_mnist(
  data_dir: str | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """IDX files in ``data_dir`` (default :data:`FASHION_MNIST_DIR`) if it holds any, else tfds.

  A directory with even one of the IDX files is read as IDX (so a missing or corrupt one is
  reported as such, not hidden by a tfds fallback); one without any is tried as a prepared
  tfds directory (``None``: tfds' default), and if that fails too, the error says how to get
  the IDX files.
  """
  directory = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)
  if _has_any_idx(directory):
    return load_fashion_mnist_idx(directory)
  try:
    return _load_tfds("fashion_mnist", "fashion_mnist", data_dir)
  except (DatasetNotPreparedError, ImportError) as exc:
    tfds_where = data_dir if data_dir is not None else "$TFDS_DATA_DIR or ~/tensorflow_datasets"
    state = "has none of the IDX files" if directory.is_dir() else "does not exist"
    raise DatasetNotPreparedError(
      f"Fashion-MNIST: {directory} {state}, and no prepared tensorflow-datasets fashion_mnist "
      f"is in {tfds_where} ({type(exc).__name__}). " + fashion_mnist_instructions(directory)
    ) from exc


# --------------------------------------------------------------------------------------------
# Label noise


def _check_label_noise(label_noise: float) -> None:
  if not 0.0 <= label_noise < 1.0:  # Also rejects NaN.
    raise ValueError(f"label_noise must be in [0, 1), got {label_noise!r}")


def add_symmetric_label_noise(
  labels: np.ndarray, num_classes: int, label_noise: float, seed: int
) -> np.ndarray:
  """Symmetric label noise: a fixed fraction of labels is replaced by a different class.

  Exactly ``round(label_noise * N)`` examples, chosen without replacement, get a label drawn
  uniformly from the ``num_classes - 1`` other classes, so exactly that fraction is wrong.
  (Some papers instead redraw from all classes, which leaves ``1/num_classes`` of the chosen
  labels unchanged; at 80% noise on CIFAR-10 that is 72% wrong labels, not 80%.) This is the
  setting of the SAM paper's Table 4, applied to training labels only.

  Args:
    labels: (N,) integer labels in ``[0, num_classes)``.
    num_classes: number of classes (at least 2 when ``label_noise > 0``).
    label_noise: fraction in [0, 1).
    seed: non-negative seed; the same seed gives the same noisy labels.

  Returns:
    A new (N,) int32 array.

  Raises:
    ValueError: when ``label_noise`` is outside [0, 1) or ``num_classes < 2`` with noise.
  """
  _check_label_noise(label_noise)
  labels = np.asarray(labels, np.int32)
  noisy = labels.copy()
  num_noisy = round(label_noise * labels.shape[0])
  if num_noisy == 0:
    return noisy
  if num_classes < 2:
    raise ValueError(f"label noise needs num_classes >= 2, got {num_classes}")
  rng = np.random.default_rng([seed, _NOISE_STREAM])
  index = rng.choice(labels.shape[0], size=num_noisy, replace=False)
  shift = rng.integers(1, num_classes, size=num_noisy)  # 1..K-1: never the original class.
  noisy[index] = (labels[index] + shift) % num_classes
  return noisy


# --------------------------------------------------------------------------------------------
# Augmentation and normalisation


def augment_batch(
  images: np.ndarray,
  rng: np.random.Generator,
  *,
  pad: int = 4,
  flip: bool = True,
  pad_mode: str = "constant",
  rows: slice | None = None,
  batch_size: int | None = None,
) -> np.ndarray:
  """Random crop after padding, then random left-right flip, for a whole batch at once.

  Each image is padded by ``pad`` pixels on every side, a window of the original size is cut
  at a uniformly random offset in ``[0, 2 * pad]`` along each axis, and the window is mirrored
  left-right with probability 1/2 if ``flip``. The output is gathered in one indexing operation.

  Args:
    images: (B, H, W, C) images, any dtype (apply before normalisation, as torchvision does).
    rng: source of the random offsets and flips.
    pad: padding in pixels (4 for 32×32 CIFAR); 0 disables the crop.
    flip: whether to flip left-right at random.
    pad_mode: ``"constant"`` pads with zeros (torchvision ``RandomCrop(32, padding=4)``, as in
      the Eigen-SAM/X-SAM code); ``"reflect"`` mirrors the border (the SAM JAX code).
    rows: ``images`` are these rows of a batch of ``batch_size`` (one process's share): the
      random numbers are drawn for the whole batch and these rows get theirs, so the shares of
      all processes put together equal the augmented whole batch.
    batch_size: the whole batch's size when ``rows`` is given.

  Returns:
    Augmented images with the shape and dtype of ``images``.
  """
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}")
  num, height, width, _ = images.shape
  total = num if rows is None else batch_size
  rows = slice(0, num) if rows is None else rows
  padded = images
  if pad > 0:
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=pad_mode)
  dy = rng.integers(0, 2 * pad + 1, size=total)[rows]
  dx = rng.integers(0, 2 * pad + 1, size=total)[rows]
  rows_index = dy[:, None] + np.arange(height)  # (B, H)
  cols = np.broadcast_to(np.arange(width), (num, width))
  if flip:
    mirrored = (rng.random(total) < 0.5)[rows]
    cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
  cols = dx[:, None] + cols  # (B, W)
  return padded[np.arange(num)[:, None, None], rows_index[:, :, None], cols[:, None, :]]


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """Per-channel normalisation to float32: ``(x / 255 - mean) / std`` for uint8 images.

  Float images are taken to be in [0, 1] already: ``(x - mean) / std``.
  """
  x = images.astype(np.float32)
  if images.dtype == np.uint8:
    x *= np.float32(1.0 / 255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# --------------------------------------------------------------------------------------------
# Batching


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool = True) -> int:
  """Number of batches per epoch: ``num_examples // batch_size``, or the ceiling if kept."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if drop_last:
    return num_examples // batch_size
  return math.ceil(num_examples / batch_size)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which epoch ``epoch`` visits the training set; a function of (seed, epoch)."""
  rng = np.random.default_rng([seed, _SHUFFLE_STREAM, epoch])
  return rng.permutation(num_examples)


def train_batches(
  dataset: Dataset,
  batch_size: int,
  seed: int,
  epoch: int,
  *,
  augment: bool = True,
  augment_pad: int | None = None,
  augment_flip: bool | None = None,
  pad_mode: str = "constant",
  start_step: int = 0,
  rows: slice | None = None,
) -> Iterator[Batch]:
  """Yields one epoch of shuffled, augmented, normalised training batches.

  The order depends only on ``(seed, epoch)`` and the augmentation of step ``s`` only on
  ``(seed, epoch, s)``: resuming at epoch ``k`` (and step ``start_step``) reproduces exactly
  the batches of an uninterrupted run. The last incomplete batch is dropped, so every batch
  has ``batch_size`` examples and the epoch has :func:`steps_per_epoch` steps.

  Args:
    dataset: the data; labels are ``dataset.train_labels`` (noisy if label noise was asked).
    batch_size: examples per batch.
    seed: non-negative run seed.
    epoch: non-negative epoch index.
    augment: whether to crop and flip at random.
    augment_pad: crop padding; ``None`` takes ``dataset.augment_pad``.
    augment_flip: random flips; ``None`` takes ``dataset.augment_flip``.
    pad_mode: padding of the crop, see :func:`augment_batch`.
    start_step: first step to yield (to resume within an epoch).
    rows: yield only these rows of every batch (this process's share, see
      :func:`process_rows`); they are exactly those rows of the whole batch, augmentation
      included, and only they are read, augmented and normalised.

  Yields:
    ``{"image": float32 (B, H, W, C), "label": int32 (B,)}`` (B = the rows' count with ``rows``).
  """
  if seed < 0 or epoch < 0 or start_step < 0:
    raise ValueError(f"seed, epoch and start_step must be >= 0, got {seed}, {epoch}, {start_step}")
  if not 0 < batch_size <= dataset.num_train:
    raise ValueError(
      f"batch_size must be in [1, {dataset.num_train}] (the training set size), got {batch_size}"
    )
  pad = dataset.augment_pad if augment_pad is None else augment_pad
  flip = dataset.augment_flip if augment_flip is None else augment_flip
  order = epoch_permutation(dataset.num_train, seed, epoch)
  for step in range(start_step, steps_per_epoch(dataset.num_train, batch_size)):
    index = order[step * batch_size : (step + 1) * batch_size]
    if rows is not None:
      index = index[rows]
    images = dataset.train_images[index]
    if augment:
      rng = np.random.default_rng([seed, _AUGMENT_STREAM, epoch, step])
      images = augment_batch(
        images, rng, pad=pad, flip=flip, pad_mode=pad_mode, rows=rows, batch_size=batch_size
      )
    yield {
      "image": normalize(images, dataset.mean, dataset.std),
      "label": dataset.train_labels[index],
    }


def test_batches(
  dataset: Dataset, batch_size: int, *, split: str = "test", rows: slice | None = None
) -> Iterator[Batch]:
  """Yields a split in order, without augmentation, keeping the remainder.

  Every batch has ``batch_size`` rows, so a jitted eval step compiles once. The final batch is
  padded with zero images and label 0; ``mask`` is 1.0 for real examples and 0.0 for padding,
  so ``sum(mask * correct) / sum(mask)`` is the exact accuracy over the split.

  Args:
    dataset: the data.
    batch_size: rows per batch.
    split: ``"test"``, or ``"train"`` to evaluate on the (possibly noisy) training labels.
    rows: yield only these rows of every batch (this process's share).

  Yields:
    ``{"image": float32 (B, H, W, C), "label": int32 (B,), "mask": float32 (B,)}``.
  """
  if split == "test":
    images, labels = dataset.test_images, dataset.test_labels
  elif split == "train":
    images, labels = dataset.train_images, dataset.train_labels
  else:
    raise ValueError(f"split must be 'test' or 'train', got {split!r}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  num = images.shape[0]
  for start in range(0, num, batch_size):
    real = min(batch_size, num - start)
    image = np.zeros((batch_size, *images.shape[1:]), np.float32)
    image[:real] = normalize(images[start : start + real], dataset.mean, dataset.std)
    label = np.zeros((batch_size,), np.int32)
    label[:real] = labels[start : start + real]
    mask = np.zeros((batch_size,), np.float32)
    mask[:real] = 1.0
    if rows is not None:
      image, label, mask = image[rows], label[rows], mask[rows]
    yield {"image": image, "label": label, "mask": mask}


# --------------------------------------------------------------------------------------------
# Devices


def data_sharding(mesh_or_sharding: Mesh | Sharding | None = None) -> Sharding:
  """The sharding that splits the batch axis over devices.

  Args:
    mesh_or_sharding: ``None`` for ``NamedSharding(Mesh(jax.devices(), ("data",)), P("data"))``;
      a ``Mesh``, whose ``"data"`` axis (else its first axis) splits the batch; or a
      ``Sharding``, returned as is.

  Returns:
    A ``jax.sharding.Sharding``.
  """
  if mesh_or_sharding is None:
    mesh_or_sharding = Mesh(np.asarray(jax.devices()), ("data",))
  if isinstance(mesh_or_sharding, Mesh):
    names = mesh_or_sharding.axis_names
    return NamedSharding(mesh_or_sharding, P("data" if "data" in names else names[0]))
  return mesh_or_sharding


def _num_batch_shards(sharding: Sharding) -> int:
  """Into how many pieces ``sharding`` cuts the leading (batch) axis."""
  if isinstance(sharding, NamedSharding):
    axes = sharding.spec[0] if len(sharding.spec) else None
    if axes is None:
      return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(sharding.mesh.shape[a] for a in axes)
  return len(sharding.device_set)


def check_batch_size(batch_size: int, num_devices: int) -> None:
  """Raises a ValueError unless ``batch_size`` splits evenly over ``num_devices``."""
  if batch_size % num_devices:
    raise ValueError(
      f"batch_size {batch_size} is not divisible by the device count {num_devices}; "
      f"use a multiple of {num_devices}"
    )


def shard_batch(
  batch: Mapping[str, np.ndarray], mesh_or_sharding: Mesh | Sharding | None = None
) -> dict[str, jax.Array]:
  """Places a host batch on the devices, split along the batch axis.

  Single-process: the batch is the global batch. Under ``jit`` with this sharding, data
  parallelism needs nothing else.

  Args:
    batch: dict of arrays sharing the leading batch dimension.
    mesh_or_sharding: see :func:`data_sharding`; ``None`` uses all devices.

  Returns:
    The same dict of ``jax.Array``s, sharded.

  Raises:
    ValueError: when the batch size is not divisible by the number of batch shards.
  """
  sharding = data_sharding(mesh_or_sharding)
  num_shards = _num_batch_shards(sharding)
  for value in batch.values():
    check_batch_size(int(np.shape(value)[0]), num_shards)
  return jax.device_put(dict(batch), sharding)


def process_rows(sharding: Sharding, batch_size: int) -> slice:
  """The rows of a global batch of ``batch_size`` that this process's devices hold.

  With the meshes of :mod:`experiments.sharding` (devices ordered by process) they are one
  contiguous block: process ``p`` of ``n`` holds rows ``[p * B / n, (p + 1) * B / n)``. In a
  single process it is every row.

  Raises:
    ValueError: when the rows of this process are not one contiguous block.
  """
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  spans = sorted(
    {(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop) for i in index_map.values()}
  )
  start, stop = spans[0][0], spans[-1][1]
  covered = sum(b - a for a, b in spans)
  if covered != stop - start:  # a gap (equal-sized shards cannot overlap and fill one)
    raise ValueError(
      f"this process's devices hold the batch rows {spans}, not one contiguous block; order "
      "the mesh's devices by process (experiments.sharding.make_mesh does)"
    )
  return slice(start, stop)


def make_global_batch(
  local: Mapping[str, np.ndarray], sharding: Sharding, batch_size: int
) -> dict[str, jax.Array]:
  """Global arrays of ``batch_size`` rows from this process's rows (:func:`process_rows`).

  Every process passes only its own share; ``jax.make_array_from_process_local_data`` puts
  each row on the device that holds it. In one process the share is the whole batch.
  """
  return {
    key: jax.make_array_from_process_local_data(
      sharding, np.asarray(value), (batch_size, *np.shape(value)[1:])
    )
    for key, value in local.items()
  }
