"""A 3-4-2 tanh MLP with its gradient derived by hand in NumPy (float64): the independent
reference that the cheap-SAM tests (test_sometimes.py, test_looksam.py) re-derive rules on, and
a 4-device harness for their data-parallel checks."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from launch_processes import xla_flags

KEYS = ("b1", "b2", "w1", "w2")


def counting_grad_fn(x, y, counter: list[int]):
  """``grad_fn`` of :func:`loss` on batch (x, y) that adds one to ``counter[0]`` each time it
  runs (a ``jax.debug.callback``: at run time, so an untaken ``lax.cond`` branch adds nothing)."""

  def bump():
    counter[0] += 1

  def grad_fn(p):
    jax.debug.callback(bump)
    return jax.grad(loss)(p, x, y)

  return grad_fn


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


# A 4-device harness (a subprocess: the device count is fixed when JAX starts). `run(tx, count,
# mode)` makes one update at state.count = count on 4 batch shards under shard_map(check_vma=True)
# ("vma"), shard_map(check_vma=False) ("novma") or pmap, checks that every device holds the same
# result, and returns it; `sam_out` is xsam_jax.sam's gradient with axis_name and `clean` the
# mean of the shards' clean gradients.
FOUR_DEVICES = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, PartitionSpec as P
import xsam_jax
N = 4
mesh = Mesh(np.array(jax.devices()), ("data",))
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
params = {"w": jax.random.normal(k1, (4, 3)), "b": 0.1 * jnp.ones(3)}
x = jax.random.normal(k2, (32, 4)); y = jax.random.normal(k3, (32, 3))
xs, ys = x.reshape(N, -1, 4), y.reshape(N, -1, 3)
def loss(p, x, y):
  return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)
pcast = lambda p: jax.lax.pcast(p, "data", to="varying")
same = lambda p: p

def run(tx, count, mode, **extra):
  def step(x, y, local):
    state = tx.init(params)
    state = state._replace(count=jnp.asarray(count, jnp.int32))
    g = jax.grad(loss)(local(params), x, y)
    return tx.update(g, state, params, grad_fn=lambda p: jax.grad(loss)(p, x, y), **extra)
  if mode == "vma":
    return jax.jit(jax.shard_map(lambda x, y: step(x, y, pcast), mesh=mesh,
        in_specs=(P("data"), P("data")), out_specs=P(), check_vma=True))(x, y)
  if mode == "novma":
    out = jax.jit(jax.shard_map(lambda x, y: jax.tree.map(lambda a: a[None], step(x, y, same)),
        mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"), check_vma=False))(x, y)
  else:
    out = jax.pmap(lambda x, y: step(x, y, same), axis_name="data")(xs, ys)
  for leaf in jax.tree.leaves(out):
    np.testing.assert_allclose(leaf, np.broadcast_to(leaf[:1], leaf.shape), rtol=1e-6, atol=1e-7)
  return jax.tree.map(lambda a: a[0], out)

flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
clean = np.mean([flat(jax.grad(loss)(params, a, b)) for a, b in zip(xs, ys)], 0)
sam_out, _ = run(xsam_jax.sam(0.1, axis_name="data"), 0, "vma")
"""


def run_on_four_devices(body: str) -> str:
  """Runs :data:`FOUR_DEVICES` then ``body`` with 4 virtual CPU devices; returns stdout."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags("--xla_force_host_platform_device_count=4")
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, "-c", FOUR_DEVICES + body],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
  return proc.stdout
