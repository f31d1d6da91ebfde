"""Reading, validation, atomic writing and the source adapters."""

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from upgrade_jax import files, rundir
from upgrade_jax.data import intensity, io, stacking
from upgrade_jax.data.types import Volume

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _pair(root, name, image, labels, others=None):
  for sub in ("images", "labels") + (("others",) if others is not None else ()):
    (root / sub).mkdir(exist_ok=True)
  tifffile.imwrite(root / "images" / f"{name}.tif", image)
  tifffile.imwrite(root / "labels" / f"{name}.tif", labels)
  if others is not None:
    tifffile.imwrite(root / "others" / f"{name}.tif", others)


def _labels(shape, ids=(5, 9)):
  lab = np.zeros(shape, np.uint16)
  lab[1:3, 1:3] = ids[0]
  lab[-3:-1, -3:-1] = ids[1]
  return lab


def test_folder_reads_grey_rgb_and_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  _pair(tmp_path, "a", rng.integers(0, 255, (8, 10)).astype(np.uint8), _labels((8, 10)))
  _pair(tmp_path, "b", rng.integers(0, 60000, (12, 6, 3)).astype(np.uint16),
        _labels((12, 6)), others=None)
  _pair(tmp_path, "c", rng.random((8, 8)).astype(np.float32), _labels((8, 8)))
  vols = io.folder(tmp_path / "images", tmp_path / "labels")
  assert [v.name for v in vols] == ["a", "b", "c"]
  assert vols[0].image.shape == (1, 8, 10) and vols[1].image.shape == (1, 12, 6, 3)
  assert vols[1].target.dtype == np.int32 and not vols[1].others.any()
  ds = stacking.volumes_to_dataset(vols, normalisation="max")
  assert ds.images.shape == (3, 12, 10, 1) and ds.images.dtype == np.float32
  np.testing.assert_array_equal(ds.extents, [[8, 10], [12, 6], [8, 8]])
  # Padding is zero; labels are relabelled 1..n; max normalisation per image.
  assert not ds.images[0, 8:].any() and not ds.targets[1, :, 6:].any()
  assert sorted(np.unique(ds.targets[0])) == [0, 1, 2]
  for i in range(3):
    assert ds.images[i].max() == pytest.approx(1.0)
  # RGB -> grey with the luma weights, then max-normalised.
  rgb = vols[1].image[0].astype(np.float64)
  grey = rgb @ [0.299, 0.587, 0.114]
  np.testing.assert_allclose(ds.images[1, :12, :6, 0], grey / grey.max(), rtol=1e-5)
  ds_rgb = stacking.volumes_to_dataset(vols, channels="rgb")
  assert ds_rgb.channels == 3
  np.testing.assert_allclose(ds_rgb.images[0, ..., 0], ds_rgb.images[0, ..., 2])


def test_folder_with_others_and_png(tmp_path):
  import skimage.io
  (tmp_path / "images").mkdir()
  skimage.io.imsave(tmp_path / "images" / "x.png", np.full((6, 7), 200, np.uint8),
                    check_contrast=False)
  (tmp_path / "labels").mkdir()
  tifffile.imwrite(tmp_path / "labels" / "x.tif", _labels((6, 7)))
  (tmp_path / "others").mkdir()
  tifffile.imwrite(tmp_path / "others" / "x.tif", _labels((6, 7), ids=(2, 4)))
  (v,) = io.folder(images_dir=tmp_path / "images",
                        labels_dir=tmp_path / "labels", others_dir=tmp_path / "others")
  assert v.image.shape == (1, 6, 7) and sorted(np.unique(v.others)) == [0, 2, 4]


def test_validation_errors(tmp_path):
  img, lab = np.zeros((6, 6), np.uint8), _labels((6, 6))
  _pair(tmp_path, "a", img, lab)
  (tmp_path / "images" / "b.tif").write_bytes(b"")
  tifffile.imwrite(tmp_path / "images" / "b.tif", img)
  with pytest.raises(ValueError, match=r"have no label file .*b\.tif"):
    io.folder(tmp_path / "images", tmp_path / "labels")
  os.remove(tmp_path / "images" / "b.tif")
  tifffile.imwrite(tmp_path / "labels" / "c.tif", lab)
  with pytest.raises(ValueError, match=r"have no image .*c\.tif"):
    io.folder(tmp_path / "images", tmp_path / "labels")
  os.remove(tmp_path / "labels" / "c.tif")
  tifffile.imwrite(tmp_path / "labels" / "a.tif", _labels((6, 5)))
  with pytest.raises(ValueError, match=r"a\.tif.*shape \(6, 6\).*\(6, 5\)"):
    io.folder(tmp_path / "images", tmp_path / "labels")
  tifffile.imwrite(tmp_path / "labels" / "a.tif", lab.astype(np.float32) + 0.5)
  with pytest.raises(ValueError, match=r"a\.tif: labels must be integer ids"):
    io.folder(tmp_path / "images", tmp_path / "labels")
  tifffile.imwrite(tmp_path / "labels" / "a.tif", lab.astype(np.int16) - 1)
  with pytest.raises(ValueError, match=r"a\.tif: labels must be >= 0, found -1"):
    io.folder(tmp_path / "images", tmp_path / "labels")
  # Integral floats are accepted (some tools save labels as float32).
  tifffile.imwrite(tmp_path / "labels" / "a.tif", lab.astype(np.float32))
  assert io.folder(tmp_path / "images", tmp_path / "labels")[0].target.max() == 9
  (tmp_path / "images" / "a.tif").write_bytes(b"this is not a tiff")
  with pytest.raises(ValueError, match=r"cannot read .*a\.tif"):
    io.folder(tmp_path / "images", tmp_path / "labels")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"images folder .*empty.* is empty"):
    io.folder(tmp_path / "empty", tmp_path / "labels")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    io.folder(tmp_path / "nope", tmp_path / "labels")


def test_stack_reads_volumes_with_channels(tmp_path):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 4000, (4, 9, 8, 3)).astype(np.uint16)
  labels = np.stack([_labels((9, 8))] * 4)
  tifffile.imwrite(tmp_path / "img.tif", image, photometric="rgb")
  tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
  (v,) = io.stack(tmp_path / "img.tif", tmp_path / "lab.tif")
  assert v.image.shape == (4, 9, 8, 3) and v.target.shape == (4, 9, 8)
  tifffile.imwrite(tmp_path / "grey.tif", image[..., 0], photometric="minisblack")
  (g,) = io.stack(image_path=tmp_path / "grey.tif",
                        label_path=tmp_path / "lab.tif")
  assert g.image.shape == (4, 9, 8)
  (two,) = io.stack(tmp_path / "img.tif", tmp_path / "lab.tif", slices=[3, 1])
  np.testing.assert_array_equal(two.image, image[[3, 1]])
  np.testing.assert_array_equal(two.target, labels[[3, 1]])
  with pytest.raises(ValueError, match=r"slices \[7\] out of range"):
    io.stack(tmp_path / "img.tif", tmp_path / "lab.tif", slices=[7])
  tifffile.imwrite(tmp_path / "short.tif", labels[:3], photometric="minisblack")
  with pytest.raises(ValueError, match=r"img\.tif vs .*short\.tif"):
    io.stack(tmp_path / "img.tif", tmp_path / "short.tif")


def test_normalise():
  img = np.array([[0, 50], [100, 200]], np.uint16)
  np.testing.assert_allclose(intensity.normalise(img, "max"), img / 200.0)
  assert not intensity.normalise(np.zeros((3, 3), np.uint8), "max").any()
  assert not intensity.normalise(np.zeros((3, 3), np.uint8)).any()   # flat: 0, not inf
  ramp = np.arange(1000, dtype=np.float32)
  p = intensity.normalise(ramp, "percentile", percentiles=(10, 90))
  lo, hi = np.percentile(ramp, (10, 90))
  # Not clipped (csbdeep's normalize): the tails stay below 0 and above 1.
  np.testing.assert_allclose(p, (ramp - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
  assert p.dtype == np.float32 and p.min() < 0 and p.max() > 1
  raw = intensity.normalise(img, "none")
  assert raw.dtype == np.float32 and raw.max() == 200
  with pytest.raises(ValueError, match="normalisation"):
    intensity.normalise(img, "zscore")


def test_volume_normalisation_divides_by_the_volume_max():
  # Two volumes; the first one's dim slice 0 must keep its volume's scale.
  img = np.array([[[10, 20], [0, 40]], [[100, 200], [50, 0]]], np.uint16)   # (2, 2, 2)
  lab = np.zeros((2, 2, 2), np.int32)
  vols = [Volume(img, lab, lab, "a"), Volume(img * 3, lab, lab, "b")]
  ds = stacking.volumes_to_dataset(vols, [(0, 0), (0, 1), (1, 0)], normalisation="volume")
  np.testing.assert_allclose(ds.images[0, ..., 0], img[0] / 200.0)   # not / 40
  np.testing.assert_allclose(ds.images[1, ..., 0], img[1] / 200.0)
  np.testing.assert_allclose(ds.images[2, ..., 0], img[0] * 3 / 600.0)
  per_image = stacking.volumes_to_dataset(vols, [(0, 0)], normalisation="max")
  np.testing.assert_allclose(per_image.images[0, ..., 0], img[0] / 40.0)
  # RGB volumes: the scale is taken after the channel policy (luma).
  rgb = np.stack([img, img, img], -1)
  grey = stacking.volumes_to_dataset([Volume(rgb, lab, lab, "c")], normalisation="volume")
  np.testing.assert_allclose(grey.images[..., 0], img / 200.0, rtol=1e-5)
  # One image is a one-slice volume; an all-zero volume stays zero.
  np.testing.assert_allclose(intensity.normalise(img[0], "volume"), intensity.normalise(img[0], "max"))
  zero = stacking.volumes_to_dataset([Volume(img * 0, lab, lab, "z")], normalisation="volume")
  assert not zero.images.any()


def test_write_labels_atomic_and_refuses_inputs(tmp_path):
  lab = _labels((5, 5)).astype(np.int32)
  out = io.write_labels(tmp_path / "out.tif", lab)
  np.testing.assert_array_equal(tifffile.imread(out), lab)
  assert tifffile.imread(out).dtype == np.uint16
  big = lab * 10000
  np.testing.assert_array_equal(tifffile.imread(io.write_labels(out, big)), big)
  src = tmp_path / "labels.tif"
  tifffile.imwrite(src, lab)
  before = src.read_bytes()
  guard = rundir.InputGuard([tmp_path / "x.tif", src])
  with pytest.raises(rundir.InputError, match="refusing to write"):
    io.write_labels(src, lab + 1, guard=guard)
  link = tmp_path / "alias.tif"
  os.symlink(src, link)
  with pytest.raises(rundir.InputError, match="same file as an input"):
    io.write_labels(link, lab, guard=rundir.InputGuard([src]))
  hard = tmp_path / "hard.tif"  # a hard link is the same inode under another name
  os.link(src, hard)
  with pytest.raises(rundir.InputError, match="same file as an input"):
    io.write_labels(hard, lab, guard=rundir.InputGuard([src]))
  folder = tmp_path / "in"
  folder.mkdir()
  with pytest.raises(rundir.InputError, match="inside"):
    io.write_labels(folder / "new.tif", lab, guard=rundir.InputGuard([folder]))
  assert src.read_bytes() == before and not (folder / "new.tif").exists()
  with pytest.raises(ValueError, match="labels must be >= 0"):
    io.write_labels(tmp_path / "neg.tif", lab - 1)
  assert not (tmp_path / "neg.tif").exists()


def test_write_labels_leaves_nothing_on_failure(tmp_path, monkeypatch):
  old = np.ones((3, 3), np.uint16)
  io.write_labels(tmp_path / "keep.tif", old)
  def boom(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(tifffile, "imwrite", boom)
  with pytest.raises(OSError, match="disk full"):
    io.write_labels(tmp_path / "keep.tif", old * 2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tif"]  # no temp file
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "keep.tif"), old)


def test_stack_samples_checks():
  img = np.zeros((4, 4))
  with pytest.raises(ValueError, match="no samples"):
    stacking.stack_samples([])
  with pytest.raises(ValueError, match="s1: others shape"):
    stacking.stack_samples([(img, np.zeros((4, 4), int), np.zeros((3, 4), int), "s1")])
  with pytest.raises(ValueError, match=r"s2: image shape \(4, 4\) does not match"):
    stacking.stack_samples([(img, np.zeros((4, 5), int), None, "s2")])


def test_synthetic_source():
  vols = io.synthetic(preset="hl60", seed=0, n_volumes=1, shape=(8, 64, 64))
  assert isinstance(vols[0], Volume) and vols[0].image.dtype == np.uint16


@pytest.mark.shared_data
def test_reads_shared_epfl_mito():
  root = SHARED / "epfl_mito"
  if not root.is_dir():
    pytest.skip(f"{root} not present")
  for split in ("train", "test"):
    (v,) = io.epfl_mito(root=root, split=split, slices=[0, 27])
    assert v.image.dtype == np.uint8 and v.image.shape == (2, 768, 1024)
    assert v.target.shape == v.image.shape and v.target.max() > 0
  ds = stacking.volumes_to_dataset([v])
  assert ds.images.shape == (2, 768, 1024, 1) and ds.targets.max() >= 5
  full = tifffile.imread(root / "test" / "labels.tif", key=27)
  np.testing.assert_array_equal(v.target[1], full)


@pytest.mark.shared_data
def test_reads_shared_dsb2018():
  root = SHARED / "dsb2018"
  if not root.is_dir():
    pytest.skip(f"{root} not present")
  stems = sorted(p.stem for p in (root / "images").iterdir())
  picks = stems[:4]
  for stem in stems:  # include one RGB image if there is one
    if tifffile.imread(root / "images" / f"{stem}.tif").ndim == 3:
      picks.append(stem)
      break
  vols = io.folder(root / "images", root / "labels", names=picks)
  assert any(v.image.ndim == 4 for v in vols)  # an RGB image (1, H, W, 3)
  ds = stacking.volumes_to_dataset(vols)
  assert ds.channels == 1 and len(ds) == len(picks)
  assert all(ds.targets[i].max() >= 1 for i in range(len(ds)))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
  # mkstemp makes 0600 files; outputs must be as readable as open() would make them.
  old = os.umask(umask)
  try:
    a = io.write_labels(tmp_path / "a.tif", np.ones((4, 4), np.int32))
    b = files.write_text(tmp_path / "b.json", "{}")
  finally:
    os.umask(old)
  assert a.stat().st_mode & 0o777 == mode
  assert b.stat().st_mode & 0o777 == mode


def test_volume_normalisation_through_the_splits_compact_and_float():
  """make_splits with normalisation="volume": every slice divided by its own
  volume's max (raw), the same in the compact and the float32 form."""
  from upgrade_jax.data import sampling
  vols = io.synthetic("hl60", seed=0, n_volumes=3, shape=(6, 96, 96))
  tops = {v.name: float(v.image.max()) for v in vols}
  kw = dict(n_hq=2, seed=0, normalisation="volume")
  flt = sampling.make_splits(vols[1:], vols[:1], **kw)
  cmp = sampling.make_splits(vols[1:], vols[:1], compact="auto", **kw)
  for a, b in ((flt.lq_truth, cmp.lq_truth), (flt.test, cmp.test), (flt.hq_train, cmp.hq_train)):
    assert b.compact and not a.compact
    np.testing.assert_array_equal(b.normalised(), a.images)
    want = [tops[n.rsplit("_z", 1)[0]] for n in b.names]
    np.testing.assert_array_equal(b.image_scale, np.float32(want))
  # A volume's dimmest slices stay dim (not stretched to 1 as per-image max would).
  per_slice_max = cmp.lq_truth.normalised().reshape(len(cmp.lq_truth), -1).max(1)
  assert per_slice_max.max() == 1.0 and per_slice_max.min() < 0.999


def test_percentile_normalisation_is_csbdeeps_normalize():
  # The field's convention (StarDist, Cellpose): csbdeep.utils.normalize(x, 1, 99.8),
  # each channel on its own (axis=(0, 1)), no clipping.
  csbdeep = pytest.importorskip("csbdeep.utils")
  rng = np.random.default_rng(0)
  grey = rng.gamma(2.0, 300.0, (64, 48)).astype(np.uint16)
  rgb = rng.integers(0, 255, (40, 30, 3)).astype(np.uint8)
  assert intensity.PERCENTILES == (1.0, 99.8)
  np.testing.assert_allclose(intensity.normalise(grey), csbdeep.normalize(grey, 1, 99.8),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(intensity.normalise(rgb), csbdeep.normalize(rgb, 1, 99.8, axis=(0, 1)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(intensity.normalise(grey, percentiles=(3, 99)),
                             csbdeep.normalize(grey, 3, 99), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="percentiles"):
    intensity.normalise(grey, percentiles=(99, 1))


def test_percentile_default_in_datasets_and_configs():
  from upgrade_jax.pipeline import DataConfig, run_key, PipelineConfig
  img = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
  lab = np.zeros((64, 64), np.int32)
  ds = stacking.stack_samples([(img, lab, None, "a")])
  np.testing.assert_allclose(ds.normalised()[0, ..., 0], intensity.normalise(img), rtol=1e-6)
  assert DataConfig().normalisation == "percentile"
  assert DataConfig().percentiles == intensity.PERCENTILES
  # The percentiles are in the run key only where they change a number.
  assert "percentiles" in run_key(PipelineConfig())["data"]
  assert "percentiles" not in run_key(PipelineConfig(data=DataConfig(normalisation="max")))["data"]
  with pytest.raises(ValueError, match="percentiles"):
    DataConfig(percentiles=(50, 50))
