"""Training tiles: `stacking.tile_bounds`, `stack_samples(tile=)` and
`make_splits(train_tile=)` (mixed-size folders without padding to the largest)."""

import numpy as np
import pytest
from scipy import ndimage

from upgrade_jax.data import intensity, sampling, stacking
from upgrade_jax.data.types import Volume


@pytest.mark.parametrize("n, tile, want", [
    (256, 256, [(0, 256)]),
    (320, 256, [(0, 160), (160, 320)]),   # two even halves, not 256 + a sliver of 64
    (260, 256, [(0, 130), (130, 260)]),
    (100, 256, [(0, 100)]),
    (768, 256, [(0, 256), (256, 512), (512, 768)]),
])
def test_tile_bounds_by_hand(n, tile, want):
  assert stacking.tile_bounds(n, tile) == want


@pytest.mark.parametrize("n", [1, 17, 255, 257, 603, 1272])
def test_tile_bounds_cover_the_axis_in_even_pieces(n):
  bounds = stacking.tile_bounds(n, 256)
  sizes = [b - a for a, b in bounds]
  assert bounds[0][0] == 0 and bounds[-1][1] == n
  assert all(a == prev_b for (a, _), (_, prev_b) in zip(bounds[1:], bounds))
  assert len(bounds) == -(-n // 256) and max(sizes) <= 256 and max(sizes) - min(sizes) <= 1


def _sample(h, w, seed, dtype=np.uint8):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 200, (h, w)).astype(dtype)
  target = np.zeros((h, w), np.int32)
  for i, (y, x) in enumerate(rng.integers(10, (h - 10, w - 10), (6, 2)), 1):
    target[max(0, y - 8):y + 8, max(0, x - 8):x + 8] = i
  return image, target, None, f"s{seed}"


@pytest.mark.parametrize("compact", [False, True])
def test_tiles_are_the_whole_image_normalised_then_cut(compact):
  samples = [_sample(300, 200, 0), _sample(120, 90, 1)]
  whole = stacking.stack_samples(samples, compact=compact)
  tiled = stacking.stack_samples(samples, compact=compact, tile=128)
  # 300×200 -> 3×2 tiles of 100×100; 120×90 stays one sample.
  assert tiled.names == tuple(f"s0@{y},{x}" for y in (0, 100, 200) for x in (0, 100)) + ("s1",)
  assert tiled.targets.shape == (7, 120, 100)
  np.testing.assert_array_equal(tiled.extents, [[100, 100]] * 6 + [[120, 90]])
  full, parts = whole.normalised(), tiled.normalised()
  for k, (y, x) in enumerate((y, x) for y in (0, 100, 200) for x in (0, 100)):
    # The image's own percentiles, not the tile's: bit for bit the whole image's pixels.
    np.testing.assert_array_equal(parts[k, :100, :100], full[0, y:y + 100, x:x + 100])
    assert not parts[k, 100:].any() and not parts[k, :, 100:].any()   # zero padding
    # Labels: the same foreground, ids 1..n in the tile, one id per connected piece
    # of an object (an object cut by the tile edge is two objects).
    tile, truth = tiled.targets[k, :100, :100], whole.targets[0, y:y + 100, x:x + 100]
    np.testing.assert_array_equal(tile > 0, truth > 0)
    ids = np.unique(tile[tile > 0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert len(ids) == len(np.unique(truth[truth > 0]))
    for i in ids:   # each tile id is exactly one original object's part
      assert len(np.unique(truth[tile == i])) == 1
  np.testing.assert_array_equal(parts[6], full[1, :120, :100])
  if compact:   # every tile carries its image's affine
    np.testing.assert_array_equal(tiled.image_scale, [whole.image_scale[0]] * 6
                                  + [whole.image_scale[1]])
  # The memory the tiles exist for: 7 × 120 × 100 px instead of 2 × 300 × 200.
  assert tiled.targets.size < whole.targets.size


def _volumes(sizes):
  vols = []
  for i, (h, w) in enumerate(sizes):
    image, target, _, _ = _sample(h, w, i)
    vols.append(Volume(image[None], target[None], np.zeros((1, h, w), np.int32), f"img{i}"))
  return vols


def test_make_splits_tiles_training_slices_only_after_a_split_of_whole_slices():
  train = _volumes([(300, 300), (64, 64), (200, 260), (64, 80), (300, 64), (90, 90)])
  test = _volumes([(400, 300), (64, 64)])
  plain = sampling.make_splits(train, test, n_hq=5, seed=3)
  tiled = sampling.make_splits(train, test, n_hq=5, seed=3, train_tile=128)
  base = lambda names: {n.split("@")[0] for n in names}  # noqa: E731
  # The train/validation split is one of whole slices, the same as without tiles.
  assert base(tiled.hq_train.names) == set(plain.hq_train.names)
  assert base(tiled.hq_val.names) == set(plain.hq_val.names)
  assert base(tiled.lq_truth.names) == set(plain.lq_truth.names)
  assert max(tiled.hq_train.targets.shape[1:]) <= 128
  # The test set stays whole, bit for bit.
  assert tiled.test.names == plain.test.names
  np.testing.assert_array_equal(tiled.test.images, plain.test.images)
  np.testing.assert_array_equal(tiled.test.targets, plain.test.targets)
  # Every labelled pixel of the LQ slices is still there, once.
  fg = lambda ds: int((ds.targets > 0).sum())  # noqa: E731
  assert fg(tiled.lq_truth) == fg(plain.lq_truth)
  # A cut object is counted once per piece, never merged with another.
  n_objects = lambda ds: sum(int(ndimage.label(t > 0)[1]) for t in ds.targets)  # noqa: E731
  assert n_objects(tiled.lq_truth) >= n_objects(plain.lq_truth)


def test_train_tile_is_checked_against_the_crops():
  from upgrade_jax import engine
  from upgrade_jax.pipeline import DataConfig, PipelineConfig
  from upgrade_jax.pipeline.config import run_key
  seg = engine.TrainConfig(task=engine.Segment(), crop=64)
  up = engine.TrainConfig(task=engine.Upgrade(), crop=96)
  with pytest.raises(ValueError, match="--train_tile=64 is smaller than the training crop 96"):
    PipelineConfig(data=DataConfig(train_tile=64), upgrade=up, segment=seg)
  with pytest.raises(ValueError, match="--train_tile=8 must be at least 16"):
    DataConfig(train_tile=8)
  # train_tile joined the run key after runs were recorded: absent when unset.
  assert "train_tile" not in run_key(PipelineConfig(upgrade=up, segment=seg))["data"]
  key = run_key(PipelineConfig(data=DataConfig(train_tile=128), upgrade=up, segment=seg))
  assert key["data"]["train_tile"] == 128


def test_percentiles_of_a_tile_are_its_image():
  image, target, _, _ = _sample(300, 40, 5)
  image[:150] //= 4   # a dim top half: its own percentiles would stretch it
  tiled = stacking.stack_samples([(image, target, None, "x")], tile=150)
  np.testing.assert_allclose(tiled.normalised()[0, :150, :40, 0],
                             intensity.normalise(image)[:150], rtol=0, atol=0)


def test_a_tiled_run_prepares_its_sets_and_thresholds_as_untiled():
  # Through the pipeline: prepare_rep tiles the HQ and LQ slices, and the threshold
  # baseline (pooled over the HQ pixels, scored on the whole test slices) finds the same
  # threshold on tiles as on whole slices.
  from upgrade_jax import engine, pipeline
  train = _volumes([(100, 90), (64, 64), (80, 120), (70, 64), (90, 90), (64, 100)])
  test = _volumes([(100, 100), (64, 64)])
  nets = dict(upgrade=engine.TrainConfig(task=engine.Upgrade(), crop=32),
              segment=engine.TrainConfig(task=engine.Segment(), crop=32))
  cfg = lambda tile: pipeline.PipelineConfig(  # noqa: E731
      data=pipeline.DataConfig(n_hq=4, train_tile=tile), scenarios=(), **nets)
  plain = pipeline.prepare_rep(cfg(None), (train, test), seed=0)
  tiled = pipeline.prepare_rep(cfg(48), (train, test), seed=0)
  assert max(tiled.hq_train.targets.shape[1:]) <= 48 and len(tiled.lq_masks) > len(plain.lq_masks)
  assert tiled.test.names == plain.test.names and len(tiled.test_lq_masks) == len(plain.test)
  a = pipeline.threshold_baseline(cfg(None), (train, test), plain)
  b = pipeline.threshold_baseline(cfg(48), (train, test), tiled)
  assert (a.fraction, a.threshold, a.test_dice) == (b.fraction, b.threshold, b.test_dice)
