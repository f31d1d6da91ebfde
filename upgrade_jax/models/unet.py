"""The UNet of the paper, used both as the upgrade network u_theta and as the
segmentation network f_delta.

Structure (Ronneberger et al. 2015, as in the authors' code):
  4 encoder blocks, a bottleneck block and 4 decoder blocks. Each block is
  2 x (3x3 conv, BatchNorm, ReLU). Down-sampling is a 2x2 max-pool, up-sampling
  a 2x2 stride-2 transposed conv; each decoder block sees the up-sampled
  features concatenated with the skip connection of the same level. The head
  is a 1x1 conv to `num_classes` logits (softmax is applied by the loss and by
  prediction, not here).

Widths: `widths[:4]` are the encoder blocks, `widths[4]` the bottleneck. The
authors use (64, 128, 256, 512, 512); the CPU-friendly default is
(16, 32, 64, 128, 128).

Any H and W work: `__call__` pads to a multiple of 16 (= 2**4 pooling levels)
and crops the logits back.

Example:
  model = UNet(widths=(4, 8, 8, 8, 8))
  variables = model.init(key, jnp.zeros((1, 32, 32, 2)), train=False)
  logits = model.apply(variables, x, train=False)          # (B, H, W, 2)
  logits, updates = model.apply(variables, x, train=True,
                                mutable=["batch_stats"])
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from upgrade_jax.models.conv import BatchNormReLU, get_conv, max_pool_2x2

POOL_LEVELS = 4
MULTIPLE = 2 ** POOL_LEVELS  # 16


def pad_to_multiple(x, m: int = MULTIPLE):
  """Zero-pads the two spatial axes of x up to multiples of m (at the end).

  Args:
    x: (B, H, W, C) or (B, H, W) array.
    m: the multiple.

  Returns:
    (padded, (H, W)): the padded array and the original spatial size, for
    `crop_to`.
  """
  h, w = x.shape[1], x.shape[2]
  ph, pw = (-h) % m, (-w) % m
  if ph or pw:
    pad = [(0, 0), (0, ph), (0, pw)] + [(0, 0)] * (x.ndim - 3)
    x = jnp.pad(x, pad)
  return x, (h, w)


def crop_to(x, hw):
  """Crops the spatial axes 1, 2 of x back to hw = (H, W)."""
  return x[:, :hw[0], :hw[1]]


class ConvBlock(nn.Module):
  """2 x (3x3 conv, BatchNorm, ReLU). (B, H, W, Cin) -> (B, H, W, features)."""

  features: int
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = get_conv(self.conv_impl)
    for i in range(2):
      # No conv bias: the BatchNorm right after it has its own shift.
      # Named explicitly so every conv_impl has the same variable tree.
      x = conv(features=self.features, kernel_size=(3, 3), padding="SAME",
               use_bias=False, name=f"Conv_{i}")(x)
      # relu(BatchNorm(x)) fused with a hand-written gradient (models/conv.py;
      # -4 to -10 % step time on CPU, BUILD_NOTES.md). Named like the
      # nn.BatchNorm it replaces, with the same variables, so checkpoints
      # match. momentum 0.9 is PyTorch's BatchNorm2d default (momentum=0.1).
      x = BatchNormReLU(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, name=f"BatchNorm_{i}")(x)
    return x


class UpConv2x2(nn.Module):
  """2x2 stride-2 transposed conv. (B, H, W, Cin) -> (B, 2H, 2W, features).

  With stride == kernel size the output blocks do not overlap, so the
  transposed conv is one matmul followed by a depth-to-space transpose; this is
  much cheaper on CPU than XLA's general transposed convolution. Parameters
  and outputs are identical to `nn.ConvTranspose(features, (2, 2),
  strides=(2, 2))` ('kernel' (2, 2, Cin, F), 'bias' (F,); flax applies the
  kernel spatially flipped, hence the [::-1, ::-1]). Kept as its own module so
  another implementation can replace it.
  """

  features: int

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (2, 2, cin, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    b, h, w, _ = x.shape
    f = self.features
    # One (B*H*W, Cin) x (Cin, 4F) matmul, then the depth-to-space transpose.
    # Not einsum("bhwc,ijcf->bhiwjf"): XLA:CPU lowers that to a dot with an
    # interleaved output layout, 3-5x slower than this matmul + copy at the
    # UNet's shapes (and 16 % of the whole eval forward at w32; BUILD_NOTES.md).
    k = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(cin, 4 * f)
    y = (x.reshape(-1, cin) @ k).reshape(b, h, w, 2, 2, f)
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, f) + bias


class UNet(nn.Module):
  """UNet: (B, H, W, C) float32 -> (B, H, W, num_classes) logits.

  Attributes:
    widths: 5 channel widths, 4 encoder blocks then the bottleneck.
    num_classes: output classes (2: background, foreground).
    conv_impl: name of the 3x3/1x1 conv implementation (models.conv.get_conv).
  """

  widths: tuple[int, ...] = (16, 32, 64, 128, 128)
  num_classes: int = 2
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x, *, train: bool, return_features: bool = False):
    """Logits (B, H, W, num_classes) f32; with return_features, also the
    last decoder block's features (B, H, W, widths[0]) f32 (after its ReLU,
    so >= 0), which Partial Labelling's pseudo-labels and separation term
    read. The flag only adds an output: the same parameters and the same
    logits either way."""
    if len(self.widths) != POOL_LEVELS + 1:
      raise ValueError(f"UNet widths must have {POOL_LEVELS + 1} entries "
                       f"(4 encoder blocks + bottleneck), got {self.widths}")
    if x.ndim != 4:
      raise ValueError(f"UNet input must be (B, H, W, C), got shape {x.shape}")
    x, hw = pad_to_multiple(x, MULTIPLE)
    skips = []
    for level in range(POOL_LEVELS):
      x = ConvBlock(self.widths[level], self.conv_impl,
                    name=f"down{level}")(x, train=train)
      skips.append(x)
      x = max_pool_2x2(x)  # mask gradient, no index arrays
    x = ConvBlock(self.widths[POOL_LEVELS], self.conv_impl,
                  name="bottleneck")(x, train=train)
    for level in reversed(range(POOL_LEVELS)):
      x = UpConv2x2(self.widths[level], name=f"upconv{level}")(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = ConvBlock(self.widths[level], self.conv_impl,
                    name=f"up{level}")(x, train=train)
    features = x
    conv = get_conv(self.conv_impl)
    x = conv(features=self.num_classes, kernel_size=(1, 1), padding="SAME",
             use_bias=True, name="head")(x)
    if return_features:
      return crop_to(x, hw), crop_to(features, hw)
    return crop_to(x, hw)
