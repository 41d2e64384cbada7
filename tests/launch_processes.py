"""Launching local multi-process runs of the train CLI on CPU, for the tests (and a worker).

:func:`launch` starts ``num_processes`` Python processes on this machine, each with
``devices_per_process`` virtual CPU devices (``--xla_force_host_platform_device_count``), joined
by JAX's distributed runtime through a coordinator on ``127.0.0.1:<free port>`` (gloo
collectives). Each process runs this file as a worker: it calls ``experiments.train.main`` with
every argv of ``runs`` in turn (so several runs share one process start and one
``jax.distributed`` connection), then writes a JSON report.

Cleanup is guaranteed: every process is the leader of its own process group, and on return,
timeout, failure or an exception in the test (Ctrl-C included) all groups still alive are
killed with SIGKILL and reaped; on Linux each process also gets SIGKILL if the test process
itself dies (``PR_SET_PDEATHSIG``). When one process fails the others get ``grace_s`` to fail
too (they are blocked in a collective otherwise) before they are killed.

Compilation dominates the cost of these short runs on a small CPU machine, so the processes
compile with XLA's cheapest CPU backend settings (:data:`FAST_COMPILE`: 5x faster compiles
here). Every run of a comparison uses the same flags, so they do not affect what is compared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# XLA:CPU's cheapest backend settings: the same programs and IEEE arithmetic, without LLVM's
# optimisation of the generated code. Compiles are ~5x faster here; compile-bound tests 2-4x
# (tests/conftest.py sets them for every test and, through the environment, its subprocesses).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(*flags: str) -> str:
  """This process's ``XLA_FLAGS`` plus ``flags`` (e.g. a device count) for a subprocess."""
  return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def _die_with_parent() -> None:
  """In the child before exec: SIGKILL when the parent dies (Linux; a no-op elsewhere)."""
  if sys.platform.startswith("linux"):
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class ProcessResult:
  """What one process of a launch left behind."""

  returncode: int | None  # None: killed by the helper (timeout, or another process failed)
  stdout: str
  stderr: str
  report: dict[str, Any]


@dataclasses.dataclass
class Launch:
  processes: list[ProcessResult]
  seconds: float

  @property
  def returncodes(self) -> list[int | None]:
    return [p.returncode for p in self.processes]

  def logs(self) -> str:
    return "\n".join(
      f"--- process {i} (rc {p.returncode}) ---\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
      for i, p in enumerate(self.processes)
    )


def launch(
  runs: list[list[str]],
  *,
  num_processes: int,
  devices_per_process: int,
  workdir: Path,
  timeout_s: float = 600,
  grace_s: float = 20,
  per_process_args: dict[int, list[str]] | None = None,
  coordinator: str | None = None,
  init_timeout_s: int = 60,
  env: dict[str, str] | None = None,
  terminate_when: tuple[Path, int] | None = None,
) -> Launch:
  """Runs ``runs`` (argv lists of ``python -m experiments.train``) in every process.

  Args:
    runs: the argv of each run, in order; the distributed flags are appended to each.
    num_processes: 1 runs a plain single-process job (no distributed flags at all).
    devices_per_process: virtual CPU devices of each process.
    workdir: where the processes' logs and reports go.
    timeout_s: wall-clock limit for the whole launch.
    grace_s: after a process fails, how long the others may take to exit on their own.
    per_process_args: extra argv for some process ids (appended to every run after the
      distributed flags, so a `--num_processes` there wins).
    coordinator: ``host:port`` to use instead of a fresh local one.
    init_timeout_s: ``--init_timeout`` of every process.
    env: extra environment variables of every process (e.g. ``JAX_ENABLE_X64``).
    terminate_when: ``(path, i)``: send ``SIGTERM`` (a preemption) to process ``i`` alone, once,
      as soon as the file ``path`` exists and is not empty (e.g. the first metrics line).
  """
  workdir.mkdir(parents=True, exist_ok=True)
  address = coordinator or f"127.0.0.1:{free_port()}"
  env = {
    **os.environ,
    **(env or {}),
    "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices_per_process}"),
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": str(REPO),
    "PYTHONUNBUFFERED": "1",
  }
  procs: list[subprocess.Popen] = []
  files = []
  start = time.monotonic()
  try:
    for i in range(num_processes):
      extra = []
      if num_processes > 1:
        extra += ["--coordinator", address, "--num_processes", str(num_processes)]
        extra += ["--process_id", str(i), "--init_timeout", str(init_timeout_s)]
      extra += list((per_process_args or {}).get(i, []))  # last: they win over the above
      spec = {"runs": [[*argv, *extra] for argv in runs], "report": str(workdir / f"report{i}")}
      (workdir / f"spec{i}.json").write_text(json.dumps(spec))
      out = open(workdir / f"stdout{i}", "w")  # noqa: SIM115 (closed in finally)
      err = open(workdir / f"stderr{i}", "w")  # noqa: SIM115
      files += [out, err]
      procs.append(
        subprocess.Popen(
          [sys.executable, __file__, str(workdir / f"spec{i}.json")],
          cwd=REPO,
          env=env,
          stdout=out,
          stderr=err,
          start_new_session=True,  # its own process group, killed as a whole below
          preexec_fn=_die_with_parent,
        )
      )
    deadline = start + timeout_s
    failed_at = None
    while time.monotonic() < deadline:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes):
        break
      if failed_at is None and any(c not in (None, 0) for c in codes):
        failed_at = time.monotonic()
      if failed_at is not None and time.monotonic() - failed_at > grace_s:
        break
      if terminate_when is not None:
        path, index = terminate_when
        if path.exists() and path.stat().st_size and procs[index].poll() is None:
          procs[index].send_signal(signal.SIGTERM)
          terminate_when = None
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # exited since poll()
          os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.returncode = None
    for f in files:
      f.close()
  results = []
  for i, p in enumerate(procs):
    report_path = workdir / f"report{i}"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    results.append(
      ProcessResult(
        p.returncode,
        (workdir / f"stdout{i}").read_text(),
        (workdir / f"stderr{i}").read_text(),
        report,
      )
    )
  return Launch(results, time.monotonic() - start)


def read_checkpoint(run_dir: Path, epoch: int) -> Any:
  """The state saved at ``epoch`` in a run directory, as NumPy arrays (any writer's layout)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  path = (run_dir / "checkpoints" / str(epoch) / "default").absolute()
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def max_abs_diff(a: Any, b: Any) -> float:
  """Largest absolute difference between two pytrees of arrays of the same structure."""
  import jax
  import numpy as np

  diffs = jax.tree.map(
    lambda x, y: (
      float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
      if np.size(x)
      else 0.0
    ),
    a,
    b,
  )
  return max(jax.tree.leaves(diffs), default=0.0)


# --------------------------------------------------------------------------------------------
# The worker: one process of a launch.


def _worker(spec_path: str) -> int:
  spec = json.loads(Path(spec_path).read_text())
  import jax
  import optax

  from experiments import train as train_lib

  captured: dict[str, Any] = {}
  train, make_train_step = train_lib.train, train_lib.make_train_step

  def capturing_train(*args, **kwargs):
    summary, state = train(*args, **kwargs)
    captured["state"] = state
    return summary, state

  def capturing_make_train_step(*args, **kwargs):
    captured["train_step"] = make_train_step(*args, **kwargs)
    return captured["train_step"]

  train_lib.train = capturing_train
  train_lib.make_train_step = capturing_make_train_step
  report: dict[str, Any] = {"returncodes": [], "runs": []}

  def spec_of(x) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]

  for argv in spec["runs"]:
    captured.clear()
    code = train_lib.main(argv)
    run: dict[str, Any] = {"returncode": code}
    if code == 0 and "state" in captured:
      state = captured["state"]
      eigvec = optax.tree.get(state.opt_state, "eigvec", default=None)
      run["params_specs"] = jax.tree.map(spec_of, state.params)
      run["eigvec_specs"] = None if eigvec is None else jax.tree.map(spec_of, eigvec)
      if "train_step" in captured:
        run["compiles"] = captured["train_step"].jitted._cache_size()
      run["process_index"] = jax.process_index()
      run["process_count"] = jax.process_count()
    report["returncodes"].append(code)
    report["runs"].append(run)
    Path(spec["report"]).write_text(json.dumps(report))
    if code:
      return code
  return 0


if __name__ == "__main__":
  sys.exit(_worker(sys.argv[1]))
