"""Convolution implementations for the UNet (a small registry), and the other
hot ops of its train step written for XLA:CPU.

`get_conv(impl)` returns a Linen module class with the fields and parameter
names of `flax.linen.Conv` (features, kernel_size, padding, use_bias;
'kernel' (kh, kw, Cin, Cout), 'bias' (Cout,)), so checkpoints do not depend
on the implementation:

  "xla"     XLA's convolution and its autodiff gradients (flax.linen.Conv's
            computation), except that an input of at most SMALL_CIN channels
            (the UNet's first layer: image + mask) is convolved forward as
            kh*kw*Cin broadcast multiply-adds, one fused elementwise loop;
            its gradients are still XLA's convolution VJP.

The registry is where a device-specific convolution would go. An im2col
variant (dW as one dot_general of the patches) was measured slower on XLA:CPU
than XLA's own weight gradient and removed (BUILD_NOTES.md). The
small-Cin forward is 2.3x faster than XLA:CPU's convolution at 8 x 256^2 x 2 -> 16
(11.5 vs 26.2 ms) and slower from 16 channels on (BUILD_NOTES.md).

Two more hot ops of the UNet train step, written for XLA:CPU:
  max_pool_2x2    nn.max_pool(x, (2, 2), strides=(2, 2)) with an elementwise
                  mask gradient instead of XLA's argmax reduce-window + scatter.
  BatchNormReLU   relu(nn.BatchNorm(x)) with the same variables and a fused,
                  hand-written gradient.
Each saves a few percent of the step; BUILD_NOTES.md (performance) has the numbers.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _same_pads(kernel_hw: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """SAME padding (stride 1) per spatial axis: (k - 1) // 2 before, the rest after."""
  return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_hw)


def _pads(padding, kernel_hw) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    if padding.upper() == "SAME":
      return _same_pads(kernel_hw)
    if padding.upper() == "VALID":
      return ((0, 0), (0, 0))
    raise ValueError(f"conv padding {padding!r} unsupported; use 'SAME', 'VALID' "
                     "or ((lo, hi), (lo, hi))")
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
    raise ValueError(f"conv padding {padding!r} must be two non-negative (lo, hi) pairs")
  return pads


def _conv(x, kernel, pads):
  return lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=_DN)


# Up to this many input channels the "xla" conv's forward is the direct sum
# below: measured faster than XLA:CPU's convolution at 1, 2 and 4 channels,
# 3.6x slower at 16 (BUILD_NOTES.md).
SMALL_CIN = 4


def _direct_conv(x, kernel, pads):
  """sum_{i,j,c} xpad[:, i:i+Ho, j:j+Wo, c:c+1] * kernel[i, j, c]: one
  elementwise fusion of kh*kw*Cin multiply-adds, no patch matrix."""
  kh, kw, cin, _ = kernel.shape
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      for c in range(cin):
        term = xp[:, i:i + ho, j:j + wo, c:c + 1] * kernel[i, j, c]
        y = term if y is None else y + term
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_small_cin(x, kernel, pads):
  """Stride-1 2-D convolution for few input channels: the direct forward sum,
  XLA's convolution gradients (its autodiff of the direct sum is 2.7x slower).

  Args:
    x: (B, H, W, Cin) float32, Cin small (SMALL_CIN).
    kernel: (kh, kw, Cin, Cout) float32.
    pads: ((top, bottom), (left, right)) static zero padding.

  Returns:
    (B, H + top + bottom - kh + 1, W + left + right - kw + 1, Cout), equal to
    lax.conv_general_dilated(x, kernel, (1, 1), pads) (NHWC, HWIO) up to
    float32 summation order.
  """
  return _direct_conv(x, kernel, pads)


def _small_fwd(x, kernel, pads):
  return _direct_conv(x, kernel, pads), (x, kernel)


def _small_bwd(pads, res, dy):
  x, kernel = res
  _, vjp = jax.vjp(lambda x, k: _conv(x, k, pads), x, kernel)
  return vjp(dy)  # dx is dead code (XLA drops it) where x is the data


conv2d_small_cin.defvjp(_small_fwd, _small_bwd)


def conv2d_xla(x, kernel, pads):
  """XLA's stride-1 convolution; conv2d_small_cin for Cin <= SMALL_CIN."""
  if x.shape[-1] <= SMALL_CIN:
    return conv2d_small_cin(x, kernel, pads)
  return _conv(x, kernel, pads)


class _StrideOneConv(nn.Module):
  """A stride-1 2-D conv with flax.linen.Conv's fields and variables ('kernel'
  (kh, kw, Cin, features), 'bias' (features,)). (B, H, W, Cin) -> (B, H', W',
  features). Subclasses set `conv_fn(x, kernel, pads)`.

  Attributes (as flax.linen.Conv): features, kernel_size, padding ('SAME',
  'VALID' or ((lo, hi), (lo, hi))), use_bias, kernel_init, bias_init.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  padding: Any = "SAME"
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    name = type(self).__name__
    if x.ndim != 4:
      raise ValueError(f"{name} input must be (B, H, W, C), got shape {x.shape}")
    kernel_hw = tuple(self.kernel_size)
    if len(kernel_hw) != 2:
      raise ValueError(f"{name} kernel_size must have 2 entries, got {self.kernel_size}")
    kernel = self.param("kernel", self.kernel_init,
                        kernel_hw + (x.shape[-1], self.features))
    y = type(self).conv_fn(x, kernel, _pads(self.padding, kernel_hw))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))
    return y


class Conv(_StrideOneConv):
  """The "xla" conv: drop-in for nn.Conv (stride 1, no dilation, no groups)
  computing conv2d_xla."""

  conv_fn = staticmethod(conv2d_xla)


@jax.custom_vjp
def max_pool_2x2(x):
  """2x2 stride-2 max-pool, as nn.max_pool(x, (2, 2), strides=(2, 2)).

  x: (B, H, W, C) -> (B, H // 2, W // 2, C) (VALID: an odd last row/column
  is dropped). The gradient goes to the first maximum of each window in
  row-major order, like XLA's select-and-scatter, but is computed with
  elementwise masks that XLA fuses into one loop.
  """
  return _pool_fwd(x)[0]


def _pool_fwd(x):
  b, h, w, c = x.shape
  xw = x[:, :h - h % 2, :w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c)
  y = xw.max(axis=(2, 4))
  return y, (x, y)


def _pool_bwd(res, dy):
  x, y = res
  b, h, w, c = x.shape
  xw = x[:, :h - h % 2, :w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c)
  hit = xw == y[:, :, None, :, None, :]
  # First maximum in row-major window order: (0,0), (0,1), (1,0), (1,1).
  h00, h01, h10, h11 = hit[:, :, 0, :, 0], hit[:, :, 0, :, 1], hit[:, :, 1, :, 0], hit[:, :, 1, :, 1]
  m01 = h01 & ~h00
  m10 = h10 & ~(h00 | h01)
  m11 = h11 & ~(h00 | h01 | h10)
  zero = jnp.zeros_like(dy)
  top = jnp.stack([jnp.where(h00, dy, zero), jnp.where(m01, dy, zero)], axis=3)
  bot = jnp.stack([jnp.where(m10, dy, zero), jnp.where(m11, dy, zero)], axis=3)
  dx = jnp.stack([top, bot], axis=2).reshape(b, h - h % 2, w - w % 2, c)
  if h % 2 or w % 2:
    dx = jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  return (dx,)


max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_relu_train(x, scale, bias, epsilon):
  """relu(BatchNorm(x)) with batch statistics, and a hand-written gradient.

  Args:
    x: (..., C) float32; statistics over all axes but the last.
    scale, bias: (C,) float32.
    epsilon: static float.

  Returns:
    (y, mean, var): y = max((x - mean) / sqrt(var + eps) * scale + bias, 0)
    of x's shape; mean, var (C,) the biased batch statistics (var = E[x^2] -
    E[x]^2, clipped at 0, as flax's use_fast_variance). Gradients flow through
    y only (mean and var feed the running averages).
  """
  return _bnr_fwd(x, scale, bias, epsilon)[0]


def _bnr_fwd(x, scale, bias, epsilon):
  xf = x.reshape(-1, x.shape[-1])
  mean = jnp.mean(xf, axis=0)
  var = jnp.maximum(jnp.mean(xf * xf, axis=0) - mean * mean, 0.0)
  inv = lax.rsqrt(var + epsilon)
  a = scale * inv
  y = jnp.maximum(x * a + (bias - mean * a), 0.0)
  return (y, mean, var), (x, y, mean, inv, scale)


def _bnr_bwd(epsilon, res, cts):
  del epsilon
  x, y, mean, inv, scale = res
  dy = cts[0]
  n = x.size // x.shape[-1]
  g = jnp.where(y > 0, dy, 0.0)  # relu'(0) = 0, as jax.nn.relu
  xhat = (x - mean) * inv
  axes = tuple(range(x.ndim - 1))
  dbias = jnp.sum(g, axis=axes)
  dscale = jnp.sum(g * xhat, axis=axes)
  dx = (scale * inv) * (g - dbias / n - xhat * (dscale / n))
  return dx, dscale, dbias


batch_norm_relu_train.defvjp(_bnr_fwd, _bnr_bwd)


class BatchNormReLU(nn.Module):
  """relu(nn.BatchNorm(x)) in one module with a fused gradient.

  Same variables as flax.linen.BatchNorm (params 'scale', 'bias';
  batch_stats 'mean', 'var'), same running-average update
  (momentum * old + (1 - momentum) * batch) and the same statistics.
  (..., C) -> (..., C).
  """

  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (c,))
    bias = self.param("bias", nn.initializers.zeros_init(), (c,))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      a = scale * lax.rsqrt(ra_var.value + self.epsilon)
      return jnp.maximum(x * a + (bias - ra_mean.value * a), 0.0)
    y, mean, var = batch_norm_relu_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


_IMPLS = {"xla": Conv}


def get_conv(impl: str = "xla"):
  """The conv module class registered under `impl` (see the module docstring)."""
  try:
    return _IMPLS[impl]
  except KeyError:
    raise ValueError(f"conv impl {impl!r} unknown; choose one of {sorted(_IMPLS)}") from None
