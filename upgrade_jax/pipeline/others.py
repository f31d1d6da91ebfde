"""What inclusion draws from: the `others` of a data set.

One registry, `OTHERS` (mode -> how a Dataset's `others` are made); the
modes a config may name are its keys (config.OTHERS_MODES).

  labels        the other cell type of the synthetic presets, or others/ of a
                folder: kept as loaded
  felzenszwalb  Felzenszwalb segments off the targets, sized like the HQ
                targets (the paper's case study, §3.3.4)
  none          nothing to include
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from upgrade_jax.data.types import Dataset
from upgrade_jax.data.labels import FelzenszwalbConfig, felzenszwalb_objects

__all__ = ["OTHERS", "with_others", "felzenszwalb_volumes", "target_area_range"]


def target_area_range(targets, percentiles=(5, 95)) -> tuple[float, float]:
  """Area range (pixels) of the target instances of a stack of (.., H, W) maps."""
  areas = []
  for t in np.asarray(targets).reshape(-1, *np.shape(targets)[-2:]):
    a = np.bincount(t.ravel())[1:]
    areas.append(a[a > 0])
  areas = np.concatenate(areas) if areas else np.zeros(0)
  if areas.size == 0:
    return (0.0, np.inf)
  lo, hi = np.percentile(areas, percentiles)
  return float(lo), float(hi)


def felzenszwalb_volumes(volumes, felz: FelzenszwalbConfig, picks, log=print):
  """`others` of every slice = Felzenszwalb segments off the targets, sized
  like the HQ targets (5th–95th percentile of their areas over the HQ slices
  `picks` only: the LQ slices' true areas are what an LQ user does not know).
  Done once per run, at the volume level, so repetitions do not recompute it."""
  train, test = volumes
  area_range = target_area_range(np.stack([train[v].target[z] for v, z in picks]))
  log(f"Felzenszwalb inclusion candidates: segments of {area_range[0]:.0f}-"
      f"{area_range[1]:.0f} px ({felz})")

  def one(v):
    img = v.image.astype(np.float32)
    if img.ndim == 4:
      img = img.mean(-1)
    others = np.stack([felzenszwalb_objects(z / max(float(z.max()), 1e-12), t,
                                            felz, area_range=area_range)
                       for z, t in zip(img, v.target)])
    return dataclasses.replace(v, others=others)

  return [one(v) for v in train], [one(v) for v in test]


def _felzenszwalb_others(ds: Dataset, felz: FelzenszwalbConfig) -> Dataset:
  area_range = target_area_range(ds.targets)
  out = np.zeros_like(ds.others)
  for i in range(len(ds)):
    h, w = ds.extents[i]
    out[i, :h, :w] = felzenszwalb_objects(ds.normalised([i])[0, :h, :w], ds.targets[i, :h, :w],
                                          felz, area_range=area_range)
  return ds.replace(others=out)


# What inclusion draws from -> how a Dataset's `others` are made from it.
# ("felzenszwalb" on volumes is made once per run by felzenszwalb_volumes.)
OTHERS: dict[str, Callable] = {
    "labels": lambda ds, felz: ds,   # the other cell type, or others/ of a folder
    "felzenszwalb": _felzenszwalb_others,
    "none": lambda ds, felz: ds.replace(others=np.zeros_like(ds.others)),
}


def with_others(ds: Dataset, mode: str, felz: FelzenszwalbConfig) -> Dataset:
  """`ds` with the `others` of `mode` (see OTHERS)."""
  return ds if len(ds) == 0 else OTHERS[mode](ds, felz)
