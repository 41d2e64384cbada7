"""The README's Python code runs as printed, every block, in order, on 4 devices.

Blocks share one namespace, as a reader going down the page would (the data-parallel and
accumulation examples reuse the fifteen-line example's ``loss`` and ``params``). They run in a
subprocess with 4 virtual CPU devices so the ``shard_map`` example really maps a batch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from launch_processes import xla_flags

README = Path(__file__).resolve().parents[1] / "README.md"

RUNNER = textwrap.dedent(
  """
  import re, sys
  import jax, numpy as np, optax
  text = open(sys.argv[1]).read()
  blocks = re.findall(r"```python\\n(.*?)```", text, flags=re.S)
  namespace = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    print("RAN BLOCK", i, flush=True)
  ns = namespace
  assert jax.device_count() == 4
  # The examples really trained: finite params, state at the expected step counts.
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(ns["params"]))
  assert int(optax.tree.get(ns["state"], "count")) == 2 * ns["k"]
  print("BLOCKS", len(blocks))
  """
)


def test_every_readme_python_block_runs_in_order():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert len(blocks) >= 4  # fifteen lines, data parallel, accumulation, Hessian toolbox
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags("--xla_force_host_platform_device_count=4")
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, "-c", RUNNER, str(README)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
  assert f"BLOCKS {len(blocks)}" in proc.stdout, proc.stdout
