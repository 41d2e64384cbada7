"""Tests for experiments.optimizers: the chain each config builds and its schedule."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs.base import OPTIMIZERS, TrainConfig
from experiments.optimizers import build_optimizer, learning_rate


def test_cosine_epoch_schedule_is_torch_cosine_annealing_stepped_per_epoch():
  config = TrainConfig(lr=0.1, epochs=4, lr_schedule="cosine_epoch")
  schedule = learning_rate(config, steps_per_epoch=10)
  expected = [0.1 * 0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(4)]
  got = [float(schedule(jnp.asarray(s))) for s in (0, 9, 10, 25, 39)]
  np.testing.assert_allclose(
    got, [expected[0], expected[0], expected[1], expected[2], expected[3]], rtol=1e-6
  )


def test_sgd_chain_matches_torch_sgd_with_coupled_weight_decay():
  config = TrainConfig(
    optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01, lr_schedule="constant"
  )
  tx = build_optimizer(config, 10).tx
  w = jnp.array([1.0, -2.0])
  g = jnp.array([0.5, 0.25])
  state = tx.init(w)
  buf = np.zeros(2)
  w_np = np.asarray(w)
  for _ in range(3):
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    buf = 0.9 * buf + (np.asarray(g) + 0.01 * w_np)  # torch: b = mu b + (g + wd w)
    w_np = w_np - 0.1 * buf
  np.testing.assert_allclose(w, w_np, rtol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_builds_and_takes_a_finite_step(name):
  config = dataclasses.replace(TrainConfig(), optimizer=name, lr_schedule="constant")
  spec = build_optimizer(config, 10)
  assert spec.needs_grad_fn == (name not in ("sgd", "adamw"))
  assert spec.tracks_eigvec == name.startswith(("xsam", "eigen_sam"))
  loss = lambda p: jnp.sum(jnp.array([3.0, 1.0]) * p**2)
  params = jnp.array([1.0, 1.0])
  extra = {"grad_fn": jax.grad(loss)} if spec.needs_grad_fn else {}
  updates, _ = spec.tx.update(jax.grad(loss)(params), spec.tx.init(params), params, **extra)
  assert np.all(np.isfinite(updates)) and float(optax.tree.norm(updates)) > 0
