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
    "eigen_sam": lambda **kw: xsam_jax.eigen_sam(rho=0.1, alpha=0.3, power_iters=ITERS, **kw),
    "xsam": lambda **kw: xsam_jax.xsam(rho=0.1, alpha=0.3, power_iters=ITERS, **kw),
    "xsam_lanczos": lambda **kw: xsam_jax.xsam(
      rho=0.1, alpha=0.3, power_iters=8, tracker="lanczos", **kw),
    # Finite-difference HVPs: each device differences its own gradients (its clean gradient as
    # the base), then the products are averaged.
    "xsam_fd": lambda **kw: xsam_jax.xsam(
      rho=0.1, alpha=0.3, power_iters=ITERS, hvp_method="forward_difference", **kw),
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

  def reference(name):
    # One device, shard by shard: the mean of each shard's own sharpness-aware gradient, the
    # eigenvector from the full batch (pmean of HVPs = HVP of the mean loss).
    tx = METHODS[name]()
    full_out, full_state = step(tx, x, y, same)
    outs, states = [], []
    for i in range(N):
      st = tx.init(params)
      if hasattr(st, "eigvec"):
        st = st._replace(eigvec=full_state.eigvec, eigval=full_state.eigval)
        if name.startswith("xsam"):  # correction applied to the mean: take SAM per shard
          sam_tx = xsam_jax.sam(rho=0.1)
          o, s = sam_tx.update(jax.grad(loss)(params, xs[i], ys[i]), sam_tx.init(params),
                               params, grad_fn=grad_fn_of(xs[i], ys[i]))
          outs.append(o), states.append(s)
          continue
      o, s = tx.update(jax.grad(loss)(params, xs[i], ys[i]), st, params,
                       grad_fn=grad_fn_of(xs[i], ys[i]), refresh=False)
      outs.append(o), states.append(s)
    mean = lambda trees: jax.tree.map(lambda *a: sum(a) / N, *trees)
    out = mean(outs)
    if not name.startswith("xsam"):
      return out, mean(states)._replace(count=full_state.count), full_state
    v = full_state.eigvec
    norm = optax.tree.norm(out)
    unit = jax.tree.map(lambda a: a / norm, out)
    c = optax.tree.vdot(unit, v)
    corrected = jax.tree.map(lambda u, vv: u - 0.3 * c * vv, unit, v)
    return corrected, full_state._replace(grad_norm=mean(states).grad_norm, cos=c,
                                          adv_grad_norm=norm,
                                          ascent_curvature=mean(states).ascent_curvature
                                          ), full_state

  def flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])

  def check(name, mode, got):
    out, state = got
    ref_out, ref_state, full_state = reference(name)
    if hasattr(state, "eigvec"):
      # The shared eigenvector is the full-batch one (up to sign), with its eigenvalue.
      assert abs(flat(state.eigvec) @ flat(full_state.eigvec)) > 0.9999, (name, mode)
      np.testing.assert_allclose(state.eigval, full_state.eigval, rtol=1e-4)
      # Recompute the reference correction with the device's own copy of v (sign included).
      sign = np.sign(flat(state.eigvec) @ flat(full_state.eigvec))
      ref_state = ref_state._replace(eigvec=state.eigvec, eigval=state.eigval,
                                     cos=sign * ref_state.cos)
    np.testing.assert_allclose(flat(out), flat(ref_out), rtol=2e-4, atol=2e-6,
                               err_msg=f"{name} {mode}")
    for field in ref_state._fields:
      np.testing.assert_allclose(flat(getattr(state, field)), flat(getattr(ref_state, field)),
                                 rtol=2e-4, atol=2e-6, err_msg=f"{name} {mode} {field}")
    # Shapes and dtypes as after init, so the state can be carried by cond/scan.
    dtypes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert dtypes(state) == dtypes(METHODS[name]().init(params)), (name, mode)

  for name, make in METHODS.items():
    tx = make(axis_name="data")
    check(name, "shard_map(check_vma=True)", in_shard_map(tx, True))
    check(name, "shard_map(check_vma=False)", in_shard_map(tx, False))
    check(name, "pmap", in_pmap(tx))
  print("CHECKED", "m-sharpness")

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
                                      power_iters=ITERS, axis_name="data")
    return st.eigval
  got = jax.jit(jax.shard_map(refresh_in, mesh=mesh, in_specs=(P("data"), P("data")),
                              out_specs=P()))(x, y)
  want = xsam_jax.refresh_eigenvector(tx.init(params), params, grad_fn_of(x, y),
                                      power_iters=ITERS).eigval
  np.testing.assert_allclose(got, want, rtol=1e-4)
  print("CHECKED", "hvp")

  # Plain jit with a sharded batch: nothing special, same as unsharded.
  for name, make in METHODS.items():
    tx = make()
    run = jax.jit(functools.partial(step, tx, local=same))
    sharded = run(jax.device_put(x, NamedSharding(mesh, P("data"))),
                  jax.device_put(y, NamedSharding(mesh, P("data"))))
    # Forward differences amplify the summation-order rounding of a sharded gradient by 1/h.
    atol = 1e-4 if name.endswith("_fd") else 1e-6
    np.testing.assert_allclose(flat(sharded), flat(run(x, y)), rtol=1e-4, atol=atol)
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
  for part in ("m-sharpness", "hvp", "jit", "shardings", "errors"):
    assert f"CHECKED {part}" in proc.stdout, proc.stdout
