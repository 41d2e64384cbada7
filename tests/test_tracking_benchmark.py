"""benchmarks/tracking.py: where it compares, that a converged tracker agrees with its reference,
and its CIFAR-shaped ResNet-18 mode."""

from __future__ import annotations

import re

import jax
import pytest


def _tracking_rows(text: str) -> list[list[str]]:
  """The data rows of the tracking table (tracker, HVP, q, p, median |cos|, ...)."""
  lines = [line for line in text.splitlines() if line.startswith(("| power", "| lanczos"))]
  return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_tracking_compares_cached_vectors_at_every_age_not_only_right_after_a_refresh():
  from benchmarks import tracking

  steps = tracking.comparison_steps(400, 20)
  assert len(steps) == 20 and all(20 * k <= s < 20 * (k + 1) for k, s in enumerate(sorted(steps)))
  # With p = 20 (or 5) and comparisons at multiples of 20, every comparison would meet a vector
  # refreshed on that very minibatch; the ages since the last refresh must spread instead.
  assert len({s % 20 for s in steps}) >= 8 and len({s % 5 for s in steps}) == 5


@pytest.mark.slow
def test_the_tracking_benchmark_finds_the_top_eigenvector_when_it_converges(tmp_path):
  from benchmarks import tracking

  out = tmp_path / "RESULTS.md"
  # One step: the fixed examples (the first 32 of the shuffled order) are then the very
  # minibatch, so the fixed-examples eigenvector must be the minibatch's.
  argv = ["--steps", "1", "--every", "1", "--batch", "32", "--ref-iters", "25", "--repeats", "1"]
  argv += ["--trackers", "lanczos,power", "--hvps", "exact", "--qs", "1,25", "--ps", "1"]
  argv += ["--full-examples", "32"]
  assert tracking.main([*argv, "--out", str(out), "--figure", str(tmp_path / "t.png")]) == 0
  text = out.read_text()
  assert "## Tracking quality along training (digits SimpleCNN)" in text
  rows = {(r[0], int(r[2])): r for r in _tracking_rows(text)}
  # A converged Lanczos run agrees with the independent one.
  assert float(rows["lanczos", 25][4]) > 0.99 and float(rows["lanczos", 25][6]) > 0.99
  assert float(rows["lanczos", 25][7]) > 0.99  # |cos| vs the 32 examples
  # With q = 1 the library's Lanczos refresh is one power step, as the benchmark's must be (a
  # one-step Lanczos run would return its random start, |cos| ~ 1/sqrt(n)).
  assert rows["lanczos", 1][4:] == rows["power", 1][4:]
  assert float(rows["lanczos", 1][4]) > 0.05
  spread = re.search(
    r"consecutive minibatches have \|cos\| (\d\.\d+).*?32 fixed training examples have (\d\.\d+)",
    text,
  )
  assert spread, text
  assert float(spread[2]) > 0.99 and 0.0 <= float(spread[1]) <= 1.0


def test_the_tracking_benchmark_refreshes_as_the_library_does_lanczos_with_one_hvp_included():
  import itertools

  import jax.numpy as jnp
  import numpy as np

  from benchmarks import tracking

  # A quadratic with a known Hessian (eigenvalues 6, 3, 1, -2 in a rotated basis).
  rng = np.random.default_rng(0)
  basis, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  hess = basis @ np.diag([6.0, 3.0, 1.0, -2.0]) @ basis.T
  grad_fn = lambda w: jnp.asarray(hess, jnp.float32) @ w
  params = jnp.asarray([0.3, -0.2, 0.5, 1.0], jnp.float32)
  v0 = basis @ np.array([0.1, 0.5, 0.8, 0.3])

  def numpy_refresh(tracker, q):
    """The library's rule from NumPy: q power steps, or the top Ritz vector of the q-vector
    Krylov space; one power step for Lanczos with q = 1."""
    if tracker == "power" or q == 1:
      v = v0
      for _ in range(q):
        v = hess @ v / np.linalg.norm(hess @ v)
      return v
    krylov = np.stack([np.linalg.matrix_power(hess, k) @ v0 for k in range(q)], axis=1)
    orth, _ = np.linalg.qr(krylov)
    _, ritz = np.linalg.eigh(orth.T @ hess @ orth)
    return orth @ ritz[:, -1]

  for tracker, method, q in itertools.product(
    ("power", "lanczos"), ("exact", "forward_difference"), (1, 2, 3)
  ):
    got = np.asarray(
      tracking.library_refresh(grad_fn, params, jnp.asarray(v0, jnp.float32), q, tracker, method),
      np.float64,
    )
    want = numpy_refresh(tracker, q)
    cos = abs(got @ want) / (np.linalg.norm(got) * np.linalg.norm(want))
    assert cos > 0.9999, (tracker, method, q, cos)
  # Lanczos with q = 1 moves: it is not the start vector.
  start = v0 / np.linalg.norm(v0)
  assert abs(numpy_refresh("lanczos", 1) @ start) < 0.95


def test_the_tracking_benchmark_runs_resnet18_on_cifar_shaped_digits_in_its_own_section(
  tmp_path, monkeypatch
):
  from benchmarks import tracking
  from experiments import models

  # ResNet-18's layers and BatchNorm at a fraction of its width, to keep the test short.
  narrow = lambda name, n: models.get_model(name, n, widths=(8, 8, 16, 16))
  monkeypatch.setattr(tracking, "get_model", narrow)
  out = tmp_path / "RESULTS.md"
  out.write_text("# Benchmarks\n\n## Another benchmark\n\nkept\n")
  argv = ["--model", "resnet18", "--steps", "2", "--every", "1", "--batch", "4", "--repeats", "1"]
  argv += ["--ref-iters", "3", "--trackers", "power", "--hvps", "exact"]
  argv += ["--qs", "1", "--ps", "1", "--out", str(out), "--figure", str(tmp_path / "r.png")]
  assert tracking.main(argv) == 0
  text = out.read_text()
  assert "## Tracking quality along training (ResNet-18, digits upsampled to 32×32×3)" in text
  params, _ = models.init_model(narrow("resnet18", 10), (1, 32, 32, 3), jax.random.key(0))
  assert f"({models.count_params(params):,} parameters)" in text
  assert "measured ResNet-18 cost" in text
  (row,) = _tracking_rows(text)
  assert 0.0 <= float(row[4]) <= 1.0 and float(row[7]) == float(row[8]) > 1.0
  assert "kept" in text and (tmp_path / "r.png").exists()


def test_the_averaged_tracker_follows_the_mean_hessian_not_the_last_minibatchs():
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import tracking
  from xsam_jax import hessian

  # Two "minibatch" Hessians, rank one along u1 and u2 at ±30° from e1: each minibatch's top
  # eigenvector is its own u, their mean's is e1 (eigenvalues 3.75 and 1.25).
  angle = np.pi / 6
  u = [np.array([np.cos(angle), s * np.sin(angle), 0.0]) for s in (1.0, -1.0)]
  hess = [jnp.asarray(5.0 * np.outer(x, x) + 0.1 * np.eye(3), jnp.float32) for x in u]
  v0 = jnp.asarray([0.2, 0.9, 0.4], jnp.float32)
  v_avg, m = v0, jnp.zeros(3, jnp.float32)
  v_pow = v0
  for step in range(60):
    hvp = lambda v, h=hess[step % 2]: h @ v
    v_avg, m = tracking.averaged_power_steps(hvp, v_avg, m, 1, 0.9)
    _, v_pow = hessian.power_iteration(hvp, v_pow, 1, unroll=True)
  assert abs(float(v_avg[0])) / float(jnp.linalg.norm(v_avg)) > 0.99
  assert abs(float(v_pow[0])) < 0.9  # power iteration sits on the last minibatch's u
  # decay 0 is power iteration.
  v_zero, _ = tracking.averaged_power_steps(lambda v: hess[0] @ v, v0, jnp.zeros(3), 3, 0.0)
  _, v_ref = hessian.power_iteration(lambda v: hess[0] @ v, v0, 3, unroll=True)
  np.testing.assert_allclose(v_zero, v_ref, rtol=1e-5, atol=1e-6)


def test_the_tracking_benchmark_rejects_an_unknown_tracker_and_bad_numbers_by_name(capsys):
  from benchmarks import tracking

  for argv, named in (
    (["--trackers", "power,oja"], "--trackers"),
    (["--full-examples", "-1"], "--full-examples"),
    (["--average-decay", "1.0"], "--average-decay"),
  ):
    with pytest.raises(SystemExit):
      tracking.main(argv)
    assert named in capsys.readouterr().err
