"""Instance labels from an upgrade, and StarDist-style matching."""

import numpy as np
import pytest

from upgrade_jax import instances


def disc(shape, cy, cx, r):
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def random_labels(rng, shape=(40, 50), n=6):
  lab = np.zeros(shape, np.int32)
  for i in range(n):
    lab[disc(shape, rng.integers(0, shape[0]), rng.integers(0, shape[1]),
             rng.integers(2, 9))] = rng.integers(1, 30)
  return lab


# --------------------------------------------------------------------------
# Matching: hand-computed cases.

def test_matching_hand_computed():
  t = np.zeros((10, 10), np.int32)
  t[0:4, 0:4] = 5          # 16 px
  t[6:10, 6:10] = 9        # 16 px
  p = np.zeros_like(t)
  p[0:4, 0:3] = 1          # IoU 12/16 = 0.75 with id 5
  p[6:10, 8:10] = 2        # IoU 8/16 = 0.5 with id 9
  p[0:2, 8:10] = 3         # no overlap: a false positive
  s05, s075 = instances.matching(t, p, (0.5, 0.75))
  assert (s05["tp"], s05["fp"], s05["fn"]) == (2, 1, 0)
  assert (s075["tp"], s075["fp"], s075["fn"]) == (1, 2, 1)
  assert s05["precision"] == pytest.approx(2 / 3) and s05["recall"] == 1.0
  assert s05["accuracy"] == pytest.approx(2 / 3) and s05["f1"] == pytest.approx(0.8)
  assert s075["accuracy"] == pytest.approx(1 / 4) and s075["f1"] == pytest.approx(2 / 5)
  assert s05["mean_matched_score"] == pytest.approx((0.75 + 0.5) / 2)
  assert s075["panoptic_quality"] == pytest.approx(0.75 / (1 + 1 + 0.5))


def test_matching_is_one_to_one_and_optimal():
  # One prediction covering two true cells matches at most one of them; the
  # assignment picks the pairing with the most matches above the threshold.
  t = np.zeros((4, 12), np.int32)
  t[:, 0:4], t[:, 4:8] = 1, 2
  p = np.zeros_like(t)
  p[:, 0:6] = 1            # IoU 16/24 with 1, 8/24 with 2
  p[:, 6:9] = 2            # IoU 8/20 with 2
  s = instances.matching(t, p, 0.3)[0]
  # Optimal: (1,1) and (2,2) both >= 0.3 beat (1,1) alone.
  assert s["tp"] == 2


def test_dataset_sums_counts_not_ratios():
  a = np.zeros((4, 4), np.int32)
  a[:2, :2] = 1
  empty = np.zeros((4, 4), np.int32)
  s = instances.matching_dataset([a, a, empty], [a, empty, a], 0.5)[0]
  assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 1)
  assert s["f1"] == pytest.approx(0.5) and s["accuracy"] == pytest.approx(1 / 3)
  z = instances.matching_dataset([empty], [empty], 0.5)[0]
  assert z["f1"] == 0.0 and z["precision"] == 0.0  # 0 when the denominator is 0


def test_matching_against_stardist():
  stardist = pytest.importorskip("stardist.matching")
  rng = np.random.default_rng(0)
  ys_t = [random_labels(rng) for _ in range(8)]
  ys_p = [random_labels(rng) if i % 3 else np.roll(ys_t[i], (i % 4, 1), (0, 1))
          for i in range(8)]
  for thr in (0.1, 0.5, 0.75):
    ours = instances.matching_dataset(ys_t, ys_p, thr)[0]
    ref = stardist.matching_dataset(ys_t, ys_p, thresh=thr, by_image=False, show_progress=False)
    for key in ("tp", "fp", "fn", "n_true", "n_pred", "precision", "recall", "accuracy", "f1",
                "mean_true_score", "mean_matched_score", "panoptic_quality"):
      assert ours[key] == pytest.approx(getattr(ref, key)), (thr, key)
    one = instances.matching(ys_t[1], ys_p[1], thr)[0]
    ref1 = stardist.matching(ys_t[1], ys_p[1], thresh=thr)
    assert (one["tp"], one["fp"], one["fn"]) == (ref1.tp, ref1.fp, ref1.fn)


def test_summary_scores_dsb_score_and_pq_against_stardist():
  stardist = pytest.importorskip("stardist.matching")
  rng = np.random.default_rng(1)
  ys_t = [random_labels(rng) for _ in range(6)]
  ys_p = [np.roll(t, (i % 3, 1), (0, 1)) if i % 2 else random_labels(rng)
          for i, t in enumerate(ys_t)]
  ours = instances.summary_scores(ys_t, ys_p)
  refs = {t: stardist.matching_dataset(ys_t, ys_p, thresh=t, by_image=False,
                                       show_progress=False)
          for t in instances.DSB_THRESHOLDS}
  assert instances.DSB_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
  assert ours["dsb_score"] == pytest.approx(np.mean([r.accuracy for r in refs.values()]))
  for t in (0.5, 0.75):
    for key in ("precision", "recall", "f1", "accuracy", "panoptic_quality"):
      assert ours[f"{key}@{t:g}"] == pytest.approx(getattr(refs[t], key)), (t, key)


def test_dsb_score_by_hand():
  # One true square of 100 px; the prediction covers 70 of it: IoU 0.7, a
  # match at 0.5..0.7 (5 of the 10 thresholds), none above.
  t = np.zeros((20, 20), np.int32)
  t[:10, :10] = 1
  p = np.zeros_like(t)
  p[:7, :10] = 1
  s = instances.summary_scores([t], [p])
  assert s["dsb_score"] == pytest.approx(0.5)
  assert s["f1@0.5"] == 1.0 and s["f1@0.75"] == 0.0
  assert s["panoptic_quality@0.5"] == pytest.approx(0.7)


# --------------------------------------------------------------------------
# Instances from an upgraded mask.

def two_touching(shape=(40, 60)):
  a, b = disc(shape, 20, 20, 9), disc(shape, 20, 37, 9)
  gt = np.zeros(shape, np.int32)
  gt[a], gt[b & ~a] = 1, 2
  return gt


def test_without_lq_instances_the_instances_are_components_without_specks():
  """Measured: splitting a 0/1 LQ's upgrade at distance peaks over-split
  cells (F1@0.5 0.503 vs 0.731 for components, quickstart): components,
  minus the specks below MIN_INSTANCE_PX."""
  gt = two_touching()
  gt[2, 2] = gt[2, 3] = 9                                   # a 2-px speck
  lab = instances.instances_from_upgrade((gt > 0).astype(np.float32))
  np.testing.assert_array_equal(lab, ((gt > 0) & (gt != 9)).astype(np.int32))
  assert lab.max() == 1 and lab[2, 2] == 0
  assert instances.instances_from_upgrade(gt > 0, min_size=0).max() == 2
  np.testing.assert_array_equal(instances.drop_small(gt, 3), instances.relabel(
      np.where(gt == 9, 0, gt)))


def test_lq_instances_seed_and_omitted_cell_is_split():
  gt = two_touching()
  gt[disc(gt.shape, 20, 54, 4)] = 3                        # a small third cell
  # The LQ label kept cell 1, dilated by 2 px (reaching into cell 2), and
  # omitted cells 2 and 3; the upgrade recovered the whole foreground.
  from scipy import ndimage as ndi
  lq = np.where(ndi.binary_dilation(gt == 1, iterations=2), 7, 0).astype(np.int32)
  lab = instances.instances_from_upgrade((gt > 0).astype(np.float32), lq)
  s = instances.matching(gt, lab, 0.75)[0]
  assert (s["tp"], s["fp"], s["fn"]) == (3, 0, 0)


def test_binary_lq_gives_no_seeds_and_empty_input():
  gt = two_touching()
  lab = instances.instances_from_upgrade(gt > 0, (gt > 0).astype(np.int32))
  assert lab.max() == 1                                    # 0/1 LQ: no seed, components
  assert not instances.instances_from_upgrade(np.zeros((5, 5))).any()
  assert instances.instances_from_upgrade(gt > 0).dtype == np.int32


def test_report_summarises_and_prints_instance_scores():
  from upgrade_jax import report
  reps = [{"annotation_instances": {
      "lq": {"f1@0.5": 0.5, "f1@0.75": 0.25, "accuracy@0.5": 0.3, "dsb_score": 0.2,
             "panoptic_quality@0.5": 0.4},
      "upgraded": {"f1@0.5": f, "f1@0.75": 0.5, "accuracy@0.5": 0.6, "dsb_score": 0.45,
                   "panoptic_quality@0.5": 0.7}}} for f in (0.8, 0.9)]
  s = report.instance_summary(reps)
  assert s["upgraded"]["f1@0.5"]["mean"] == pytest.approx(0.85)
  assert s["lq"]["f1@0.75"]["per_rep"] == [0.25, 0.25]
  assert report.instance_summary([{}]) == {}
  d = {"reps": reps, "annotation_dice": {}, "segmentation_dice": {}, "wilcoxon": {},
       "annotation_instances": s}
  table = report.format_table(d)
  assert "Instances" in table and "f1@0.5" in table and "0.8500" in table
  assert "DSB score" in table and "PQ@0.5" in table and "0.4500" in table


def test_dsb_lq_script_omits_and_biases_instances():
  from benchmarks.dsb_lq import lq_instances
  rng = np.random.default_rng(0)
  gt = np.zeros((60, 60), np.int32)
  for k, (cy, cx) in enumerate([(10, 10), (10, 30), (30, 10), (30, 30), (50, 50), (10, 50)]):
    gt[disc(gt.shape, cy, cx, 6)] = k + 1
  seen = set()
  for _ in range(6):
    lq = lq_instances(gt, rng, 0.5, 2)
    ids = set(np.unique(lq)) - {0}
    assert len(ids) == 3 and ids <= set(range(1, 7))   # floor(0.5·6) omitted, ids kept
    for i in ids:
      area, gt_area = np.count_nonzero(lq == i), np.count_nonzero(gt == i)
      seen.add(area > gt_area)
      assert area != gt_area                            # grown or shrunk by q >= 1
  assert seen == {True, False}                          # both directions drawn


def test_instance_tally_adds_up_to_matching_dataset():
  from scipy import ndimage as ndi
  rng = np.random.default_rng(3)
  truths = [ndi.label(rng.random((30, 40)) > 0.6)[0] for _ in range(4)]
  preds = [ndi.label(ndi.binary_dilation(t > 0) & (rng.random(t.shape) > 0.1))[0] for t in truths]
  tally = instances.InstanceTally()
  for t, p in zip(truths, preds):
    tally.add(t, p)
  got = tally.summary()
  every = instances.matching_dataset(truths, preds, instances.DSB_THRESHOLDS)
  assert got["f1@0.5"] == pytest.approx(every[0]["f1"])
  assert got["panoptic_quality@0.5"] == pytest.approx(every[0]["panoptic_quality"])
  assert got["f1@0.75"] == pytest.approx(every[5]["f1"])
  assert got["dsb_score"] == pytest.approx(np.mean([s["accuracy"] for s in every]))
  assert tally.images == 4 and got == instances.summary_scores(truths, preds)
