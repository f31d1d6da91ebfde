"""The paper's choice of high-quality slices, and the HQ / LQ / test splits.

Slice selection (`select_slices`), as in the paper: to take n slices, split a
volume into n equal sections and take the middle slice of each; with several
volumes, the k-th pick (k = 0..n-1) is the middle of section k of the next
volume in circular order. So 5 slices from 5 volumes are the middle of
section 1 of volume 1, section 2 of volume 2, ..., section 5 of volume 5, and
10 slices from 5 volumes give every volume two slices far apart.

Edge cases (our rules; the paper does not meet them):
  - A pick that falls on a slice already taken in that volume (more picks
    than slices in a short volume) takes the nearest free slice of that
    volume, the lower one on a tie.
  - A volume with no free slice left is skipped in the circular order.
  - Asking for more slices than all volumes hold is an error.

Splits (`make_splits`): HQ = the slices chosen above from the training
volumes; LQ = the other training slices (all, or a seeded subset of n_lq);
test = every slice of the held-out volumes. HQ is split 80/20 into train and
validation from the seed. `make_lq` then turns a Dataset into its fixed
low-quality version once per seed, with a PerturbConfig that may differ from
the one the upgrade network trains with (the paper's mismatch study).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np

from upgrade_jax.data.stacking import volumes_to_dataset
from upgrade_jax.data.types import Dataset, Volume
from upgrade_jax.perturb import PerturbConfig, perturb, perturb_counts

__all__ = ["select_slices", "select_hq", "hold_out", "hold_out_first", "train_val_split", "Splits",
           "make_splits", "make_lq", "lq_counts", "effective_rates", "empty_like"]


def select_slices(num_slices_per_volume: Sequence[int], n: int) -> list[tuple[int, int]]:
  """The paper's rule for picking n high-quality slices from several volumes.

  Args:
    num_slices_per_volume: Z of each volume, e.g. [129] * 30.
    n: number of slices wanted, 0 <= n <= sum(num_slices_per_volume).

  Returns:
    n (volume_idx, slice_idx) pairs in pick order, all distinct.

  Example:
    >>> select_slices([129] * 5, 5)
    [(0, 12), (1, 38), (2, 64), (3, 90), (4, 116)]
  """
  sizes = [int(z) for z in num_slices_per_volume]
  if not sizes:
    raise ValueError("select_slices: no volumes")
  if any(z < 0 for z in sizes):
    raise ValueError(f"select_slices: negative slice count in {sizes}")
  if not 0 <= n <= sum(sizes):
    raise ValueError(f"select_slices: cannot pick {n} slices from volumes with "
                     f"{sum(sizes)} slices in total")
  taken = [set() for _ in sizes]
  picks = []
  volume = 0
  for k in range(n):
    while len(taken[volume]) == sizes[volume]:  # full: skip in circular order
      volume = (volume + 1) % len(sizes)
    z_n = sizes[volume]
    middle = ((2 * k + 1) * z_n) // (2 * n)  # floor of the centre of section k
    picks.append((volume, _nearest_free(middle, z_n, taken[volume])))
    taken[volume].add(picks[-1][1])
    volume = (volume + 1) % len(sizes)
  return picks


def _nearest_free(z: int, z_n: int, taken: set) -> int:
  for d in range(z_n):
    for cand in (z - d, z + d):
      if 0 <= cand < z_n and cand not in taken:
        return cand
  raise AssertionError("no free slice")  # callers skip full volumes


def hold_out(volumes: Sequence[Volume], n_test: int, *, seed: int):
  """(train_volumes, test_volumes): a seeded choice of n_test test volumes.

  Both lists keep the original order of `volumes`.
  """
  if not 0 <= n_test <= len(volumes):
    raise ValueError(f"hold_out: n_test={n_test} not in [0, {len(volumes)}]")
  test = set(np.random.default_rng(seed).permutation(len(volumes))[:n_test].tolist())
  return ([v for i, v in enumerate(volumes) if i not in test],
          [v for i, v in enumerate(volumes) if i in test])


def hold_out_first(volumes: Sequence[Volume], n_test: int):
  """(train_volumes, test_volumes): the first n_test volumes are the test set.

  For a generator that makes volume i the same however many volumes it makes
  (`synthetic.generate` spawns one child seed per volume), the test set is
  then the same for every n_volumes, and adding volumes only adds training
  volumes. `hold_out` permutes all volumes, so its test set changed with
  n_volumes and confounded the paper's Figure 3.4 sweep with the test set.
  """
  if not 0 <= n_test <= len(volumes):
    raise ValueError(f"hold_out_first: n_test={n_test} not in [0, {len(volumes)}]")
  return list(volumes[n_test:]), list(volumes[:n_test])


def select_hq(train_volumes: Sequence[Volume], n_hq: int,
              hq_volumes: int | None = None) -> list[tuple[int, int]]:
  """The HQ slices (volume_idx, slice_idx) of the training volumes: the paper's
  rule (`select_slices`) over the first `hq_volumes` of them (None: all)."""
  if hq_volumes is not None and not 1 <= hq_volumes <= len(train_volumes):
    raise ValueError(f"hq_volumes={hq_volumes} not in [1, {len(train_volumes)}] "
                     "(the number of training volumes)")
  pool = train_volumes[:hq_volumes] if hq_volumes is not None else train_volumes
  return select_slices([v.num_slices for v in pool], n_hq)


def train_val_split(n: int, *, seed: int, val_fraction: float = 0.2):
  """(train_idx, val_idx): sorted int arrays splitting range(n) from `seed`.

  The validation part has round(val_fraction·n) samples, at least 1 when
  n >= 2 and val_fraction > 0 (early stopping needs one), and never all.
  """
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
  n_val = int(round(val_fraction * n))
  if n >= 2 and val_fraction > 0:
    n_val = min(max(n_val, 1), n - 1)
  else:
    n_val = 0
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def empty_like(dataset: Dataset) -> Dataset:
  """A Dataset with 0 samples and the same (H, W, C) as `dataset`."""
  return dataset.subset(np.zeros((0,), np.int64))


@dataclasses.dataclass(frozen=True)
class Splits:
  """The paper's data splits. Datasets may hold 0 samples (e.g. no LQ left).

  Every Dataset holds ground truth: lq_truth is the truth of the slices that
  will get LQ labels (make_lq turns it into LQ masks). hq_picks / lq_picks are
  the (volume_idx, slice_idx) pairs in the training volumes, in the order of
  hq_train + hq_val's source (pick order) and lq_truth.
  """

  hq_train: Dataset
  hq_val: Dataset
  lq_truth: Dataset
  test: Dataset
  hq_picks: tuple
  lq_picks: tuple


def make_splits(train_volumes: Sequence[Volume], test_volumes: Sequence[Volume], *,
                n_hq: int, seed: int, n_lq: int | None = None, val_fraction: float = 0.2,
                normalisation: str = "percentile", channels: str = "grey",
                hq_volumes: int | None = None, compact: bool | str = False,
                percentiles=None, train_tile: int | None = None) -> Splits:
  """HQ / LQ / test Datasets and the 80/20 train/validation split of HQ.

  Args:
    train_volumes: volumes HQ and LQ slices come from.
    test_volumes: held-out volumes; all their slices form the test set.
    n_hq: number of HQ slices, chosen by `select_slices`.
    seed: seeds the train/val split and the LQ subset.
    n_lq: number of LQ slices drawn (seeded) from the remaining training
      slices; None takes them all.
    val_fraction: fraction of HQ slices held out for validation.
    normalisation, channels, compact, percentiles: see
      `upgrade_jax.data.io.stack_samples` (percentiles None: its default).
    hq_volumes: the HQ slices come from the first `hq_volumes` training
      volumes only (the paper's Figure 3.4 axis); None: from all of them. LQ
      slices still come from every training volume.
    train_tile: None keeps every slice whole. An int cuts the HQ (train and
      validation) and LQ slices into tiles of at most train_tile² px
      (`stack_samples(tile=)`), after the train/validation split, which stays
      one of whole slices; the test set stays whole. For folders of mixed
      sizes, whose stack would otherwise pad every image to the largest.
  """
  if not train_volumes or not test_volumes:
    raise ValueError("make_splits needs at least one training and one test volume")
  kw = dict(normalisation=normalisation, channels=channels, compact=compact)
  if percentiles is not None:
    kw["percentiles"] = percentiles
  hq_picks = select_hq(train_volumes, n_hq, hq_volumes)
  chosen = set(hq_picks)
  rest = [(v, z) for v, vol in enumerate(train_volumes) for z in range(vol.num_slices)
          if (v, z) not in chosen]
  if n_lq is not None:
    if not 0 <= n_lq <= len(rest):
      raise ValueError(f"n_lq={n_lq}: only {len(rest)} training slices are left after "
                       f"{n_hq} HQ slices")
    rng = np.random.default_rng([seed, 1])  # independent of the train/val stream
    rest = [rest[i] for i in np.sort(rng.permutation(len(rest))[:n_lq])]
  test = volumes_to_dataset(test_volumes, **kw)
  train_idx, val_idx = train_val_split(len(hq_picks), seed=seed, val_fraction=val_fraction)
  if train_tile is None:
    hq = volumes_to_dataset(train_volumes, hq_picks, **kw) if hq_picks else empty_like(test)
    hq_train, hq_val = hq.subset(train_idx), hq.subset(val_idx)
  else:   # split whole slices first: no slice has tiles on both sides
    tiled = lambda picks: (volumes_to_dataset(train_volumes, picks, tile=train_tile, **kw)  # noqa: E731
                           if picks else empty_like(test))
    hq_train = tiled([hq_picks[i] for i in train_idx])
    hq_val = tiled([hq_picks[i] for i in val_idx])
  lq = (volumes_to_dataset(train_volumes, rest, tile=train_tile, **kw) if rest
        else empty_like(test))
  return Splits(hq_train, hq_val, lq, test, tuple(hq_picks), tuple(rest))


@functools.lru_cache(maxsize=32)
def _perturb_batch(config: PerturbConfig, max_label: int):
  return jax.jit(jax.vmap(functools.partial(perturb, config=config, max_label=max_label),
                          in_axes=(0, 0, 0)))


def make_lq(dataset: Dataset, config: PerturbConfig, *, seed: int,
            batch_size: int = 64) -> Dataset:
  """The fixed low-quality version of `dataset`, made once per seed.

  Sample i is perturbed with the i-th key of jax.random.split(key(seed), N),
  so the result does not depend on batch_size.

  Args:
    dataset: Dataset with ground-truth instance targets (relabelled).
    config: the perturbation that made the "real" LQ annotations; it may
      differ from the one the upgrade network trains with.
    seed: integer seed.
    batch_size: samples per jitted call (the last batch is zero-padded so the
      function compiles once).

  Returns:
    A Dataset equal to `dataset` except targets: (N, H, W) int32 0/1 LQ masks,
    zero on padding. The ground truth stays in `dataset` (same order, names).
  """
  n = len(dataset)
  if n == 0:
    return dataset
  fn = _perturb_batch(config, dataset.max_label)
  keys = jax.random.split(jax.random.key(seed), n)
  out = np.zeros(dataset.targets.shape, bool)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    labels, others = dataset.targets[start:stop], dataset.others[start:stop]
    k = keys[start:stop]
    pad = batch_size - (stop - start) if n > batch_size else 0
    if pad:
      zeros = np.zeros((pad, *labels.shape[1:]), np.int32)
      labels, others = np.concatenate([labels, zeros]), np.concatenate([others, zeros])
      k = jax.numpy.concatenate([k, keys[:pad]])
    out[start:stop] = np.asarray(fn(k, labels, others))[:stop - start]
  out &= dataset.valid_mask()
  return dataset.replace(targets=out.astype(np.int32))


@functools.lru_cache(maxsize=32)
def _counts_batch(config: PerturbConfig, max_label: int):
  return jax.jit(jax.vmap(functools.partial(perturb_counts, config=config,
                                            max_label=max_label)))


def lq_counts(dataset: Dataset, config: PerturbConfig, *, seed: int) -> np.ndarray:
  """(N, 4) int64 object counts behind `make_lq(dataset, config, seed=seed)`:
  [target instances, omitted, other objects, included] per sample (the same
  keys, so the same draws)."""
  n = len(dataset)
  if n == 0:
    return np.zeros((0, 4), np.int64)
  keys = jax.random.split(jax.random.key(seed), n)
  fn = _counts_batch(config, dataset.max_label)
  return np.asarray(fn(keys, dataset.targets, dataset.others)).astype(np.int64)


def effective_rates(counts) -> dict:
  """Pooled effective rates of (N, 4) `lq_counts` rows: omitted / targets and
  included / others (None when there is nothing to count), with the sums."""
  c = np.asarray(counts, np.int64).reshape(-1, 4).sum(axis=0)
  targets, omitted, others, included = (int(x) for x in c)
  return {"omission": omitted / targets if targets else None,
          "inclusion": included / others if others else None,
          "targets": targets, "omitted": omitted, "others": others, "included": included}
