"""Tests of the Flax glue: BatchNorm and dropout conventions, Linen/NNX agreement, jit."""

import collections
import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import xsam_jax
from xsam_jax import training

NUM_IN, NUM_HIDDEN, NUM_CLASSES, BATCH = 5, 8, 3, 16
MOMENTUM = 0.9  # BatchNorm momentum; lower than the default so one pass moves the stats.


class LinenMLP(nn.Module):
  """Dense -> BatchNorm -> relu -> Dropout -> Dense, called as ``apply(v, x, train=...)``."""

  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(NUM_HIDDEN, name="dense1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, name="bn")(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
    return nn.Dense(NUM_CLASSES, name="dense2")(x)


class NNXMLP(nnx.Module):
  """The same architecture in NNX, with the same parameter names."""

  def __init__(self, dropout_rate: float, rngs: nnx.Rngs):
    self.dense1 = nnx.Linear(NUM_IN, NUM_HIDDEN, rngs=rngs)
    self.bn = nnx.BatchNorm(NUM_HIDDEN, momentum=MOMENTUM, rngs=rngs)
    self.drop = nnx.Dropout(dropout_rate, rngs=rngs)
    self.dense2 = nnx.Linear(NUM_HIDDEN, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.dense2(self.drop(nnx.relu(self.bn(self.dense1(x)))))


def xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def nnx_loss(model, x, y):
  return xent(model(x), y)


@functools.cache
def batch():
  kx, ky = jax.random.split(jax.random.key(42))
  x = 1.0 + 2.0 * jax.random.normal(kx, (BATCH, NUM_IN))  # BatchNorm has something to track.
  return x, jax.random.randint(ky, (BATCH,), 0, NUM_CLASSES)


@functools.cache
def initial_variables():
  return jax.jit(LinenMLP().init, static_argnames="train")(
    jax.random.key(0), batch()[0], train=False
  )


@functools.cache
def linen_apply(dropout_rate):
  return LinenMLP(dropout_rate).apply  # one object per model: jit caches key on it


def linen_state(tx, dropout_rate=0.0):
  variables = initial_variables()  # dropout has no variables
  return training.TrainState.create(
    apply_fn=linen_apply(dropout_rate),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=tx,
  )


def nnx_model_like(state, dropout_rate=0.0):
  """An NNX model holding the weights and statistics of a Linen ``TrainState``."""
  model = NNXMLP(dropout_rate, nnx.Rngs(params=1, dropout=2))
  for name in ("dense1", "dense2"):
    getattr(model, name).kernel[...] = state.params[name]["kernel"]
    getattr(model, name).bias[...] = state.params[name]["bias"]
  model.bn.scale[...] = state.params["bn"]["scale"]
  model.bn.bias[...] = state.params["bn"]["bias"]
  model.bn.mean[...] = state.batch_stats["bn"]["mean"]
  model.bn.var[...] = state.batch_stats["bn"]["var"]
  return model


# Traces of the two training steps, to check that each compiles once. The steps and the
# transforms below are shared by the tests, so that they share compiled programs too.
TRACES = collections.Counter()


def linen_step(state, x, y, dropout_rng=None):
  TRACES["linen"] += 1
  out = training.linen_grad_fns(state, xent, x, y, dropout_rng=dropout_rng)
  state = state.apply_gradients(
    grads=out.grads,
    batch_stats=out.batch_stats,
    grad_fn=out.grad_fn,
    eig_grad_fn=out.eig_grad_fn,
  )
  return state, out.loss


def nnx_step(model, optimizer, x, y):
  TRACES["nnx"] += 1
  out = training.nnx_grad_fns(model, nnx_loss, x, y)
  optimizer.update(model, out.grads, grad_fn=out.grad_fn, eig_grad_fn=out.eig_grad_fn)
  return out.loss


def ascent_point(params, grads, rho):
  """``w + rho g/||g||``: where the perturbed pass of SAM and X-SAM evaluates the loss."""
  return optax.tree.add_scale(params, rho / optax.tree.norm(grads), grads)


def max_abs_diff(a, b):
  return max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


RHO = 0.5  # large, so that the perturbed pass's statistics are clearly different

TXS = {
  "sam": optax.chain(xsam_jax.sam(rho=RHO), optax.sgd(0.1)),
  "xsam": optax.chain(
    xsam_jax.xsam(rho=RHO, alpha=0.5, refresh_every=2, num_iters=3), optax.sgd(0.1)
  ),
}
linen_step_jit = jax.jit(linen_step)
nnx_step_jit = nnx.jit(nnx_step)


# --------------------------------------------------------------------------------------------
# BatchNorm statistics come from the clean pass only.


@pytest.mark.parametrize("method", ["sam", "xsam"])
def test_linen_step_keeps_batch_stats_of_the_clean_pass_only(method):
  x, y = batch()
  state = linen_state(TXS[method])
  new_state, _ = linen_step_jit(state, x, y)

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  apply = jax.jit(LinenMLP().apply, static_argnames=("train", "mutable"))
  _, clean = apply(variables, x, train=True, mutable=("batch_stats",))
  chex.assert_trees_all_close(new_state.batch_stats, clean["batch_stats"], atol=1e-6)

  # Had the perturbed pass updated them too, the statistics would be these instead.
  grads = jax.jit(lambda s: training.linen_grad_fns(s, xent, x, y).grads)(state)
  adv = {"params": ascent_point(state.params, grads, RHO), "batch_stats": clean["batch_stats"]}
  _, both = apply(adv, x, train=True, mutable=("batch_stats",))
  assert max_abs_diff(both["batch_stats"], clean["batch_stats"]) > 1e-2


@pytest.mark.parametrize("method", ["sam", "xsam"])
def test_nnx_step_keeps_batch_stats_of_the_clean_pass_only(method):
  x, y = batch()
  model = nnx_model_like(linen_state(optax.identity()))
  reference = nnx.clone(model)
  grads = nnx.jit(lambda m: nnx.grad(nnx_loss)(m, x, y))(nnx.clone(model))
  nnx_step_jit(model, nnx.Optimizer(model, TXS[method], wrt=nnx.Param), x, y)

  reference(x)  # the clean pass alone, in train mode
  clean = nnx.as_pure(nnx.state(reference, nnx.BatchStat))
  chex.assert_trees_all_close(nnx.as_pure(nnx.state(model, nnx.BatchStat)), clean, atol=1e-6)

  # Had the perturbed pass updated them too, the statistics would be these instead.
  params = nnx.as_pure(nnx.state(reference, nnx.Param))
  nnx.update(reference, ascent_point(params, nnx.as_pure(grads), RHO))
  reference(x)
  both = nnx.as_pure(nnx.state(reference, nnx.BatchStat))
  assert max_abs_diff(both, clean) > 1e-2


# --------------------------------------------------------------------------------------------
# grad_fn is the clean loss (same dropout mask); eig_grad_fn is the eval-mode loss.


def test_linen_grad_fn_at_clean_params_reproduces_clean_gradient_with_same_dropout_mask():
  x, y = batch()
  state = linen_state(optax.identity(), dropout_rate=0.5)

  @jax.jit
  def run(state, key, other_key):
    out = training.linen_grad_fns(state, xent, x, y, dropout_rng=key)
    other = training.linen_grad_fns(state, xent, x, y, dropout_rng=other_key)
    return out.grads, out.grad_fn(state.params), other.grads

  grads, again, other_mask = run(state, jax.random.key(1), jax.random.key(2))
  chex.assert_trees_all_close(again, grads, atol=1e-6)
  assert max_abs_diff(other_mask, grads) > 1e-3  # dropout matters, so the key was shared


def test_nnx_grad_fn_at_clean_params_reproduces_clean_gradient_with_same_dropout_mask():
  x, y = batch()
  model = nnx_model_like(linen_state(optax.identity()), dropout_rate=0.5)

  @nnx.jit
  def run(model):
    out = training.nnx_grad_fns(model, nnx_loss, x, y)
    pure_params = nnx.as_pure(nnx.state(model, nnx.Param))  # what nnx.Optimizer passes
    again = out.grad_fn(pure_params)
    next_step = training.nnx_grad_fns(model, nnx_loss, x, y)  # the RNG stream has moved on
    return nnx.as_pure(out.grads), again, nnx.as_pure(next_step.grads)

  grads, again, next_mask = run(model)
  chex.assert_trees_all_equal_structs(again, grads)
  chex.assert_trees_all_close(again, grads, atol=1e-6)
  assert max_abs_diff(next_mask, grads) > 1e-3  # dropout matters, so the RNG was shared


def test_linen_eig_grad_fn_is_the_eval_mode_gradient_with_running_averages():
  x, y = batch()
  state = linen_state(optax.identity(), dropout_rate=0.5)
  moved = {"bn": {"mean": jnp.full((NUM_HIDDEN,), 0.7), "var": jnp.full((NUM_HIDDEN,), 3.0)}}
  state = state.replace(batch_stats=moved)

  @jax.jit
  def run(state):
    out = training.linen_grad_fns(state, xent, x, y, dropout_rng=jax.random.key(1))
    return out.eig_grad_fn(state.params), out.grad_fn(state.params)

  def eval_loss(params):
    logits = state.apply_fn({"params": params, "batch_stats": moved}, x, train=False)
    return xent(logits, y)

  eig_grads, train_grads = run(state)
  chex.assert_trees_all_close(eig_grads, jax.jit(jax.grad(eval_loss))(state.params), atol=1e-6)
  assert max_abs_diff(eig_grads, train_grads) > 1e-2


def test_nnx_eig_grad_fn_is_the_eval_mode_gradient_with_running_averages():
  x, y = batch()
  model = nnx_model_like(linen_state(optax.identity()), dropout_rate=0.5)
  model.bn.mean[...] = jnp.full((NUM_HIDDEN,), 0.7)
  model.bn.var[...] = jnp.full((NUM_HIDDEN,), 3.0)
  reference = nnx.clone(model)
  reference.eval()

  @nnx.jit
  def run(model):
    out = training.nnx_grad_fns(model, nnx_loss, x, y)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    return out.eig_grad_fn(params), out.grad_fn(params)

  eig_grads, train_grads = run(model)
  expected = nnx.jit(lambda m: nnx.as_pure(nnx.grad(nnx_loss)(m, x, y)))(reference)
  chex.assert_trees_all_close(eig_grads, expected, atol=1e-6)
  assert max_abs_diff(eig_grads, train_grads) > 1e-2
  assert not model.bn.use_running_average and not model.drop.deterministic  # mode untouched


class LinenLinear(nn.Module):
  """A model without BatchNorm or dropout."""

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return nn.Dense(NUM_CLASSES)(x)


def test_linen_helper_works_without_batch_stats_and_returns_the_aux_output():
  x, y = batch()
  model = LinenLinear()
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
  state = training.TrainState.create(
    apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1)
  )
  loss_and_logits = lambda logits, y: (xent(logits, y), logits)

  @jax.jit
  def run(state):
    out = training.linen_grad_fns(state, loss_and_logits, x, y, has_aux=True)
    return out.aux, out.batch_stats, out.grads, out.grad_fn(state.params)

  logits, batch_stats, grads, again = run(state)
  chex.assert_trees_all_close(logits, model.apply(variables, x, train=True), atol=1e-6)
  assert batch_stats is None
  expected = jax.grad(lambda p: xent(model.apply({"params": p}, x, train=True), y))(state.params)
  chex.assert_trees_all_close(grads, expected, atol=1e-6)
  chex.assert_trees_all_close(again, expected, atol=1e-6)


def test_nnx_helper_returns_the_aux_output_of_the_clean_pass():
  x, _ = batch()
  model = nnx_model_like(linen_state(optax.identity()))
  reference = nnx.clone(model)

  @nnx.jit
  def run(model):
    return training.nnx_grad_fns(model, lambda m: (m(x).sum(), m(x)), has_aux=True).aux

  chex.assert_trees_all_close(run(model), reference(x), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Linen and NNX agree; everything compiles once.


@pytest.mark.parametrize("method", ["sam", "xsam"])
def test_nnx_and_linen_steps_agree_for_the_same_weights(method):
  x, y = batch()
  state = linen_state(TXS[method])
  model = nnx_model_like(state)
  optimizer = nnx.Optimizer(model, state.tx, wrt=nnx.Param)
  traces = TRACES.copy()
  for _ in range(3):  # with xsam: refresh, keep, refresh
    state, linen_loss = linen_step_jit(state, x, y)
    loss = nnx_step_jit(model, optimizer, x, y)
    np.testing.assert_allclose(loss, linen_loss, rtol=1e-5)
    chex.assert_trees_all_close(
      nnx.as_pure(nnx.state(model, nnx.Param)).to_pure_dict(), state.params, atol=1e-5
    )
    chex.assert_trees_all_close(
      nnx.as_pure(nnx.state(model, nnx.BatchStat)).to_pure_dict(), state.batch_stats, atol=1e-5
    )
  assert all(TRACES[k] - traces[k] <= 1 for k in ("linen", "nnx"))  # one compile for 3 steps
  opt_state = nnx.as_pure(optimizer.opt_state)
  assert int(optax.tree.get(opt_state, "count")) == int(optimizer.step[...]) == 3
  if method == "xsam":  # the NNX optimizer refreshed the same eigenvector
    chex.assert_trees_all_close(
      optax.tree.get(opt_state, "eigval"), optax.tree.get(state.opt_state, "eigval"), rtol=1e-4
    )


def test_train_state_forwards_extra_args_and_requires_grad_fn_for_xsam():
  x, y = batch()
  state = linen_state(optax.chain(xsam_jax.xsam(rho=0.05), optax.sgd(0.1)))

  @jax.jit
  def step(state):
    out = training.linen_grad_fns(state, xent, x, y)
    with pytest.raises(ValueError, match="grad_fn"):  # raised while tracing
      state.apply_gradients(grads=out.grads, batch_stats=out.batch_stats)
    new_state = state.apply_gradients(
      grads=out.grads, batch_stats=out.batch_stats, grad_fn=out.grad_fn, refresh=False
    )
    return new_state, out.batch_stats

  new_state, batch_stats = step(state)
  assert int(new_state.step) == 1
  chex.assert_trees_all_equal(new_state.batch_stats, batch_stats)  # a field: replaced
  assert max_abs_diff(new_state.batch_stats, state.batch_stats) > 1e-2
  assert float(optax.tree.get(new_state.opt_state, "eigval")) == 0.0  # refresh=False reached tx


def test_train_state_step_compiles_once_across_eigenvector_refreshes():
  # In a fresh interpreter: under xdist, CI twice counted one extra trace after earlier tests in
  # the same worker (cause not found: it does not reproduce alone or with the suspect files).
  # The check itself is unchanged: 4 steps of one jitted function, refresh at steps 0 and 2.
  script = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "tests")
    import optax
    import test_training as t
    x, y = t.batch()
    state = t.linen_state(t.TXS["xsam"])
    eigvals = []
    for _ in range(4):
      state, _ = t.linen_step_jit(state, x, y)
      eigvals.append(float(optax.tree.get(state.opt_state, "eigval")))
    assert t.TRACES["linen"] == 1, t.TRACES
    assert int(state.step) == 4
    assert eigvals[0] != 0.0 and eigvals[1] == eigvals[0]  # refreshed at step 0, kept at 1
    assert eigvals[2] != eigvals[1] and eigvals[3] == eigvals[2]  # refreshed at step 2
    print("OK")
    """
  )
  root = Path(__file__).resolve().parents[1]
  proc = subprocess.run(
    [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_nnx_step_runs_alike_under_nnx_jit_and_plain_jax_jit_of_split_merge():
  x, y = batch()
  model = nnx_model_like(linen_state(optax.identity()))
  optimizer = nnx.Optimizer(model, TXS["sam"], wrt=nnx.Param)
  graphdef, split_state = nnx.split((nnx.clone(model), nnx.clone(optimizer)))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def split_merge_step(split_state, x, y):
    model, optimizer = nnx.merge(graphdef, split_state)
    loss = nnx_step(model, optimizer, x, y)
    return nnx.state((model, optimizer)), loss

  traces = TRACES["nnx"]
  losses = []
  for _ in range(3):
    losses.append(float(nnx_step_jit(model, optimizer, x, y)))
    split_state, _ = split_merge_step(split_state, x, y)
  assert TRACES["nnx"] - traces <= 2  # nnx.jit once (0 if cached) and jax.jit once
  assert losses[-1] < losses[0]
  assert int(optimizer.step[...]) == 3
  weights = (nnx.Param, nnx.BatchStat)
  chex.assert_trees_all_close(
    nnx.as_pure(nnx.state(model, weights)), nnx.as_pure(nnx.state(split_state[0], weights))
  )


def test_nnx_refresh_eigenvector_updates_the_optimizer_state_in_place():
  from flax import nnx

  class Quad(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(3))

    def __call__(self, x):
      return x * self.w[...]

  scales = jnp.array([5.0, 2.0, 1.0])
  model = Quad()
  optimizer = nnx.Optimizer(model, optax.chain(xsam_jax.xsam(), optax.sgd(0.1)), wrt=nnx.Param)
  loss_fn = lambda m, x: 0.5 * jnp.sum(scales * m(x) ** 2)
  out = training.nnx_grad_fns(model, loss_fn, jnp.ones(3))
  training.nnx_refresh_eigenvector(optimizer, model, out.eig_grad_fn, num_iters=40)
  state = nnx.as_pure(optimizer.opt_state)
  np.testing.assert_allclose(optax.tree.get(state, "eigval"), 5.0, rtol=1e-4)
  eigvec = jax.tree.leaves(optax.tree.get(state, "eigvec"))[0]
  np.testing.assert_allclose(np.abs(eigvec), [1.0, 0.0, 0.0], atol=1e-3)


# --------------------------------------------------------------------------------------------
# ESAM's sharpness-sensitive data selection


def _per_example_loss(params, batch):
  """The per-example losses of tests/numpy_mlp.py's MLP: 0.5 * sum_j r_ij^2."""
  import numpy_mlp as mlp

  x, y = batch
  return jax.vmap(lambda a, b: mlp.loss(params, a[None], b[None]))(x, y)


def _top_k_np(clean, perturbed, fraction):
  """NumPy: the floor(fraction * n) largest loss rises, largest first (stable on ties)."""
  k = int(fraction * len(clean))
  return np.argsort(-(np.asarray(perturbed) - np.asarray(clean)), kind="stable")[:k]


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.7, 1.0])
def test_select_sharp_examples_keeps_the_largest_loss_rises_like_numpy_top_k(fraction):
  rng = np.random.default_rng(1)
  clean, perturbed = rng.random(10), rng.random(10)
  sel = training.select_sharp_examples(jnp.asarray(clean), jnp.asarray(perturbed), fraction)
  want = _top_k_np(clean, perturbed, fraction)
  np.testing.assert_array_equal(np.asarray(sel.indices), want)
  np.testing.assert_array_equal(np.asarray(sel.mask), np.isin(np.arange(10), want))
  np.testing.assert_allclose(sel.sharpness, perturbed - clean, atol=1e-6)
  if fraction < 1:  # the rise, not the perturbed loss, decides (so the test can fail)
    assert set(want) != set(np.argsort(-perturbed)[: len(want)])


def test_sharp_examples_grad_fn_is_the_gradient_on_the_top_fraction_at_the_given_point():
  import numpy_mlp as mlp

  params = mlp.init()
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 2))
  clean = _per_example_loss(params, (x, y))
  point = jax.tree.map(lambda w: w + 0.3 * jnp.sign(w), params)  # some other parameters
  grad_fn = jax.jit(training.sharp_examples_grad_fn(_per_example_loss, (x, y), clean, 0.5))
  got = grad_fn(point)
  sel = _top_k_np(clean, _per_example_loss(point, (x, y)), 0.5)
  want = mlp.grad_np(mlp.to_np(point), x[sel], y[sel])  # mean loss over the 6 selected
  for k in mlp.KEYS:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-4, atol=1e-6)
  worst = np.argsort(_per_example_loss(point, (x, y)) - clean)[:6]  # the opposite choice
  other = mlp.grad_np(mlp.to_np(point), x[worst], y[worst])
  assert not np.allclose(np.asarray(got["w1"]), other["w1"], atol=1e-4)


def test_esam_with_data_selection_matches_numpy_over_jitted_steps_and_compiles_once():
  # The whole of ESAM: tensors drawn with probability beta (xsam_jax.esam) and the second
  # gradient on the half of the batch whose loss rose most (sharp_examples_grad_fn).
  import numpy_mlp as mlp

  lr, rho, beta, key, steps = 0.1, 0.3, 0.5, 4, 4
  params = mlp.init()
  rng = np.random.default_rng(5)
  data = [(rng.normal(size=(8, 3)), rng.normal(size=(8, 2))) for _ in range(steps)]
  tx = optax.chain(xsam_jax.esam(rho, beta=beta, key=key), optax.sgd(lr))

  @jax.jit
  def step(params, state, x, y):
    (_, clean), grads = jax.value_and_grad(
      lambda p: (jnp.mean(_per_example_loss(p, (x, y))), _per_example_loss(p, (x, y))),
      has_aux=True,
    )(params)
    grad_fn = training.sharp_examples_grad_fn(_per_example_loss, (x, y), clean, 0.5)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  p_ref = mlp.to_np(params)

  def losses_np(p, x, y):
    return np.array([mlp.loss(p, x[i : i + 1], y[i : i + 1]) for i in range(len(x))])

  for t, (x, y) in enumerate(data):
    params, state = step(params, state, x, y)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(key), t), len(mlp.KEYS))
    drawn = {k: bool(jax.random.bernoulli(s, beta)) for k, s in zip(mlp.KEYS, keys, strict=True)}
    g = mlp.grad_np(p_ref, x, y)
    mg = {k: g[k] * drawn[k] for k in mlp.KEYS}
    eps = {k: rho / beta * mg[k] / (mlp.norm(mg) + 1e-12) for k in mlp.KEYS}
    point = mlp.axpy(1.0, eps, p_ref)
    sel = _top_k_np(losses_np(p_ref, x, y), losses_np(point, x, y), 0.5)
    p_ref = mlp.axpy(-lr, mlp.grad_np(point, x[sel], y[sel]), p_ref)
    for k in mlp.KEYS:
      np.testing.assert_allclose(np.asarray(params[k]), p_ref[k], rtol=1e-4, atol=1e-5)
  assert step._cache_size() == 1


@pytest.mark.parametrize(
  ("clean", "perturbed", "fraction", "match"),
  [
    (np.zeros(4), np.zeros(4), 0.0, r"`fraction` \(the paper's gamma\) must be a float in"),
    (np.zeros(4), np.zeros(4), 1.5, r"`fraction` \(the paper's gamma\) must be a float in"),
    (np.zeros(4), np.zeros(4), "0.5", r"`fraction` \(the paper's gamma\) must be a float in"),
    (np.zeros(4), np.zeros(4), 0.2, "selects none"),
    (np.zeros((4, 2)), np.zeros((4, 2)), 0.5, "must be 1-D per-example losses"),
    (np.zeros(4), np.zeros(5), 0.5, "must be 1-D per-example losses"),
  ],
)
def test_bad_selection_arguments_raise_a_value_error_naming_them(clean, perturbed, fraction, match):
  with pytest.raises(ValueError, match=match):
    training.select_sharp_examples(clean, perturbed, fraction)


def test_sharp_examples_grad_fn_refuses_a_batch_of_another_size():
  batch = (np.zeros((5, 3)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="every leaf of `batch` must have the 4 examples"):
    training.sharp_examples_grad_fn(_per_example_loss, batch, np.zeros(4), 0.5)
  with pytest.raises(ValueError, match="selects none"):
    training.sharp_examples_grad_fn(_per_example_loss, (np.zeros((4, 3)),), np.zeros(4), 0.1)


def test_xla_counts_sams_flops_for_esams_weight_half_and_fewer_with_data_selection():
  # The cost claim of the README: a masked perturbation skips no backward computation in JAX
  # (the compiled step of esam has sam's FLOPs), while the data selection's static-size gather
  # does remove work (forward on n plus forward and backward on n/2, instead of both on n).
  def conv(h, w):
    return jax.lax.conv_general_dilated(
      h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def per_example_loss(p, batch):
    x, y = batch
    h = jax.nn.relu(conv(jax.nn.relu(conv(x, p["c1"])), p["c2"]))
    return optax.softmax_cross_entropy_with_integer_labels(h.mean((1, 2)) @ p["w"], y)

  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "c1": 0.1 * jax.random.normal(keys[0], (3, 3, 3, 8)),
    "c2": 0.1 * jax.random.normal(keys[1], (3, 3, 8, 8)),
    "w": 0.1 * jax.random.normal(keys[2], (8, 3)),
  }
  x, y = jax.random.normal(keys[3], (16, 8, 8, 3)), jnp.arange(16) % 3

  def flops(method, select):
    tx = optax.chain(method, optax.sgd(0.1))

    def step(p, s):
      (_, clean), g = jax.value_and_grad(
        lambda q: (per_example_loss(q, (x, y)).mean(), per_example_loss(q, (x, y))), has_aux=True
      )(p)
      if select:
        grad_fn = training.sharp_examples_grad_fn(per_example_loss, (x, y), clean, 0.5)
      else:
        grad_fn = jax.grad(lambda q: per_example_loss(q, (x, y)).mean())
      return tx.update(g, s, p, grad_fn=grad_fn)

    cost = jax.jit(step).lower(params, tx.init(params)).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  sam = flops(xsam_jax.sam(0.05), select=False)
  np.testing.assert_allclose(flops(xsam_jax.esam(0.05, beta=0.5), select=False), sam, rtol=1e-3)
  assert flops(xsam_jax.esam(0.05, beta=0.5), select=True) < 0.95 * sam


# MESA: the KL term towards the EMA teacher.


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_mesa_loss_is_cross_entropy_plus_weight_tau_squared_kl_from_teacher_to_student():
  rng = np.random.default_rng(0)
  z, z_ema = rng.normal(size=(6, 4)) * 3, rng.normal(size=(6, 4)) * 3
  labels = rng.integers(0, 4, size=6)
  tau, lam = 2.5, 0.7
  # NumPy, float64: KL(q || p) with q the teacher's softened softmax, summed over classes.
  log_p, log_q = _np_log_softmax(z / tau), _np_log_softmax(z_ema / tau)
  kl = tau**2 * np.mean(np.sum(np.exp(log_q) * (log_q - log_p), -1))
  ce = -np.mean(_np_log_softmax(z)[np.arange(6), labels])
  args = (jnp.asarray(z, jnp.float32), jnp.asarray(z_ema, jnp.float32))
  got_kl = training.trajectory_kl(*args, temperature=tau)
  got = training.mesa_loss(*args, jnp.asarray(labels), weight=lam, temperature=tau)
  np.testing.assert_allclose(got_kl, kl, rtol=1e-5)
  np.testing.assert_allclose(got, ce + lam * kl, rtol=1e-5)
  # Its gradient: tau (p - q) / B on the student's logits, nothing on the teacher's.
  g_z, g_ema = jax.grad(lambda a, b: training.trajectory_kl(a, b, temperature=tau), argnums=(0, 1))(
    *args
  )
  np.testing.assert_allclose(g_z, tau * (np.exp(log_p) - np.exp(log_q)) / 6, atol=1e-6)
  assert not np.any(np.asarray(g_ema))


def test_ema_update_matches_numpy_keeps_dtypes_and_copies_integer_leaves():
  rng = np.random.default_rng(1)
  steps = [rng.normal(size=3) for _ in range(4)]
  tree = lambda w: {"f32": jnp.asarray(w, jnp.float32), "bf16": jnp.asarray(w, jnp.bfloat16)}
  state = training.mesa_init({**tree(steps[0]), "n": jnp.asarray(0)})
  expected = steps[0]
  for i, w in enumerate(steps[1:], start=1):
    state = training.mesa_update(state, {**tree(w), "n": jnp.asarray(i)}, decay=0.75)
    expected = 0.75 * expected + 0.25 * w
  assert int(state.count) == 3 and int(state.ema["n"]) == 3
  assert (state.ema["f32"].dtype, state.ema["bf16"].dtype) == (jnp.float32, jnp.bfloat16)
  np.testing.assert_allclose(state.ema["f32"], expected, rtol=1e-6)
  np.testing.assert_allclose(np.float32(state.ema["bf16"]), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
  ("call", "name"),
  [
    (lambda: training.ema_update(jnp.ones(2), jnp.ones(2), 1.0), "decay"),
    (lambda: training.ema_update(jnp.ones(2), jnp.ones(2), -0.1), "decay"),
    (lambda: training.mesa_update(training.mesa_init(1.0), 1.0, decay=float("nan")), "decay"),
    (
      lambda: training.mesa_loss(
        jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.zeros(1, int), temperature=0.0
      ),
      "temperature",
    ),
    (
      lambda: training.trajectory_kl(jnp.ones((1, 2)), jnp.ones((1, 2)), temperature=-1.0),
      "temperature",
    ),
    (
      lambda: training.mesa_loss(
        jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.zeros(1, int), weight=-0.5
      ),
      "weight",
    ),
    (
      lambda: training.trajectory_kl(jnp.ones((1, 2)), jnp.ones((1, 3)), temperature=1.0),
      "ema_logits",
    ),
    (lambda: linen_state_mesa(optax.sgd(0.1), decay=1.0), "decay"),
  ],
)
def test_bad_mesa_arguments_raise_a_value_error_naming_the_argument(call, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    call()


def linen_state_mesa(tx, decay):
  variables = initial_variables()
  return training.MESATrainState.create(
    apply_fn=linen_apply(0.0),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=tx,
    mesa_decay=decay,
  )


@functools.partial(jax.jit, static_argnames=("weight", "temperature"))
def mesa_linen_step(state, x, y, weight, temperature=4.0):
  teacher = state.teacher_logits(x)
  loss_fn = lambda z, t: training.mesa_loss(z, t[1], t[0], weight=weight, temperature=temperature)
  out = training.linen_grad_fns(state, loss_fn, x, (y, teacher))
  return state.apply_gradients(grads=out.grads, batch_stats=out.batch_stats)


@jax.jit
def plain_linen_step(state, x, y):
  out = training.linen_grad_fns(state, xent, x, y)
  return state.apply_gradients(grads=out.grads, batch_stats=out.batch_stats)


def test_mesa_with_weight_zero_trains_bit_for_bit_like_plain_sgd():
  tx = optax.sgd(0.5, momentum=0.9)
  mesa, plain = linen_state_mesa(tx, decay=0.5), linen_state(tx)
  x, y = batch()
  for _ in range(3):
    mesa, plain = mesa_linen_step(mesa, x, y, weight=0.0), plain_linen_step(plain, x, y)
  np.testing.assert_array_equal(
    jax.flatten_util.ravel_pytree(mesa.params)[0], jax.flatten_util.ravel_pytree(plain.params)[0]
  )
  chex.assert_trees_all_equal(mesa.batch_stats, plain.batch_stats)
  # ... and the term does move the weights once it has a weight (the test can fail).
  moved = mesa_linen_step(mesa_linen_step(linen_state_mesa(tx, 0.5), x, y, 1.0), x, y, 1.0)
  assert (
    max_abs_diff(
      moved.params,
      mesa_linen_step(mesa_linen_step(linen_state_mesa(tx, 0.5), x, y, 0.0), x, y, 0.0).params,
    )
    > 1e-4
  )


def test_mesa_train_state_averages_params_and_batch_stats_after_each_step_and_teaches_in_eval():
  decay = 0.6
  state = linen_state_mesa(optax.sgd(0.5), decay)
  x, y = batch()
  flat = lambda s: jax.flatten_util.ravel_pytree({"params": s.params, "bn": s.batch_stats})[0]
  expected = np.asarray(flat(state), np.float64)  # a copy of the initial variables
  for _ in range(3):
    state = mesa_linen_step(state, x, y, weight=1.0)
    expected = decay * expected + (1 - decay) * np.asarray(flat(state), np.float64)
  ema = jax.flatten_util.ravel_pytree(
    {"params": state.mesa.ema["params"], "bn": state.mesa.ema["batch_stats"]}
  )[0]
  assert int(state.mesa.count) == 3
  np.testing.assert_allclose(ema, expected, rtol=1e-5, atol=1e-6)
  # The teacher is the model at the averaged variables, in eval mode (running averages).
  np.testing.assert_allclose(
    state.teacher_logits(x), state.apply_fn(state.mesa.ema, x, train=False), rtol=1e-6
  )


def test_one_mesa_step_of_a_linear_softmax_model_matches_numpy():
  # logits = x W: the step's gradient is x^T [(softmax(z) - onehot) + lam tau (p - q)] / B,
  # with p, q the softened softmaxes of the student and the EMA teacher.
  class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      return nn.Dense(NUM_CLASSES, use_bias=False)(x)

  x, y = batch()
  params = Linear().init(jax.random.key(3), x, train=False)["params"]
  state = training.MESATrainState.create(
    apply_fn=Linear().apply, params=params, tx=optax.sgd(0.3), mesa_decay=0.5
  )
  lam, tau, lr, decay = 0.9, 3.0, 0.3, 0.5
  xn, onehot = np.asarray(x, np.float64), np.eye(NUM_CLASSES)[np.asarray(y)]
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  w_ema = w.copy()
  softmax = lambda z: np.exp(_np_log_softmax(z))
  for _ in range(3):
    state = mesa_linen_step(state, x, y, weight=lam, temperature=tau)
    z, z_ema = xn @ w, xn @ w_ema
    dz = (softmax(z) - onehot) + lam * tau * (softmax(z / tau) - softmax(z_ema / tau))
    w = w - lr * xn.T @ dz / BATCH
    w_ema = decay * w_ema + (1 - decay) * w
  np.testing.assert_allclose(state.params["Dense_0"]["kernel"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    state.mesa.ema["params"]["Dense_0"]["kernel"], w_ema, rtol=1e-5, atol=1e-6
  )


def test_nnx_mesa_steps_match_the_linen_ones():
  x, y = batch()
  tx, decay, lam, tau = optax.sgd(0.5), 0.6, 0.8, 4.0
  state = linen_state_mesa(tx, decay)
  model = nnx_model_like(state)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  mesa = training.nnx_mesa_init(model)

  def loss_fn(model, x, labels, teacher):
    return training.mesa_loss(model(x), teacher, labels, weight=lam, temperature=tau)

  @nnx.jit
  def nnx_mesa_step(model, optimizer, mesa, x, y):
    teacher = training.nnx_teacher(model, mesa)(x)
    out = training.nnx_grad_fns(model, loss_fn, x, y, teacher)
    optimizer.update(model, out.grads)
    return training.nnx_mesa_update(mesa, model, decay=decay)

  for _ in range(3):
    state = mesa_linen_step(state, x, y, weight=lam, temperature=tau)
    mesa = nnx_mesa_step(model, optimizer, mesa, x, y)
  np.testing.assert_allclose(
    model.dense2.kernel[...], state.params["dense2"]["kernel"], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    mesa.ema["bn"]["mean"], state.mesa.ema["batch_stats"]["bn"]["mean"], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    mesa.ema["dense1"]["kernel"], state.mesa.ema["params"]["dense1"]["kernel"], rtol=1e-5, atol=1e-6
  )
  assert not model.bn.use_running_average  # nnx_teacher switched a copy to eval mode
