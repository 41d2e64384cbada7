"""`pip install .` installs `xsam_jax` and nothing else: `experiments/` and `benchmarks/` are
run from a checkout (pytest puts the repository root on the path), never installed as
top-level packages of site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_built_wheel_has_xsam_jax_as_its_only_top_level_package(tmp_path):
  # Build from a copy, so the checkout gets no build/ or *.egg-info from the test.
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, src / name)
  for name in ("xsam_jax", "experiments", "benchmarks", "tests"):
    shutil.copytree(
      REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.png", "*.pdf")
    )
  out = tmp_path / "wheel"
  offline = ["--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check"]
  proc = subprocess.run(
    [sys.executable, "-m", "pip", "wheel", str(src), *offline, "-q", "-w", str(out)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  (wheel,) = out.glob("xsam_jax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert top_level == {"xsam_jax"}
  assert "xsam_jax/__init__.py" in names and "xsam_jax/hessian.py" in names
