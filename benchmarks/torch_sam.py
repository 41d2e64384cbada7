"""PyTorch SAM and Eigen-SAM steps on the model shapes of ``benchmarks.gpu``, for a side-by-side
row. Importing this module needs PyTorch; :mod:`benchmarks.gpu` skips it where it is absent.

Our own straightforward PyTorch code in the style of the papers' releases (not their code):
ResNet-18 (CIFAR stem), WRN-28-10 and the SimpleCNN, NCHW, BatchNorm in train mode for the
gradients and in eval mode for the eigenvector refresh. One step, on the same random batch:

* SGD: forward, backward, ``optimizer.step()``;
* SAM: the clean gradient g, ascend by ε = ρ g/‖g‖, the adversarial gradient, descend, step;
* Eigen-SAM: as SAM with ε = ρ(ĝ + α·sign⟨g,v⟩·(v − ⟨ĝ,v⟩ĝ)); its refresh step first runs q
  warm-started power iterations, each an HVP by double backward
  (``torch.autograd.grad(g·v, params)`` with ``create_graph=True``).

bfloat16 runs under ``torch.autocast`` (float32 parameters), as the JAX models' compute dtype.
Times are medians of blocked (``torch.cuda.synchronize``) steps after warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

RHO, ALPHA, LR, MOMENTUM = 0.05, 0.2, 0.1, 0.9


class BasicBlock(nn.Module):
  """ResNet basic block (kuangliu pytorch-cifar)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
  """ResNet-18 with the CIFAR stem (3x3 convolution, no max-pool)."""

  def __init__(self, num_classes: int = 10):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
      layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
      cin = cout
    self.layers = nn.Sequential(*layers)
    self.head = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.layers(self.stem(x))
    return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WideBlock(nn.Module):
  """Pre-activation wide block (WideResNet-pytorch)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.shortcut = (
      None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
    )

  def forward(self, x):
    pre = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
    return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
  """WRN-depth-k for 32x32 inputs."""

  def __init__(self, depth: int = 28, k: int = 10, num_classes: int = 10):
    super().__init__()
    n = (depth - 4) // 6
    blocks, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)], 16
    for i, width in enumerate((16 * k, 32 * k, 64 * k)):
      for j in range(n):
        blocks.append(WideBlock(cin, width, 2 if i > 0 and j == 0 else 1))
        cin = width
    self.body = nn.Sequential(*blocks)
    self.bn = nn.BatchNorm2d(cin)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.relu(self.bn(self.body(x)))
    return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SimpleCNN(nn.Module):
  """Four 3x3 convolutions (32, 32, 64, 64), max-pools after the second and fourth, two Dense."""

  def __init__(self, image_size: int, num_classes: int = 10):
    super().__init__()
    self.convs = nn.ModuleList(
      nn.Conv2d(cin, cout, 3, 1, 1) for cin, cout in ((3, 32), (32, 32), (32, 64), (64, 64))
    )
    self.fc1 = nn.Linear(64 * (image_size // 4) ** 2, 128)
    self.head = nn.Linear(128, num_classes)

  def forward(self, x):
    for i, conv in enumerate(self.convs):
      x = F.relu(conv(x))
      if i % 2 == 1:
        x = F.max_pool2d(x, 2)
    return self.head(F.relu(self.fc1(torch.flatten(x, 1))))


def simple_cnn_tensors(tree, image_size: int) -> list[torch.Tensor]:
  """A Flax ``SimpleCNN`` pytree (its params, or a vector shaped like them) as the
  :class:`SimpleCNN` twin's parameter list, in ``model.parameters()`` order.

  Convolution kernels go from HWIO to OIHW, Dense kernels are transposed, and ``fc1``'s rows
  are reordered from Flax's (h, w, c) flattening of NHWC to PyTorch's (c, h, w) of NCHW. This
  is what lets the tests check that the PyTorch row times the same computation as the JAX
  rows: same weights in, same logits and same SAM / Eigen-SAM steps out.
  """
  tensor = lambda a: torch.as_tensor(np.array(a, order="C"))  # a contiguous, writable copy
  tensors = []
  for i in range(1, 5):
    layer = tree[f"conv{i}"]
    tensors += [tensor(np.asarray(layer["kernel"]).transpose(3, 2, 0, 1)), tensor(layer["bias"])]
  side = image_size // 4
  fc1 = np.asarray(tree["fc1"]["kernel"])  # (side * side * c, hidden)
  hidden = fc1.shape[1]
  fc1 = fc1.reshape(side, side, -1, hidden).transpose(3, 2, 0, 1).reshape(hidden, -1)
  tensors += [tensor(fc1), tensor(tree["fc1"]["bias"])]
  tensors += [tensor(np.asarray(tree["head"]["kernel"]).T), tensor(tree["head"]["bias"])]
  return tensors


def make_model(name: str, image_size: int) -> nn.Module:
  """The PyTorch twin of ``experiments.models`` model ``name``."""
  if name == "resnet18":
    return ResNet18()
  if name == "wrn28_10":
    return WideResNet()
  if name == "simple_cnn":
    return SimpleCNN(image_size)
  raise ValueError(f"no PyTorch twin of {name!r}")


# --------------------------------------------------------------------------------------------
# Steps.


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
  return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def _norm(a: Sequence[torch.Tensor]) -> torch.Tensor:
  return torch.sqrt(_dot(a, a))


class Stepper:
  """SGD, SAM and Eigen-SAM steps of one model on one batch."""

  def __init__(self, model: nn.Module, images, labels, dtype: str):
    self.model, self.images, self.labels = model, images, labels
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM)
    self.autocast = dtype == "bfloat16"
    self.device_type = images.device.type
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = [torch.randn(p.shape, generator=gen).to(p.device) for p in self.params]
    self.v = [x / _norm(v) for x in v]

  def _loss(self):
    with torch.autocast(self.device_type, torch.bfloat16, enabled=self.autocast):
      return F.cross_entropy(self.model(self.images).float(), self.labels)

  def _grad(self, create_graph: bool = False):
    return torch.autograd.grad(self._loss(), self.params, create_graph=create_graph)

  def _descend(self, grads) -> None:
    for p, g in zip(self.params, grads, strict=True):
      p.grad = g.detach()
    self.opt.step()

  def sgd(self) -> None:
    self.model.train()
    self._descend(self._grad())

  def _perturbed_step(self, eps) -> None:
    with torch.no_grad():
      for p, e in zip(self.params, eps, strict=True):
        p.add_(e)
    adv = self._grad()
    with torch.no_grad():
      for p, e in zip(self.params, eps, strict=True):
        p.sub_(e)
    self._descend(adv)

  def sam(self) -> None:
    self.model.train()
    g = self._grad()
    scale = RHO / (_norm(g) + 1e-12)
    self._perturbed_step([scale * x for x in g])

  def refresh(self, q: int) -> None:
    """q warm-started power iterations in eval mode (HVPs by double backward)."""
    self.model.eval()
    g = self._grad(create_graph=True)
    v = self.v
    for _ in range(q):
      hv = torch.autograd.grad(_dot(g, v), self.params, retain_graph=True)
      norm = _norm(hv) + 1e-12
      v = [x.detach() / norm for x in hv]
    self.v = v

  def eigen_sam(self, q: int = 0) -> None:
    if q:
      self.refresh(q)
    self.model.train()
    g = self._grad()
    g_hat = [x / (_norm(g) + 1e-12) for x in g]
    cos = _dot(g_hat, self.v)
    sign = torch.sign(_dot(g, self.v))
    eps = [RHO * (gh + ALPHA * sign * (v - cos * gh)) for gh, v in zip(g_hat, self.v, strict=True)]
    self._perturbed_step(eps)


def _median_seconds(fn: Callable[[], None], sync: Callable[[], None], repeats: int) -> float:
  fn()
  sync()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark(
  name: str, dtype: str, batch: int, input_shape: Sequence[int], p: int, q: int, repeats: int = 10
) -> dict:
  """Median seconds of the SGD, SAM, Eigen-SAM (without / with refresh) steps of ``name``."""
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.backends.cudnn.benchmark = True  # autotuned convolutions, as XLA autotunes its own
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  torch.manual_seed(0)
  h, w, c = input_shape
  model = make_model(name, h).to(device)
  images = torch.randn(batch, c, h, w, device=device)
  labels = torch.randint(0, 10, (batch,), device=device)
  stepper = Stepper(model, images, labels, dtype)
  if device.type == "cpu":
    repeats = min(repeats, 2)
  return {
    "model": name,
    "dtype": dtype,
    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    "sgd_s": _median_seconds(stepper.sgd, sync, repeats),
    "sam_s": _median_seconds(stepper.sam, sync, repeats),
    "eigen_sam_s": _median_seconds(stepper.eigen_sam, sync, repeats),
    "eigen_sam_refresh_s": _median_seconds(lambda: stepper.eigen_sam(q), sync, repeats),
  }
