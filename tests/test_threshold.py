"""The global-threshold baseline against a brute-force oracle."""

import numpy as np
import pytest

from upgrade_jax.baselines import threshold
from upgrade_jax.data.types import Dataset, concat
from upgrade_jax.metrics import pooled_dice_np


def _dataset(rng, n=3, h=20, w=24, c=1, extents=None):
  targets = np.zeros((n, h, w), np.int32)
  images = rng.random((n, h, w, c)).astype(np.float32) * 0.6
  for i in range(n):
    y, x = rng.integers(2, h - 8), rng.integers(2, w - 8)
    targets[i, y:y + 6, x:x + 6] = 1
    images[i, y:y + 6, x:x + 6] += 0.4  # brighter objects, overlapping noise
  if extents is None:
    extents = np.tile([h, w], (n, 1))
  return Dataset(images, targets, np.zeros_like(targets), np.asarray(extents, np.int32),
                 tuple(f"s{i}" for i in range(n)))


def _brute_force(ds, thresholds, polarity="bright"):
  valid = ds.valid_mask()
  inten = ds.images.mean(axis=-1).astype(np.float64)
  pred = (lambda t: inten >= t) if polarity == "bright" else (lambda t: inten < t)
  return np.array([pooled_dice_np(pred(t), ds.targets, valid) for t in thresholds])


def test_dice_per_threshold_matches_brute_force():
  rng = np.random.default_rng(0)
  ds = _dataset(rng, extents=[[20, 24], [15, 24], [20, 10]], c=3)
  # Padding pixels get huge values: they must not count.
  ds.images[1, 15:] = 5.0
  top = ds.images.mean(axis=-1)[ds.valid_mask()].max()
  cands = threshold.threshold_candidates(top)
  assert len(cands) == 101 and cands[0] == 0 and cands[-1] == pytest.approx(top)
  np.testing.assert_allclose(threshold.dice_per_threshold(ds, cands), _brute_force(ds, cands))
  # Thresholds equal to pixel values exactly (>= counts them as foreground).
  vals = np.unique(ds.images.mean(axis=-1)[ds.valid_mask()])[::37]
  np.testing.assert_allclose(threshold.dice_per_threshold(ds, vals), _brute_force(ds, vals))
  for t in (cands, vals):   # dark objects: foreground is intensity < t
    np.testing.assert_allclose(threshold.dice_per_threshold(ds, t, "dark"),
                               _brute_force(ds, t, "dark"))


def test_best_threshold_and_apply():
  rng = np.random.default_rng(1)
  train, test = _dataset(rng, n=4), _dataset(rng, n=3, extents=[[20, 24], [18, 20], [20, 24]])
  t, frac, train_dice, polarity = threshold.best_threshold(train)
  top = train.images.max()
  oracle = _brute_force(train, threshold.threshold_candidates(top))
  assert train_dice == pytest.approx(oracle.max()) and polarity == "bright"
  assert frac == pytest.approx(np.argmax(oracle) / 100) and t == pytest.approx(frac * top)
  assert 0.4 < frac < 0.8  # between the noise and the objects
  result = threshold.fit_and_evaluate(train, test)
  pred = threshold.apply_threshold(test, result.threshold)
  assert not pred[~test.valid_mask()].any()
  assert result.test_dice == pytest.approx(
      pooled_dice_np(test.images[..., 0] >= result.threshold, test.targets,
                     test.valid_mask()))
  assert result.test_dice > 0.6


def test_separable_data_gives_dice_one():
  targets = np.zeros((2, 8, 8), np.int32)
  targets[:, 2:5, 2:5] = 1
  images = np.where(targets > 0, 0.9, 0.1).astype(np.float32)[..., None]
  ds = Dataset(images, targets, np.zeros_like(targets), np.full((2, 2), 8, np.int32),
               ("a", "b"))
  result = threshold.fit_and_evaluate(ds, ds)
  assert result.train_dice == 1.0 and result.test_dice == 1.0
  assert 0.1 < result.threshold <= 0.9


def test_dark_objects_pick_the_dark_polarity():
  """EM: objects darker than their surround. The paper's >= rule can only
  mark everything (t = 0); the dark polarity separates them, on train and
  test, and the paper's rule alone is still available."""
  rng = np.random.default_rng(3)
  bright_train, bright_test = _dataset(rng, n=4), _dataset(rng, n=3)
  invert = lambda d: d.replace(images=(1.0 - d.images).astype(np.float32))  # noqa: E731
  train, test = invert(bright_train), invert(bright_test)
  result = threshold.fit_and_evaluate(train, test)
  assert result.polarity == "dark"
  top = train.images.max()
  oracle = _brute_force(train, threshold.threshold_candidates(top), "dark")
  assert result.train_dice == pytest.approx(oracle.max())
  pred = threshold.apply_threshold(test, result.threshold, "dark")
  assert result.test_dice == pytest.approx(
      pooled_dice_np(test.images[..., 0] < result.threshold, test.targets, test.valid_mask()))
  assert result.test_dice > 0.6 and not pred[~test.valid_mask()].any()
  paper = threshold.fit_and_evaluate(train, test, polarities=("bright",))
  assert paper.polarity == "bright" and paper.test_dice < result.test_dice - 0.3
  # On bright objects the choice is the paper's baseline exactly.
  assert threshold.fit_and_evaluate(bright_train, bright_test) == threshold.fit_and_evaluate(
      bright_train, bright_test, polarities=("bright",))


def test_errors():
  rng = np.random.default_rng(2)
  ds = _dataset(rng)
  with pytest.raises(ValueError, match="empty"):
    threshold.best_threshold(ds.subset(np.zeros(0, int)))
  with pytest.raises(ValueError, match="increasing"):
    threshold.dice_per_threshold(ds, [0.5, 0.2])
  with pytest.raises(ValueError, match="polarity"):
    threshold.apply_threshold(ds, 0.5, "inverted")


# ---------------------------------------------------------------- numbers a scientist can trust

def _two_slice_volume(name):
  """Slice A: bright cells (1000) on a grey background (120). Slice B: dim
  cells (300) on background 100 beside a tiny very bright non-cell (3000).
  One raw threshold separates both; after dividing each slice by its own
  max, A's background (0.12) is brighter than B's cells (0.10)."""
  from upgrade_jax.data.types import Volume
  img = np.zeros((2, 16, 16), np.uint16)
  tgt = np.zeros((2, 16, 16), np.int32)
  img[0] = 120
  img[0, 2:6, 2:6] = 1000
  tgt[0, 2:6, 2:6] = 1
  img[1] = 100
  img[1, 8:12, 8:12] = 300
  tgt[1, 8:12, 8:12] = 1
  img[1, 0:2, 14:16] = 3000
  return Volume(img, tgt, np.zeros_like(tgt), name=name)


def test_pipeline_threshold_is_one_global_threshold_on_raw_intensities():
  # Under the paper's max normalisation the baseline thresholds raw intensities.
  from upgrade_jax import pipeline
  cfg = pipeline.PipelineConfig(data=pipeline.DataConfig(n_hq=4, normalisation="max"),
                                scenarios=())
  assert pipeline.stages.threshold_intensities(cfg) == "raw"
  volumes = ([_two_slice_volume("a"), _two_slice_volume("b")], [_two_slice_volume("t")])
  data = pipeline.prepare_rep(cfg, volumes, seed=0)
  assert data.hq_train.normalised().max() <= 1.0   # the networks still see normalised images
  result = pipeline.threshold_baseline(cfg, volumes, data)
  # Hand count on the test volume: both cells found (TP 32), the 2×2 bright
  # non-cell is the only error (FP 4); the lowest threshold above 120 is 5%
  # of the raw max 3000 (150).
  assert result.fraction == pytest.approx(0.05)
  assert result.threshold == pytest.approx(150.0)
  assert result.test_dice == pytest.approx(2 * 32 / (2 * 32 + 4))
  # The per-image-normalised search (the old baseline) cannot do this well.
  test = pipeline.prepare_rep(cfg, volumes, seed=0).test
  assert threshold.fit_and_evaluate(concat([data.hq_train, data.hq_val]),
                                    test).test_dice < 0.9


def test_pipeline_threshold_reads_percentile_normalised_images_by_default():
  # The default (percentile) normalisation: the baseline thresholds the same
  # percentile-normalised images the networks read (StarDist's inputs), one
  # global threshold on them.
  from upgrade_jax import pipeline
  from upgrade_jax.data import stacking
  cfg = pipeline.PipelineConfig(data=pipeline.DataConfig(n_hq=4), scenarios=())
  assert pipeline.stages.threshold_intensities(cfg) == "percentile"
  volumes = ([_two_slice_volume("a"), _two_slice_volume("b")], [_two_slice_volume("t")])
  data = pipeline.prepare_rep(cfg, volumes, seed=0)
  result = pipeline.threshold_baseline(cfg, volumes, data)
  hq = stacking.volumes_to_dataset(volumes[0], normalisation="percentile")
  test = stacking.volumes_to_dataset(volumes[1], normalisation="percentile")
  ref = threshold.fit_and_evaluate(hq, test)
  assert (result.threshold, result.test_dice) == pytest.approx((ref.threshold, ref.test_dice))
