"""The PyTorch reference UNet of the benchmarks (train_bench.py, predict_bench.py).

The same architecture as `upgrade_jax.models.unet.UNet`: per block
2 x (3x3 conv without bias, BatchNorm, ReLU), 2x2 max-pool, 2x2 stride-2
transposed conv, skip concat (skip first), 1x1 head to 2 classes. Widths
(w, 2w, 4w, 8w, 8w): four encoder blocks, then the bottleneck.

PyTorch is an optional benchmark dependency (`pip install '.[bench]'`):
import this module only after checking that torch imports.
"""

from __future__ import annotations

import torch
import torch.nn as tnn
import torch.nn.functional as F


def _block(cin, cout):
  return tnn.Sequential(
      tnn.Conv2d(cin, cout, 3, padding=1, bias=False), tnn.BatchNorm2d(cout), tnn.ReLU(inplace=True),
      tnn.Conv2d(cout, cout, 3, padding=1, bias=False), tnn.BatchNorm2d(cout), tnn.ReLU(inplace=True))


class UNet(tnn.Module):
  """(B, C, H, W) -> (B, 2, H, W) logits; H and W multiples of 16."""

  def __init__(self, widths, cin):
    super().__init__()
    self.down = tnn.ModuleList()
    c = cin
    for f in widths[:4]:
      self.down.append(_block(c, f))
      c = f
    self.bottleneck = _block(c, widths[4])
    c = widths[4]
    self.upconv, self.up = tnn.ModuleList(), tnn.ModuleList()
    for f in reversed(widths[:4]):
      self.upconv.append(tnn.ConvTranspose2d(c, f, 2, stride=2))
      self.up.append(_block(2 * f, f))
      c = f
    self.head = tnn.Conv2d(c, 2, 1)

  def forward(self, x):
    skips = []
    for b in self.down:
      x = b(x)
      skips.append(x)
      x = F.max_pool2d(x, 2)
    x = self.bottleneck(x)
    for upconv, b, s in zip(self.upconv, self.up, reversed(skips)):
      x = b(torch.cat([s, upconv(x)], 1))
    return self.head(x)


def widths_of(width: int) -> tuple[int, ...]:
  """The library's widths for base width w: (w, 2w, 4w, 8w, 8w)."""
  return tuple(width * m for m in (1, 2, 4, 8, 8))
