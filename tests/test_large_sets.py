"""Training sets larger than a device: compact images
normalised on the device, the streaming placement, and the automatic choice
between them. Each compact or streamed run must train exactly as the
replicated float32 run of the same data (the equivalence the placements
promise), so the assertions are bit-for-bit."""

import functools
import types

import jax
import numpy as np
import pytest

from upgrade_jax import engine as T
from upgrade_jax import parallel
from upgrade_jax.data import stacking
from upgrade_jax.data.types import Dataset, concat
from upgrade_jax.perturb import PerturbConfig

from conftest import toy_discs


def _raw_samples(n, seed, scale=1000):
  """toy_discs as uint16 'source' images, with per-sample brightness so the
  per-image maxima differ."""
  ds = toy_discs(n, seed=seed)
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    gain = rng.uniform(0.5, 2.0)
    img = np.round(np.clip(ds.images[i, ..., 0], 0, None) * scale * gain).astype(np.uint16)
    out.append((img, ds.targets[i], None, f"s{seed}_{i}"))
  return out


@functools.lru_cache(maxsize=None)
def _make_sets(norm):
  train = _raw_samples(16, 0)
  val = _raw_samples(4, 1)
  return (stacking.stack_samples(train, normalisation=norm),
          stacking.stack_samples(train, compact=True, normalisation=norm),
          stacking.stack_samples(val, normalisation=norm))


@pytest.fixture(scope="module", params=["max", "percentile"])
def sets(request):
  """(float train, compact train, float val) from the same uint16 sources,
  under max and percentile normalisation (a division; an affine map)."""
  return _make_sets(request.param)


def test_compact_images_normalise_exactly_as_the_host(sets):
  flt, cmp, _ = sets
  assert cmp.images.dtype == np.uint16 and cmp.compact and not flt.compact
  if cmp.image_offset is None:   # max
    np.testing.assert_array_equal(cmp.image_scale, cmp.images.reshape(16, -1).max(1))
  else:   # percentile: offset the 1st percentile, scale the 1st..99.8th span
    lo, hi = np.percentile(cmp.images.reshape(16, -1).astype(np.float64), (1, 99.8), axis=1)
    np.testing.assert_allclose(cmp.image_offset, lo, rtol=1e-6)
    np.testing.assert_allclose(cmp.image_scale, hi - lo, rtol=1e-6)
  np.testing.assert_array_equal(cmp.normalised(), flt.images)   # bit for bit
  # Subsets and concatenation keep the form; mixing falls back to float32.
  assert cmp.subset([3, 1]).compact
  np.testing.assert_array_equal(cmp.subset([3, 1]).normalised(), flt.images[[3, 1]])
  both = concat([cmp.subset([0]), cmp.subset([5])])
  assert both.compact and both.images.dtype == np.uint16
  mixed = concat([cmp.subset([0]), flt.subset([5])])
  assert not mixed.compact
  np.testing.assert_array_equal(mixed.images, flt.images[[0, 5]])


def test_compact_sets_keep_labels_in_the_smallest_type(sets):
  flt, cmp, _ = sets
  # The same ids either way; a compact set holds them in int8 (< 128 cells a
  # sample), the float form in int32.
  assert flt.targets.dtype == np.int32 and cmp.targets.dtype == np.int8
  assert cmp.others.dtype == np.int8
  np.testing.assert_array_equal(cmp.targets, flt.targets)
  assert 4 * cmp.targets.nbytes == flt.targets.nbytes   # host memory, 1 byte a pixel
  # 500 cells in a sample need int16; the ids survive unchanged.
  yy, xx = np.mgrid[:40, :50]
  many = (yy // 2) * 25 + xx // 2 + 1            # 500 ids, 1..500
  one = [(np.ones((40, 50), np.uint8), many, None, "many")]
  big = stacking.stack_samples(one, compact=True)
  assert big.targets.dtype == np.int16 and big.targets.max() == 500
  np.testing.assert_array_equal(big.targets[0], stacking.stack_samples(one).targets[0])
  # Mixed with an int32 set, the concatenation promotes: no id wraps.
  assert concat([big, cmp.subset([0])]).targets.max() == 500


def test_compact_dataset_is_validated():
  img = np.zeros((2, 4, 4, 1), np.uint8)
  lab = np.zeros((2, 4, 4), np.int32)
  ext = np.full((2, 2), 4, np.int32)
  with pytest.raises(ValueError, match="need an image_scale"):
    Dataset(img, lab, lab, ext, ("a", "b"))
  with pytest.raises(ValueError, match="need no image_scale"):
    Dataset(img.astype(np.float32), lab, lab, ext, ("a", "b"), np.ones(2, np.float32))
  with pytest.raises(ValueError, match="image_scale shape"):
    Dataset(img, lab, lab, ext, ("a", "b"), np.ones(3, np.float32))
  with pytest.raises(ValueError, match="image_offset"):
    Dataset(img.astype(np.float32), lab, lab, ext, ("a", "b"), None, np.ones(2, np.float32))
  with pytest.raises(ValueError, match="one channel"):
    stacking.stack_samples([(np.zeros((4, 4, 3), np.uint8), lab[0], None, "rgb")],
                     normalisation="percentile", channels="rgb", compact=True)
  with pytest.raises(ValueError, match="weighted sum"):
    stacking.stack_samples([(np.zeros((4, 4, 3), np.uint8), lab[0], None, "rgb")], compact=True)


def test_device_bytes_per_pixel(sets):
  flt, cmp, _ = sets
  assert parallel.bytes_per_pixel(flt) == 4 + 1 + 1      # float32 + int8 + int8
  assert parallel.bytes_per_pixel(cmp) == 2 + 1 + 1      # uint16 + int8 + int8
  mesh = parallel.make_mesh()
  placed = parallel.place_dataset(cmp, mesh)
  assert placed.images.dtype == np.uint16 and parallel.bytes_per_pixel(placed) == 4
  assert parallel.dataset_bytes(cmp) == cmp.targets.size * 4


def test_auto_placement_takes_the_first_that_fits(sets, monkeypatch):
  _, cmp, _ = sets
  size = parallel.dataset_bytes(cmp)
  mesh = parallel.make_mesh()
  assert parallel.choose_placement("auto", cmp, mesh) == "replicate"
  four = types.SimpleNamespace(shape={parallel.DATA_AXIS: 4},
                               devices=np.array(jax.devices()[:1] * 4))
  for memory, one, several in ((2 * size, "replicate", "replicate"),   # a copy fits
                               (size, "stream", "shard"),            # a quarter fits
                               (size // 4, "stream", "stream")):     # nothing fits
    monkeypatch.setattr(parallel, "device_memory", lambda d, m=memory: m)
    assert parallel.choose_placement("auto", cmp, mesh) == one
    assert parallel.choose_placement("auto", cmp, four) == several
  assert parallel.choose_placement("replicate", cmp, mesh) == "replicate"
  with pytest.raises(ValueError, match="data_placement"):
    parallel.choose_placement("disk", cmp, mesh)
  with pytest.raises(ValueError, match="data_placement"):
    T.TrainConfig(data_placement="disk")


def _config(task, placement):
  return T.TrainConfig(task=task, widths=(4, 8, 8, 8, 8), crop=32, batch_size=8,
                       max_steps=12, steps_per_epoch=6, log_every=5, checkpoint_every=100,
                       data_placement=placement)


# Each task once and each normalisation once: the normalisation is the
# Dataset's, the crop path the task's, and the two do not meet.
@pytest.mark.parametrize("norm,task", [
    ("max", T.Segment()),
    ("percentile", T.Upgrade(perturb=PerturbConfig(omission_rate=0.5, inclusion_rate=0.0)))],
    ids=["max-segment", "percentile-upgrade"])
def test_compact_and_streamed_sets_train_exactly_as_replicated_float(tmp_path, norm, task):
  """Same parameters, bit for bit, after 12 steps (two epochs, validation,
  an index chunk boundary at step 5): float32 replicated, compact
  replicated, compact streamed. The upgrade task perturbs whole samples
  before cropping, the segment task crops first: both step paths."""
  flt, cmp, val = _make_sets(norm)
  params = {}
  for name, data, placement in (("float", flt, "replicate"), ("compact", cmp, "replicate"),
                                ("streamed", cmp, "stream")):
    lines = []
    fit = T.fit(_config(task, placement), data, val, tmp_path / name, log=lines.append)
    params[name] = jax.device_get(fit.state_last.params)
    assert any("streamed from the host" in s for s in lines) == (placement == "stream")
  for name in ("compact", "streamed"):
    jax.tree.map(np.testing.assert_array_equal, params["float"], params[name])


def test_prediction_refuses_unscaled_compact_images(sets):
  """A compact set's source integers must not reach the network unscaled."""
  _, cmp, val = sets
  state = T.create_train_state(_config(T.Segment(), "replicate"), 1, jax.random.PRNGKey(0),
                               parallel.make_mesh())
  with pytest.raises(ValueError, match="normalised"):
    T.predict(state, cmp.images[:2])
  from upgrade_jax.engine import tiling
  with pytest.raises(ValueError, match="normalised"):
    tiling.predict_image(state.model, state.variables, state.task, cmp.images[0])
  assert T.predict(state, cmp.normalised([0, 1])).shape == (2, 48, 48)
  # A Dataset is predicted a batch at a time, normalised as it goes: the
  # same probabilities as its float32 images in one array (odd N, batch 4).
  part = cmp.subset(list(range(7)))
  whole = T.predict_proba(state, part.normalised(), batch_size=4, extents=part.extents)
  np.testing.assert_array_equal(T.predict_proba(state, part, batch_size=4), whole)


def test_compact_percentile_sets_of_mixed_sizes_keep_zero_padding():
  """Padding is 0 in the float form; the device's (x - low) / span of a
  compact set must not turn it into -low / span (the network sees it)."""
  from upgrade_jax.engine.step import take_samples
  rng = np.random.default_rng(3)
  samples = [(rng.integers(100, 4000, (h, w)).astype(np.uint16), np.ones((h, w), np.int32),
              None, f"s{h}") for h, w in ((40, 24), (32, 48), (48, 48))]
  flt = stacking.stack_samples(samples)
  cmp = stacking.stack_samples(samples, compact=True)
  assert cmp.compact and cmp.image_offset is not None and (cmp.image_offset > 0).all()
  np.testing.assert_array_equal(cmp.normalised(), flt.images)
  mesh = parallel.make_mesh()
  for ds in (cmp, concat([cmp.subset([2]), cmp.subset([0])])):
    batch, _ = jax.jit(take_samples)(parallel.place_dataset(ds, mesh))
    np.testing.assert_array_equal(np.asarray(batch.images), ds.as_float().images)
