"""Which steps make the ascent: the every-k, random (RST) and adaptive (AE-SAM) policies shared
by :func:`~xsam_jax.sometimes_sam` and :func:`~xsam_jax.xsam`'s ``when=``.

One copy of the rule: :func:`policy_args` fills in and checks the policy's arguments,
:func:`decide` returns the traced choice :math:`a_t` and the AE-SAM statistics. The formulas are
documented on :func:`~xsam_jax.sometimes_sam`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from xsam_jax._perturbation import as_key, check_positive_int, check_range, read_hyperparam

POLICIES = ("every", "random", "adaptive")
# The arguments that only one policy reads, with the value used when they are not given.
POLICY_ARGS = {
  "k": ("every", 2),
  "prob": ("random", 0.5),
  "decay": ("adaptive", 0.9),
  "threshold": ("adaptive", 0.0),
}


def policy_args(
  where: str, when: Any, given: dict[str, Any], key: Any, *, optional: bool = False
) -> dict[str, Any] | None:
  """The policy's own arguments with defaults filled in, checked.

  Args:
    where: the public name, for the messages (``"xsam_jax.sometimes_sam"``).
    when: ``"every"``, ``"random"`` or ``"adaptive"`` (or None when ``optional``: no policy,
      every step ascends; then None is returned).
    given: ``{"k": ..., "prob": ..., "decay": ..., "threshold": ...}``, None where not given.
    key: the PRNG key or int seed ``when="random"`` draws from.
    optional: whether ``when=None`` (no policy) is allowed.

  Raises:
    ValueError: an unknown ``when``; an argument of another policy (or of any policy when
      ``when`` is None); ``k`` not a Python int >= 1 (an injected array is accepted);
      ``prob`` or ``decay`` outside [0, 1]; a NaN ``threshold``; with ``when="random"`` a
      ``key`` that is neither a PRNG key nor an int.
  """
  if when is None and optional:
    for name, (policy, _) in POLICY_ARGS.items():
      if given[name] is not None:
        raise ValueError(
          f"{where}: `{name}` is read only with when={policy!r}, but `when` is None (every "
          f"step ascends). Drop `{name}` or pass when={policy!r}."
        )
    return None
  if when not in POLICIES:
    allowed = ((None,) if optional else ()) + POLICIES
    raise ValueError(
      f"{where}: `when` must be one of {allowed} (every k-th step, at random with probability "
      f"`prob`, or AE-SAM's adaptive rule{'; None: every step' if optional else ''}), got "
      f"{when!r}."
    )
  values = {}
  for name, (policy, default) in POLICY_ARGS.items():
    if given[name] is not None and policy != when:
      raise ValueError(
        f"{where}: `{name}` is read only with when={policy!r}, but when={when!r}. Drop "
        f"`{name}` or pass when={policy!r}."
      )
    values[name] = default if given[name] is None else given[name]
  check_positive_int("k", values["k"], traced_ok=True)
  check_range("prob", values["prob"], 0.0, 1.0, hint="It is the probability of an ascent step.")
  check_range("decay", values["decay"], 0.0, 1.0, hint="AE-SAM's moving-average factor.")
  check_range("threshold", values["threshold"], -float("inf"))
  if when == "random":
    as_key(key, where)
  return values


def decide(
  when: str,
  args: dict[str, Any],
  key: Any,
  where: str,
  mean: jax.Array,
  var: jax.Array,
  sq_norm: jax.Array,
  step: jax.Array,
  dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""``(a_t, mu_t, sigma2_t)``: whether optimizer step ``step`` ascends, and AE-SAM's statistics.

  ``"every"``: :math:`[t \bmod k = 0]`; ``"random"``: a Bernoulli(:math:`p_t`) draw from
  ``fold_in(key, t)``; ``"adaptive"``: :math:`[s_t \ge \mu_t + c_t\sigma_t]` with
  :math:`s_t` = ``sq_norm`` (a non-finite :math:`s_t` keeps the statistics and does not
  ascend). ``mean``/``var`` are returned unchanged by the first two.
  """
  if when == "every":
    return step % args["k"] == 0, mean, var
  if when == "random":
    p = read_hyperparam(args["prob"], step, dtype)
    draw = jax.random.fold_in(as_key(key, where), step)
    return jax.random.bernoulli(draw, p), mean, var
  d = jnp.asarray(args["decay"], dtype)
  finite = jnp.isfinite(sq_norm)
  new_mean = d * mean + (1 - d) * sq_norm
  new_var = d * var + (1 - d) * jnp.square(sq_norm - new_mean)
  c = read_hyperparam(args["threshold"], step, dtype)
  due = finite & (sq_norm >= new_mean + c * jnp.sqrt(new_var))
  return due, jnp.where(finite, new_mean, mean), jnp.where(finite, new_var, var)
