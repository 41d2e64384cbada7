"""The PyTorch side-by-side row of the GPU benchmark computes what the library computes.

``benchmarks/torch_sam.py`` is our own PyTorch code; these tests start its SimpleCNN twin from
the Flax model's weights and check its logits, SAM steps and Eigen-SAM steps (with their power
iteration refresh) against ``xsam_jax``. They need PyTorch, which is not a dependency of the
project: they are skipped where it cannot be imported (CI). Locally:
``pip install --target /tmp/torchsite torch==2.13.0`` and ``PYTHONPATH=/tmp/torchsite``.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

try:
  import torch
except Exception as exc:  # absent, or a CUDA build without its libraries
  pytest.skip(f"PyTorch is not importable here ({exc})", allow_module_level=True)

import xsam_jax
from benchmarks import torch_sam
from experiments.models import get_model, init_model

IMAGE, BATCH, STEPS = 8, 4, 3


@pytest.fixture(scope="module")
def twin():
  """The Flax SimpleCNN, its params, a batch, and its PyTorch twin on that batch."""
  model = get_model("simple_cnn", 10)
  params, _ = init_model(model, (1, IMAGE, IMAGE, 3), jax.random.key(0))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
  labels = rng.integers(0, 10, BATCH).astype(np.int32)

  def loss(p):
    logits = model.apply({"params": p}, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return model, params, images, labels, loss


def stepper_from(params, images, labels) -> torch_sam.Stepper:
  """A PyTorch stepper whose model holds ``params``."""
  net = torch_sam.make_model("simple_cnn", IMAGE)
  with torch.no_grad():
    for p, t in zip(net.parameters(), torch_sam.simple_cnn_tensors(params, IMAGE), strict=True):
      assert p.shape == t.shape
      p.copy_(t)
  x = torch.as_tensor(images.transpose(0, 3, 1, 2).copy())
  return torch_sam.Stepper(net, x, torch.as_tensor(labels, dtype=torch.long), "float32")


def assert_same_params(stepper, params, rtol=2e-4, atol=2e-6):
  expected = torch_sam.simple_cnn_tensors(params, IMAGE)
  for p, t in zip(stepper.params, expected, strict=True):
    np.testing.assert_allclose(p.detach().numpy(), t.numpy(), rtol=rtol, atol=atol)


def sam_then_sgd():
  """The library's SAM before the PyTorch stepper's SGD with momentum."""
  return optax.chain(xsam_jax.sam(rho=torch_sam.RHO), optax.sgd(torch_sam.LR, torch_sam.MOMENTUM))


def max_abs_difference(a, b) -> float:
  return float(optax.tree.norm(optax.tree.sub(a, b), ord="inf"))


def run_jax(tx, params, loss, steps):
  grad_fn = jax.grad(loss)

  @jax.jit
  def step(p, state):
    updates, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_the_pytorch_simple_cnn_twin_computes_the_flax_logits(twin):
  model, params, images, labels, _ = twin
  stepper = stepper_from(params, images, labels)
  expected = np.asarray(model.apply({"params": params}, images, train=False))
  with torch.no_grad():
    logits = stepper.model(stepper.images).numpy()
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_the_pytorch_sam_steps_match_xsam_jax_sam_before_sgd_with_momentum(twin):
  _, params, images, labels, loss = twin
  expected, _ = run_jax(sam_then_sgd(), params, loss, STEPS)
  stepper = stepper_from(params, images, labels)
  for _ in range(STEPS):
    stepper.sam()
  assert_same_params(stepper, expected)
  # Not vacuous: the steps moved the weights by much more than the tolerance.
  assert max_abs_difference(expected, params) > 1e-3


def test_the_pytorch_eigen_sam_steps_with_power_iteration_match_xsam_jax_eigen_sam(twin):
  _, params, images, labels, loss = twin
  q = 3
  eigen = xsam_jax.eigen_sam(rho=torch_sam.RHO, alpha=torch_sam.ALPHA, refresh_every=1, num_iters=q)
  tx = optax.chain(eigen, optax.sgd(torch_sam.LR, torch_sam.MOMENTUM))
  expected, state = run_jax(tx, params, loss, STEPS)
  stepper = stepper_from(params, images, labels)
  stepper.v = torch_sam.simple_cnn_tensors(eigen.init(params).eigvec, IMAGE)
  for _ in range(STEPS):
    stepper.eigen_sam(q)
  assert_same_params(stepper, expected)
  # The refreshed eigenvectors agree too (up to sign).
  v_jax = np.concatenate(
    [t.numpy().ravel() for t in torch_sam.simple_cnn_tensors(state[0].eigvec, IMAGE)]
  )
  v_torch = np.concatenate([t.numpy().ravel() for t in stepper.v])
  assert abs(v_jax @ v_torch) == pytest.approx(1.0, abs=1e-4)
  # And the tilt mattered: the same steps without it (SAM) end elsewhere.
  sam_params, _ = run_jax(sam_then_sgd(), params, loss, STEPS)
  assert max_abs_difference(expected, sam_params) > 1e-5


def test_the_pytorch_benchmark_times_every_step_of_the_tiny_model():
  row = torch_sam.benchmark("simple_cnn", "float32", BATCH, (IMAGE, IMAGE, 3), p=2, q=1)
  assert row["model"] == "simple_cnn" and row["device"] == "cpu"
  for key in ("sgd_s", "sam_s", "eigen_sam_s", "eigen_sam_refresh_s"):
    assert row[key] > 0
