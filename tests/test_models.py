"""Tests of the model zoo in ``experiments.models``.

The large models are only traced (``jax.eval_shape``), so nothing is computed for them; the small
ones (SimpleCNN, a tiny WRN) run for real on a handful of images.
"""

from __future__ import annotations

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import (
  MODELS,
  SimpleCNN,
  WideResNet,
  count_params,
  get_model,
  init_model,
)

CIFAR_BATCH = (2, 32, 32, 3)
BN_MODELS = ("resnet18", "resnet34", "resnet50", "wrn28_10")
NHWC = ("NHWC", "HWIO", "NHWC")


def init_key(seed: int = 0) -> jax.Array:
  """A key whose random bits compile fast on XLA:CPU.

  Flax draws every parameter with its own call, and each threefry call costs ~0.5 s of XLA:CPU
  compile time; the ``rbg`` generator compiles in a fraction of that.
  """
  return jax.random.key(seed, impl="rbg")


def numpy_variables(model: nn.Module, input_shape) -> dict:
  """Variables of the right shapes drawn with NumPy, so that no initialiser is compiled.

  Kernels are N(0, 1/fan_in), biases 0, BN scales 1, running means 0 and variances 1.
  """
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if name == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, input_shape))


def images(shape) -> np.ndarray:
  """A fixed batch of standard-normal NHWC images."""
  return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


def abstract_variables(model: nn.Module, input_shape=CIFAR_BATCH):
  """Shapes and dtypes of ``model.init`` without running it."""
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)


def abstract_apply(model: nn.Module, variables, input_shape=CIFAR_BATCH, **kwargs):
  """Shapes and dtypes of ``model.apply`` without running it."""
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), variables, x)


def conv_count(k: int, c_in: int, c_out: int, bias: bool = False) -> int:
  return k * k * c_in * c_out + (c_out if bias else 0)


def dense_count(n_in: int, n_out: int) -> int:
  return n_in * n_out + n_out


def wrn_count(depth: int, k: int, classes: int) -> int:
  """Closed-form parameter count of WRN-depth-k (Zagoruyko & Komodakis, Table 1 layout)."""
  n = (depth - 4) // 6
  total = conv_count(3, 3, 16)
  c_in = 16
  for width in (16 * k, 32 * k, 64 * k):
    for j in range(n):
      c = c_in if j == 0 else width
      total += 2 * c + conv_count(3, c, width) + 2 * width + conv_count(3, width, width)
      if c != width:
        total += conv_count(1, c, width)
    c_in = width
  return total + 2 * c_in + dense_count(c_in, classes)


# ---------------------------------------------------------------------------------------------
# Shapes and parameter counts (traced only).


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_a_cifar_batch_to_float32_logits(name):
  model = get_model(name, num_classes=100)
  variables = abstract_variables(model)
  out = abstract_apply(model, variables, train=False)
  assert out.shape == (2, 100)
  assert out.dtype == jnp.float32
  assert model.num_classes == 100


def test_resnet18_cifar_has_11_17m_parameters():
  params = abstract_variables(get_model("resnet18", 10))["params"]
  assert count_params(params) == 11_173_962


def test_resnet34_cifar_has_21_28m_parameters():
  params = abstract_variables(get_model("resnet34", 10))["params"]
  assert count_params(params) == 21_282_122


def test_resnet50_cifar_has_23_52m_parameters():
  params = abstract_variables(get_model("resnet50", 10))["params"]
  assert count_params(params) == 23_520_842


def test_wrn28_10_cifar_has_36_48m_parameters():
  params = abstract_variables(get_model("wrn28_10", 10))["params"]
  assert wrn_count(28, 10, 10) == 36_479_194
  assert count_params(params) == 36_479_194


def test_wrn_parameter_count_follows_the_closed_form_for_other_depths_and_widths():
  model = WideResNet(depth=16, widen_factor=4, num_classes=100)
  assert count_params(abstract_variables(model)["params"]) == wrn_count(16, 4, 100)


def test_alexnet_cifar_has_23_27m_parameters():
  convs = [(3, 64), (64, 192), (192, 384), (384, 256), (256, 256)]
  expected = sum(conv_count(3, i, o, bias=True) for i, o in convs)
  expected += dense_count(256 * 2 * 2, 4096) + dense_count(4096, 4096) + dense_count(4096, 10)
  params = abstract_variables(get_model("alexnet", 10))["params"]
  assert expected == 23_272_266
  assert count_params(params) == expected


@pytest.mark.parametrize(
  ("input_shape", "flat"), [((2, 8, 8, 1), 2 * 2 * 64), (CIFAR_BATCH, 8 * 8 * 64)]
)
def test_simple_cnn_pools_twice_and_flattens_into_the_hidden_layer(input_shape, flat):
  c_in = input_shape[-1]
  expected = (
    conv_count(3, c_in, 32, True)
    + conv_count(3, 32, 32, True)
    + conv_count(3, 32, 64, True)
    + conv_count(3, 64, 64, True)
    + dense_count(flat, 128)
    + dense_count(128, 10)
  )
  params = abstract_variables(SimpleCNN(num_classes=10), input_shape)["params"]
  assert count_params(params) == expected
  assert params["fc1"]["kernel"].shape == (flat, 128)


def test_simple_cnn_width_scales_every_convolution():
  params = abstract_variables(SimpleCNN(width=8), (2, 8, 8, 1))["params"]
  assert [params[f"conv{i}"]["kernel"].shape[-1] for i in range(1, 5)] == [8, 8, 16, 16]


def test_resnet_stem_has_no_max_pool_so_the_last_stage_is_4x4_on_cifar():
  model = get_model("resnet18", 10)
  variables = abstract_variables(model)
  _, state = abstract_apply(model, variables, train=False, capture_intermediates=True)
  feats = state["intermediates"]
  assert feats["stem_conv"]["__call__"][0].shape == (2, 32, 32, 64)
  assert feats["stage4_block2"]["__call__"][0].shape == (2, 4, 4, 512)


def test_resnet_projection_shortcuts_appear_only_where_the_shape_changes():
  params = abstract_variables(get_model("resnet18", 10))["params"]
  with_projection = sorted(name for name, block in params.items() if "shortcut" in block)
  assert with_projection == ["stage2_block1", "stage3_block1", "stage4_block1"]
  params50 = abstract_variables(get_model("resnet50", 10))["params"]
  assert "shortcut" in params50["stage1_block1"]  # 64 -> 256 channels
  assert params50["stage1_block1"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 64, 256)


def test_bfloat16_compute_keeps_float32_params_and_float32_logits():
  model = get_model("resnet18", 10, dtype=jnp.bfloat16)
  variables = abstract_variables(model)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  _, state = abstract_apply(model, variables, train=False, capture_intermediates=True)
  assert state["intermediates"]["stage1_block1"]["__call__"][0].dtype == jnp.bfloat16
  assert abstract_apply(model, variables, train=False).dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# BatchNorm state.


@pytest.mark.parametrize("name", sorted(MODELS))
def test_only_models_with_batchnorm_have_batch_stats(name):
  variables = abstract_variables(get_model(name, 10))
  assert ("batch_stats" in variables) == (name in BN_MODELS)


@pytest.mark.parametrize("name", BN_MODELS)
def test_train_mode_returns_batch_stats_of_the_same_structure(name):
  model = get_model(name, 10)
  variables = abstract_variables(model)
  logits, updates = abstract_apply(model, variables, train=True, mutable=["batch_stats"])
  assert logits.shape == (2, 10)
  assert set(updates) == {"batch_stats"}
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_train_mode_moves_running_statistics_by_momentum_0_9():
  model = SimpleCNN(use_bn=True)
  variables = numpy_variables(model, (4, 8, 8, 1))
  x = images((4, 8, 8, 1)) + 3.0
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
    variables, x
  )
  # The first BN sees conv1(x); its running mean moves from 0 to 0.1 * the batch mean.
  h = jax.lax.conv_general_dilated(
    x, variables["params"]["conv1"]["kernel"], (1, 1), "SAME", dimension_numbers=NHWC
  )
  bn1 = updates["batch_stats"]["bn1"]
  np.testing.assert_allclose(bn1["mean"], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bn1["var"], 0.9 + 0.1 * h.var(axis=(0, 1, 2)), rtol=1e-4)


@pytest.fixture(scope="module")
def digits_cnn_init():
  """``init_model`` of the default SimpleCNN on digits-shaped input (shared: init compiles)."""
  return init_model(SimpleCNN(), (1, 8, 8, 1), init_key())


def test_init_model_returns_params_and_empty_batch_stats_without_batchnorm(digits_cnn_init):
  params, batch_stats = digits_cnn_init
  assert batch_stats == {}
  assert count_params(params) == 99_178
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_init_model_returns_running_statistics_for_batchnorm_models():
  params, batch_stats = init_model(SimpleCNN(width=4, use_bn=True), (1, 8, 8, 1), init_key())
  assert set(batch_stats) == {"bn1", "bn2", "bn3", "bn4"}
  np.testing.assert_array_equal(batch_stats["bn3"]["mean"], np.zeros(8))
  np.testing.assert_array_equal(batch_stats["bn3"]["var"], np.ones(8))
  assert "bias" not in params["conv1"]


def test_simple_cnn_kernels_start_lecun_normal(digits_cnn_init):
  kernel = np.asarray(digits_cnn_init[0]["conv4"]["kernel"])
  np.testing.assert_allclose(kernel.std(), 1.0 / math.sqrt(3 * 3 * 64), rtol=0.05)
  assert np.abs(kernel).max() > 1.5 / math.sqrt(3 * 3 * 64)  # not the old uniform interval


def test_torch_init_variant_keeps_pytorch_default_uniform_distribution():
  params, _ = init_model(get_model("simple_cnn_torch_init", 10), (1, 8, 8, 1), init_key())
  kernel = np.asarray(params["conv4"]["kernel"])
  bound = 1.0 / math.sqrt(3 * 3 * 64)
  assert np.abs(kernel).max() <= bound
  np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3.0), rtol=0.05)


def _layer_rms_at_init(model: nn.Module) -> dict[str, float]:
  """RMS of every layer's output (before its ReLU) on 256 normalised digits, at init."""
  from experiments import data

  ds = data.load_dataset("digits")
  x = data.normalize(ds.train_images[:256], ds.mean, ds.std)
  params, _ = init_model(model, (1, 8, 8, 1), init_key())
  _, state = jax.jit(
    lambda p, x: model.apply(
      {"params": p}, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
  )(params, x)
  inter = state["intermediates"]
  return {
    name: float(jnp.sqrt(jnp.mean(jnp.square(inter[name]["__call__"][0]))))
    for name in ("conv1", "conv2", "conv3", "conv4", "fc1", "head")
  }


def test_simple_cnn_keeps_the_signal_through_its_layers_at_init():
  # Without BatchNorm, PyTorch's default init (variance 1/(3 fan_in)) shrinks the signal by
  # ~sqrt(1/6) per ReLU layer: logits of RMS ~0.01 and a long plateau at loss 2.30 (issue 9).
  rms = _layer_rms_at_init(SimpleCNN())
  assert min(rms.values()) > 0.15, rms
  assert rms["head"] > 0.15, rms  # logits large enough to carry a gradient signal
  old = _layer_rms_at_init(get_model("simple_cnn_torch_init", 10))
  assert old["head"] < 0.03 and old["head"] < 0.1 * rms["head"], old


# ---------------------------------------------------------------------------------------------
# Small models, run for real.


@pytest.mark.parametrize("input_shape", [(4, 8, 8, 1), (4, 32, 32, 3)])
@pytest.mark.parametrize("use_bn", [False, True])
def test_simple_cnn_runs_on_digits_and_cifar_shapes_with_finite_outputs(input_shape, use_bn):
  model = SimpleCNN(num_classes=10, use_bn=use_bn)
  variables = numpy_variables(model, input_shape)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images(input_shape))
  assert out.shape == (4, 10)
  assert np.all(np.isfinite(out))
  assert float(jnp.std(out)) > 0.0


def test_wrn_dropout_changes_outputs_under_different_rngs():
  model = WideResNet(depth=10, widen_factor=1, num_classes=10, dropout_rate=0.5)
  variables = numpy_variables(model, (2, 8, 8, 3))
  x = images((2, 8, 8, 3))

  @jax.jit
  def run(key):
    out, _ = model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
    return out

  np.testing.assert_array_equal(run(init_key(0)), run(init_key(0)))
  assert not np.allclose(run(init_key(0)), run(init_key(1)))


def test_wrn_needs_a_dropout_rng_only_when_training_with_a_positive_rate():
  x_shape = (2, 8, 8, 3)
  for rate, train, needs_rng in [(0.5, True, True), (0.5, False, False), (0.0, True, False)]:
    model = WideResNet(depth=10, widen_factor=1, dropout_rate=rate)
    variables = abstract_variables(model, x_shape)
    mutable = ["batch_stats"] if train else False
    if needs_rng:
      with pytest.raises(flax.errors.InvalidRngError):
        abstract_apply(model, variables, x_shape, train=train, mutable=mutable)
    else:
      abstract_apply(model, variables, x_shape, train=train, mutable=mutable)


def test_wide_resnet_rejects_a_depth_not_of_the_form_6n_plus_4():
  with pytest.raises(ValueError, match="6n \\+ 4"):
    abstract_variables(WideResNet(depth=27))


# ---------------------------------------------------------------------------------------------
# Registry.


def test_get_model_rejects_an_unknown_name_and_lists_the_choices():
  with pytest.raises(ValueError, match="unknown model 'resnet101'") as info:
    get_model("resnet101", 10)
  for name in MODELS:
    assert repr(name) in str(info.value)


def test_get_model_forwards_keyword_arguments_to_the_module():
  assert get_model("simple_cnn", 10, use_bn=True, width=16).use_bn
  wrn = get_model("wrn28_10", 100, dropout_rate=0.3)
  assert (wrn.depth, wrn.widen_factor, wrn.dropout_rate, wrn.num_classes) == (28, 10, 0.3, 100)
  assert get_model("alexnet", 10, dropout_rate=0.5).dropout_rate == 0.5


def test_registry_holds_the_six_models_of_the_papers_and_the_old_simple_cnn_init():
  assert set(MODELS) == {
    "resnet18",
    "resnet34",
    "resnet50",
    "wrn28_10",
    "alexnet",
    "simple_cnn",
    "simple_cnn_torch_init",
  }
