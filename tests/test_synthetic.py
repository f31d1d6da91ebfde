"""The virtual microscope: determinism, presets, shapes and the cell types."""

import numpy as np
import pytest
import scipy.ndimage as ndi

from upgrade_jax.data import synthetic

SMALL = (16, 96, 96)


def _gen(preset, seed=0, n=2, **kw):
  return synthetic.generate(preset, seed=seed, n_volumes=n, shape=SMALL, **kw)


def test_deterministic_for_a_seed_and_independent_of_n_volumes():
  a, b = _gen("combined_hl60", seed=3, n=2), _gen("combined_hl60", seed=3, n=3)
  for x, y in zip(a, b):  # volume i does not depend on how many come after it
    np.testing.assert_array_equal(x.image, y.image)
    np.testing.assert_array_equal(x.target, y.target)
    np.testing.assert_array_equal(x.others, y.others)
  c = _gen("combined_hl60", seed=4, n=1)
  assert not np.array_equal(a[0].target[:5], c[0].target[:5])


def test_dtypes_shapes_and_empty_slices():
  kept = _gen("combined_granulocytes", keep_empty=True)
  dropped = _gen("combined_granulocytes")
  for k, d in zip(kept, dropped):
    assert k.image.shape == SMALL and k.image.dtype == np.uint16
    assert k.target.dtype == np.int32 and k.others.dtype == np.int32
    has_target = k.target.reshape(SMALL[0], -1).any(axis=1)
    # Dropping keeps exactly the slices with a target, in order.
    np.testing.assert_array_equal(d.image, k.image[has_target])
    np.testing.assert_array_equal(d.target, k.target[has_target])
    assert d.target.reshape(d.num_slices, -1).any(axis=1).all()
  assert any(not k.target.reshape(SMALL[0], -1).any(axis=1).all() for k in kept), \
      "expected some empty slices at the top/bottom of the stack"


def test_presets_assign_target_and_others():
  for preset in ("hl60", "granulocytes"):
    for v in _gen(preset):
      assert v.target.max() > 0 and not v.others.any()
  hl, gr = _gen("combined_hl60", keep_empty=True), _gen("combined_granulocytes",
                                                        keep_empty=True)
  for a, b in zip(hl, gr):  # same seed: same scene, roles swapped
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.target, b.others)
    np.testing.assert_array_equal(a.others, b.target)
    assert a.others.any()
    assert not np.any((a.target > 0) & (a.others > 0))  # disjoint label maps
    assert not set(np.unique(a.target)[1:]) & set(np.unique(a.others)[1:])


def _instances(labels):
  ids, sizes = np.unique(labels[labels > 0], return_counts=True)
  return ids, sizes


def test_type_a_is_larger_and_brighter_but_intensities_overlap():
  vols = synthetic.generate("combined_hl60", seed=2, n_volumes=3, shape=(24, 128, 128),
                            keep_empty=True)
  size_a, size_b, mean_a, mean_b = [], [], [], []
  for v in vols:
    img = v.image.astype(np.float64)
    for labels, sizes, means in ((v.target, size_a, mean_a), (v.others, size_b, mean_b)):
      ids, counts = _instances(labels)
      sizes.extend(counts)
      means.extend(ndi.mean(img, labels, ids))
  assert np.median(size_a) > 3 * np.median(size_b)
  assert np.median(mean_a) > np.median(mean_b)
  # The ranges overlap: some granulocytes are brighter than some HL60 nuclei.
  assert max(mean_b) > min(mean_a)


def test_cross_sections_change_along_z():
  v = _gen("hl60", n=1, keep_empty=True)[0]
  ids, _ = _instances(v.target)
  changes = 0
  for i in ids:
    area = (v.target == i).reshape(SMALL[0], -1).sum(axis=1)
    area = area[area > 0]
    changes += area.max() > 2 * area.min()
  assert changes >= len(ids) // 2


def test_type_b_cells_are_lobed():
  """Granulocyte nuclei are a chain of lobes: less convex than HL60 nuclei."""
  from skimage.measure import regionprops
  vols = synthetic.generate("combined_hl60", seed=2, n_volumes=3, shape=(24, 128, 128),
                            keep_empty=True)
  def solidity(labels):  # 3-D: volume / convex-hull volume
    return [r.solidity for r in regionprops(labels) if r.area >= 50]
  sol_a = sum((solidity(v.target) for v in vols), [])
  sol_b = sum((solidity(v.others) for v in vols), [])
  assert len(sol_a) >= 3 and len(sol_b) >= 3
  assert np.median(sol_a) > 0.85 and np.median(sol_b) < np.median(sol_a) - 0.07


def test_noise_blur_and_background():
  v = _gen("hl60", n=1, keep_empty=True)[0]
  img = v.image.astype(np.float64)
  far = ndi.distance_transform_edt(v.target == 0) > 15
  assert img[far].std() > 5  # read + shot noise
  assert img[far].mean() > 100  # offset + background
  # Blur: intensity just outside a cell is above the far background.
  ring = (ndi.distance_transform_edt(v.target == 0) <= 2) & (v.target == 0)
  assert img[ring].mean() > img[far].mean() + 3 * img[far].std() / np.sqrt(ring.sum())


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown preset"):
    synthetic.generate("nope", seed=0, n_volumes=1)
  with pytest.raises(ValueError, match="unknown simulator parameters"):
    synthetic.generate("hl60", seed=0, n_volumes=1, shape=SMALL, brightnes=2)
  with pytest.raises(ValueError, match="size"):
    synthetic.generate("hl60", seed=0, n_volumes=1, size="huge")
  with pytest.raises(ValueError, match="a_count"):
    synthetic.generate("hl60", seed=0, n_volumes=1, shape=SMALL, a_count=(3, 1))


def test_parameters_change_the_output():
  dim = synthetic.generate("hl60", seed=0, n_volumes=1, shape=SMALL, photons=50.0)[0]
  bright = synthetic.generate("hl60", seed=0, n_volumes=1, shape=SMALL, photons=800.0)[0]
  np.testing.assert_array_equal(dim.target, bright.target)
  assert bright.image[bright.target > 0].mean() > dim.image[dim.target > 0].mean() + 100
  none = synthetic.generate("hl60", seed=0, n_volumes=1, shape=SMALL, a_count=(0, 0),
                            keep_empty=True)[0]
  assert not none.target.any()
  assert synthetic.generate("hl60", seed=0, n_volumes=1, shape=SMALL, a_count=(0, 0))[0] \
      .num_slices == 0


def test_paper_size_option_scales_pixels(monkeypatch):
  seen = {}
  def fake_render(rng, shape, sim):
    seen["shape"], seen["sim"] = shape, sim
    z = np.zeros(shape, np.int32)
    return z.astype(np.uint16), z, z
  monkeypatch.setattr(synthetic, "render_volume", fake_render)
  synthetic.generate("hl60", seed=0, n_volumes=1, size="paper", keep_empty=True)
  assert seen["shape"] == (129, 565, 807) == synthetic.PAPER_SHAPE
  assert seen["sim"].cell_scale == 1.5


def test_preview_cli_writes_png(tmp_path):
  out = tmp_path / "preview.png"
  synthetic.main(["--preset", "combined_granulocytes", "--preview", str(out), "--only"])
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
