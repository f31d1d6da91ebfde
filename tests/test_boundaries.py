"""The upgrade task with boundaries: cell codes, interior-seeded instances,
and a model of three classes trained, saved, loaded and applied."""

import jax
import numpy as np
import pytest
import scipy.ndimage as ndi

from conftest import toy_discs
from upgrade_jax import engine, export, instances
from upgrade_jax.engine.tasks import cell_codes
from upgrade_jax.engine.tiling import TileConfig
from upgrade_jax.perturb import PerturbConfig

CROSS = ndi.generate_binary_structure(2, 1)


def _codes_oracle(ids):
  """Boundary = a cell pixel whose 4-neighbourhood (image border: itself)
  holds another value, via scipy's grey max/min filters."""
  hi = ndi.maximum_filter(ids, footprint=CROSS, mode="nearest")
  lo = ndi.minimum_filter(ids, footprint=CROSS, mode="nearest")
  return np.where(ids > 0, np.where((hi != ids) | (lo != ids), 2, 1), 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cell_codes_match_scipy(seed):
  rng = np.random.default_rng(seed)
  ids = ndi.label(rng.random((3, 23, 31)) > 0.45)[0]          # ragged, touching the border
  ids = np.where(rng.random(ids.shape) > 0.9, ids + 1, ids)   # touching ids inside cells
  got = np.asarray(cell_codes(ids.astype(np.int32)))
  want = np.stack([_codes_oracle(x) for x in ids])
  np.testing.assert_array_equal(got, want)


def test_touching_cells_split_on_their_interiors():
  mask = np.zeros((20, 30), bool)
  mask[4:14, 3:13] = mask[4:14, 13:23] = True           # two touching squares
  mask[16:20, 25:29] = True                             # 16 px with no interior: a cell
  mask[1, 28] = True                                    # a 1-px speck
  interior = np.zeros(mask.shape, np.float32)
  interior[6:12, 5:11] = interior[6:12, 15:21] = 0.9
  interior[17, 26] = 0.9                                # one pixel: below min_seed
  lab = instances.instances_from_interiors(mask, interior)
  assert lab.max() == 3
  assert len(np.unique(lab[4:14, 3:13])) == 1 and len(np.unique(lab[4:14, 13:23])) == 1
  assert lab[5, 5] != lab[5, 20] and lab[1, 28] == 0    # the speck is dropped
  assert (lab > 0).sum() == mask.sum() - 1              # every other mask pixel in one instance
  assert instances.instances_from_interiors(mask, interior, min_unseeded=1).max() == 4
  # Components would merge the squares; labels_from_mask routes by `interior`.
  assert instances.components(mask).max() == 3
  np.testing.assert_array_equal(instances.labels_from_mask(mask, None, "instances", interior),
                                lab)
  assert instances.labels_from_mask(mask, None, "mask", interior).max() == 3


def test_a_model_with_boundaries_trains_saves_and_applies(tmp_path):
  train, val = toy_discs(8, seed=0), toy_discs(3, seed=1)
  task = engine.Upgrade(perturb=PerturbConfig(omission_rate=0.5), boundaries=True)
  assert task.num_classes == 3 and engine.Upgrade().num_classes == 2
  cfg = engine.TrainConfig(task=task, widths=(4, 8, 8, 8, 8), crop=32, batch_size=4,
                           max_steps=20, steps_per_epoch=10, log_every=10,
                           checkpoint_every=1000)
  # The pair's target: codes whose foreground is the HQ mask.
  inputs, target = task.pair(jax.random.PRNGKey(0), train.images[:2], train.targets[:2],
                             train.others[:2], max_label=train.max_label,
                             valid=np.ones(train.targets[:2].shape, bool), train=True)
  np.testing.assert_array_equal(np.asarray(target) > 0, train.targets[:2] > 0)
  assert set(np.unique(np.asarray(target))) == {0, 1, 2}
  fit = engine.fit(cfg, train, val, tmp_path / "fit", log=lambda s: None)
  assert 0.0 <= fit.best_val_dice <= 1.0
  up = export.upgrader_from_state(fit.state_best, image_channels=1,
                                  tiling=TileConfig(tile=32, margin=8))
  assert up.model.num_classes == 3
  export.save_upgrader(tmp_path / "model", up)
  back = export.load_upgrader(tmp_path / "model")
  assert back.task == task and back.model.num_classes == 3
  image, lq = train.images[0], train.targets[0]     # 48 px: tiled at 32
  fg, interior = export.sample_maps(back, image, lq)
  assert fg.shape == interior.shape == lq.shape
  assert ((0 <= interior) & (interior <= fg + 1e-6)).all()   # the interior is part of the cell
  mask, labels = export.upgrade_sample(back, image, lq)
  np.testing.assert_array_equal(mask, fg > 0.5)
  np.testing.assert_array_equal(labels, instances.instances_from_interiors(mask, interior))
  probs, maps = export.upgrade_maps(back, train.subset(np.arange(2)), train.targets[:2])
  np.testing.assert_array_equal(probs[0], fg)
  np.testing.assert_array_equal(maps[0], interior)
