"""Tiled, shape-bucketed prediction (engine/tiling.py)."""

import importlib

import jax
import numpy as np
import pytest

from upgrade_jax.engine import TrainConfig, create_train_state
from upgrade_jax.engine.tiling import TileConfig, predict_image, shape_bucket, tile_starts


evaluate = importlib.import_module("upgrade_jax.engine.evaluation")


@pytest.fixture(scope="module")
def state():
  return create_train_state(TrainConfig(widths=(4, 8, 8, 8, 8)), 2, jax.random.PRNGKey(0))


def inputs(h, w, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.random((h, w, 1)).astype(np.float32),
          (rng.random((h, w)) > 0.7).astype(np.int32))


@pytest.mark.parametrize("n,size,margin", [(300, 256, 64), (4096, 1024, 64), (1000, 128, 32),
                                           (257, 256, 0), (100, 128, 8)])
def test_tile_starts_cover_with_context(n, size, margin):
  starts, cuts = tile_starts(n, size, margin)
  assert cuts[0] == 0 and cuts[-1] == n and np.all(np.diff(cuts) > 0)
  assert starts[0] == 0 and starts[-1] + size >= n
  for k in range(len(starts)):
    lo, hi = cuts[k], cuts[k + 1]
    assert starts[k] <= lo and hi <= starts[k] + size       # owned part inside the tile
    if k > 0:
      assert lo - starts[k] >= margin                       # context before
    if k < len(starts) - 1:
      assert starts[k] + size - hi >= margin                # context after


def test_shape_bucket_ladder():
  assert [shape_bucket(n, 4096) for n in (1, 17, 64, 65, 256, 260, 520, 696, 1024, 1272)] == \
      [16, 32, 64, 80, 256, 320, 640, 768, 1024, 1280]
  assert shape_bucket(5000, 1024) == 1024
  for n in range(1, 3000, 7):
    b = shape_bucket(n, 8192)
    assert b >= n and b % 16 == 0 and (n <= 64 or b <= 1.25 * n + 16)


def test_tiles_leave_no_seams(state):
  img, lab = inputs(512, 512)
  whole = predict_image(state.model, state.variables, state.task, img, lab,
                        config=TileConfig(tile=512))
  tiled = predict_image(state.model, state.variables, state.task, img, lab,
                        config=TileConfig(tile=256, margin=64, batch=2))
  # 64 px of context: float noise only. Without a margin, seams show.
  assert np.abs(tiled - whole).max() < 1e-4
  seams = predict_image(state.model, state.variables, state.task, img, lab,
                        config=TileConfig(tile=256, margin=0))
  assert np.abs(seams - whole).max() > 1e-2


def test_mixed_sizes_compile_per_bucket_and_match_predict(state):
  # One image alone = engine.predict on the same padded shape (48 -> 48, 64 -> 64).
  img, lab = inputs(48, 64)
  p = predict_image(state.model, state.variables, state.task, img, lab,
                    config=TileConfig(tile=256))
  ref = evaluate.predict_proba(state, img[None], lab[None], batch_size=1)[0]
  assert p.shape == (48, 64) and np.abs(p - ref).max() < 1e-5
  before = evaluate.forward_probs_fn()._cache_size()
  for h, w in [(100, 90), (110, 95), (97, 85), (300, 300), (280, 310)]:
    out = predict_image(state.model, state.variables, state.task, *inputs(h, w),
                        config=TileConfig(tile=192, margin=32))
    assert out.shape == (h, w) and out.dtype == np.float32
  # (112, 96) for the first three, (192, 192) tiles for the two larger: 2 shapes.
  assert evaluate.forward_probs_fn()._cache_size() - before == 2


def test_tile_config_checks():
  for bad in (dict(tile=100), dict(tile=64, margin=30), dict(batch=0), dict(margin=-1)):
    with pytest.raises(ValueError):
      TileConfig(**bad)


def test_tile_side_shrinks_to_the_tiles_needed():
  from upgrade_jax.engine.tiling import _tile_side
  cfg = TileConfig(tile=1024, margin=64)
  assert _tile_side(2048, cfg) == 768 and _tile_side(4096, cfg) == 1024
  assert _tile_side(300, cfg) == 320   # one tile: the bucket
  for n in range(1025, 9000, 97):
    side = _tile_side(n, cfg)
    assert side <= 1024 and side % 16 == 0
    assert len(tile_starts(n, side, 64)[0]) == len(tile_starts(n, 1024, 64)[0])
