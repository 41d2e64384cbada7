"""Small shared test utilities (imported by the test modules)."""

from __future__ import annotations

import jax
import optax


def make_step(tx: optax.GradientTransformationExtraArgs, loss, **update_kwargs):
  """A jitted SAM-style step ``(params, state) -> (params, state, updates)`` for ``loss``."""

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss), **update_kwargs)
    return optax.apply_updates(params, updates), state, updates

  return step
