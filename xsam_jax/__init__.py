"""xsam_jax: sharpness-aware training with Hessian-eigenvector control, as optax transforms.

Every method is an ``optax.GradientTransformationExtraArgs`` that sits first in an
``optax.chain``: it receives the clean gradient as ``updates`` and a ``grad_fn`` (the gradient
of the same minibatch loss at other parameters) as an extra argument, and hands a sharpness-aware
gradient to the optimizer after it.

* :func:`sam` -- SAM, and ASAM with ``adaptive=True``.
* :func:`sometimes_sam` -- SAM on a subset of steps: every k-th, random (RST) or
  adaptive (AE-SAM); the clean gradient on the others.
* :func:`esam` -- ESAM's stochastic weight perturbation: SAM's ascent on a random subset of
  the tensors, scaled by 1/beta (its data selection is in :mod:`xsam_jax.training`).
* :func:`looksam` -- LookSAM: SAM every k steps, its orthogonal part reused in between.
* :func:`eigen_sam` -- Eigen-SAM: perturbation tilted towards the top Hessian eigenvector.
* :func:`xsam` -- X-SAM: perturbed gradient corrected along the top Hessian eigenvector.
* :func:`ascent_due` -- host-side twin of the every-k and random policies (the static path).
* :func:`accumulate` -- gradient accumulation over k micro-batches, built from one k.
* :func:`refresh_eigenvector` -- refresh the cached eigenvector outside the training step.
* :mod:`xsam_jax.hessian` -- HVPs, power iteration, Lanczos, trace and spectral density.
* :mod:`xsam_jax.training` -- Flax (NNX and Linen) glue; not imported here, it needs flax:
  ``pip install 'xsam_jax[flax]'``.
"""

from xsam_jax import hessian
from xsam_jax._accumulate import accumulate
from xsam_jax._eigen_sam import EigenSAMState, eigen_sam
from xsam_jax._eigvec import is_due, refresh_eigenvector
from xsam_jax._esam import ESAMState, esam
from xsam_jax._looksam import LookSAMState, looksam
from xsam_jax._policy import ascent_due
from xsam_jax._sam import SAMState, sam
from xsam_jax._sometimes import SometimesSAMState, sometimes_sam
from xsam_jax._xsam import XSAMState, xsam

__version__ = "0.1.0"

__all__ = [
  "ESAMState",
  "EigenSAMState",
  "LookSAMState",
  "SAMState",
  "SometimesSAMState",
  "XSAMState",
  "accumulate",
  "ascent_due",
  "eigen_sam",
  "esam",
  "hessian",
  "is_due",
  "looksam",
  "refresh_eigenvector",
  "sam",
  "sometimes_sam",
  "xsam",
]
