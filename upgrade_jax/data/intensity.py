"""What a pixel value means: the channel policy and per-image normalisation.

Channel policy: the images of one Dataset share C. `channels="grey"` (the
default) converts RGB(A) to grey with the ITU-R 601 luma weights, so DSB2018's
mix of grey fluorescence and RGB histology becomes C=1; `channels="rgb"`
repeats grey images to 3 channels and keeps RGB. Normalisation to float32 is
per image: "percentile" (the default, as StarDist and Cellpose: csbdeep's
`normalize`, which maps the 1st and 99.8th percentiles of each channel to 0
and 1 without clipping) or "max" (divide by the image's maximum, the paper's);
"none" keeps the raw values as float32.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NORMALISATIONS", "PERCENTILES", "check_percentiles", "percentile_affine",
           "normalise", "to_channels"]

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def to_channels(image: np.ndarray, channels: str) -> np.ndarray:
  """(..., C) float32 image → (..., 1) for "grey" or (..., 3) for "rgb".

  Alpha (C=4, or C=2 grey+alpha) is dropped first.
  """
  img = np.asarray(image, np.float32)
  c = img.shape[-1]
  if c in (2, 4):
    img, c = img[..., :c - 1], c - 1
  if channels == "grey":
    return img if c == 1 else (img @ _LUMA)[..., None]
  if channels == "rgb":
    return np.repeat(img, 3, axis=-1) if c == 1 else img
  raise ValueError(f"channels must be 'grey' or 'rgb', got {channels!r}")


# The normalisation methods `normalise` knows, and the default percentiles
# of "percentile" (StarDist's and Cellpose's: csbdeep.utils.normalize(x, 1, 99.8)).
NORMALISATIONS = ("max", "percentile", "volume", "none")
PERCENTILES = (1.0, 99.8)


def check_percentiles(percentiles) -> tuple[float, float]:
  """(low, high) as floats, with 0 <= low < high <= 100; else ValueError."""
  try:
    lo, hi = (float(p) for p in percentiles)
  except (TypeError, ValueError):
    raise ValueError(f"percentiles must be two numbers (low, high), got {percentiles!r}") \
        from None
  if not 0.0 <= lo < hi <= 100.0:
    raise ValueError(f"percentiles ({lo:g}, {hi:g}) must satisfy 0 <= low < high <= 100")
  return lo, hi


def percentile_affine(image: np.ndarray, percentiles=PERCENTILES) -> tuple[np.ndarray, np.ndarray]:
  """(offset, divisor), each (C,) float32: "percentile" normalisation of an
  (H, W, C) image is (image - offset) / divisor per channel, the channel's
  low and high percentiles mapped to 0 and 1 (csbdeep's normalize with
  axis=(0, 1): channels independently). A flat channel (high == low) gets
  divisor 1, so it becomes 0, not inf."""
  lo_p, hi_p = check_percentiles(percentiles)
  img = np.asarray(image)
  flat = img.reshape(-1, img.shape[-1]).astype(np.float64)
  lo, hi = np.percentile(flat, (lo_p, hi_p), axis=0)
  span = hi - lo
  return lo.astype(np.float32), np.where(span > 0, span, 1.0).astype(np.float32)


def normalise(image: np.ndarray, method: str = "percentile", *,
              percentiles=PERCENTILES) -> np.ndarray:
  """Per-image normalisation to float32.

  Args:
    image: (H, W, C) uint8, uint16, bool or float ((H, W) is one channel).
    method: "percentile" maps each channel's low and high `percentiles` to 0
      and 1 without clipping (csbdeep's `normalize`, as StarDist and
      Cellpose); "max" divides by the image's maximum (the paper's; an
      all-zero image stays zero); "none" only converts to float32 (data
      normalised already, or a global threshold on raw intensities);
      "volume" is "max" over a whole 3-D stack (`volumes_to_dataset`), and
      on one image the same as "max" (an image is a one-slice stack).
    percentiles: (low, high) of "percentile", in [0, 100].

  Returns:
    float32 array of the same shape.
  """
  img = np.asarray(image, np.float32)
  if method in ("max", "volume"):
    top = float(img.max(initial=0.0))
    return img / top if top > 0 else np.zeros_like(img)
  if method == "percentile":
    chans = img if img.ndim >= 3 else img[..., None]
    offset, divisor = percentile_affine(chans, percentiles)
    # float32 throughout: the device's normalisation of a compact set
    # (engine.step.take_samples) computes exactly this.
    return ((chans - offset) / divisor).astype(np.float32).reshape(img.shape)
  if method == "none":
    return img
  raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {method!r}")

