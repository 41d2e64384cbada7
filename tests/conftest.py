"""Shared fixtures: a quadratic with a known Hessian and a tiny MLP with a dense Hessian."""

from __future__ import annotations

import os
import tempfile

# A persistent XLA compilation cache shared by the test processes (xdist workers and the
# subprocesses the end-to-end tests start): set before JAX is imported.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "xsam_jax_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Compilation dominates this suite on a small CPU machine: compile with XLA:CPU's cheapest
# backend settings (see launch_processes.FAST_COMPILE). Subprocesses inherit them; tests that
# set a device count add it with `launch_processes.xla_flags(...)`.
from launch_processes import FAST_COMPILE, xla_flags

if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = xla_flags(FAST_COMPILE)

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree


@dataclasses.dataclass(frozen=True)
class Quadratic:
  """L(w) = 0.5 (w_a^T A_a w_a + w_b^T A_b w_b) - b^T w on a two-leaf pytree, known Hessian."""

  hess: np.ndarray  # dense Hessian over the flattened [a, b] vector
  shift: np.ndarray
  params: dict

  def flat(self, tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], dtype=np.float64)

  def unflat(self, x: np.ndarray):
    return ravel_pytree(self.params)[1](jnp.asarray(x, dtype=jnp.float32))

  def loss(self, params) -> jax.Array:
    x = ravel_pytree(params)[0]
    return 0.5 * x @ jnp.asarray(self.hess, x.dtype) @ x - jnp.asarray(self.shift, x.dtype) @ x

  def grad_np(self, x: np.ndarray) -> np.ndarray:
    return self.hess @ x - self.shift

  def top_eigvec(self) -> tuple[float, np.ndarray]:
    w, v = np.linalg.eigh(self.hess)
    i = int(np.argmax(np.abs(w)))
    return float(w[i]), v[:, i]


@pytest.fixture
def quadratic() -> Quadratic:
  rng = np.random.default_rng(0)
  d = 5
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  eigs = np.array([6.0, 2.5, 1.5, 0.8, 0.3])  # clear gap, so power iteration converges fast
  hess = (q * eigs) @ q.T
  shift = rng.normal(size=d)
  params = {
    "a": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
  }
  return Quadratic(hess=hess, shift=shift, params=params)


@dataclasses.dataclass(frozen=True)
class TinyMLP:
  """A 3-4-2 tanh MLP with a fixed batch; dense Hessian through jax.hessian."""

  params: dict
  x: jax.Array
  y: jax.Array

  def loss(self, params) -> jax.Array:
    h = jnp.tanh(self.x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, self.y[:, None], axis=1))

  def dense_hessian(self, params) -> np.ndarray:
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda z: self.loss(unravel(z)))(flat), dtype=np.float64)


@pytest.fixture
def tiny_mlp() -> TinyMLP:
  key = jax.random.key(42)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  params = {
    "w1": jax.random.normal(k1, (3, 4)),
    "b1": 0.1 * jax.random.normal(k2, (4,)),
    "w2": jax.random.normal(k3, (4, 2)),
    "b2": jnp.zeros((2,)),
  }
  x = jax.random.normal(k4, (16, 3))
  y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(jnp.int32)
  return TinyMLP(params=params, x=x, y=y)
