"""The paper's slice selection, the splits and the fixed LQ set."""

import numpy as np
import pytest

from upgrade_jax.data import sampling
from upgrade_jax.data.types import Volume


def test_paper_example_five_slices_from_five_volumes():
  # Section k of 129 slices split into 5 spans [25.8k, 25.8(k+1)); middles
  # 12.9, 38.7, 64.5, 90.3, 116.1 -> floor.
  assert sampling.select_slices([129] * 5, 5) == [(0, 12), (1, 38), (2, 64), (3, 90),
                                                  (4, 116)]


def test_more_picks_than_volumes_cycle_through_them():
  # 10 sections of 20 slices: middles (2k+1)·20 // 20 = 2k+1.
  assert sampling.select_slices([20, 20, 20], 10) == [
      (0, 1), (1, 3), (2, 5), (0, 7), (1, 9), (2, 11), (0, 13), (1, 15), (2, 17), (0, 19)]


def test_single_volume_and_uneven_division():
  # 3 sections of 10 slices: middles floor(10/6), floor(30/6), floor(50/6).
  assert sampling.select_slices([10], 3) == [(0, 1), (0, 5), (0, 8)]
  # 4 picks from 2 volumes of 7: (2k+1)·7 // 8 = 0, 2, 4, 6.
  assert sampling.select_slices([7, 7], 4) == [(0, 0), (1, 2), (0, 4), (1, 6)]
  assert sampling.select_slices([5, 9], 1) == [(0, 2)]
  assert sampling.select_slices([5], 0) == []


def test_more_slices_than_a_volume_has():
  # Volume 0 has 2 slices: its second pick collides and moves to the nearest
  # free slice; once full it is skipped in the circular order.
  assert sampling.select_slices([2, 10], 6) == [(0, 0), (1, 2), (0, 1), (1, 5), (1, 7),
                                                (1, 9)]
  # All the slices of one volume: every slice exactly once.
  picks = sampling.select_slices([4], 4)
  assert sorted(picks) == [(0, 0), (0, 1), (0, 2), (0, 3)]
  picks = sampling.select_slices([3, 1, 2], 6)
  assert sorted(picks) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]
  with pytest.raises(ValueError, match="cannot pick 7 slices"):
    sampling.select_slices([3, 1, 2], 7)
  with pytest.raises(ValueError, match="no volumes"):
    sampling.select_slices([], 1)


def test_picks_are_distinct_and_balanced():
  rng = np.random.default_rng(0)
  for _ in range(50):
    sizes = rng.integers(1, 30, size=rng.integers(1, 6)).tolist()
    n = int(rng.integers(0, sum(sizes) + 1))
    picks = sampling.select_slices(sizes, n)
    assert len(set(picks)) == n
    assert all(0 <= z < sizes[v] for v, z in picks)
    if n <= min(sizes):  # no volume fills up: strict circular order
      assert [v for v, _ in picks] == [k % len(sizes) for k in range(n)]


def test_train_val_split_is_80_20_and_seeded():
  tr, va = sampling.train_val_split(10, seed=0)
  assert len(tr) == 8 and len(va) == 2
  assert sorted(np.concatenate([tr, va]).tolist()) == list(range(10))
  tr2, va2 = sampling.train_val_split(10, seed=0)
  np.testing.assert_array_equal(va, va2)
  splits = {tuple(sampling.train_val_split(10, seed=s)[1]) for s in range(10)}
  assert len(splits) > 1
  assert [len(x) for x in sampling.train_val_split(1, seed=0)] == [1, 0]
  assert [len(x) for x in sampling.train_val_split(2, seed=0)] == [1, 1]


def _volumes(n, z=6, hw=(12, 10)):
  rng = np.random.default_rng(0)
  vols = []
  for i in range(n):
    target = np.zeros((z, *hw), np.int32)
    target[:, 2:5, 2:5] = 7       # a non-sequential id: Datasets relabel
    target[:, 7:10, 6:9] = 9
    others = np.zeros_like(target)
    others[:, 0:2, 6:9] = 3
    vols.append(Volume(rng.integers(0, 1000, (z, *hw)).astype(np.uint16), target, others,
                       name=f"v{i}"))
  return vols


def test_make_splits():
  vols = _volumes(5)
  train, test = sampling.hold_out(vols, 2, seed=1)
  assert len(train) == 3 and len(test) == 2
  assert {v.name for v in train} | {v.name for v in test} == {v.name for v in vols}
  s = sampling.make_splits(train, test, n_hq=5, seed=0)
  assert s.hq_picks == tuple(sampling.select_slices([6, 6, 6], 5))
  assert len(s.hq_train) == 4 and len(s.hq_val) == 1
  assert len(s.lq_truth) == 18 - 5 and len(s.test) == 12
  assert not set(s.hq_picks) & set(s.lq_picks)
  hq_names = set(s.hq_train.names) | set(s.hq_val.names)
  assert hq_names == {f"{train[v].name}_z{z:03d}" for v, z in s.hq_picks}
  assert s.test.targets.max() == 2 and s.test.others.max() == 1  # relabelled
  # Percentile-normalised by default: each slice as intensity.normalise makes it.
  from upgrade_jax.data import intensity
  assert s.test.images.dtype == np.float32
  np.testing.assert_allclose(s.test.images[0, ..., 0], intensity.normalise(test[0].image[0]), rtol=1e-6)
  s2 = sampling.make_splits(train, test, n_hq=5, seed=0, n_lq=4)
  assert len(s2.lq_truth) == 4 and set(s2.lq_picks) <= set(s.lq_picks)
  with pytest.raises(ValueError, match="n_lq=20"):
    sampling.make_splits(train, test, n_hq=5, seed=0, n_lq=20)
  s3 = sampling.make_splits(train, test, n_hq=18, seed=0)
  assert len(s3.lq_truth) == 0 and s3.lq_truth.images.shape[1:] == s3.test.images.shape[1:]


def test_make_lq_is_seeded_and_follows_the_config():
  from upgrade_jax.perturb import PerturbConfig
  ds = sampling.make_splits(_volumes(2), _volumes(1), n_hq=2, seed=0).lq_truth
  identity = sampling.make_lq(ds, PerturbConfig(), seed=0)
  np.testing.assert_array_equal(identity.targets, (ds.targets > 0).astype(np.int32))
  np.testing.assert_array_equal(identity.images, ds.images)
  cfg = PerturbConfig(omission_rate=0.5, inclusion_rate=1.0)
  a = sampling.make_lq(ds, cfg, seed=0, batch_size=4)
  b = sampling.make_lq(ds, cfg, seed=0, batch_size=64)
  np.testing.assert_array_equal(a.targets, b.targets)  # independent of batching
  assert a.targets.dtype == np.int32 and set(np.unique(a.targets)) <= {0, 1}
  # Every sample: one of its two targets dropped, the other object included.
  for lq, gt, oth in zip(a.targets, ds.targets, ds.others):
    kept = {i for i in (1, 2) if lq[gt == i].all()}
    assert len(kept) == 1 and not lq[gt == ({1, 2} - kept).pop()].any()
    assert lq[oth > 0].all()
  c = sampling.make_lq(ds, cfg, seed=1)
  assert not np.array_equal(a.targets, c.targets)


# ---------------------------------------------------------------- numbers a scientist can trust

def test_test_volumes_do_not_depend_on_n_volumes():
  # Figure 3.4 sweeps the number of training volumes: the test set must stay
  # the same volumes, pixel for pixel. `hold_out` (a permutation of all
  # volumes) changed it with n_volumes.
  from upgrade_jax.data import synthetic
  small = synthetic.generate("hl60", seed=3, n_volumes=3, shape=(6, 96, 96))
  large = synthetic.generate("hl60", seed=3, n_volumes=5, shape=(6, 96, 96))
  for a, b in zip(small, large):  # volume i is the same whatever n_volumes
    assert a.num_slices > 0
    np.testing.assert_array_equal(a.image, b.image)
  (tr_s, te_s), (tr_l, te_l) = (sampling.hold_out_first(v, 2) for v in (small, large))
  assert len(te_s) == len(te_l) == 2 and len(tr_s) == 1 and len(tr_l) == 3
  for a, b in zip(te_s, te_l):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.target, b.target)
  np.testing.assert_array_equal(tr_s[0].image, tr_l[0].image)  # training volumes grow


def test_hq_volumes_limits_where_hq_slices_come_from():
  vols = _volumes(4)
  s = sampling.make_splits(vols[:3], vols[3:], n_hq=4, seed=0, hq_volumes=1)
  assert {v for v, _ in s.hq_picks} == {0}
  assert s.hq_picks == tuple(sampling.select_slices([6], 4))
  assert {v for v, _ in s.lq_picks} == {0, 1, 2}   # LQ still from every volume
  assert len(s.lq_truth) == 18 - 4
  s2 = sampling.make_splits(vols[:3], vols[3:], n_hq=4, seed=0, hq_volumes=2)
  assert {v for v, _ in s2.hq_picks} == {0, 1}
  with pytest.raises(ValueError, match="hq_volumes"):
    sampling.make_splits(vols[:3], vols[3:], n_hq=4, seed=0, hq_volumes=4)


def test_lq_counts_are_the_draws_of_make_lq():
  from upgrade_jax.perturb import PerturbConfig
  ds = sampling.make_splits(_volumes(2), _volumes(1), n_hq=2, seed=0).lq_truth
  cfg = PerturbConfig(omission_rate=0.5, inclusion_rate=0.5)
  lq = sampling.make_lq(ds, cfg, seed=4)
  counts = sampling.lq_counts(ds, cfg, seed=4)
  for c, m, gt, oth in zip(counts, lq.targets, ds.targets, ds.others):
    ids, oids = np.unique(gt[gt > 0]), np.unique(oth[oth > 0])
    omitted = sum(not m[gt == i].any() for i in ids)
    included = sum(m[oth == j].all() for j in oids)
    assert c.tolist() == [len(ids), omitted, len(oids), included]
  r = sampling.effective_rates(counts)
  assert r["omission"] == pytest.approx(counts[:, 1].sum() / counts[:, 0].sum())
  assert r["inclusion"] == pytest.approx(counts[:, 3].sum() / counts[:, 2].sum())
  assert sampling.effective_rates(np.zeros((0, 4)))["omission"] is None
