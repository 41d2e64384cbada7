"""Which steps make the ascent: the every-k, random (RST) and adaptive (AE-SAM) policies shared
by :func:`~xsam_jax.sometimes_sam` and :func:`~xsam_jax.xsam`'s ``when=``.

One copy of the rule: :func:`policy_args` fills in and checks the policy's arguments,
:func:`decide` returns the traced choice :math:`a_t` and the AE-SAM statistics,
:func:`static_ascent` checks a host-side ``ascend=`` and :func:`ascent_due` is the public
host-side twin of :func:`decide` for the policies a host can evaluate (every k, random). The
formulas are documented on :func:`~xsam_jax.sometimes_sam`.
"""

from __future__ import annotations

from collections.abc import Callable
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
    # The draw is in float32 whatever the params' dtype, so that ascent_due (host side) and
    # float64 runs make the same choices as float32 ones.
    p = read_hyperparam(args["prob"], step, jnp.float32)
    draw = jax.random.fold_in(as_key(key, where), step)
    return jax.random.bernoulli(draw, p), mean, var
  d = jnp.asarray(args["decay"], dtype)
  finite = jnp.isfinite(sq_norm)
  new_mean = d * mean + (1 - d) * sq_norm
  new_var = d * var + (1 - d) * jnp.square(sq_norm - new_mean)
  c = read_hyperparam(args["threshold"], step, dtype)
  due = finite & (sq_norm >= new_mean + c * jnp.sqrt(new_var))
  return due, jnp.where(finite, new_mean, mean), jnp.where(finite, new_var, var)


def static_ascent(ascend: Any, where: str, when: Any) -> bool | None:
  """Checks ``update(..., ascend=...)``: None (the traced policy decides, under ``lax.cond``)
  or a Python bool decided on the host (the chosen branch is traced alone, no control flow).

  Raises:
    ValueError: ``ascend`` neither None nor a Python bool (a traced or array value: leave it
      None for a traced decision); a bool when ``when`` is None (the transform has no policy:
      every step ascends, and a silently ignored ``ascend=False`` would still ascend).
  """
  if ascend is None:
    return None
  if when is None:
    raise ValueError(
      f"{where}: `ascend` is read only by a transform with an ascent policy "
      "(sometimes_sam, looksam, xsam(when=...)); this one ascends on every step, so "
      f"ascend={ascend!r} would be ignored. Drop `ascend`"
      + (", or build it with when='every'/'random'/'adaptive'." if "xsam" in where else ".")
    )
  if not isinstance(ascend, bool):
    raise ValueError(
      f"{where}: `ascend` must be None (the policy decides inside the step, under lax.cond) or a "
      f"Python bool decided on the host (e.g. xsam_jax.ascent_due(count, ...)), got {ascend!r}. "
      "For a traced decision leave it as None."
    )
  return ascend


def ascent_due(
  count: int,
  *,
  when: str = "every",
  k: int | None = None,
  prob: Any = None,
  key: Any = 0,
  accumulation_steps: int = 1,
) -> bool:
  r"""Host-side twin of the in-step policy: whether ``update`` call ``count`` makes the ascent.

  :func:`~xsam_jax.sometimes_sam`, :func:`~xsam_jax.looksam` (``when="every"``) and
  :func:`~xsam_jax.xsam` with ``when=`` decide inside the step with ``lax.cond`` by default: one
  compiled program. On XLA:CPU a gradient inside a ``lax.cond`` branch runs 20-30x slower than
  at top level (``benchmarks/RESULTS.md``, "Variant cost"), which makes the cheap variants
  dearer than SAM there. The static path avoids it: decide on the host with this function and
  pass ``update(..., ascend=ascent_due(count, ...))``, with the step jitted with ``ascend`` as a
  static argument (two compiled programs, one per value). The choices are exactly the in-step
  ones: the same :math:`[t \bmod k = 0]`, the same Bernoulli draw from
  ``fold_in(key, t)`` (in float32, for any params dtype), with :math:`t` =
  ``count // accumulation_steps``.

  AE-SAM (``when="adaptive"``) decides from the current gradient norm, a device value: it has
  no host-side twin without a host sync in the step, so it is refused here.

  Args:
    count: the ``update`` call, counting micro-batches (the state's ``count`` before the call).
    when: ``"every"`` or ``"random"`` (LookSAM: ``"every"`` with its ``k``).
    k: ``when="every"``: the period, a Python int >= 1 (default 2, as the transforms).
    prob: ``when="random"``: the probability, a float or a schedule ``step -> p`` (default 0.5).
    key: ``when="random"``: the transform's PRNG key or int seed.
    accumulation_steps: micro-batches per optimizer step (:func:`~xsam_jax.accumulate`'s ``k``).

  Returns:
    A Python bool.

  Raises:
    ValueError: ``when="adaptive"`` or an unknown ``when``; a policy argument of the other
      policy; ``k``, ``prob``, ``key`` or ``accumulation_steps`` as the transforms refuse them.

  Example:
    >>> import xsam_jax
    >>> [xsam_jax.ascent_due(c, when="every", k=3) for c in range(5)]
    [True, False, False, True, False]
    >>> [xsam_jax.ascent_due(c, when="every", k=2, accumulation_steps=2) for c in range(5)]
    [True, True, False, False, True]
  """
  where = "xsam_jax.ascent_due"
  if when == "adaptive":
    raise ValueError(
      f"{where}: when='adaptive' (AE-SAM) decides from the current gradient norm, which only "
      "the step knows; it has no host-side twin. Leave `ascend` as None (lax.cond path)."
    )
  args = policy_args(where, when, {"k": k, "prob": prob, "decay": None, "threshold": None}, key)
  check_positive_int("accumulation_steps", accumulation_steps)
  step = int(count) // accumulation_steps
  # The in-step rule itself, evaluated eagerly: one copy of both policies.
  due, _, _ = decide(
    when,
    args,
    key,
    where,
    jnp.zeros(()),
    jnp.zeros(()),
    jnp.zeros(()),
    jnp.asarray(step),
    jnp.float32,
  )
  return bool(due)


def run_branch(
  due: jax.Array, static: bool | None, ascend: Callable[[], Any], skip: Callable[[], Any]
) -> tuple[Any, jax.Array]:
  """``(ascend() if a_t else skip(), a_t)``: under ``lax.cond`` on the traced ``due`` when
  ``static`` is None, else only the branch the host chose is traced (``a_t = static``)."""
  if static is None:
    return jax.lax.cond(due, ascend, skip), jnp.asarray(due)
  return (ascend() if static else skip()), jnp.asarray(static)
