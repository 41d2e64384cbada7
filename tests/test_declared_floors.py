"""The constraints `make test-floors` installs are the floors pyproject.toml declares.

`make test-floors` creates fresh venvs at exactly the versions of `tests/floors/*.txt` and runs
the README's blocks and the doctests there; these tests keep those files equal to the declared
`>=` floors, so a floor raised or lowered in pyproject.toml is the floor that gets tested.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
FLOORS = REPO / "tests" / "floors"


def _floors(requirements: list[str]) -> dict[str, Version]:
  floors = {}
  for text in requirements:
    req = Requirement(text)
    if req.name == "xsam_jax":  # an extra that includes another
      continue
    (lower,) = [s.version for s in req.specifier if s.operator == ">="]
    floors[req.name] = Version(lower)
  return floors


def _pins(path: Path) -> dict[str, Version]:
  pins = {}
  for line in path.read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = line.split("==")
      pins[name.strip()] = Version(version)
  return pins


def _project() -> dict:
  return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_every_dependency_has_a_floor_and_the_core_constraints_pin_exactly_those():
  floors = _floors(_project()["dependencies"])
  assert set(floors) == {"jax", "jaxlib", "optax", "chex", "numpy"}
  assert _pins(FLOORS / "core.txt") == floors


def test_the_flax_constraints_pin_the_flax_floor_and_no_core_dependency_below_its_floor():
  project = _project()
  core = _floors(project["dependencies"])
  flax = _floors(project["optional-dependencies"]["flax"])
  pins = _pins(FLOORS / "flax.txt")
  assert pins["flax"] == flax["flax"]
  assert set(pins) == set(core) | {"flax"}
  assert all(pins[name] >= floor for name, floor in core.items())
  # Only jax/jaxlib may sit above the library's floor (flax's own requirement lifts them).
  assert {name for name, floor in core.items() if pins[name] != floor} <= {"jax", "jaxlib"}


def test_flax_is_an_extra_that_the_experiments_and_dev_extras_include():
  project = _project()
  assert "flax" not in {Requirement(r).name for r in project["dependencies"]}
  extras = project["optional-dependencies"]
  assert "xsam_jax[flax]" in extras["experiments"]
  assert "xsam_jax[experiments]" in extras["dev"]
  assert project["license-files"] == ["LICENSE"] and (REPO / "LICENSE").is_file()
