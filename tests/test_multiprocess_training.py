"""Multi-process training on JAX's distributed runtime (gloo on CPU), launched locally.

Every run trains the digits SimpleCNN on 256 examples, 4 steps of batch 64 per epoch, on 4
global CPU devices: 1 process x 4 devices, 2 x 2 or 4 x 1 (see tests/launch_processes.py for the
launcher). SGD, SAM and X-SAM run in 1 and 2 processes, X-SAM also in 4 processes and on a
2-process data=2,model=2 mesh, whose checkpoint a single process then continues. The global
batch is the same in every layout, so parameters and optimizer state must agree up to the
rounding of the cross-device reductions.

The runs are in float64 (``compute_dtype=float64`` under ``JAX_ENABLE_X64=1``): in float32 the
reductions of 1 and of 2 or 4 processes round differently (1e-9 relative), and on a ReLU/max-pool
net such a difference can flip one unit across its kink and move the trajectories apart by 1e-5
in one step (measured, X-SAM, 1 vs 2 processes: every parameter within 1e-7 after step 0, then
one output channel of conv4 4.5e-5 apart after step 1, the rest of the net within 1e-7 to 8e-6
through back-propagation; in each layout the ``lax.cond`` and host-decided refresh paths give
bitwise the same step from the same state). In float64 the rounding is
1e-16 and the 1e-6 tolerance then catches any real difference: a missing or doubled reduction, a
wrong shard of the batch, a state that lost its layout. The X-SAM runs refresh every 2 steps
with 2 power iterations, on the path the CLI picks on CPU (``refresh_path=auto``: decided on the
host; the ``lax.cond`` path runs convolutions ~2x slower here and is compared with it in
tests/test_train.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import pytest
from launch_processes import free_port, launch, max_abs_diff, read_checkpoint

# Every test that launches training; `make test-multiprocess` runs them alone. One xdist worker
# runs this file (`make test` uses `--dist loadfile`), so every launch starts once.
MULTIPROCESS = pytest.mark.multiprocess

CONFIG = "experiments/configs/digits_simple_cnn.py"
SETTINGS = [
  "epochs=2",
  "train_examples=256",
  "batch_size=64",
  "compute_dtype=float64",
  "progress=false",
  "tensorboard=false",
  "lambda_max_examples=64",
  "lambda_max_iters=4",
  "refresh_every=2",
  "power_iters=2",
  "log_every=1",
]
X64 = {"JAX_ENABLE_X64": "1"}
OPTIMIZERS = ("sgd", "sam", "xsam")
LAYOUTS = {1: 4, 2: 2, 4: 1}  # processes -> devices per process: 4 global devices each
TOLERANCE = 1e-6


def _argv(optimizer: str, workdir: Path, *extra: str) -> list[str]:
  sets = [a for s in SETTINGS for a in ("--set", s)]
  return ["--config", f"{CONFIG}:{optimizer}", "--workdir", str(workdir), *sets, *extra]


def _assert_ok(result) -> None:
  assert result.returncodes == [0] * len(result.processes), result.logs()


class Runs:
  """The launches the tests compare, each started once, on first use."""

  def __init__(self, root: Path):
    self.root = root

  def dir(self, processes: int, name: str) -> Path:
    return self.root / f"p{processes}" / name

  @functools.cache  # noqa: B019 (one instance per session)
  def first_epoch(self, processes: int):
    """Epoch 1 of SGD, SAM and X-SAM with 1 or 2 processes, of X-SAM alone with 4, and with 2
    of X-SAM on a data x model mesh. The 1-process X-SAM run goes on through epoch 2 (the
    reference for the resumed runs)."""
    one = ["--max_epochs_this_run", "1"]
    optimizers = ("xsam",) if processes == 4 else OPTIMIZERS
    runs = [
      _argv(o, self.dir(processes, o), *([] if (processes, o) == (1, "xsam") else one))
      for o in optimizers
    ]
    if processes == 2:
      runs.append([*_argv("xsam", self.dir(2, "mesh"), *one), "--mesh", "data=2,model=2"])
    result = launch(
      runs,
      num_processes=processes,
      devices_per_process=LAYOUTS[processes],
      workdir=self.root / f"logs{processes}",
      env=X64,
    )
    print(f"\n{processes} process(es) x {LAYOUTS[processes]} devices: {result.seconds:.1f} s")
    _assert_ok(result)
    return result

  @functools.cache  # noqa: B019
  def second_epoch_in_one_process(self):
    """Epoch 2 of X-SAM in one unsharded process from the 2-process data=2,model=2 checkpoint
    (another process count *and* another layout)."""
    self.first_epoch(2)
    runs = [_argv("xsam", self.dir(2, "mesh"))]
    result = launch(
      runs, num_processes=1, devices_per_process=4, workdir=self.root / "logs_r", env=X64
    )
    print(f"\nresume in 1 process x 4 devices: {result.seconds:.1f} s")
    _assert_ok(result)
    return result


@pytest.fixture(scope="session")  # not "module": xdist may tear those down between tests
def runs(tmp_path_factory) -> Runs:
  return Runs(tmp_path_factory.mktemp("multiprocess"))


# Four processes run X-SAM only (4 processes compile on CI's 2 cores): its step holds every
# collective SGD's and SAM's steps hold, plus the refresh's.
@pytest.mark.parametrize(
  ("processes", "optimizer"), [(2, "sgd"), (2, "sam"), (2, "xsam"), (4, "xsam")]
)
@MULTIPROCESS
def test_sgd_sam_and_xsam_train_to_the_single_process_result_on_the_same_devices(
  runs, processes, optimizer
):
  runs.first_epoch(1), runs.first_epoch(processes)
  single = read_checkpoint(runs.dir(1, optimizer), 1)
  multi = read_checkpoint(runs.dir(processes, optimizer), 1)
  params = max_abs_diff(single["params"], multi["params"])
  opt_state = max_abs_diff(single["opt_state"], multi["opt_state"])
  print(f"1 vs {processes} processes, {optimizer}: params {params:.3g}, opt_state {opt_state:.3g}")
  assert int(multi["step"]) == 4
  assert str(multi["params"]["head"]["kernel"].dtype) == "float64"
  assert params <= TOLERANCE and opt_state <= TOLERANCE


@MULTIPROCESS
def test_only_process_zero_writes_metrics_and_every_process_says_which_it_is(runs):
  result = runs.first_epoch(2)
  records = [
    json.loads(x) for x in (runs.dir(2, "xsam") / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in records if r["kind"] == "step"] == [0, 1, 2, 3]  # once, not twice
  for i, process in enumerate(result.processes):
    assert f"[process {i} of 2]" in process.stderr
    assert f"reading rows {32 * i}:{32 * (i + 1)} of every batch of 64" in process.stderr
    assert all(r["process_count"] == 2 for r in process.report["runs"])


@MULTIPROCESS
def test_checkpoint_of_two_processes_resumes_in_one_process_and_continues_identically(runs):
  runs.first_epoch(1), runs.second_epoch_in_one_process()
  single = read_checkpoint(runs.dir(1, "xsam"), 2)  # 2 epochs, never interrupted
  resumed = read_checkpoint(runs.dir(2, "mesh"), 2)
  diff = max_abs_diff(single, resumed)
  print(f"epoch 2: uninterrupted in 1 process vs resumed in 1 from 2 (sharded): {diff:.3g}")
  assert int(resumed["step"]) == 8 and diff <= TOLERANCE
  summary = json.loads((runs.dir(2, "mesh") / "summary.json").read_text())
  assert summary["processes"] == 1 and summary["mesh"] == "data=4,model=1"
  kinds = [
    json.loads(x)["kind"] for x in (runs.dir(2, "mesh") / "metrics.jsonl").read_text().splitlines()
  ]
  assert kinds.count("resume") == 1


@MULTIPROCESS
def test_data_model_mesh_shards_weights_and_eigvec_alike_and_matches_the_unsharded_run(runs):
  runs.first_epoch(1), runs.first_epoch(2)
  mesh_run = runs.first_epoch(2).processes[0].report["runs"][3]
  params, eigvec = mesh_run["params_specs"], mesh_run["eigvec_specs"]
  assert eigvec == params  # the eigenvector lives exactly where its parameter lives
  assert params["conv4"]["kernel"] == [None, None, None, "model"]  # (3, 3, 64, 64): out channels
  assert params["fc1"]["kernel"] == ["model", None]  # (256, 128): the larger side
  assert params["conv1"]["kernel"] == [] and params["fc1"]["bias"] == []  # small: replicated
  # The state kept its layout: one program per refresh value (the host-decided path) for all
  # 4 steps, refreshing and not.
  assert mesh_run["compiles"] == 2
  unsharded = read_checkpoint(runs.dir(1, "xsam"), 1)
  sharded = read_checkpoint(runs.dir(2, "mesh"), 1)
  diff = max_abs_diff(unsharded, sharded)
  print(f"data=2,model=2 (2 processes) vs data=4 (1 process), xsam: {diff:.3g}")
  assert diff <= TOLERANCE


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written.


def _digest(path: Path) -> dict[str, str]:
  return {
    str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(path.rglob("*"))
    if p.is_file()
  }


def test_batch_that_does_not_split_over_the_processes_is_refused_before_anything_is_written(
  tmp_path,
):
  run = _argv("sgd", tmp_path / "run", "--set", "batch_size=66")
  result = launch([run], num_processes=2, devices_per_process=2, workdir=tmp_path / "logs", env=X64)
  assert result.returncodes == [2, 2], result.logs()
  for process in result.processes:
    assert "batch_size 66 is not divisible by the device count 4 of the 2 processes" in (
      process.stderr
    )
  assert not (tmp_path / "run").exists()


def test_unreachable_coordinator_fails_within_the_timeout_with_a_clear_error(tmp_path):
  nobody = f"127.0.0.1:{free_port()}"
  start = time.monotonic()
  result = launch(
    [_argv("sgd", tmp_path / "run", "--process_id", "1")],
    num_processes=1,  # only process 1 of a 2-process run; nobody hosts the coordinator
    devices_per_process=1,
    workdir=tmp_path / "logs",
    env=X64,
    per_process_args={0: ["--coordinator", nobody, "--num_processes", "2", "--init_timeout", "3"]},
  )
  assert result.returncodes == [2], result.logs()
  assert "could not reach the coordinator at 127.0.0.1:" in result.processes[0].stderr
  assert time.monotonic() - start < 120
  assert not (tmp_path / "run").exists()


def test_coordinator_whose_peers_never_connect_stops_after_the_timeout_and_says_why(tmp_path):
  # XLA terminates the process from C++ when the others do not register in time (no Python
  # exception to catch), so process 0 says beforehand what that termination will mean.
  flags = ["--coordinator", f"127.0.0.1:{free_port()}", "--num_processes", "2", "--process_id"]
  start = time.monotonic()
  result = launch(
    [_argv("sgd", tmp_path / "run")],
    num_processes=1,  # process 0 of a 2-process run whose process 1 never starts
    devices_per_process=1,
    workdir=tmp_path / "logs",
    env=X64,
    per_process_args={0: [*flags, "0", "--init_timeout", "3"]},
  )
  assert result.returncodes[0] not in (0, None), result.logs()
  stderr = result.processes[0].stderr
  assert "waiting up to 3 s for the other processes" in stderr
  assert "they did not all connect" in stderr and "DEADLINE_EXCEEDED" in stderr
  assert time.monotonic() - start < 120
  assert not (tmp_path / "run").exists()


def test_processes_started_with_different_configs_refuse_to_run_and_touch_nothing(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("someone's work\n")
  result = launch(
    [_argv("sgd", workdir)],
    num_processes=2,
    devices_per_process=1,
    workdir=tmp_path / "logs",
    env=X64,
    per_process_args={1: ["--set", "rho=0.1"]},
  )
  assert result.returncodes == [2, 2], result.logs()
  for process in result.processes:
    assert "different configs (rho: process 0: 0.05, process 1: 0.1)" in process.stderr
  assert _digest(workdir) == {"notes.txt": hashlib.sha256(b"someone's work\n").hexdigest()}


@MULTIPROCESS
def test_a_workdir_one_process_cannot_use_stops_every_process_before_anything_is_written(
  tmp_path,
):
  # Process 1 is given a file as its --workdir (as if its host saw another file system): it
  # refuses by name, and process 0 stops with it instead of waiting for it in a collective.
  workdir, afile = tmp_path / "run", tmp_path / "afile"
  afile.write_text("precious\n")
  result = launch(
    [_argv("sgd", workdir)],
    num_processes=2,
    devices_per_process=1,
    workdir=tmp_path / "logs",
    env=X64,
    per_process_args={1: ["--workdir", str(afile)]},
  )
  assert result.returncodes == [2, 2], result.logs()
  assert f"--workdir {afile} is a file, not a directory" in result.processes[1].stderr
  assert "process 1 of 2 stopped the run: ValueError: --workdir" in result.processes[0].stderr
  assert not workdir.exists() and afile.read_text() == "precious\n"


@MULTIPROCESS
def test_processes_started_with_different_num_processes_all_refuse_by_name(tmp_path):
  # The coordinator (process 0) fixes the count at 2; process 1 believes in 3 and joins anyway.
  result = launch(
    [_argv("sgd", tmp_path / "run")],
    num_processes=2,
    devices_per_process=1,
    workdir=tmp_path / "logs",
    env=X64,
    per_process_args={1: ["--num_processes", "3"]},
  )
  assert result.returncodes == [2, 2], result.logs()
  for process in result.processes:
    assert "--num_processes differs between the processes (process 0: 2, process 1: 3)" in (
      process.stderr
    )
    assert "Start every process with --num_processes 2" in process.stderr
  assert not (tmp_path / "run").exists()


@MULTIPROCESS
def test_sigterm_to_one_process_checkpoints_every_process_and_the_rerun_resumes(runs, tmp_path):
  # A preemption notice reaches one process (here process 1, which writes no metrics): JAX's
  # preemption service agrees on a step, every process saves its part of the state there and
  # exits with 75, and the rerun continues to the uninterrupted run's parameters.
  runs.first_epoch(1)  # the 1-process X-SAM reference, 2 epochs, never interrupted
  workdir = tmp_path / "run"
  argv = [_argv("xsam", workdir)]
  kwargs = dict(num_processes=2, devices_per_process=2, env=X64)
  stopped = launch(
    argv, workdir=tmp_path / "logs", terminate_when=(workdir / "metrics.jsonl", 1), **kwargs
  )
  assert stopped.returncodes == [75, 75], stopped.logs()
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  step = next(r["step"] for r in records if r["kind"] == "preempted")
  for i, process in enumerate(stopped.processes):
    assert f"[process {i} of 2] preempted at step {step}" in process.stderr
  assert 0 < step < 8
  resumed = launch(argv, workdir=tmp_path / "logs_r", **kwargs)
  _assert_ok(resumed)
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "resume"] == [step]
  diff = max_abs_diff(read_checkpoint(runs.dir(1, "xsam"), 2), read_checkpoint(workdir, 2))
  print(f"2 processes preempted at step {step} and resumed vs 1 process uninterrupted: {diff:.3g}")
  assert diff <= TOLERANCE
