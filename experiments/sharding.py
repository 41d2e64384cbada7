"""The device mesh of a run and where every array of the training state lives on it.

A run's mesh has two axes, ``("data", "model")``, over *all* processes' devices
(``jax.devices()``, ordered by process, so each process's devices are consecutive):

* the batch is split over both axes (``P(("data", "model"))``): every device sees its own rows;
* large weight matrices are split over ``model`` (FSDP style: each device stores ``1/M`` of the
  weight and XLA gathers it for the layer's compute); everything else is replicated.

``--mesh data=N,model=M`` chooses the shape (``N * M`` = the global device count; the default is
``data=<all devices>,model=1``, plain data parallelism with replicated parameters).

The rule is a function of a leaf's *shape* alone (:func:`fsdp_spec`): shard the largest
dimension divisible by ``M`` if the leaf has at least ``min_size`` elements. The optimizer's
parameter-shaped leaves (momentum, the X-SAM/Eigen-SAM ``eigvec``) therefore get exactly the
sharding of their parameter, and so do the Hessian-vector products the transform computes, since
the train step's ``in_shardings`` and ``out_shardings`` pin the whole state to these rules. The
rule covers every model in :mod:`experiments.models`: convolution kernels ``(kh, kw, in, out)``
split their channel dimension, Dense kernels ``(in, out)`` their larger side, and biases and
BatchNorm vectors stay replicated (they are below ``min_size``).

Example:
  >>> parse_mesh("data=4,model=2")
  (4, 2)
  >>> fsdp_spec((3, 3, 64, 128), model_size=2)
  P(None, None, None, 'model')
  >>> fsdp_spec((128,), model_size=2)
  P()
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")
BATCH_AXES = ("data", "model")  # the batch is split over every device (FSDP)
MIN_SHARDED_SIZE = 4096  # leaves with fewer elements are replicated


def parse_mesh(text: str | None, device_count: int | None = None) -> tuple[int, int]:
  """``"data=N,model=M"`` -> ``(N, M)``; either may be left out, and ``""``/None means all data.

  A missing ``data`` is ``device_count // M``; a missing ``model`` is 1.

  Raises:
    ValueError: for unknown or repeated axes, sizes that are not positive ASCII integers, or
      ``N * M != device_count``.
  """
  sizes: dict[str, int] = {}
  for item in (text or "").replace(" ", "").split(","):
    if not item:
      continue
    name, sep, value = item.partition("=")
    # isdigit() alone accepts '²' and other non-ASCII digits, which int() then refuses.
    positive = value.isascii() and value.isdigit() and int(value) >= 1
    if not sep or name not in AXES or not positive:
      raise ValueError(
        f"mesh {text!r}: expected 'data=N,model=M' with positive integers (axes {list(AXES)})"
      )
    if name in sizes:
      raise ValueError(f"mesh {text!r} names the axis {name!r} twice; name each axis once")
    sizes[name] = int(value)
  model = sizes.get("model", 1)
  if device_count is None:
    return sizes.get("data", 0), model
  data = sizes.get("data", device_count // model)
  if data * model != device_count:
    raise ValueError(
      f"mesh {text!r} has data * model = {data} * {model} = {data * model} devices, but there "
      f"are {device_count} devices over {jax.process_count()} process(es); use "
      f"data * model = {device_count}"
    )
  return data, model


def make_mesh(text: str | None = None) -> Mesh:
  """The ``("data", "model")`` mesh over all processes' devices, as ``parse_mesh(text)`` says.

  Devices are ordered by (process, id), so the devices of one process are consecutive in the
  flattened mesh and each process holds one contiguous block of batch rows.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  data, model = parse_mesh(text, len(devices))
  return Mesh(np.asarray(devices).reshape(data, model), AXES)


def describe(mesh: Mesh) -> str:
  """``"data=4,model=2"`` for a mesh of :func:`make_mesh`."""
  return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of the batch split over every device of the mesh."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same value on every device."""
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], model_size: int, min_size: int = MIN_SHARDED_SIZE) -> P:
  """Where a leaf of ``shape`` lives: its largest dimension divisible by ``model_size`` split
  over ``"model"`` (the last one on ties: output channels of a kernel), or replicated when the
  leaf is small, ``model_size`` is 1 or no dimension divides."""
  if model_size <= 1 or math.prod(shape) < min_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % model_size == 0 and d >= model_size]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], i))
  return P(*(["model" if i == axis else None for i in range(len(shape))]))


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> Any:
  """A pytree of ``NamedSharding`` shaped like ``abstract_state`` (arrays or ShapeDtypeStructs).

  Parameters, their optimizer-state twins (momentum, ``eigvec``) and BatchNorm statistics follow
  :func:`fsdp_spec`; scalars (step counts, ``eigval``, ``cos``) are replicated.
  """
  model_size = mesh.shape.get("model", 1)
  return jax.tree.map(
    lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), model_size, min_size)),
    abstract_state,
  )


def sharded_fraction(tree: Any) -> float:
  """Fraction of the elements of ``tree`` that live in leaves split over ``"model"``."""
  leaves = jax.tree.leaves(tree)
  total = sum(math.prod(x.shape) for x in leaves)
  split = sum(
    math.prod(x.shape)
    for x in leaves
    if isinstance(x.sharding, NamedSharding) and "model" in jax.tree.leaves(tuple(x.sharding.spec))
  )
  return split / max(total, 1)
