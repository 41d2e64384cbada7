"""The Markdown report writer every benchmark shares: machine and run header, number formats,
PASS/FAIL cells, tables, and a results file in which each benchmark owns one marked section.

A benchmark renders its section with :func:`section` (markers, title, the run header and its own
lines) and writes it with :func:`write_section`, which replaces that benchmark's previous
section between its markers and keeps everything else in the file (hand-written readings
included).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jaxlib
import optax

from benchmarks._harness import make_log


def machine_info() -> dict[str, Any]:
  """CPU model, cores, backend, devices and library versions."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      cpu = names[0]
  except OSError:
    pass
  devices = jax.devices()
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": f"{len(devices)} x {devices[0].device_kind}",
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "python": platform.python_version(),
  }


def load_average() -> str:
  """The 1, 5 and 15 minute load averages, e.g. ``"2.7 2.3 2.8"``."""
  return " ".join(f"{x:.1f}" for x in os.getloadavg())


def command_line(module: str, argv: Sequence[str] | None) -> str:
  """The command that ran ``module`` with ``argv`` (``sys.argv[1:]`` when None)."""
  args = sys.argv[1:] if argv is None else list(argv)
  return f"python -m {module}" + (" " + shlex.join(args) if args else "")


class Run:
  """One benchmark run: logs with elapsed seconds from its start and records what the report's
  header needs (date, command, machine, load averages at start and end, minutes taken)."""

  def __init__(self, module: str, argv: Sequence[str] | None):
    self.module, self.argv = module, argv
    self.start = time.time()
    self.load_start = load_average()
    self.log = make_log(self.start)
    m = machine_info()
    self.log(f"backend {m['backend']} ({m['devices']}), jax {m['jax']}")

  def meta(self) -> dict[str, Any]:
    """The run's header data, as of now."""
    return {
      "date": datetime.datetime.now(datetime.UTC).strftime("%a %b %d %H:%M:%S UTC %Y"),
      "command": command_line(self.module, self.argv),
      "machine": machine_info(),
      "load_start": self.load_start,
      "load_end": load_average(),
      "elapsed_s": time.time() - self.start,
    }


def header(meta: dict[str, Any]) -> list[str]:
  """The bullet lines every section starts with: date, command, backend, machine, versions."""
  m = meta["machine"]
  return [
    f"- Date: {meta['date']} (took {meta['elapsed_s'] / 60:.1f} min)",
    f"- Command: `{meta['command']}`",
    f"- Backend: **{m['backend']}**, devices: {m['devices']}",
    f"- Machine: {m['cpu']}, {m['cores']} cores; load average at start/end "
    f"{meta['load_start']} / {meta['load_end']} (the machine is shared: compare ratios within "
    "this run, not absolute times across runs)",
    f"- Versions: jax {m['jax']}, jaxlib {m['jaxlib']}, optax {m['optax']}, flax {m['flax']}, "
    f"Python {m['python']}",
  ]


# --------------------------------------------------------------------------------------------
# Numbers and tables.


def fmt_ms(seconds: float | None) -> str:
  """Milliseconds with three significant digits (thousands separated above 100 ms)."""
  if seconds is None or not math.isfinite(seconds):
    return "–"
  ms = seconds * 1e3
  return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def fmt_s(seconds: float | None) -> str:
  """Seconds with one decimal."""
  return "–" if seconds is None else f"{seconds:.1f}"


def fmt_ratio(value: float | None) -> str:
  """A ratio with three decimals below 10, one above."""
  if value is None or not math.isfinite(value):
    return "–"
  return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def verdict(value: float, goal: float | None) -> str:
  """``PASS``/``FAIL`` against an upper bound; empty for information rows."""
  if goal is None or not math.isfinite(value):
    return ""
  return "PASS" if value <= goal else "FAIL"


def cell(value: float, goal: float | None) -> str:
  """A ratio with its verdict, ``FAIL`` in bold."""
  mark = verdict(value, goal)
  return f"{fmt_ratio(value)} {'**FAIL**' if mark == 'FAIL' else mark}".strip()


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  """A Markdown table: a header of ``columns`` and one line per row."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
  return lines


# --------------------------------------------------------------------------------------------
# Sections of a results file.


def markers(name: str) -> tuple[str, str]:
  """The begin and end markers of benchmark ``name``'s section (e.g. ``benchmarks.step_cost``)."""
  return (
    f"<!-- {name}: begin (generated; edits inside are overwritten) -->",
    f"<!-- {name}: end -->",
  )


def section(name: str, title: str, meta: dict[str, Any] | None, lines: Sequence[str]) -> str:
  """Benchmark ``name``'s section: its markers around ``## title``, the run header of ``meta``
  (when given) and ``lines``. ``name`` is the module (``benchmarks.tracking``), or the module
  and one of its sections (``benchmarks.tracking:resnet18``) when it writes several."""
  begin, end = markers(name)
  head = [begin, f"## {title}", ""]
  module, _, part = name.partition(":")
  if meta is not None:
    head += [
      f"Generated by `{module.replace('.', '/')}.py`"
      + (f" (its `{part}` section)" if part else "")
      + "; rerunning it regenerates this section only "
      "(up to the end marker) and keeps the other sections of the file.",
      "",
      *header(meta),
    ]
  return "\n".join([*head, *lines, end]) + "\n"


def merge_section(
  existing: str | None, text: str, name: str, *, first: bool = True, title: str = "Benchmarks"
) -> str:
  """The results file with benchmark ``name``'s section ``text`` in place, every other section
  kept: ``text`` replaces what lies between ``name``'s markers; without them it goes first
  (after the file's ``# `` title) or, with ``first=False``, last. A new file gets
  ``# title``."""
  begin, end = markers(name)
  if not existing:
    return f"# {title}\n\n" + text
  if begin in existing and end in existing:
    head, rest = existing.split(begin, 1)
    tail = rest.split(end, 1)[1]
    return head + text.rstrip("\n") + tail
  if not first:
    return existing.rstrip("\n") + "\n\n" + text
  lines = existing.splitlines(keepends=True)
  if lines and lines[0].startswith("# "):
    return lines[0] + "\n" + text + "\n" + "".join(lines[1:]).lstrip("\n")
  return f"# {title}\n\n" + text + "\n" + existing


def write_section(path: str | Path, text: str, name: str, *, first: bool = True) -> None:
  """Writes benchmark ``name``'s section ``text`` into the file at ``path`` (see
  :func:`merge_section`), creating the file and its folder if needed."""
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(merge_section(out.read_text() if out.exists() else None, text, name, first=first))
