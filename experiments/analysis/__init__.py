"""The papers' analyses on top of the train CLI (``python -m experiments.analysis.<name>``).

* :mod:`experiments.analysis.angles` -- angle between the (clean and SAM-perturbed) minibatch
  gradient and the top Hessian eigenvector during training, full and per layer; histograms.
* :mod:`experiments.analysis.lambda_trace` -- λ_max over training for SGD, SAM, Eigen-SAM and
  X-SAM (independent Lanczos estimate on a fixed batch).
* :mod:`experiments.analysis.sweep` -- α, (p, q) and ρ sweeps over seeds; Markdown table and
  figure. Resumable: finished runs are skipped.
* :mod:`experiments.analysis.start` -- the first epochs: PyTorch-default init against LeCun
  normal, and ρ warm-up (issue 9).
* :mod:`experiments.analysis.study` -- the benchmark protocol: tuning on a validation split,
  5 seeds on the test set, paired 95% intervals, equal compute, λ_max. Resumable.
* :mod:`experiments.analysis.common` -- shared helpers (configs, resumable runs, metrics).
"""
