"""A 3-4-2 tanh MLP with its gradient derived by hand in NumPy (float64): the independent
reference that the cheap-SAM tests (test_sometimes.py, test_looksam.py) re-derive rules on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KEYS = ("b1", "b2", "w1", "w2")


def init(seed: int = 0, dtype=jnp.float32) -> dict:
  rng = np.random.default_rng(seed)
  shapes = {"w1": (3, 4), "b1": (4,), "w2": (4, 2), "b2": (2,)}
  return {k: jnp.asarray(rng.normal(size=s) * 0.8, dtype) for k, s in shapes.items()}


def batches(n: int, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
  """``n`` different batches of 5 examples."""
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(5, 3)), rng.normal(size=(5, 2))) for _ in range(n)]


def loss(params: dict, x, y) -> jax.Array:
  f = lambda k: params[k].astype(jnp.float32)
  h = jnp.tanh(jnp.asarray(x, jnp.float32) @ f("w1") + f("b1"))
  r = h @ f("w2") + f("b2") - jnp.asarray(y, jnp.float32)
  return 0.5 * jnp.sum(r**2) / r.shape[0]


def grad_np(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
  """The gradient of :func:`loss` by hand-written backpropagation, in float64."""
  h = np.tanh(x @ p["w1"] + p["b1"])
  dout = (h @ p["w2"] + p["b2"] - y) / x.shape[0]
  dz = (dout @ p["w2"].T) * (1 - h**2)
  return {"w1": x.T @ dz, "b1": dz.sum(0), "w2": h.T @ dout, "b2": dout.sum(0)}


def to_np(tree: dict) -> dict:
  return {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for k, v in tree.items()}


def vdot(a: dict, b: dict) -> float:
  return float(sum(np.vdot(a[k], b[k]) for k in KEYS))


def norm(a: dict) -> float:
  return vdot(a, a) ** 0.5


def axpy(alpha: float, x: dict, y: dict) -> dict:
  """``alpha * x + y``."""
  return {k: alpha * x[k] + y[k] for k in KEYS}


def sam_grad_np(p: dict, x, y, rho: float, adaptive: bool = False, eta: float = 0.01) -> dict:
  """SAM's (or ASAM's) perturbed gradient, in NumPy."""
  g = grad_np(p, x, y)
  if adaptive:
    t = {k: np.abs(p[k]) + eta for k in KEYS}
    tg = {k: t[k] * g[k] for k in KEYS}
    eps = {k: rho * t[k] * tg[k] / (norm(tg) + 1e-12) for k in KEYS}
  else:
    eps = {k: rho * g[k] / (norm(g) + 1e-12) for k in KEYS}
  return grad_np(axpy(1.0, eps, p), x, y)
