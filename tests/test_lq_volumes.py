"""Omission and inclusion of whole 3-D instances (upgrade_jax/lq_volumes.py)."""

import dataclasses

import numpy as np
import pytest

from upgrade_jax import pipeline
from upgrade_jax.data import lq_volumes, sampling, stacking
from upgrade_jax.data.types import Volume
from upgrade_jax.perturb import PerturbConfig


def _volumes(n=2, z=6, size=48, cells=8):
  """Volumes of vertical cylinders: target id k is one cell through every
  slice (3-D ids, as the simulator's); `others` are smaller cylinders."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  vols = []
  for v in range(n):
    t = np.zeros((size, size), np.int32)
    o = np.zeros((size, size), np.int32)
    for k in range(1, 2 * cells + 1):
      cy, cx = rng.integers(4, size - 4, 2)
      disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
      if k <= cells:
        t[disc & (t == 0)] = k
      else:
        o[disc & (t == 0) & (o == 0)] = k - cells
    target, others = np.repeat(t[None], z, 0), np.repeat(o[None], z, 0)
    image = (target > 0) * 100.0 + 10
    vols.append(Volume(image, target, others, name=f"vol{v}"))
  return vols


def _per_id(ds, lq, vols):
  """{(volume, id): [slice LQ mask == truth mask of the id, id present in LQ]} per slice."""
  out = {}
  for i, (v, z) in enumerate(lq_volumes.slice_picks(ds, vols)):
    t = vols[v].target[z]
    for k in np.unique(t[t > 0]):
      m = t == k
      out.setdefault((v, k), []).append((bool(np.all(lq.targets[i][m] > 0)),
                                         bool(np.any(lq.targets[i][m] > 0))))
  return out


def test_z_consistent_omission_removes_whole_3d_instances():
  vols = _volumes()
  picks = [(v, z) for v in range(2) for z in (0, 2, 3, 5)]   # some slices, as an LQ set
  ds = stacking.volumes_to_dataset(vols, picks)
  cfg = PerturbConfig(omission_rate=0.5)
  lq, counts = lq_volumes.make_lq(ds, vols, cfg, seed=3)
  kept = omitted = 0
  for (v, k), per_slice in _per_id(ds, lq, vols).items():
    intact = [a for a, _ in per_slice]
    present = [b for _, b in per_slice]
    if any(present):   # kept: intact in every slice
      assert all(intact), (v, k)
      kept += 1
    else:              # omitted: gone from every slice
      omitted += 1
  assert kept and omitted
  assert omitted == 8 and kept == 8   # 0.5 of 8 cells per volume, exactly
  # The counts are those of the slices: each slice shows 8 cells, 4 omitted.
  np.testing.assert_array_equal(counts[:, :2], np.tile([8, 4], (len(ds), 1)))
  # Contrast: the per-slice P chooses anew in each slice, splitting cells.
  per_slice = sampling.make_lq(ds, cfg, seed=3)
  split = [k for k, s in _per_id(ds, per_slice, vols).items() if len({b for _, b in s}) > 1]
  assert split


def test_z_consistent_inclusion_paints_whole_objects():
  vols = _volumes()
  ds = stacking.volumes_to_dataset(vols)
  lq, counts = lq_volumes.make_lq(ds, vols, PerturbConfig(inclusion_rate=0.5), seed=0)
  for i, (v, z) in enumerate(lq_volumes.slice_picks(ds, vols)):
    t, o = vols[v].target[z], vols[v].others[z]
    np.testing.assert_array_equal(lq.targets[i][t > 0], 1)   # no cell lost
    painted = sorted(int(k) for k in np.unique(o[(o > 0) & (t == 0) & (lq.targets[i] > 0)]))
    if z == 0:
      first = painted
    assert painted == first   # the same objects in every slice of the volume
    assert counts[i, 3] == len(painted) > 0


def test_pixel_components_draw_what_the_per_slice_mode_draws():
  vols = _volumes(n=1)
  ds = stacking.volumes_to_dataset(vols)
  cfg = PerturbConfig(bias_max=2, salt_pepper_prob=0.05)
  lq, _ = lq_volumes.make_lq(ds, vols, cfg, seed=7)
  np.testing.assert_array_equal(lq.targets, sampling.make_lq(ds, cfg, seed=7).targets)


def test_prepare_rep_and_config():
  vols = _volumes(n=3, z=5)
  data = pipeline.DataConfig(n_hq=4, z_consistent=True)
  cfg = pipeline.PipelineConfig(data=data, scenarios=())
  d = pipeline.prepare_rep(cfg, (vols[:2], vols[2:]), seed=0)
  for ds, lq, v in ((d.lq_truth, d.lq_masks, vols[:2]), (d.test, d.test_lq_masks, vols[2:])):
    for per_slice in _per_id(ds, lq, v).values():
      assert len({b for _, b in per_slice}) == 1   # each cell: in every slice or none
  assert d.effective_rates["omission"] == pytest.approx(0.75, abs=0.2)   # default rate 0.7
  assert pipeline.run_key(dataclasses.replace(cfg, data=pipeline.DataConfig()))["data"][
      "z_consistent"] is False
  assert pipeline.run_key(cfg)["data"]["z_consistent"] is True
  for kw, needle in ((dict(source="folder", data_dir="/x"), "2-D images"),
                     (dict(source="epfl_mito", data_dir="/x"), "per-slice ids"),
                     (dict(others="felzenszwalb"), "felzenszwalb")):
    with pytest.raises(ValueError, match=needle):
      pipeline.DataConfig(z_consistent=True, **kw)
