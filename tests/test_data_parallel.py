"""Data parallelism: the axis_name path inside shard_map, on 8 virtual CPU devices.

The checks run in a subprocess because the device count is fixed when JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import Mesh, PartitionSpec as P, NamedSharding
  import xsam_jax

  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  key = jax.random.key(0)
  k1, k2, k3 = jax.random.split(key, 3)
  params = {"w": jax.random.normal(k1, (4, 3)), "b": jnp.zeros(3)}
  x = jax.random.normal(k2, (32, 4))
  y = jax.random.randint(k3, (32,), 0, 3)

  def loss(p, x, y):
    logits = jnp.tanh(x @ p["w"] + p["b"]) * 3.0
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  def run(tx, x, y, refresh=None):
    state = tx.init(params)
    g = jax.grad(loss)(params, x, y)
    return tx.update(g, state, params, grad_fn=lambda p: jax.grad(loss)(p, x, y),
                     refresh=refresh)

  def sharded(tx):
    def f(x, y):
      out, state = run(tx, x, y)
      # Stack per-device results so we can compare devices.
      return jax.tree.map(lambda a: a[None], (out, state))
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data")),
                                 out_specs=P("data"), check_vma=False))(x, y)

  results = {}
  for name, make in [("xsam", xsam_jax.xsam), ("eigen_sam", xsam_jax.eigen_sam)]:
    tx_axis = make(rho=0.1, alpha=0.3, power_iters=30, axis_name="data")
    out, state = sharded(tx_axis)
    # 1. Every device holds the same eigenvector, eigenvalue and returned gradient.
    for leaf in jax.tree.leaves((out, state.eigvec, state.eigval)):
      np.testing.assert_allclose(leaf, np.broadcast_to(leaf[:1], leaf.shape), rtol=1e-6,
                                 atol=1e-7)
    # 2. The shared eigenvector is the top eigenvector of the full-batch Hessian, as the
    #    single-device run on the whole batch finds it (pmean of HVPs = HVP of the mean loss).
    tx_single = make(rho=0.1, alpha=0.3, power_iters=30)
    _, st_single = run(tx_single, x, y)
    v_dev = np.concatenate([np.ravel(a[0]) for a in jax.tree.leaves(state.eigvec)])
    v_one = np.concatenate([np.ravel(a) for a in jax.tree.leaves(st_single.eigvec)])
    assert abs(v_dev @ v_one) > 0.9999, abs(v_dev @ v_one)
    np.testing.assert_allclose(state.eigval[0], st_single.eigval, rtol=1e-4)
    # 3. Ascent is local (m-sharpness): the gradient is the mean over devices of each
    #    shard's own SAM step, recomputed here shard by shard on one device.
    tx_ref = make(rho=0.1, alpha=0.0, power_iters=30)
    per_shard = []
    for i in range(8):
      xs, ys = x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]
      st = tx_ref.init(params)._replace(eigvec=jax.tree.map(lambda a: a[0], state.eigvec))
      g = jax.grad(loss)(params, xs, ys)
      if name == "xsam":
        # X-SAM: SAM gradient per shard, pmean, then the correction on the mean.
        sam_out, _ = xsam_jax.sam(rho=0.1).update(
          g, xsam_jax.sam().init(params), params,
          grad_fn=lambda p: jax.grad(loss)(p, xs, ys))
        per_shard.append(sam_out)
      else:
        o, _ = xsam_jax.eigen_sam(rho=0.1, alpha=0.3).update(
          g, st, params, grad_fn=lambda p: jax.grad(loss)(p, xs, ys), refresh=False)
        per_shard.append(o)
    mean = jax.tree.map(lambda *a: sum(a) / 8, *per_shard)
    if name == "xsam":
      v = jax.tree.map(lambda a: a[0], state.eigvec)
      norm = optax.tree.norm(mean)
      unit = jax.tree.map(lambda a: a / norm, mean)
      c = optax.tree.vdot(unit, v)
      mean = jax.tree.map(lambda u, vv: u - 0.3 * c * vv, unit, v)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(mean)):
      np.testing.assert_allclose(a[0], b, rtol=2e-4, atol=1e-6)
    results[name] = "ok"

  # 4. Under plain jit with a sharded batch nothing special is needed: same as unsharded.
  tx = xsam_jax.xsam(rho=0.1, alpha=0.3)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  out_sh, st_sh = jax.jit(run, static_argnums=0)(tx, xs, ys)
  out_un, st_un = jax.jit(run, static_argnums=0)(tx, x, y)
  for a, b in zip(jax.tree.leaves((out_sh, st_sh)), jax.tree.leaves((out_un, st_un))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  print("RESULT", results)
  """
)


@pytest.mark.multidevice
def test_axis_name_shares_one_eigenvector_and_matches_single_device_reference():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "RESULT {'xsam': 'ok', 'eigen_sam': 'ok'}" in proc.stdout
