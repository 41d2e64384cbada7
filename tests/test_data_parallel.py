"""Data parallelism: every way a user maps devices gives the documented m-sharpness result.

With ``axis_name`` each device ascends along its own gradient, the returned gradient and every
HVP are means over devices, and every state field is identical on every device. Checked on 4
virtual CPU devices against a one-device reference computed shard by shard, for
``shard_map(check_vma=True)`` (the default, where jax.grad of replicated params comes back
summed), ``shard_map(check_vma=False)``, ``pmap`` and plain ``jit`` with a sharded batch; and
every misuse raises a ValueError naming ``axis_name``.

The checks run in a subprocess because the device count is fixed when JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from launch_processes import xla_flags

SCRIPT = textwrap.dedent(
  """
  import functools
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import Mesh, PartitionSpec as P, NamedSharding
  import xsam_jax
  from xsam_jax import hessian
  from jax.flatten_util import ravel_pytree

  N = 4
  assert jax.device_count() == N, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(k1, (4, 3)), "b": 0.1 * jnp.ones(3)}
  x = jax.random.normal(k2, (32, 4))
  y = jax.random.randint(k3, (32,), 0, 3)
  xs = x.reshape(N, -1, 4)
  ys = y.reshape(N, -1)
  ITERS = 30

  def loss(p, x, y):
    logits = jnp.tanh(x @ p["w"] + p["b"]) * 3.0
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  def grad_fn_of(x, y):
    return lambda p: jax.grad(loss)(p, x, y)

  METHODS = {
    "sam": lambda **kw: xsam_jax.sam(rho=0.1, **kw),
    "asam": lambda **kw: xsam_jax.sam(rho=0.5, adaptive=True, **kw),
    "eigen_sam": lambda **kw: xsam_jax.eigen_sam(rho=0.1, alpha=0.3, num_iters=ITERS, **kw),
    "xsam": lambda **kw: xsam_jax.xsam(rho=0.1, alpha=0.3, num_iters=ITERS, **kw),
    "xsam_lanczos": lambda **kw: xsam_jax.xsam(
      rho=0.1, alpha=0.3, num_iters=8, solver="lanczos", **kw),
    # Finite-difference HVPs: each device differences its own gradients (its clean gradient as
    # the base), then the products are averaged.
    "xsam_fd": lambda **kw: xsam_jax.xsam(
      rho=0.1, alpha=0.3, num_iters=ITERS, hvp_method="forward_difference", **kw),
  }

  def step(tx, x, y, local):
    # The recommended pattern: the clean gradient at device-varying params (`local`), the
    # replicated params handed to update.
    state = tx.init(params)
    g = jax.grad(loss)(local(params), x, y)
    return tx.update(g, state, params, grad_fn=grad_fn_of(x, y))

  pcast = lambda p: jax.lax.pcast(p, "data", to="varying")
  same = lambda p: p

  def in_shard_map(tx, check_vma):
    local = pcast if check_vma else same
    if check_vma:
      # out_specs=P(): shard_map's type check itself proves the outputs are device-invariant.
      f = lambda x, y: step(tx, x, y, local)
      return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data")),
                                   out_specs=P(), check_vma=True))(x, y)
    f = lambda x, y: jax.tree.map(lambda a: a[None], step(tx, x, y, local))
    out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data")),
                                out_specs=P("data"), check_vma=False))(x, y)
    return same_on_every_device(out)

  def in_pmap(tx):
    out = jax.pmap(lambda x, y: step(tx, x, y, same), axis_name="data")(xs, ys)
    return same_on_every_device(out)

  def same_on_every_device(stacked):
    for leaf in jax.tree.leaves(stacked):
      np.testing.assert_allclose(leaf, np.broadcast_to(leaf[:1], leaf.shape), rtol=1e-6,
                                 atol=1e-7)
    return jax.tree.map(lambda a: a[0], stacked)

  # Independent reference in NumPy (float64) from the formulas, with m-sharpness: each shard
  # ascends along its own gradient, the returned gradient is the mean of the shards' perturbed
  # gradients, and the eigenvector comes from the mean of the shards' Hessians (dense, through
  # jax.hessian of the loss; no xsam_jax code). One shard is plain jit's global ascent.
  def flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])

  W0, unravel = ravel_pytree(params)
  W0 = np.asarray(W0, np.float64)
  unit = lambda a: a / np.linalg.norm(a)

  def np_grad(z, xi, yi):
    f = lambda q: loss(unravel(jnp.asarray(q, jnp.float32)), xi, yi)
    return np.asarray(jax.grad(f)(jnp.asarray(z, jnp.float32)), np.float64)

  def np_hess(xi, yi):
    f = lambda q: loss(unravel(q), xi, yi)
    return np.asarray(jax.hessian(f)(jnp.asarray(W0, jnp.float32)), np.float64)

  def np_eigvec(name, shards):
    hess = np.mean([np_hess(*sh) for sh in shards], axis=0)
    v = flat(METHODS[name]().init(params).eigvec).astype(np.float64)
    if name == "xsam_lanczos":  # 8 Krylov vectors, reorthogonalised; top algebraic Ritz pair
      basis = []
      q = unit(v)
      for _ in range(8):
        for b in basis:
          q = q - (b @ q) * b
        q = unit(q)
        basis.append(q)
        q = hess @ q
      basis = np.stack(basis, 1)
      vals, vecs = np.linalg.eigh(basis.T @ hess @ basis)
      return vals[-1], unit(basis @ vecs[:, -1])
    lam = 0.0
    for _ in range(ITERS):
      lam, v = v @ hess @ v, unit(hess @ v)
    return lam, v

  def np_reference(name, shards):
    # Returns (the returned gradient, {state field: value}) from the formulas.
    gs = [np_grad(W0, *sh) for sh in shards]
    ref = {"count": 1.0, "grad_norm": np.mean([np.linalg.norm(g) for g in gs])}
    if name in ("sam", "asam", "xsam", "xsam_lanczos", "xsam_fd"):
      rho = 0.5 if name == "asam" else 0.1
      if name == "asam":
        t = np.abs(W0) + 0.01
        eps_ = [rho * t**2 * g / np.linalg.norm(t * g) for g in gs]
      else:
        eps_ = [rho * unit(g) for g in gs]
    else:
      lam, v = np_eigvec(name, shards)
      cs = [unit(g) @ v for g in gs]
      eps_ = [0.1 * (unit(g) + 0.3 * np.sign(c) * (v - c * unit(g))) for g, c in zip(gs, cs)]
      ref.update(eigvec=v, eigval=lam, cos=np.mean(cs))
    advs = [np_grad(W0 + e, *sh) for e, sh in zip(eps_, shards)]
    ref["ascent_curvature"] = np.mean(
      [e @ (a - g) / (e @ e) for e, a, g in zip(eps_, advs, gs)])
    out = np.mean(advs, axis=0)
    if name in ("sam", "asam"):
      ref["perturbation_norm"] = np.mean([np.linalg.norm(e) for e in eps_])
    if name.startswith("xsam"):
      lam, v = np_eigvec(name, shards)
      u = unit(out)
      c = u @ v
      ref.update(eigvec=v, eigval=lam, cos=c, adv_grad_norm=np.linalg.norm(out))
      out = u - 0.3 * c * v
    return out, ref

  def check(name, mode, got, shards=None):
    out, state = got
    ref_out, ref = np_reference(name, shards or list(zip(xs, ys)))
    # Forward differences: every product carries its O(sqrt(u)) error (hessian.hvp).
    tol = dict(rtol=3e-3, atol=3e-4) if name.endswith("_fd") else dict(rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(flat(out), ref_out, **tol, err_msg=f"{name} {mode}")
    if "eigvec" in ref:
      # The eigenvector is defined up to sign: compare with the sign the device holds.
      sign = np.sign(flat(state.eigvec) @ ref["eigvec"])
      ref["eigvec"], ref["cos"] = sign * ref["eigvec"], sign * ref["cos"]
    for field, want in ref.items():
      np.testing.assert_allclose(flat(getattr(state, field)), np.ravel(want), **tol,
                                 err_msg=f"{name} {mode} {field}")
    # Shapes and dtypes as after init, so the state can be carried by cond/scan.
    dtypes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert dtypes(state) == dtypes(METHODS[name]().init(params)), (name, mode)

  for name, make in METHODS.items():
    tx = make(axis_name="data")
    check(name, "shard_map(check_vma=True)", in_shard_map(tx, True))
    check(name, "shard_map(check_vma=False)", in_shard_map(tx, False))
    check(name, "pmap", in_pmap(tx))
  print("CHECKED", "m-sharpness")

  # A pmean inside the loss (harmless under pmap) under shard_map(check_vma=True): the gradient
  # at device-varying params comes back divided by N and typed exactly like the device's own,
  # so the library cannot tell; the README says so. Pinned here: SAM's gradient and X-SAM's
  # eigval are 1/N of the documented pattern's.
  def pmean_loss(p, x, y):
    return jax.lax.pmean(loss(p, x, y), "data")

  def pmean_step(tx, x, y):
    state = tx.init(params)
    g = jax.grad(pmean_loss)(pcast(params), x, y)
    return tx.update(g, state, params, grad_fn=lambda p: jax.grad(pmean_loss)(p, x, y))

  for name in ("sam", "xsam"):
    f = lambda x, y, tx=METHODS[name](axis_name="data"): pmean_step(tx, x, y)
    out, state = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data")),
                                       out_specs=P()))(x, y)
    ref_out, ref = np_reference(name, list(zip(xs, ys)))
    if name == "sam":
      np.testing.assert_allclose(flat(out), ref_out / N, rtol=2e-4, atol=2e-6)
    else:
      np.testing.assert_allclose(state.eigval, ref["eigval"] / N, rtol=2e-4)
  print("CHECKED", "pmean in the loss")

  # Hessian toolbox and the out-of-step refresh: HVP of the mean loss on every path.
  v = jax.tree.map(jnp.ones_like, params)
  full_hvp = hessian.hvp(grad_fn_of(x, y), params, v)
  def hvp_in(x, y):
    return hessian.hvp(grad_fn_of(x, y), params, v, axis_name="data")
  for check_vma in (True, False):
    got = jax.jit(jax.shard_map(hvp_in, mesh=mesh, in_specs=(P("data"), P("data")),
                                out_specs=P(), check_vma=check_vma))(x, y)
    np.testing.assert_allclose(flat(got), flat(full_hvp), rtol=1e-5, atol=1e-6)
  # Forward differences: the device's own base gradient, the mean of the differences; equal to
  # the one-device product up to its documented O(sqrt(u)) error.
  def fd_in(x, y):
    return hessian.hvp(grad_fn_of(x, y), params, v, axis_name="data",
                       hvp_method="forward_difference")
  got = jax.jit(jax.shard_map(fd_in, mesh=mesh, in_specs=(P("data"), P("data")),
                              out_specs=P()))(x, y)
  np.testing.assert_allclose(flat(got), flat(full_hvp), rtol=3e-3,
                             atol=3e-3 * np.abs(flat(full_hvp)).max())
  tx = xsam_jax.xsam(rho=0.1)
  def refresh_in(x, y):
    st = xsam_jax.refresh_eigenvector(tx.init(params), params, grad_fn_of(x, y),
                                      num_iters=ITERS, axis_name="data")
    return st.eigval
  got = jax.jit(jax.shard_map(refresh_in, mesh=mesh, in_specs=(P("data"), P("data")),
                              out_specs=P()))(x, y)
  want = xsam_jax.refresh_eigenvector(tx.init(params), params, grad_fn_of(x, y),
                                      num_iters=ITERS).eigval
  np.testing.assert_allclose(got, want, rtol=1e-4)
  print("CHECKED", "hvp")

  # Plain jit with a sharded batch: one global ascent, against the one-shard formulas.
  for name, make in METHODS.items():
    tx = make()
    run = jax.jit(functools.partial(step, tx, local=same))
    sharded = run(jax.device_put(x, NamedSharding(mesh, P("data"))),
                  jax.device_put(y, NamedSharding(mesh, P("data"))))
    check(name, "jit", sharded, shards=[(x, y)])
  print("CHECKED", "jit")

  # Sharded parameters (jit, no axis_name): an eagerly initialised state already has the
  # shardings update returns (eigvec like each parameter, scalars replicated), so the jitted
  # step compiles once and the state's shardings never change.
  placed = {"w": jax.device_put(params["w"], NamedSharding(mesh, P("data"))),
            "b": jax.device_put(params["b"], NamedSharding(mesh, P()))}
  full_loss = lambda p: loss(p, x, y)
  for name, make in METHODS.items():
    tx = make()
    @jax.jit
    def sharded_step(p, s):
      u, s = tx.update(jax.grad(full_loss)(p), s, p, grad_fn=jax.grad(full_loss))
      return optax.apply_updates(p, u), s
    state = tx.init(placed)
    p, s = placed, state
    for _ in range(3):
      p, s = sharded_step(p, s)
    assert sharded_step._cache_size() == 1, name
    assert jax.tree.map(lambda a: a.sharding, s) == jax.tree.map(lambda a: a.sharding, state)
    if hasattr(s, "eigvec"):
      assert s.eigvec["w"].sharding == placed["w"].sharding
  print("CHECKED", "shardings")

  # Misuse: each raises a ValueError that names axis_name and the fix.
  def expect_error(fn, *needles):
    try:
      fn()
    except ValueError as err:
      for needle in needles:
        assert needle in str(err), (needle, str(err))
      return
    raise AssertionError(f"no ValueError; wanted {needles}")

  def sharded_call(f, check_vma=True):
    return lambda: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data")),
                                         out_specs=P(), check_vma=check_vma))(x, y)

  for name, make in METHODS.items():
    tx = make(axis_name="data")
    # (a) check_vma=True, clean gradient at replicated params: autodiff summed it (N x).
    expect_error(sharded_call(lambda x, y: step(tx, x, y, same)), "axis_name='data'",
                 "pcast", "summed")
    # (b) axis_name outside any mapped axis.
    expect_error(lambda: jax.jit(lambda x, y: step(tx, x, y, same))(x, y),
                 "axis_name='data'", "not a mapped axis")
    # (c) a grad_fn that reduces, mixed with an unreduced clean gradient.
    def reducing(x, y, tx=tx):
      state = tx.init(params)
      g = jax.grad(loss)(pcast(params), x, y)
      gf = lambda p: jax.lax.pmean(jax.grad(loss)(p, x, y), "data")
      return tx.update(g, state, params, grad_fn=gf)
    expect_error(sharded_call(reducing), "axis_name='data'", "already reduced")
    # (d) per-device gradients but no axis_name: every device would step differently.
    tx_none = make()
    expect_error(sharded_call(lambda x, y: step(tx_none, x, y, pcast)), "axis_name='data'")
  expect_error(lambda: hessian.hvp(grad_fn_of(x, y), params, v, axis_name="data"),
               "axis_name='data'")
  print("CHECKED", "errors")
  """
)


@pytest.mark.multidevice
def test_every_device_mapping_gives_m_sharpness_identical_state_and_clear_errors():
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags("--xla_force_host_platform_device_count=4")
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
  for part in ("m-sharpness", "pmean in the loss", "hvp", "jit", "shardings", "errors"):
    assert f"CHECKED {part}" in proc.stdout, proc.stdout
