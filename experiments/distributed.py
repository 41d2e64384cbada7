"""Starting a run on JAX's multi-controller runtime, and agreeing across its processes.

One process per host (or, on one machine, per group of devices) runs the same program; JAX's
distributed runtime connects them and every collective then spans all processes' devices.
:func:`initialize` connects this process:

* explicitly, with ``coordinator="host:port"``, ``num_processes`` and ``process_id`` (a local
  launch: process 0 hosts the coordinator at that address);
* or from the cluster environment, which ``jax.distributed.initialize()`` detects by itself
  (SLURM, Open MPI, Cloud TPU pods, Kubernetes, or ``JAX_COORDINATOR_ADDRESS``).

Without either the run is single-process and nothing here does anything. On CPU the
cross-process collectives are gloo's (JAX's default since 0.5; set here if unset).

A coordinator that cannot be reached makes XLA abort the process from C++ (no Python exception),
so processes other than 0 first wait for the coordinator's port with a bounded timeout and raise
:class:`CoordinatorUnreachableError` with a message naming the address.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

import jax
import numpy as np

DEFAULT_TIMEOUT_S = 300  # jax.distributed.initialize's own default


class CoordinatorUnreachableError(RuntimeError):
  """The coordinator of a multi-process run did not answer within the timeout."""


def cluster_detected() -> bool:
  """Whether the environment describes a multi-process job ``jax.distributed`` can join alone."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
    return True
  return int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto: bool = False,
  timeout_s: int = DEFAULT_TIMEOUT_S,
) -> bool:
  """Joins the multi-process run this process belongs to; returns whether there is one.

  Args:
    coordinator: ``host:port`` of process 0's coordinator (explicit launch); all three of
      ``coordinator``, ``num_processes`` and ``process_id`` or none of them.
    num_processes: number of processes of the run.
    process_id: this process's index in ``[0, num_processes)``.
    auto: call ``jax.distributed.initialize()`` and let it read the cluster environment (also
      done when :func:`cluster_detected`).
    timeout_s: how long to wait for the coordinator and the other processes.

  Raises:
    ValueError: for an incomplete or inconsistent set of arguments.
    CoordinatorUnreachableError: if the coordinator's port stays closed for ``timeout_s``.
  """
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError(
      "a local multi-process launch needs all of --coordinator HOST:PORT, --num_processes N "
      "and --process_id I (0 <= I < N), the same coordinator and N in every process"
    )
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if coordinator is None and not (auto or cluster_detected()):
    return False
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is None:
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return jax.process_count() > 1
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(
      f"--process_id {process_id} must be in [0, --num_processes {num_processes}) and "
      "--num_processes must be >= 1"
    )
  host, sep, port = coordinator.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"--coordinator {coordinator!r} must look like HOST:PORT, e.g. 10.0.0.1:1234")
  start = time.monotonic()
  if process_id != 0:
    _wait_for_port(host.strip("[]"), int(port), timeout_s, coordinator)
  else:
    print(
      f"[process 0 of {num_processes}] hosting the coordinator at {coordinator}; waiting up to "
      f"{timeout_s} s for the other processes (if this process is then terminated with "
      "DEADLINE_EXCEEDED, they did not all connect: check their --coordinator and "
      "--num_processes)",
      file=sys.stderr,
      flush=True,
    )
  remaining = max(1, round(timeout_s - (time.monotonic() - start)))
  jax.distributed.initialize(
    coordinator_address=coordinator,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=remaining,
  )
  check_process_count(num_processes)
  return num_processes > 1


def check_process_count(num_processes: int) -> None:
  """Raises the same ValueError in every process unless each one's ``--num_processes`` is
  :func:`jax.process_count`.

  The coordinator fixes the count (process 0's flag); a process started with another count
  joins all the same, and would train as if all agreed.

  Args:
    num_processes: this process's ``--num_processes``.

  Raises:
    ValueError: naming every process's flag and the count to use.
  """
  counts = [int(p) for p in _allgather_bytes(str(num_processes).encode())]
  if any(c != jax.process_count() for c in counts):
    flags = ", ".join(f"process {i}: {c}" for i, c in enumerate(counts))
    raise ValueError(
      f"--num_processes differs between the processes ({flags}), but {jax.process_count()} "
      f"joined the run. Nothing was written. Start every process with --num_processes "
      f"{jax.process_count()} (or start that many processes)."
    )


def _wait_for_port(host: str, port: int, timeout_s: float, coordinator: str) -> None:
  deadline = time.monotonic() + timeout_s
  last: Exception | None = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
        return
    except OSError as exc:
      last = exc
      time.sleep(0.2)
  raise CoordinatorUnreachableError(
    f"could not reach the coordinator at {coordinator} within {timeout_s:g} s ({last}). Start "
    "process 0 (--process_id 0) with the same --coordinator, check the host and port and the "
    "firewall, or raise --init_timeout. Nothing was written."
  )


def tag() -> str:
  """``"process i of n"`` for logs and progress bars."""
  return f"process {jax.process_index()} of {jax.process_count()}"


def is_primary() -> bool:
  """Whether this process writes the run's metrics, TensorBoard and summary."""
  return jax.process_index() == 0


def _allgather_bytes(payload: bytes) -> list[bytes]:
  """Every process's ``payload``, in process order (a collective: all processes must call it)."""
  from jax.experimental import multihost_utils

  length = np.int32(len(payload))
  lengths = np.asarray(multihost_utils.process_allgather(length)).reshape(-1)
  buffer = np.zeros(int(lengths.max()), np.uint8)
  buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(lengths), -1)
  return [bytes(row[:n]) for row, n in zip(gathered, lengths, strict=True)]


def check_same_config(fields: dict[str, Any], ignore: frozenset = frozenset()) -> None:
  """Raises the same ValueError in every process unless all processes run the same config.

  Args:
    fields: this process's resolved settings (JSON-serialisable).
    ignore: names that may legitimately differ between hosts (e.g. a local ``data_dir``).
  """
  if jax.process_count() == 1:
    return
  mine = {k: v for k, v in fields.items() if k not in ignore}
  payloads = _allgather_bytes(json.dumps(mine, sort_keys=True).encode())
  configs = [json.loads(p) for p in payloads]
  differ = []
  for key in sorted(set().union(*configs)):
    values = [c.get(key) for c in configs]
    if any(v != values[0] for v in values):
      differ.append(f"{key}: " + ", ".join(f"process {i}: {v!r}" for i, v in enumerate(values)))
  if differ:
    raise ValueError(
      "the processes of this run were started with different configs ("
      + "; ".join(differ)
      + "). Nothing was written. Start every process with the same --config, --set and --mesh."
    )


def agree(error: Exception | None) -> None:
  """Raises in every process if any process hit ``error`` (so none waits on the others)."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  message = b"" if error is None else f"{type(error).__name__}: {error}".encode()
  messages = _allgather_bytes(message)
  if error is not None:
    raise error
  failed = [(i, m.decode()) for i, m in enumerate(messages) if m]
  if failed:
    index, text = failed[0]
    raise RuntimeError(f"process {index} of {jax.process_count()} stopped the run: {text}")


def barrier(name: str) -> None:
  """Waits until every process got here."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class PreemptionWatch:
  """Whether the run was asked to stop (``SIGTERM``: a ``kill``, a SLURM or TPU preemption).

  In a multi-process run JAX's preemption service catches the signal in whichever process gets
  it and agrees on a step at which every process stops (``reached_preemption_sync_point``):
  :meth:`reached` is True at that step in every process and False before. In a single
  process (no distributed runtime) a ``SIGTERM`` handler, installed while the watch is entered
  in the main thread, makes :meth:`reached` True at the next step. Call :meth:`reached` after
  every training step, with the number of steps done (increasing, the same in every process).

  Example:
    >>> with PreemptionWatch() as watch:
    ...   stop = watch.reached(1)
    >>> stop
    False
  """

  def __init__(self):
    self.signalled = False
    self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.signalled = True

  def __enter__(self) -> PreemptionWatch:
    import signal
    import threading

    if not _has_preemption_service() and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    import signal

    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and stop after ``step`` steps (the same in every process)."""
    if _has_preemption_service():
      from jax.experimental import multihost_utils

      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.signalled


def _has_preemption_service() -> bool:
  """Whether JAX's distributed runtime (and its ``SIGTERM`` notifier) runs in this process."""
  from jax._src import distributed as jax_distributed

  state = jax_distributed.global_state
  return state.client is not None and state.preemption_sync_manager is not None
