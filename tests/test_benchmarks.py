"""The shared benchmark harness and report writer, and smoke runs of the benchmarks that keep them
from rotting: the accelerator benchmark in its tiny CPU mode, the step-cost benchmark on an MLP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from benchmarks import _harness as harness
from benchmarks import _report as report

ROOT = Path(__file__).resolve().parents[1]


def test_interleaving_gives_every_variant_its_repeats_and_a_median():
  variants = [harness.Variant(f"v{i}", lambda: jnp.zeros(())) for i in range(3)]
  harness.interleave(variants, repeats=4, budget_s=10.0, seed=0, log=lambda _: None)
  assert [v.count for v in variants] == [4, 4, 4]
  summary = harness.summarize(variants)
  assert set(summary["medians_s"]) == {"v0", "v1", "v2"}
  assert all(m >= 0 for m in summary["medians_s"].values())


def test_a_variant_stops_repeating_once_its_budget_is_spent_but_keeps_one_sample():
  slow = harness.Variant("slow", lambda: jnp.zeros(()))
  slow.sample()
  slow.spent_s = slow.last_s = 5.0  # as if one sample had taken 5 s
  assert not slow.wants_more(repeats=10, budget_s=6.0)
  assert slow.count == 1
  assert harness.Variant("new", lambda: None).wants_more(repeats=10, budget_s=0.0)


def test_compile_events_count_one_backend_compile_per_new_input_shape():
  events = harness.compile_events()
  x3, x4 = jnp.ones(3), jnp.ones(4)  # made first: building them compiles too
  fn = jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)  # a program no other test compiles
  mark = events.mark()
  for x in (x3, x3, x4):
    fn(x).block_until_ready()
  assert events.since(mark)["compiles"] == 2


def test_a_benchmark_rewrites_only_its_own_section_of_the_results_file():
  first = report.section("benchmarks.a", "A", None, ["a1"])
  second = report.section("benchmarks.b", "B", None, ["b1"])
  text = report.merge_section(None, first, "benchmarks.a")
  text = report.merge_section(text, second, "benchmarks.b", first=False)
  text += "\nHand-written reading of B.\n"
  updated = report.merge_section(
    text, report.section("benchmarks.a", "A", None, ["a2"]), "benchmarks.a"
  )
  assert "a2" in updated and "a1" not in updated
  assert "b1" in updated and "Hand-written reading of B." in updated
  assert updated.startswith("# Benchmarks\n")
  assert updated.index("## A") < updated.index("## B")


def test_a_ratio_cell_marks_failures_in_bold_and_information_rows_plainly():
  assert report.cell(2.5, 2.0) == "2.500 **FAIL**"
  assert report.cell(1.5, 2.0) == "1.500 PASS"
  assert report.cell(12.34, None) == "12.3"
  assert report.fmt_ms(0.01234) == "12.3" and report.fmt_ms(1.5) == "1,500"


def test_the_accelerator_benchmark_imports_neither_tensorflow_datasets_nor_tensorboardx():
  code = (
    "import sys\n"
    "sys.modules['tensorflow_datasets'] = None\n"  # any import of them raises ImportError
    "sys.modules['tensorboardX'] = None\n"
    "import benchmarks.gpu\n"
  )
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


@pytest.mark.slow
def test_the_accelerator_benchmark_runs_every_part_in_its_tiny_cpu_mode(tmp_path):
  from benchmarks import gpu

  out = tmp_path / "GPU_RESULTS.md"
  code = gpu.main(["--tiny", "--dtypes", "bfloat16", "--max-minutes", "30", "--out", str(out)])
  text = out.read_text()
  assert code == 0, text
  assert "Accelerator benchmark (tiny CPU mode)" in text
  agreement = text.split("### (a)")[1].split("### (b)")[0]
  assert "| simple_cnn |" in agreement and "PASS" in agreement
  costs = text.split("### (b)")[1].split("### (c)")[0]
  for row in ("| sgd |", "| sam |", "| xsam_refresh |", "| xsam_norefresh |", "| hvp |"):
    assert row in costs
  assert "| HVP / gradient |" in costs
  throughput = text.split("### (c)")[1].split("### (d)")[0]
  for optimizer in ("sgd", "sam", "xsam"):
    assert f"| simple_cnn | bfloat16 | {optimizer} |" in throughput
  torch_part = text.split("### (d)")[1]
  assert "Skipped: PyTorch is not importable" in torch_part or "| simple_cnn |" in torch_part
  assert "Skipped for the time limit" not in text


@pytest.mark.slow
def test_the_step_cost_benchmark_writes_its_section_and_keeps_the_others(tmp_path):
  from benchmarks import step_cost

  out = tmp_path / "RESULTS.md"
  out.write_text("# Benchmarks\n\n## Another benchmark\n\nkept\n")
  argv = ["--models", "mlp", "--batch", "2", "--repeats", "1", "--budget", "0.1"]
  argv += ["--refresh-every", "2", "--power-iters", "1", "--count-steps", "3", "--out", str(out)]
  assert step_cost.main(argv) == 0
  text = out.read_text()
  assert "## Step cost: SGD, SAM, optax.contrib.sam, X-SAM" in text
  assert "| SAM step / SGD step | ≤ 2.05 |" in text
  assert "#### mlp: 26,122 parameters" in text
  assert "the cond path traced 1×" in text and "the static path traced 2×" in text
  assert text.index("## Step cost") < text.index("## Another benchmark")
  assert "kept" in text


def test_the_tracker_benchmark_without_timing_reports_hvp_counts_and_no_times():
  from benchmarks import tracker

  result = {
    "model": "simple_cnn",
    "batch": 16,
    "lambda_max": 72.5,
    "residual": 1.5e-5,
    "warm_start_cos": 0.115,
    "cold_power": 16,
    "cold_lanczos": 8,
    "warm_power": 3,
    "warm_lanczos": None,
    "cos_after_5": {"warm_power": 1.0, "warm_lanczos": 0.98},
    "max_iters": 40,
  }
  meta = {
    "date": "Sat Dec 05 07:53:57 UTC 2026",
    "command": "python -m benchmarks.tracker --no-timing",
    "machine": dict.fromkeys(
      ("cpu", "cores", "backend", "devices", "jax", "jaxlib", "optax", "flax", "python"), "x"
    ),
    "load_start": "1.0 1.0 1.0",
    "load_end": "1.0 1.0 1.0",
    "elapsed_s": 60.0,
  }
  text = tracker.to_markdown([result], meta, 60, timing=False)
  (row,) = [line for line in text.splitlines() if line.startswith("| simple_cnn")]
  cells = "72.5 | 1.5e-05 | 16 | 8 | 0.115 | 3 | >40 | 1.000 / 0.980"
  assert row == f"| simple_cnn (batch 16) | {cells} |"
  header = next(line for line in text.splitlines() if line.startswith("| model"))
  assert header.count("|") == row.count("|") and "HVP / grad" not in header
  assert "Amortised" not in text and "Times not measured (`--no-timing`)" in text
  begin, end = report.markers("benchmarks.tracker")
  assert text.startswith(begin) and end in text


@pytest.mark.parametrize(
  ("variant", "grads", "hvps"),
  [
    # SAM every 5 steps: the ascent on steps 0 and 5 only, 1 + 1/5 gradients per step.
    ("every5", [2, 1, 1, 1, 1, 2, 1, 1, 1, 1], [0] * 10),
    # The same policy decided on the host (static path): the same evaluations.
    ("every5_static", [2, 1, 1, 1, 1, 2, 1, 1, 1, 1], [0] * 10),
    ("looksam5_static", [2, 1, 1, 1, 1, 2, 1, 1, 1, 1], [0] * 10),
    # X-SAM, p = q = 5: two gradients every step, a refresh of 5 HVPs on steps 0 and 5.
    ("xsam", [2] * 10, [5, 0, 0, 0, 0, 5, 0, 0, 0, 0]),
  ],
)
def test_the_variant_cost_benchmark_counts_the_evaluations_that_really_run(variant, grads, hvps):
  from benchmarks import _problems, variant_cost

  problem = _problems.make_problem("mlp", batch=2)
  method = variant_cost.VARIANTS[variant]
  state = _problems.create_state(problem, variant_cost.make_tx(method))
  counted = variant_cost.count_window(method, problem, state, steps=10)
  assert [g for _, g, _ in counted["per_step"]] == grads
  assert [h for _, _, h in counted["per_step"]] == hvps
  assert [c for c, _, _ in counted["per_step"]] == [1] * 10  # one clean gradient per step
  assert counted["grads_per_step"] == sum(grads) / 10 and counted["hvps_per_step"] == sum(hvps) / 10
  if variant != "xsam":
    assert counted["ascent_steps"] == 2  # the state's own count agrees


def test_registering_a_variant_twice_or_with_an_unknown_extra_argument_raises():
  from benchmarks import variant_cost

  with pytest.raises(ValueError, match="'sam' is already registered"):
    variant_cost.register("sam", "again", None)
  with pytest.raises(ValueError, match="`extra` may hold"):
    variant_cost.register("new_variant", "new", None, extra=("hvp_fn",))
  assert "new_variant" not in variant_cost.VARIANTS
