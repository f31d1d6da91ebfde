"""Omission and inclusion of 3-D instances: a cell skipped in every slice.

P (upgrade_jax.perturb) acts on one 2-D slice: omission drops a fraction of
the slice's cells, so a cell omitted in slice 5 is often kept in slice 6. An
annotator who skips a cell of a volume skips it in every slice. With
DataConfig.z_consistent, the fixed LQ sets of volume sources are made here:

  slice_picks    (volume, slice) of each sample of a Dataset, from its names
  choose_ids     k = count(rate·n) of n ids, uniformly (P's count rules)
  make_lq        per volume, the 3-D target ids omitted and the 3-D `others`
                 ids included, applied to every slice of the set; then the
                 per-pixel components of P (salt-and-pepper, bias) per slice,
                 with the keys of sampling.make_lq

The volumes' ids are taken as 3-D identities (one id = one cell through the
slices), as the synthetic volumes hold them. Sources whose ids are per slice
(EPFL's shared copy) or that have no volumes (folders of 2-D images) are
refused by DataConfig. Host code (numpy), once per run and set.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from upgrade_jax.data import sampling
from upgrade_jax.data.types import Dataset, Volume
from upgrade_jax.perturb import COUNT_EPS, PerturbConfig
from upgrade_jax.data.labels import relabel_sequential

__all__ = ["slice_picks", "choose_ids", "make_lq"]


def slice_picks(ds: Dataset, volumes: Sequence[Volume]) -> list[tuple[int, int]]:
  """(volume_idx, slice_idx) of each sample of `ds`, read from its names
  ("<volume>_z<slice>", or "<volume>" for a single-slice volume), as
  stacking.volumes_to_dataset names them."""
  by_name = {}
  for v, vol in enumerate(volumes):
    if vol.name in by_name:
      raise ValueError(f"z-consistent LQ: two volumes are named {vol.name!r}")
    by_name[vol.name] = v
  picks = []
  for name in ds.names:
    if name in by_name and volumes[by_name[name]].num_slices == 1:
      picks.append((by_name[name], 0))
      continue
    stem, _, z = name.rpartition("_z")
    if stem not in by_name or not z.isdigit():
      raise ValueError(f"z-consistent LQ: sample {name!r} is no slice of the given volumes")
    picks.append((by_name[stem], int(z)))
  return picks


def choose_ids(rng: np.random.Generator, ids: np.ndarray, rate: float,
               rounding: str) -> np.ndarray:
  """A uniform choice of k of the n `ids` (1-D int array), k as P counts:
  "stochastic" floor(r·n) + Bernoulli(frac(r·n)), "floor" floor(r·n),
  "authors" max(1, int(r·n)) when n > 0 and r > 0 (perturb.components._count)."""
  n = len(ids)
  x = float(rate) * n
  base = np.floor(x + COUNT_EPS)
  if rounding == "floor":
    k = base
  elif rounding == "authors":
    k = max(base, 1.0) if n > 0 and rate > 0 else 0.0
  elif rounding == "stochastic":
    k = base + float(rng.random() < np.clip(x - base, 0.0, 1.0))
  else:
    raise ValueError(f"count rounding {rounding!r} unknown")
  k = int(min(k, n))
  return np.sort(rng.choice(ids, size=k, replace=False)) if k else ids[:0]


def _ids(arrays) -> np.ndarray:
  ids = np.unique(np.concatenate([np.unique(a) for a in arrays]))
  return ids[ids > 0]


def make_lq(ds: Dataset, volumes: Sequence[Volume], config: PerturbConfig, *,
            seed: int) -> tuple[Dataset, np.ndarray]:
  """The fixed LQ version of `ds` (slices of `volumes`), omission and
  inclusion per 3-D instance.

  Per volume, of the target ids present in its slices of `ds`, k ≈ rate·n
  are omitted (in every one of those slices); of its `others` ids, k ≈
  rate·m are painted onto background (in every slice). Where `ds.others` is
  zero (others="none") nothing is included. Salt-and-pepper and bias then act
  per slice as in sampling.make_lq with the same `seed` (same keys: they
  draw what the per-slice mode draws).

  Args:
    ds: Dataset of slices of `volumes` (stacking.volumes_to_dataset names).
    volumes: the volumes, with 3-D instance ids.
    config: the LQ perturbation.
    seed: integer seed.

  Returns:
    (lq, counts): lq as sampling.make_lq returns it ((N, H, W) int32 0/1
    targets), counts (N, 4) int64 [target instances, omitted, other objects,
    included] per slice, as sampling.lq_counts gives them.
  """
  n = len(ds)
  if n == 0:
    return ds, np.zeros((0, 4), np.int64)
  picks = slice_picks(ds, volumes)
  raw_t, raw_o = [], []
  for i, (v, z) in enumerate(picks):
    h, w = ds.extents[i]
    raw_t.append(volumes[v].target[z])
    raw_o.append(np.where(ds.others[i, :h, :w] > 0, volumes[v].others[z], 0))
  rng = np.random.default_rng([seed, 0x3D])
  drop, add = {}, {}
  for v in sorted({v for v, _ in picks}):
    mine = [i for i, p in enumerate(picks) if p[0] == v]
    drop[v] = (choose_ids(rng, _ids([raw_t[i] for i in mine]), config.omission_rate,
                          config.count_rounding) if config.omission_rate > 0 else np.zeros(0))
    add[v] = (choose_ids(rng, _ids([raw_o[i] for i in mine]), config.inclusion_rate,
                         config.count_rounding) if config.inclusion_rate > 0 else np.zeros(0))
  targets = np.zeros(ds.targets.shape, np.int32)
  counts = np.zeros((n, 4), np.int64)
  for i, (v, _) in enumerate(picks):
    t, o = raw_t[i], raw_o[i]
    h, w = t.shape
    gone = np.isin(t, drop[v])
    kept = np.where(gone, 0, t)
    paint = np.isin(o, add[v]) & (o > 0) & (kept == 0)
    top = int(t.max(initial=0))
    targets[i, :h, :w] = relabel_sequential(np.where(paint, o + top, kept))
    t_ids, o_ids = _ids([t]), _ids([o])
    counts[i] = (len(t_ids), np.isin(t_ids, drop[v]).sum(), len(o_ids),
                 np.isin(o_ids, add[v]).sum())
  rest = dataclasses.replace(config, omission_rate=0.0, inclusion_rate=0.0)
  chosen = ds.replace(targets=targets, others=np.zeros_like(ds.others))
  return sampling.make_lq(chosen, rest, seed=seed), counts
