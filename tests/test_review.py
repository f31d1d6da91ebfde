"""The review queue (upgrade_jax/review.py): numbers by hand, ranking, files."""

import csv

import numpy as np
import pytest

from upgrade_jax import review, rundir


def _pair():
  """LQ: cells A (2:6) and B (10:14); upgraded: A grown by a row, B gone, C new."""
  lq = np.zeros((20, 20), np.int32)
  lq[2:6, 2:6], lq[10:14, 10:14] = 1, 2
  up = np.zeros((20, 20), bool)
  up[2:7, 2:6] = True          # A + 4 pixels
  up[15:18, 2:5] = True        # C: 9 pixels, touches no LQ pixel
  return lq, up


def test_image_review_counts_by_hand():
  lq, up = _pair()
  probs = np.where(up, 0.9, 0.1).astype(np.float32)
  probs[6, 2:6] = 0.5          # the added row of A: 1 bit each
  r = review.image_review(lq, up, probs, "a")
  assert (r["pixels_added"], r["pixels_removed"]) == (4 + 9, 16)
  assert (r["objects_added"], r["objects_removed"]) == (1, 1)
  assert r["changed_fraction"] == pytest.approx(29 / 400)
  h = float(review.binary_entropy(0.9))   # = H(0.1)
  assert r["mean_entropy_changed"] == pytest.approx((4 * 1.0 + 25 * h) / 29)
  fg = 16 + 16 + 4 + 9
  assert r["mean_entropy_foreground"] == pytest.approx((4 * 1.0 + (fg - 4) * h) / fg)
  assert r["score"] == r[review.SCORE]
  truth = np.zeros_like(lq)
  truth[2:7, 2:6] = 1
  assert review.image_review(lq, up, probs, "a", truth=truth)["dice_vs_truth"] == \
      pytest.approx(2 * 20 / (20 + 29))


def test_truth_floods_by_hand():
  truth = np.zeros((10, 10), np.int32)
  truth[:2, :] = 1                                   # truth 20% foreground
  up = np.zeros((10, 10), bool)
  up[:6, :] = True                                   # 60%: a flood
  assert review.truth_floods(up, truth)
  assert not review.truth_floods(np.zeros((10, 10)), truth)   # empty
  up[5, :] = False                                   # exactly 50%: not above
  assert not review.truth_floods(up, truth)
  truth[2, :] = 2                                    # truth exactly 30%: not below
  assert not review.truth_floods(np.ones((10, 10)), truth)
  truth[2, 0] = 0
  assert review.truth_floods(np.ones((10, 10)), truth)
  r = review.image_review(truth, np.ones((10, 10), bool), np.ones((10, 10)), "x", truth=truth)
  assert (r["flooded_vs_truth"], r["truth_foreground_fraction"]) == (1, pytest.approx(0.29))
  with pytest.raises(ValueError, match="shapes differ"):
    review.truth_floods(np.ones((4, 4)), np.ones((4, 5)))


def test_entropy_and_empty_images():
  np.testing.assert_allclose(review.binary_entropy([0.0, 0.5, 1.0]), [0, 1, 0], atol=1e-5)
  z = np.zeros((8, 8))
  r = review.image_review(z, z > 0, z, "empty")
  assert r["changed_fraction"] == 0 and r["score"] == 0 and r["objects_added"] == 0
  with pytest.raises(ValueError, match="shapes differ"):
    review.image_review(z, np.zeros((8, 9), bool), z, "bad")


def test_rank_rows_most_doubtful_first_ties_by_name():
  rows = [{"name": n, "score": s} for n, s in (("b", 0.2), ("a", 0.2), ("c", 0.9))]
  ranked = review.rank_rows(rows)
  assert [(r["rank"], r["name"]) for r in ranked] == [(1, "c"), (2, "a"), (3, "b")]


def test_write_review_csv_overlays_and_guard(tmp_path):
  lq, up = _pair()
  rng = np.random.default_rng(0)
  rows, samples = [], {}
  for i in range(4):
    probs = np.clip(up + rng.normal(0, 0.1 * (i + 1), up.shape), 0, 1).astype(np.float32)
    rows.append(review.image_review(lq, up, probs, f"img {i}"))
    samples[f"img {i}"] = (rng.random((20, 20)), lq, up)
  out = tmp_path / "run"
  (out / "review").mkdir(parents=True)
  (out / "review" / "007_old.png").write_bytes(b"stale overlay")   # an earlier run's
  (out / "review" / "notes.txt").write_text("mine")                  # not ours: kept
  ranked = review.write_review(out, rows, samples.__getitem__, top_n=2)
  with open(out / "review.csv") as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == list(review.COLUMNS)
  assert [t["name"] for t in table] == [r["name"] for r in ranked] == \
      ["img 3", "img 2", "img 1", "img 0"]   # noisier probabilities, more doubt
  assert sorted(p.name for p in (out / "review").iterdir()) == \
      ["001_img_3.png", "002_img_2.png", "notes.txt"]
  assert (out / "review" / "001_img_3.png").read_bytes()[:4] == b"\x89PNG"
  guard = rundir.InputGuard([out / "review"])
  with pytest.raises(rundir.InputError):
    review.write_review(tmp_path / "run", rows, samples.__getitem__, guard=guard)


def _disc_mask(shape, r):
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  return (yy - shape[0] // 2) ** 2 + (xx - shape[1] // 2) ** 2 <= r * r


def test_a_flooded_background_is_flagged_and_a_dense_image_is_not():
  shape = (40, 40)
  lq = _disc_mask(shape, 7).astype(np.int32)            # 9.6% foreground
  flood = np.ones(shape, bool)
  flood[:4] = False                                      # 90% foreground
  row = review.image_review(lq, flood, flood * 0.9, "hazy", hq_foreground_fraction=0.3)
  assert row["foreground_fraction"] == pytest.approx(0.9)
  assert row["lq_foreground_fraction"] == pytest.approx(lq.mean())
  assert row["foreground_ratio"] == pytest.approx(0.9 / 0.3)   # the HQ reference is larger
  assert row["flooded"] == 1
  # A dense image whose LQ label omitted most: 60% foreground, 2.4x the LQ's,
  # but within twice the densest HQ image: not a flood.
  dense = np.zeros(shape, bool)
  dense[:24] = True
  half = np.zeros(shape, np.int32)
  half[:10] = 1
  row = review.image_review(half, dense, dense * 0.9, "dense", hq_foreground_fraction=0.35)
  assert row["foreground_fraction"] == pytest.approx(0.6) and row["flooded"] == 0
  # Without an HQ reference, the LQ label alone decides.
  assert review.image_review(half, dense, dense * 0.9, "d")["flooded"] == 1
  assert review.image_review(lq, lq > 0, lq * 0.9, "same")["flooded"] == 0
  assert "flooded" in review.review_csv(review.rank_rows([row])).splitlines()[0].split(",")


def test_max_foreground_fraction_reads_each_sample_on_its_extent():
  from upgrade_jax.data.types import Dataset

  targets = np.zeros((2, 8, 8), np.int32)
  targets[0, :2, :2] = 1                 # 4 of a 4x4 extent
  targets[1, :, :4] = 1                  # 32 of 64
  ds = Dataset(images=np.zeros((2, 8, 8, 1), np.float32), targets=targets,
               others=np.zeros_like(targets), names=("a", "b"), extents=np.array([[4, 4], [8, 8]]))
  assert review.max_foreground_fraction(ds) == pytest.approx(0.5)
  assert review.max_foreground_fraction(ds.subset(np.array([0]))) == pytest.approx(0.25)


def test_flood_warning_names_the_flooded_rows_only():
  rows = [{"name": "a", "flooded": 0}, {"name": "b", "flooded": 1}]
  assert review.flood_warning(rows[:1]) is None
  line = review.flood_warning(rows)
  assert line.startswith("WARNING: 1 upgraded labels flooded") and line.endswith(": b")
