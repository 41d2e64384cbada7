"""The README's code runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_fifteen_line_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  example = next(b for b in blocks if "optax.chain" in b and "train_step" in b)
  namespace: dict = {}
  exec(compile(example, str(README), "exec"), namespace)
  assert "params" in namespace and "state" in namespace
