"""The mesh of a run and the FSDP rules that place weights, their optimizer state and eigvec."""

from __future__ import annotations

import jax
import optax
import pytest
from jax.sharding import PartitionSpec as P

import xsam_jax
from experiments import sharding
from experiments.models import get_model, init_model


@pytest.mark.parametrize(
  ("text", "devices", "expected"),
  [("", 8, (8, 1)), ("data=4,model=2", 8, (4, 2)), ("model=4", 8, (2, 4)), ("data=8", 8, (8, 1))],
)
def test_mesh_text_gives_data_and_model_sizes(text, devices, expected):
  assert sharding.parse_mesh(text, devices) == expected


@pytest.mark.parametrize(
  ("text", "match"),
  [
    ("data=3,model=2", "data \\* model = 3 \\* 2 = 6 devices, but there are 8"),
    ("pipeline=2", "expected 'data=N,model=M'"),
    ("model=0", "positive integers"),
  ],
)
def test_impossible_mesh_is_refused_with_a_message_naming_the_fix(text, match):
  with pytest.raises(ValueError, match=match):
    sharding.parse_mesh(text, 8)


@pytest.mark.parametrize(
  ("shape", "spec"),
  [
    ((3, 3, 64, 128), P(None, None, None, "model")),  # conv kernel: output channels
    ((3, 3, 128, 64), P(None, None, "model", None)),  # the larger channel dimension
    ((4096, 10), P("model", None)),  # dense kernel whose output does not divide
    ((256, 128), P("model", None)),
    ((3, 3, 1, 32), P()),  # 288 elements: replicated
    ((512,), P()),  # biases and BatchNorm vectors: replicated
    ((4097, 3), P()),  # nothing divides
    ((), P()),  # scalars: step counts, eigval
  ],
)
def test_fsdp_rule_splits_the_largest_divisible_dimension_of_large_leaves(shape, spec):
  assert sharding.fsdp_spec(shape, model_size=2) == spec


def test_without_a_model_axis_everything_is_replicated():
  assert sharding.fsdp_spec((3, 3, 64, 128), model_size=1) == P()


def test_eigvec_and_momentum_get_exactly_the_sharding_of_their_parameter():
  model = get_model("simple_cnn", 10)
  params, _ = init_model(model, (1, 8, 8, 1), jax.random.key(0))
  tx = optax.chain(xsam_jax.xsam(), optax.sgd(0.1, momentum=0.9))
  mesh = jax.sharding.AbstractMesh((4, 2), sharding.AXES)  # the rules need no devices
  abstract = jax.eval_shape(tx.init, params)
  placed = sharding.state_shardings({"params": params, "opt_state": abstract}, mesh)
  specs = jax.tree.map(lambda s: s.spec, placed["params"])
  eigvec = jax.tree.map(lambda s: s.spec, optax.tree.get(placed["opt_state"], "eigvec"))
  trace = jax.tree.map(lambda s: s.spec, optax.tree.get(placed["opt_state"], "trace"))
  assert eigvec == specs and trace == specs
  assert specs["conv4"]["kernel"] == P(None, None, None, "model")
  assert optax.tree.get(placed["opt_state"], "eigval").spec == P()
