"""``rho_warmup_epochs``: the SAM family's rho ramps linearly from 0 (the remedy for the slow
escape from the initial saddle at large rho, experiments/RESULTS.md "The start")."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.base import TrainConfig
from experiments.optimizers import build_optimizer

STEPS_PER_EPOCH = 4


def _rho_per_step(optimizer: str, warmup_epochs: float, steps: int) -> list[float]:
  """rho actually used at each update, read off L(w) = |w|^2 / 2, where g_adv - g = eps.

  With lr 1, no momentum and no weight decay the chain returns -g_adv (X-SAM with alpha 0 and
  normalize=False too), and |eps| is rho for SAM's and X-SAM's ascent.
  """
  config = dataclasses.replace(
    TrainConfig(),
    optimizer=optimizer,
    rho=0.1,
    rho_warmup_epochs=warmup_epochs,
    lr=1.0,
    lr_schedule="constant",
    momentum=0.0,
    weight_decay=0.0,
    alpha=0.0,
    normalize=False,
  )
  tx = build_optimizer(config, STEPS_PER_EPOCH).tx
  w = {"w": jnp.array([3.0, 4.0])}
  grad_fn = jax.grad(lambda p: 0.5 * jnp.sum(p["w"] ** 2))
  state, rhos = tx.init(w), []
  for _ in range(steps):
    updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
    rhos.append(float(jnp.linalg.norm(-updates["w"] - w["w"])))  # w itself is not moved
  return rhos


@pytest.mark.parametrize("optimizer", ["sam", "xsam"])
def test_rho_rises_linearly_over_the_warmup_epochs_then_stays(optimizer):
  rhos = _rho_per_step(optimizer, warmup_epochs=2, steps=11)  # 8 warm-up steps
  np.testing.assert_allclose(rhos, [0.1 * min(1, s / 8) for s in range(11)], atol=1e-6)


def test_no_warmup_uses_rho_from_the_first_step():
  np.testing.assert_allclose(_rho_per_step("sam", 0.0, 3), [0.1] * 3, atol=1e-6)
