r"""Is a run sitting on its initial saddle? A rule on the epoch's training metrics, and its remedy.

A network near the constant predictor sits on a saddle of the cross-entropy: every input gets
the same (nearly uniform) output, so the epoch's mean training loss is about
:math:`\ln C` for :math:`C` classes and its training accuracy about :math:`1/C`. SAM-type
methods can stay there for a whole run (Kim, Park, Choi and Lee, "Stability analysis of
sharpness-aware minimization", 2023): on the digits config with :math:`\rho = 0.1` and no
warm-up, SAM's seed 1 ends 30 epochs with training loss 2.2996–2.3125 against
:math:`\ln 10 = 2.3026` and 10.0% test accuracy (experiments/RESULTS.md, "The initial saddle").

The rule (:func:`at_initial_saddle`), from epoch :data:`MIN_EPOCH` = 3 (1-based) on:

.. math::

  |\bar L_\text{train} - \ln C| \le 10^{-2} \ln C
  \quad\text{and}\quad \overline{\text{acc}}_\text{train} \le 1/C + 0.05.

The tolerance is measured: that stuck run's mean training loss drifted from
:math:`+9\cdot 10^{-4}` to :math:`-1.3\cdot 10^{-3}` relative to :math:`\ln 10` as the output
bias learned the noisy labels' class frequencies (a fixed :math:`10^{-3}` would have missed its
last 8 epochs), and a small training set's class imbalance moves the constant predictor's loss
further below :math:`\ln C`. The accuracy bound keeps a run that learns under heavy label noise
out: at 80% symmetric noise (:func:`experiments.data.add_symmetric_label_noise` draws a wrong
label from the other classes) a perfect clean classifier scores 0.20 on the noisy training labels
(10 classes), at a loss 1.9% below :math:`\ln 10`.
"""

from __future__ import annotations

import math

# The first epoch (1-based) the rule is applied at. Measured on the digits config at its default
# rho = 0.05 without warm-up: 3 of 5 SAM and 2 of 5 X-SAM seeds were still at ln C after epoch 2
# and had left it after epoch 3 (ending at 94-98%), so epoch 2 would warn on healthy runs.
MIN_EPOCH = 3
LOSS_RTOL = 1e-2  # |loss - ln C| <= LOSS_RTOL * ln C
ACCURACY_MARGIN = 0.05  # train accuracy <= 1/C + ACCURACY_MARGIN
# The optimizers with a `rho` (their ρ can be warmed up by `rho_warmup_epochs`).
_SAM_METHODS = ("sam", "asam", "eigen_sam", "xsam", "sam_every", "rst", "ae_sam", "looksam")
SAM_FAMILY = frozenset({*_SAM_METHODS, *(f"{m}_adamw" for m in _SAM_METHODS)})


def at_initial_saddle(
  epoch: int, train_loss: float, train_accuracy: float, num_classes: int
) -> bool:
  r"""Whether an epoch's training metrics say the net still sits on its initial saddle.

  True when ``epoch >= MIN_EPOCH``, :math:`|L - \ln C| \le` ``LOSS_RTOL`` :math:`\ln C` and
  the accuracy is at most :math:`1/C +` ``ACCURACY_MARGIN``. A non-finite loss is not a saddle
  (it is a divergence, reported as such by the loss itself).

  Args:
    epoch: the epoch just finished, 1-based.
    train_loss: the epoch's mean training loss (cross-entropy, nats).
    train_accuracy: the epoch's mean training accuracy, in [0, 1].
    num_classes: :math:`C`, at least 2.

  Returns:
    A Python bool.

  Raises:
    ValueError: if ``num_classes < 2``.

  Example:
    >>> at_initial_saddle(3, 2.3040, 0.11, 10), at_initial_saddle(2, 2.3040, 0.11, 10)
    (True, False)
  """
  if num_classes < 2:
    raise ValueError(f"`num_classes` must be >= 2, got {num_classes}")
  if epoch < MIN_EPOCH or not math.isfinite(train_loss):
    return False
  chance = math.log(num_classes)
  return (
    abs(train_loss - chance) <= LOSS_RTOL * chance
    and train_accuracy <= 1.0 / num_classes + ACCURACY_MARGIN
  )


def suggested_warmup_epochs(epochs: int) -> int:
  """The warm-up the remedy suggests: 10% of the run's epochs, at least 1 (3 of 30)."""
  return max(1, math.ceil(0.1 * epochs))


def remedy(optimizer: str, epochs: int, rho_warmup_epochs: float) -> str:
  """One sentence: what to change when :func:`at_initial_saddle` holds.

  Args:
    optimizer: the config's optimizer name.
    epochs: the run's epochs.
    rho_warmup_epochs: the run's current ρ warm-up.

  Returns:
    The advice, naming the ``--set`` override to use.

  Example:
    >>> remedy("sam", 30, 0.0)
    'ramp rho up from 0: --set rho_warmup_epochs=3 (or a smaller rho)'
  """
  if optimizer not in SAM_FAMILY:
    return (
      f"{optimizer} has no rho to warm up: check the learning rate and the initialisation "
      "(experiments/RESULTS.md, 'The start')"
    )
  if rho_warmup_epochs > 0:
    longer = max(2 * rho_warmup_epochs, suggested_warmup_epochs(epochs))
    return f"a longer warm-up (--set rho_warmup_epochs={longer:g}) or a smaller rho"
  return (
    f"ramp rho up from 0: --set rho_warmup_epochs={suggested_warmup_epochs(epochs)} "
    "(or a smaller rho)"
  )


def message(epoch: int, train_loss: float, num_classes: int, advice: str) -> str:
  """The warning printed when a run is found on its initial saddle."""
  return (
    f"epoch {epoch}: still on the initial saddle (training loss {train_loss:.4f}, "
    f"ln {num_classes} = {math.log(num_classes):.4f}; accuracy at chance). Remedy: {advice}"
  )
