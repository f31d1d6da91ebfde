"""Host label helpers (numpy / scikit-image, not jittable): sequential ids and
Felzenszwalb segments as inclusion candidates."""

from __future__ import annotations

import dataclasses

import numpy as np


def relabel_sequential(labels) -> np.ndarray:
  """Host: renumbers the ids of an instance map to 1..n in order of first id.

  Args:
    labels: (..., H, W) non-negative integer array.

  Returns:
    int32 array of the same shape; 0 stays 0, the k-th smallest id becomes k.
  """
  arr = np.asarray(labels)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"labels must be integer, got dtype {arr.dtype}")
  if arr.size and arr.min() < 0:
    raise ValueError(f"labels has negative ids (min {arr.min()})")
  ids, inverse = np.unique(arr, return_inverse=True)
  if ids.size and ids[0] != 0:
    inverse = inverse + 1  # no background present: ids start at 1
  return inverse.reshape(arr.shape).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class FelzenszwalbConfig:
  """Which Felzenszwalb segments become inclusion candidates.

  Attributes:
    scale, sigma, min_size: `skimage.segmentation.felzenszwalb` parameters.
      The defaults are larger than skimage's (100, 0.8, 20): on EPFL slices
      those gave ~1800 segments covering 87% of the image, so 70% inclusion
      made labels no annotator would draw.
    max_overlap: a segment is kept if at most this fraction of it overlaps
      the targets (0 keeps only segments entirely on background).
    max_area_fraction: segments larger than this fraction of the image are
      background regions, not objects, and are dropped.
  """

  scale: float = 300.0
  sigma: float = 1.0
  min_size: int = 100
  max_overlap: float = 0.0
  max_area_fraction: float = 0.05


def felzenszwalb_objects(image, labels, config: FelzenszwalbConfig = FelzenszwalbConfig(), *,
                         area_range: tuple[float, float] | None = None) -> np.ndarray:
  """Host: Felzenszwalb segments that do not overlap the targets, as `others`.

  The paper's case study (§3.3.4) draws its inclusions from these: plausible
  but wrong objects an annotator might outline.

  Args:
    image: (H, W) or (H, W, C) image.
    labels: (H, W) int target instance map.
    config: the segmentation and filter settings.
    area_range: optional (min, max) area in pixels of a kept segment, e.g.
      the range of the target cells' areas, so inclusions look like cells.

  Returns:
    (H, W) int32 instance map with ids 1..m, zero on every target pixel.
  """
  from skimage.segmentation import felzenszwalb  # host-only dependency

  img = np.asarray(image, dtype=np.float32)
  lab = np.asarray(labels)
  if lab.ndim != 2:
    raise ValueError(f"labels must be (H, W), got shape {lab.shape}")
  if img.shape[:2] != lab.shape:
    raise ValueError(f"image shape {img.shape} does not match labels {lab.shape}")
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  channel_axis = -1 if img.ndim == 3 else None
  segments = felzenszwalb(img, scale=config.scale, sigma=config.sigma,
                          min_size=config.min_size, channel_axis=channel_axis)
  n_seg = int(segments.max()) + 1
  area = np.bincount(segments.ravel(), minlength=n_seg)
  on_target = np.bincount(segments.ravel(), weights=(lab > 0).ravel(), minlength=n_seg)
  keep = ((on_target <= config.max_overlap * area)
          & (area <= config.max_area_fraction * lab.size))
  if area_range is not None:
    keep &= (area >= area_range[0]) & (area <= area_range[1])
  out = np.where(keep[segments] & (lab == 0), segments + 1, 0)
  return relabel_sequential(out)
