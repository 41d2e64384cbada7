"""`pip install .` installs `xsam_jax` and nothing else: `experiments/` and `benchmarks/` are
run from a checkout (pytest puts the repository root on the path), never installed as
top-level packages of site-packages; flax comes only with the `[flax]` extra (the library
imports it only in `xsam_jax.training`), and the wheel ships the license text."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  # Build from a copy, so the checkout gets no build/ or *.egg-info from the test.
  tmp_path = tmp_path_factory.mktemp("wheel")
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE"):
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
  return wheel


def test_built_wheel_has_xsam_jax_as_its_only_top_level_package(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert top_level == {"xsam_jax"}
  assert "xsam_jax/__init__.py" in names and "xsam_jax/hessian.py" in names


def test_the_wheel_requires_flax_only_with_the_flax_extra(wheel):
  with zipfile.ZipFile(wheel) as z:
    (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    requires = [
      Requirement(r) for r in email.message_from_bytes(z.read(meta)).get_all("Requires-Dist")
    ]
  unconditional = {r.name for r in requires if r.marker is None}
  assert {"jax", "jaxlib", "optax", "chex", "numpy"} <= unconditional
  assert "flax" not in unconditional
  flax = [r for r in requires if r.name == "flax"]
  assert flax and all(r.marker.evaluate({"extra": "flax"}) for r in flax)
  assert not any(r.marker.evaluate({"extra": ""}) for r in flax)


def test_the_wheel_ships_the_apache_license_text(wheel):
  with zipfile.ZipFile(wheel) as z:
    (license_file,) = [n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    text = z.read(license_file).decode()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text


def test_xsam_jax_imports_without_flax_and_training_names_the_extra():
  # `sys.modules["flax"] = None` makes `import flax` fail, as in a venv without flax.
  code = textwrap.dedent(
    """
    import sys
    sys.modules["flax"] = None
    import jax, jax.numpy as jnp, optax, xsam_jax
    loss = lambda w: jnp.sum((w - 1.0) ** 2)
    tx = optax.chain(xsam_jax.xsam(rho=0.05), optax.sgd(0.1))
    updates, _ = tx.update(jax.grad(loss)(jnp.zeros(2)), tx.init(jnp.zeros(2)), jnp.zeros(2),
                           grad_fn=jax.grad(loss))
    print("STEP", bool(jnp.isfinite(updates).all()))
    try:
      import xsam_jax.training
    except ImportError as e:
      print("ERROR", e)
    """
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "STEP True" in proc.stdout
  assert "ERROR xsam_jax.training needs flax" in proc.stdout
  assert "pip install 'xsam_jax[flax]'" in proc.stdout
