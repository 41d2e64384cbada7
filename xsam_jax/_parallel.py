"""Data parallelism inside ``shard_map`` / ``pmap``: what each device computes and what is shared.

With ``axis_name`` a sharpness method computes every gradient and Hessian-vector product on the
device's *own* shard of the batch, then averages over the axis:

* the ascent step comes from the device's own clean gradient (m-sharpness, SAM paper sec. 4.1);
* the returned gradient, every HVP and every scalar kept in the state are ``pmean``-ed, so all
  devices hold identical values (with ``shard_map(check_vma=True)`` they are typed as
  invariant over the axis, so ``out_specs=P()`` checks it).

Under ``shard_map``'s default ``check_vma=True``, ``jax.grad`` with respect to *replicated*
(axis-invariant) parameters already comes back summed over the devices: autodiff inserts the
``psum`` that is the transpose of the implicit broadcast. A sum cannot be turned back into the
device's own gradient, so these helpers read the varying-axes type of every gradient and refuse
a reduced one with a ``ValueError`` that says what to do, and they evaluate ``grad_fn`` at
device-varying parameters so that what it returns is the device's own gradient. Under
``check_vma=False`` and ``pmap`` nothing is typed and nothing is reduced by autodiff: gradients
are the device's own, and the helpers only average.
"""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any

RECOMMENDED = (
  "local = jax.lax.pcast(params, {axis!r}, to='varying'); "
  "grads = jax.grad(loss)(local, batch); "
  "updates, state = tx.update(grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, batch))"
)


def varying_axes(x: Any) -> frozenset:
  """The manual mesh axes over which ``x`` may differ between devices (empty if untyped)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # jax 0.7 - 0.9


def check_axis(method: str, axis_name: str | None) -> bool:
  """Checks that ``axis_name`` is bound here; returns whether its varying type is tracked.

  Returns False for ``axis_name=None``, under ``pmap`` and under ``shard_map(check_vma=False)``;
  True under ``shard_map(check_vma=True)``.

  Raises:
    ValueError: if ``axis_name`` is not a mapped axis at this point of the program.
  """
  if axis_name is None:
    return False
  try:
    index = jax.lax.axis_index(axis_name)
  except NameError as err:
    raise ValueError(
      f"{method}: `axis_name={axis_name!r}` is not a mapped axis here ({err}). Call update "
      "inside `jax.shard_map(..., mesh=mesh)` whose mesh has that axis (or `jax.pmap(..., "
      f"axis_name={axis_name!r})`); under plain `jax.jit` with a sharded batch pass "
      "axis_name=None: the gradient is then already global."
    ) from None
  return axis_name in varying_axes(index)


def _unreduced(tree: PyTree, axis_name: str) -> bool:
  return all(axis_name in varying_axes(x) for x in jax.tree.leaves(tree))


def check_clean_gradient(updates: PyTree, method: str, axis_name: str | None) -> bool:
  """Checks the clean gradient handed to ``update``; returns whether types are tracked.

  Raises:
    ValueError: if ``axis_name`` is unbound; if it is given and the gradient is already
      reduced over it (``check_vma=True`` with replicated parameters); or if it is None while
      the gradient varies over a mapped axis (the per-device results would silently differ).
  """
  tracked = check_axis(method, axis_name)
  if axis_name is None:
    axes = set().union(*(varying_axes(x) for x in jax.tree.leaves(updates)))
    if axes:
      raise ValueError(
        f"{method}: the gradient varies over the mapped axes {sorted(axes)} but `axis_name` "
        "is None, so every device would step differently. If that axis splits the batch (data "
        f"parallelism), pass `axis_name={sorted(axes)[0]!r}` to the transform: the ascent stays "
        "per device and the result is averaged. Parameters split across devices inside "
        "shard_map (model parallelism) are not supported, since norms would be per shard: use "
        "jax.jit with NamedSharding parameters instead, where every sharding is handled."
      )
    return False
  if tracked and not _unreduced(updates, axis_name):
    raise ValueError(
      f"{method}: with `axis_name={axis_name!r}` the clean gradient must be each device's own, "
      f"but it is already reduced over {axis_name!r} (it does not vary across devices). Under "
      "shard_map's default check_vma=True, jax.grad with respect to replicated parameters "
      "returns the gradient *summed* over devices, and the per-device ascent cannot be "
      "recovered from it. Take the gradient at device-varying parameters and pass the "
      f"replicated ones to update: {RECOMMENDED.format(axis=axis_name)}. Do not pmean/psum the "
      "loss or the gradients yourself: the transform averages. For one ascent along the "
      "global gradient instead, drop axis_name and use jax.jit with a sharded batch."
    )
  return tracked


def to_varying(tree: PyTree, axis_name: str | None) -> PyTree:
  """Marks every leaf as varying over ``axis_name`` (where that is typed and not yet so).

  ``grad_fn`` evaluated at such parameters returns the device's own gradient, not the sum that
  autodiff produces for replicated parameters under ``check_vma=True``.
  """
  if axis_name is None or not check_axis("xsam_jax", axis_name):
    return tree

  def cast(x):
    if axis_name in varying_axes(x):
      return x
    if hasattr(jax.lax, "pcast"):  # jax >= 0.8
      return jax.lax.pcast(x, axis_name, to="varying")
    return jax.lax.pvary(x, axis_name)

  return jax.tree.map(cast, tree)


def check_unreduced(tree: PyTree, axis_name: str | None, *, what: str = "grad_fn") -> None:
  """Checks that per-device values are the device's own (not yet reduced over ``axis_name``).

  A no-op for ``axis_name=None`` and where the varying type is not tracked (``pmap``,
  ``shard_map(check_vma=False)``).

  Raises:
    ValueError: if, with typed axes, a value is already reduced over ``axis_name`` (e.g. a
      ``grad_fn`` whose loss or gradient is ``pmean``-ed): averaging it again would be silent.
  """
  if axis_name is None:
    return
  if check_axis("xsam_jax", axis_name) and not _unreduced(tree, axis_name):
    raise ValueError(
      f"xsam_jax: {what} returned a value already reduced over `axis_name={axis_name!r}` while "
      "the transform evaluated it at device-varying parameters, so it mixes reduced and "
      "per-device gradients. Return each device's own gradient (no pmean/psum in the loss or "
      f"the gradient); the transform averages it. Recommended: {RECOMMENDED.format(axis=axis_name)}"
    )


def device_mean(tree: PyTree, axis_name: str | None, *, what: str = "grad_fn") -> PyTree:
  """``lax.pmean`` over ``axis_name`` of per-device values; identity for ``axis_name=None``.

  Raises:
    ValueError: if, with typed axes, a value is already reduced over ``axis_name`` (see
      :func:`check_unreduced`).
  """
  if axis_name is None:
    return tree
  check_unreduced(tree, axis_name, what=what)
  return jax.lax.pmean(tree, axis_name)


def _concrete_arrays(tree: PyTree) -> list[jax.Array]:
  return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and not _is_tracer(x)]


def _is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def place_state(
  state: PyTree, params: PyTree, eigvec: PyTree | None = None, field: str = "eigvec"
) -> PyTree:
  """Gives a freshly initialised state the shardings that ``update`` will return.

  When ``init`` runs eagerly on parameters laid out with a ``NamedSharding``, the eigenvector
  takes each parameter's sharding and the scalars are replicated over the same mesh, so a
  jitted step sees identical input shardings on every call and compiles once. Under ``jit``
  (tracers) or on one device the state is returned unchanged; a jitted ``init`` is then placed
  by its ``out_shardings``. ``field`` names the parameter-shaped field that ``eigvec`` fills
  (LookSAM's ``gv``).
  """
  arrays = _concrete_arrays(params)
  meshes = [x.sharding.mesh for x in arrays if isinstance(x.sharding, jax.sharding.NamedSharding)]
  if not meshes or _concrete_arrays(state) != jax.tree.leaves(state):
    return state
  replicated = jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec())
  placed = jax.tree.map(lambda x: jax.device_put(x, replicated), state)
  if eigvec is not None:
    placed = placed._replace(
      **{
        field: jax.tree.map(
          lambda v, p: jax.device_put(
            v, p.sharding if isinstance(p.sharding, jax.sharding.NamedSharding) else replicated
          ),
          eigvec,
          params,
        )
      }
    )
  return placed
