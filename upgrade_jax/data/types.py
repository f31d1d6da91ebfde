"""In-memory data types shared by every data source.

Every source (synthetic, epfl_mito, folder, stack) becomes either a list of
`Volume` (3-D, before sampling) or a `Dataset` (a padded stack of 2-D samples,
ready to be put on the devices).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Volume:
  """One 3-D acquisition.

  Attributes:
    image: (Z, H, W) or (Z, H, W, C) raw intensities (uint8, uint16 or float).
    target: (Z, H, W) int32 instance ids of the target cells, 0 = background.
    others: (Z, H, W) int32 instance ids of non-target objects; all zero if none.
    name: a short identifier used in file names and logs.
  """

  image: np.ndarray
  target: np.ndarray
  others: np.ndarray
  name: str = "volume"

  def __post_init__(self):
    z = self.image.shape[0]
    spatial = self.image.shape[1:3]
    for field in ("target", "others"):
      arr = getattr(self, field)
      if arr.shape != (z, *spatial):
        raise ValueError(
            f"Volume {self.name!r}: {field} has shape {arr.shape}, expected "
            f"{(z, *spatial)} to match image {self.image.shape}")

  @property
  def num_slices(self) -> int:
    return int(self.image.shape[0])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A stack of 2-D samples padded on the host to one shape.

  Attributes:
    images: (N, H, W, C) float32, normalised (roughly [0, 1]); or, compact,
      the source integers (e.g. uint8, uint16) with `image_scale` set.
    targets: (N, H, W) int32 instance ids (or a smaller integer type, for a
      set too large for int32 on the host), relabelled to 1..n per sample: the
      labels this set carries (ground truth, LQ masks or predictions; the
      name of the variable or field holding the Dataset says which).
    others: (N, H, W) int32 non-target instance ids (zeros when none).
    extents: (N, 2) int32 valid (height, width) of each sample; pixels at
      rows >= extents[i, 0] or columns >= extents[i, 1] are padding and never
      count in losses or metrics.
    names: N names, one per sample (file names for folder sources).
    image_scale: None for float images; for compact integer images, (N,)
      float32 divisors: the network sees (images[i] - image_offset[i]) /
      image_scale[i] inside the sample's extent, 0 outside (`normalised`),
      computed on the device by the train step. The same float32 arithmetic
      as stacking.stack_samples', so a compact set trains exactly as its float32
      form (tests/test_large_sets.py).
    image_offset: None (offset 0: "max", "volume", "none"), or (N,) float32
      offsets of a compact "percentile" set (each sample's low percentile).
  """

  images: np.ndarray
  targets: np.ndarray
  others: np.ndarray
  extents: np.ndarray
  names: tuple[str, ...]
  image_scale: np.ndarray | None = None
  image_offset: np.ndarray | None = None

  def __post_init__(self):
    n, h, w = self.targets.shape
    if self.images.ndim != 4 or self.images.shape[:3] != (n, h, w):
      raise ValueError(f"Dataset: images shape {self.images.shape} does not "
                       f"match targets {self.targets.shape} (want (N,H,W,C))")
    if self.others.shape != (n, h, w):
      raise ValueError(f"Dataset: others shape {self.others.shape} != "
                       f"targets {self.targets.shape}")
    if self.extents.shape != (n, 2):
      raise ValueError(f"Dataset: extents shape {self.extents.shape} != {(n, 2)}")
    if len(self.names) != n:
      raise ValueError(f"Dataset: {len(self.names)} names for {n} samples")
    compact = np.issubdtype(self.images.dtype, np.integer)
    if compact != (self.image_scale is not None):
      raise ValueError(f"Dataset: {self.images.dtype} images need "
                       + ("an image_scale (compact form)" if compact else "no image_scale"))
    if compact and np.shape(self.image_scale) != (n,):
      raise ValueError(f"Dataset: image_scale shape {np.shape(self.image_scale)} != {(n,)}")
    if self.image_offset is not None and (not compact or np.shape(self.image_offset) != (n,)):
      raise ValueError(f"Dataset: image_offset (shape {np.shape(self.image_offset)}) needs a "
                       f"compact set of {n} samples")

  def __len__(self) -> int:
    return int(self.targets.shape[0])

  @property
  def channels(self) -> int:
    return int(self.images.shape[-1])

  @property
  def max_label(self) -> int:
    """Static bound on ids in `targets` and `others` (at least 1)."""
    return max(1, int(self.targets.max(initial=0)), int(self.others.max(initial=0)))

  @property
  def compact(self) -> bool:
    """True when images hold source integers with per-sample image_scale."""
    return self.image_scale is not None

  def normalised(self, index=None) -> np.ndarray:
    """(N, H, W, C) float32 images as the network sees them; of the samples
    `index` (ints) only, when given."""
    pick = (lambda x: x) if index is None else (lambda x: x[np.asarray(index)])  # noqa: E731
    images = pick(self.images)
    if not self.compact:
      return np.asarray(images, np.float32)
    col = lambda x: np.asarray(pick(x), np.float32).reshape(-1, 1, 1, 1)  # noqa: E731
    if self.image_offset is None:
      return images.astype(np.float32) / col(self.image_scale)
    _, h, w = self.targets.shape
    from upgrade_jax.metrics import extent_mask
    valid = extent_mask(pick(self.extents), h, w)[..., None]
    out = (images.astype(np.float32) - col(self.image_offset)) / col(self.image_scale)
    return np.where(valid, out, np.float32(0))   # padding stays 0, as in the float form

  def as_float(self) -> "Dataset":
    """This Dataset with float32 normalised images (itself when not compact)."""
    return self if not self.compact else self.replace(images=self.normalised(),
                                                      image_scale=None, image_offset=None)

  def valid_mask(self) -> np.ndarray:
    """(N, H, W) bool, True on real (non-padding) pixels."""
    from upgrade_jax.metrics import extent_mask
    _, h, w = self.targets.shape
    return extent_mask(self.extents, h, w)

  def subset(self, index) -> "Dataset":
    """The samples at `index` (array of ints or bool mask), as a new Dataset."""
    index = np.asarray(index)
    if index.dtype == bool:
      index = np.flatnonzero(index)
    return Dataset(self.images[index], self.targets[index], self.others[index],
                   self.extents[index], tuple(self.names[i] for i in index),
                   None if self.image_scale is None else self.image_scale[index],
                   None if self.image_offset is None else self.image_offset[index])

  def replace(self, **changes) -> "Dataset":
    return dataclasses.replace(self, **changes)


def float_images(images, what: str = "predict") -> np.ndarray:
  """`images` as float32 network inputs; integer arrays are refused (a
  compact Dataset's source integers would reach the network unscaled: pass
  Dataset.normalised())."""
  arr = np.asarray(images)
  if np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{what}: images are {arr.dtype}; pass the normalised float32 images "
                     "(Dataset.normalised() of a compact set)")
  return np.asarray(arr, np.float32)


def concat(datasets) -> Dataset:
  """Stacks Datasets into one, padding every sample to the largest H and W.

  Channels must agree. Padding is zeros, and `extents` keep each sample's
  valid region, so padded pixels never count. Compact sets stay compact
  when all are (in their common integer dtype); mixed with float sets they
  are normalised to float32.
  """
  datasets = [d for d in datasets if len(d)]
  if not datasets:
    raise ValueError("concat: no non-empty Dataset")
  compact = all(d.compact for d in datasets)
  if not compact:
    datasets = [d.as_float() for d in datasets]
  channels = {d.channels for d in datasets}
  if len(channels) != 1:
    raise ValueError(f"concat: Datasets differ in channels {sorted(channels)}")
  h = max(d.targets.shape[1] for d in datasets)
  w = max(d.targets.shape[2] for d in datasets)

  def pad(x):
    widths = [(0, 0), (0, h - x.shape[1]), (0, w - x.shape[2])] + [(0, 0)] * (x.ndim - 3)
    return np.pad(x, widths)

  return Dataset(
      images=np.concatenate([pad(d.images) for d in datasets]),
      targets=np.concatenate([pad(d.targets) for d in datasets]),
      others=np.concatenate([pad(d.others) for d in datasets]),
      extents=np.concatenate([d.extents for d in datasets]),
      names=tuple(n for d in datasets for n in d.names),
      image_scale=np.concatenate([d.image_scale for d in datasets]).astype(np.float32)
      if compact else None,
      image_offset=np.concatenate([
          np.zeros(len(d), np.float32) if d.image_offset is None else d.image_offset
          for d in datasets]).astype(np.float32)
      if compact and any(d.image_offset is not None for d in datasets) else None)


def label_dtype(*arrays) -> np.dtype:
  """The smallest signed integer dtype holding every value of `arrays`.

  Signed, because targets may carry negative codes (the competing methods'
  corrected / unlabelled pixels); lossless, so training reads the same ids.
  """
  lo = min((int(a.min()) for a in arrays if a.size), default=0)
  hi = max((int(a.max()) for a in arrays if a.size), default=0)
  for dt in (np.int8, np.int16, np.int32):
    if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
      return np.dtype(dt)
  raise ValueError(f"label ids {lo}..{hi} do not fit in int32")
