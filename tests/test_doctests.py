"""Every docstring example in ``xsam_jax`` runs as printed and ends with output it checks.

What ``python -m pytest --doctest-modules xsam_jax`` runs, run here in the suite's process (its
XLA flags and compilation cache), one test per docstring. ``xsam_jax.training``'s examples are
skipped where flax is not installed: the library without its ``[flax]`` extra, as
``make test-floors`` installs it.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import io
import pkgutil

import pytest

import xsam_jax


def _docstrings_with_examples() -> list:
  finder = doctest.DocTestFinder()
  submodules = sorted(f"xsam_jax.{m.name}" for m in pkgutil.iter_modules(xsam_jax.__path__))
  params = []
  for name in ["xsam_jax", *submodules]:
    try:
      module = importlib.import_module(name)
    except ImportError as e:
      if importlib.util.find_spec("flax") is not None:
        raise
      params.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=str(e))))
      continue
    # `find` keeps the objects defined in `module` (not the names it imports from elsewhere).
    params += [pytest.param(t, id=t.name) for t in finder.find(module, name) if t.examples]
  return params


DOCSTRINGS = _docstrings_with_examples()


def test_the_library_has_docstring_examples_to_run():
  tests = [p.values[0] for p in DOCSTRINGS if p.values[0] is not None]
  assert len(tests) >= 15
  assert sum(len(t.examples) for t in tests) >= 90


@pytest.mark.parametrize("test", DOCSTRINGS)
def test_a_docstring_example_prints_what_it_shows(test):
  out = io.StringIO()
  result = doctest.DocTestRunner().run(test, out=out.write)
  assert result.failed == 0, out.getvalue()


@pytest.mark.parametrize("test", DOCSTRINGS)
def test_a_docstring_example_ends_with_output_that_checks_it(test):
  # An example that only assigns shows that nothing raised, not that the result is right.
  last = test.examples[-1]
  assert last.want.strip(), (
    f"{test.name}: the example ends with `{last.source.strip()}`, which prints nothing; end it "
    "with a line whose printed output checks the result"
  )
