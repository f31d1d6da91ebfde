"""From samples to one padded Dataset: `stack_samples` (loose 2-D samples) and
`volumes_to_dataset` (slices of Volumes), with the compact (uint8/uint16 on the
device) form of integer images, and training tiles (`tile_bounds`): a set of
mixed sizes cut into tiles of at most tile² so that padding to one shape
does not multiply its memory (DSB2018: 400 images padded to 1024×1272 are 521
Mpx for 60 Mpx of image; as 256-px tiles, 84 Mpx)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from upgrade_jax.data.io import _split_channels, check_labels
from upgrade_jax.data.labels import relabel_sequential
from upgrade_jax.data.intensity import (NORMALISATIONS, PERCENTILES, check_percentiles, normalise,
                                        percentile_affine, to_channels)
from upgrade_jax.data.types import Dataset, Volume, label_dtype

__all__ = ["stack_samples", "volumes_to_dataset", "tile_bounds"]


def stack_samples(samples: Sequence, *, normalisation: str = "percentile",
                  channels: str = "grey", scales: Sequence[float] | None = None,
                  compact: bool | str = False, percentiles=PERCENTILES,
                  tile: int | None = None) -> Dataset:
  """Pads 2-D samples of different sizes into one Dataset.

  Args:
    samples: (image, target, others, name) tuples; image (H, W) or (H, W, C)
      of any numeric dtype, target and others (H, W) integer (others may be
      None). Sizes may differ between samples.
    normalisation: per-image method, see `normalise`; "volume" divides each
      image by its entry of `scales` (without scales: as "max").
    channels: "grey" or "rgb", see `to_channels`.
    scales: per-sample divisors for normalisation="volume" (volumes_to_dataset
      passes each slice its volume's max).
    compact: True keeps integer images in their source dtype with
      Dataset.image_scale (the divisor of each sample) and, for
      "percentile", Dataset.image_offset: normalised on the device by the
      train step, bit for bit as here; 1-2 bytes a pixel instead of 4. Needs
      integer, single-channel images (or RGB under the "rgb" policy with
      "max"/"volume"/"none": a percentile affine is per channel). "auto":
      compact when every sample allows it and is 8 or 16 bits, else float32.
      False: float32.
    percentiles: (low, high) of "percentile" normalisation.
    tile: None keeps every sample whole. An int cuts each sample, after its
      normalisation (so percentiles stay the whole image's), into
      `tile_bounds` tiles of at most tile × tile px, each a sample of its own
      with its labels relabelled 1..n, named "<name>@<y0>,<x0>" when a sample
      makes more than one. For training sets only: an object cut by a tile
      edge becomes two, so sets scored per image (test sets) stay whole.

  Returns:
    Dataset with images (N, Hmax, Wmax, C) float32 (or the source integer
    dtype when compact), targets/others relabelled 1..n per sample (int32;
    compact: int8/int16/int32, the smallest that holds the ids), zero
    padding at the bottom/right, and extents (N, 2).
  """
  if not samples:
    raise ValueError("stack_samples: no samples")
  if scales is not None and len(scales) != len(samples):
    raise ValueError(f"stack_samples: {len(scales)} scales for {len(samples)} samples")
  if normalisation not in NORMALISATIONS:
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
  percentiles = check_percentiles(percentiles)
  checked = []
  for image, target, others, name in samples:
    target = check_labels(target, name)
    if target.ndim != 2:
      raise ValueError(f"{name}: target must be (H, W), got shape {target.shape}")
    others = np.zeros_like(target) if others is None else check_labels(others, name)
    if others.shape != target.shape:
      raise ValueError(f"{name}: others shape {others.shape} != target shape {target.shape}")
    checked.append((_split_channels(np.asarray(image), target.shape, name), target, others,
                    name))
  if compact == "auto":
    compact = all(_compact_ok(raw, channels, normalisation) for raw, *_ in checked)
  prepared, divisors, offsets = [], [], []
  for i, (raw, target, others, name) in enumerate(checked):
    img = _compact_channels(raw, channels, name) if compact else to_channels(raw, channels)
    offset = 0.0
    if normalisation == "percentile":
      if compact and img.shape[-1] != 1:
        raise ValueError(f"{name}: compact percentile normalisation needs one channel, got "
                         f"{img.shape[-1]}; use compact=False")
      if compact:   # the device applies the affine (engine.step.take_samples)
        off, div = percentile_affine(img, percentiles)
        offset, top = float(off[0]), float(div[0])
      else:
        img, top = normalise(img, "percentile", percentiles=percentiles), 1.0
    elif normalisation == "volume" and scales is not None:
      top = float(scales[i])
    elif normalisation in ("max", "volume"):
      top = float(img.max(initial=0))
    else:
      top = 1.0
    top = top if top > 0 else 1.0   # an all-zero image stays zero
    if not compact and normalisation not in ("none", "percentile"):
      img = np.asarray(img, np.float32) / top
    target, others = relabel_sequential(target), relabel_sequential(others)
    if tile is None:
      pieces = [(img, target, others, str(name))]
    else:   # tiles of the normalised image; each tile's ids 1..n again
      rows, cols = tile_bounds(target.shape[0], tile), tile_bounds(target.shape[1], tile)
      cut = lambda a, y0, y1, x0, x1: a[y0:y1, x0:x1]  # noqa: E731
      pieces = [(cut(img, *r, *c), relabel_sequential(cut(target, *r, *c)),
                 relabel_sequential(cut(others, *r, *c)),
                 str(name) if len(rows) * len(cols) == 1 else f"{name}@{r[0]},{c[0]}")
                for r in rows for c in cols]
    prepared.extend(pieces)
    divisors.extend([top] * len(pieces))
    offsets.extend([offset] * len(pieces))
  h = max(p[1].shape[0] for p in prepared)
  w = max(p[1].shape[1] for p in prepared)
  n, c = len(prepared), prepared[0][0].shape[-1]
  dtype = np.result_type(*(p[0].dtype for p in prepared)) if compact else np.float32
  # A compact set also keeps its labels small: the ids are 1..n per sample,
  # so int8 or int16 hold them where a sample has < 128 or < 32768 cells
  # (2000 LQ slices of 1024² then need 4 GiB of host labels, not 16). The
  # engine narrows them the same way for the device.
  label_type = (label_dtype(*(a for p in prepared for a in p[1:3])) if compact
                else np.int32)
  images = np.zeros((n, h, w, c), dtype)
  targets = np.zeros((n, h, w), label_type)
  others = np.zeros((n, h, w), label_type)
  extents = np.zeros((n, 2), np.int32)
  for i, (img, tgt, oth, _) in enumerate(prepared):
    hi, wi = tgt.shape
    images[i, :hi, :wi] = img
    targets[i, :hi, :wi] = tgt
    others[i, :hi, :wi] = oth
    extents[i] = (hi, wi)
  scale = np.asarray(divisors, np.float32) if compact else None
  offset = np.asarray(offsets, np.float32) if compact and normalisation == "percentile" else None
  return Dataset(images, targets, others, extents, tuple(p[3] for p in prepared), scale,
                 offset)


def tile_bounds(n: int, tile: int) -> list[tuple[int, int]]:
  """[(start, stop), ...] cutting an axis of n px into ceil(n / tile) pieces
  as even as possible (sizes differ by at most 1): 320 px with tile 256 give
  two of 160, not 256 + a sliver of 64 that a training crop would mostly
  pad."""
  if tile < 1:
    raise ValueError(f"tile must be >= 1, got {tile}")
  k = max(1, -(-n // tile))
  edges = [round(i * n / k) for i in range(k + 1)]
  return list(zip(edges[:-1], edges[1:]))


def _compact_ok(image: np.ndarray, channels: str, normalisation: str = "max") -> bool:
  """Whether `compact="auto"` keeps this (H, W, C) image as integers."""
  c = image.shape[-1] - (image.shape[-1] in (2, 4))
  if normalisation == "percentile" and not (c == 1 and channels == "grey"):
    return False   # one affine per sample: one channel
  return (np.issubdtype(image.dtype, np.integer) and image.dtype.itemsize <= 2
          and (c == 1 or (channels == "rgb" and c == 3)))


def _compact_channels(image: np.ndarray, channels: str, name) -> np.ndarray:
  """(H, W, C) integer image after the channel policy, still integer: only
  policies that do not mix channels (grey of 1 channel, rgb of 1 or 3)."""
  if not np.issubdtype(image.dtype, np.integer):
    raise ValueError(f"{name}: compact images must be integers, got {image.dtype}; "
                     "use the float form")
  c = image.shape[-1]
  if c in (2, 4):
    image, c = image[..., :c - 1], c - 1
  if channels == "grey" and c == 1:
    return image
  if channels == "rgb":
    return np.repeat(image, 3, axis=-1) if c == 1 else image
  raise ValueError(f"{name}: a {c}-channel image under the '{channels}' policy is a "
                   "weighted sum, not integers; use the float form")


def volumes_to_dataset(volumes: Sequence[Volume], picks=None, **kwargs) -> Dataset:
  """The slices `picks` [(volume_idx, slice_idx), ...] (default: all) as a Dataset.

  Sample names are "<volume name>_z<slice>" for multi-slice volumes and the
  volume name for single-slice ones. kwargs go to `stack_samples`.
  normalisation="volume" divides every slice by the maximum of its whole
  volume (after the channel policy), so a slice near the volume's edge, with
  few cells, keeps the background level of the rest of its volume; per-image
  "max" would stretch it (a dim edge slice's background rises from ~0.2 to
  ~0.35 of full scale in the synthetic volumes: BUILD_NOTES.md).
  """
  if picks is None:
    picks = [(v, z) for v, vol in enumerate(volumes) for z in range(vol.num_slices)]
  if kwargs.get("normalisation") == "volume":
    channels = kwargs.get("channels", "grey")
    tops = {v: _volume_max(volumes[v], channels) for v in {v for v, _ in picks}}
    kwargs = {**kwargs, "scales": [tops[v] for v, _ in picks]}
  samples = []
  for v, z in picks:
    vol = volumes[v]
    name = vol.name if vol.num_slices == 1 else f"{vol.name}_z{z:03d}"
    samples.append((vol.image[z], vol.target[z], vol.others[z], name))
  return stack_samples(samples, **kwargs)


def _volume_max(vol: Volume, channels: str) -> float:
  """The maximum of a volume's image after the channel policy (float)."""
  return max(float(to_channels(_split_channels(np.asarray(vol.image[z]), vol.target[z].shape,
                                               vol.name), channels).max(initial=0.0))
             for z in range(vol.num_slices))

