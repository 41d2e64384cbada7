"""The timing harness every benchmark shares: interleaved repeats, compile counting, wall and
CPU time, medians.

A :class:`Variant` is one measured computation. :func:`first_run` runs it once after its
compile and calibrates how many calls one sample takes; :func:`interleave` then samples all
variants round robin, shuffled every round, so that load from other processes affects them
alike (report ratios measured within one run, not absolute times across runs). A variant stops
repeating once its time spent would exceed a budget, so slow cases are measured once.
:class:`CompileEvents` counts backend compiles and their durations through ``jax.monitoring``;
:func:`compile_ahead` lowers and compiles a jitted function, timing both.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

# A sample of a fast call repeats it until at least this long, so milliseconds are resolved.
MIN_SAMPLE_S = 0.2
# A first execution at least this long is kept as a sample (one-time costs are negligible).
KEEP_FIRST_S = 1.0

Log = Callable[[str], None]


def make_log(start: float | None = None) -> Log:
  """A logger to stderr that prefixes every message with the seconds since ``start``."""
  start = time.time() if start is None else start

  def log(message: str) -> None:
    print(f"[{time.time() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

  return log


@dataclasses.dataclass
class Variant:
  """One measured computation: ``call()`` runs it once and returns something to block on.

  Each sample records the wall-clock seconds per call (the measurement) and the process CPU
  seconds per call (all threads; on a CPU backend a measure of the work done that is not
  inflated when other processes take the cores).
  """

  name: str
  call: Callable[[], Any]
  inner: int = 1  # calls per sample
  samples: list[tuple[float, float]] = dataclasses.field(default_factory=list)
  seeds: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # 10-step runs
  spent_s: float = 0.0
  last_s: float = 0.0  # wall time of the last sample (all inner calls)
  compile_s: float | None = None
  lower_s: float | None = None

  def sample(self) -> None:
    """Times ``inner`` blocked calls and records the mean wall and CPU seconds per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(self.inner):
      jax.block_until_ready(self.call())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    self.spent_s += wall
    self.last_s = wall
    self.samples.append((wall / self.inner, cpu / self.inner))

  def wants_more(self, repeats: int, budget_s: float) -> bool:
    """Whether another sample fits: fewer than ``repeats`` and within ``budget_s`` seconds."""
    if len(self.samples) >= repeats:
      return False
    if not self.samples and not self.seeds:
      return True
    return self.spent_s + self.last_s <= budget_s

  def data(self, clock: str = "wall") -> list[float]:
    """Seconds per call on ``clock`` (``"wall"`` or ``"cpu"``): the round-robin samples, or
    the 10-step-run samples when there are none."""
    index = 0 if clock == "wall" else 1
    return [sample[index] for sample in self.samples or self.seeds]

  def median(self, clock: str = "wall") -> float:
    """Median seconds per call."""
    data = self.data(clock)
    return statistics.median(data) if data else math.nan

  def minimum(self, clock: str = "wall") -> float:
    """Fastest seconds per call."""
    data = self.data(clock)
    return min(data) if data else math.nan

  @property
  def count(self) -> int:
    """Number of samples behind :meth:`median`."""
    return len(self.samples or self.seeds)

  def add_seed(self, wall: float, cpu: float) -> None:
    """Adds a post-compile single-call timing taken elsewhere (the 10-step runs)."""
    self.seeds.append((wall, cpu))
    self.spent_s += wall
    self.last_s = wall
    self.calibrate(statistics.median(w for w, _ in self.seeds))

  def calibrate(self, per_call_s: float) -> None:
    """Sets ``inner`` so that one sample lasts at least ``MIN_SAMPLE_S``."""
    self.inner = max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(per_call_s, 1e-7))))


def timed_call(fn: Callable[[], Any]) -> tuple[float, float, Any]:
  """``(wall seconds, CPU seconds, result)`` of one blocked call."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - wall, time.process_time() - cpu, out


class CompileEvents:
  """Records jax's compile-pipeline events (``jax.monitoring``): every trace to a jaxpr,
  lowering to MLIR and backend compile, with its duration."""

  PREFIX = "/jax/core/compile/"

  def __init__(self):
    self.events: list[tuple[str, float]] = []
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event: str, duration: float, **kwargs: Any) -> None:
    del kwargs
    if event.startswith(self.PREFIX):
      self.events.append((event[len(self.PREFIX) :], duration))

  def mark(self) -> int:
    """A position to summarise from."""
    return len(self.events)

  def since(self, mark: int) -> dict[str, Any]:
    """Backend compiles after ``mark`` (count, seconds of each in order, total) and the
    seconds spent tracing and lowering."""
    events = self.events[mark:]
    compiles = [d for name, d in events if name == "backend_compile_duration"]
    front = [d for name, d in events if name != "backend_compile_duration"]
    return {
      "compiles": len(compiles),
      "compile_each_s": compiles,
      "compile_s": sum(compiles),
      "trace_lower_s": sum(front),
    }


_COMPILE_EVENTS: CompileEvents | None = None


def compile_events() -> CompileEvents:
  """The process-wide :class:`CompileEvents` (registered once)."""
  global _COMPILE_EVENTS
  if _COMPILE_EVENTS is None:
    _COMPILE_EVENTS = CompileEvents()
  return _COMPILE_EVENTS


def compile_ahead(jitted: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, float, float]:
  """``(compiled, lower_s, compile_s)``: ``jitted`` lowered and compiled for ``args``."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lower_s, time.perf_counter() - start


def first_run(variant: Variant, log) -> Variant:
  """Runs ``variant`` once; a run of at least ``KEEP_FIRST_S`` seconds is kept as a sample
  (its one-time costs are negligible then). After a shorter one, ``variant`` runs for about
  ``MIN_SAMPLE_S`` to calibrate ``inner`` and that warm-up is discarded."""
  seconds, cpu_seconds, _ = timed_call(variant.call)
  if seconds >= KEEP_FIRST_S:
    variant.calibrate(seconds)
    variant.samples.append((seconds, cpu_seconds))
    variant.spent_s = variant.last_s = seconds
  else:
    calls, start = 0, time.perf_counter()
    while calls < 1000 and time.perf_counter() - start < MIN_SAMPLE_S:
      jax.block_until_ready(variant.call())
      calls += 1
    variant.calibrate((time.perf_counter() - start) / calls)
  compiled = "" if variant.compile_s is None else f"compile {variant.compile_s:.2f}s, "
  lowered = "" if variant.lower_s is None else f"lower {variant.lower_s:.2f}s, "
  log(f"  {variant.name}: {lowered}{compiled}first run {seconds:.4f}s")
  return variant


def compiled_variant(
  name: str, jitted: Callable[..., Any], args: Sequence[Any], log: Log
) -> Variant:
  """``jitted`` compiled ahead of time for ``args``, wrapped as a variant that calls it on
  ``args``, and run once (:func:`first_run`)."""
  compiled, lower_s, compile_s = compile_ahead(jitted, args)
  variant = Variant(name, lambda: compiled(*args), lower_s=lower_s, compile_s=compile_s)
  return first_run(variant, log)


def interleave(variants: Sequence[Variant], repeats: int, budget_s: float, seed: int, log):
  """Round robin over ``variants``, shuffled every round, until each has ``repeats`` samples
  or would exceed ``budget_s`` seconds."""
  rng = random.Random(seed)
  for round_index in range(repeats):
    order = list(variants)
    rng.shuffle(order)
    for variant in order:
      if variant.wants_more(repeats, budget_s):
        variant.sample()
    log(f"  round {round_index + 1}/{repeats} done")


def summarize(variants: Sequence[Variant]) -> dict[str, dict[str, Any]]:
  """Per variant name: wall-clock medians and minima, CPU-time medians, sample counts, calls
  per sample and the raw samples (seconds per call)."""
  return {
    "medians_s": {v.name: v.median() for v in variants},
    "minima_s": {v.name: v.minimum() for v in variants},
    "cpu_medians_s": {v.name: v.median("cpu") for v in variants},
    "samples": {v.name: v.count for v in variants},
    "inner": {v.name: v.inner for v in variants},
    "raw_samples_s": {v.name: v.data() for v in variants},
    "raw_cpu_samples_s": {v.name: v.data("cpu") for v in variants},
  }
