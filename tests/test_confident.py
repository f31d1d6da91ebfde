"""Confident Learning's counting (baselines/confident.py) against a loop
reference written from the formulas and, when installed, against cleanlab."""

import numpy as np
import pytest

from upgrade_jax.baselines import confident as cl


def _noisy_pixels(n=4000, seed=0, flip=(0.15, 0.3)):
  """Two-class pixels: true class, given label (flipped at class-dependent
  rates) and probabilities that mostly agree with the truth."""
  rng = np.random.default_rng(seed)
  truth = (rng.random(n) < 0.3).astype(int)
  flips = rng.random(n) < np.where(truth == 1, flip[1], flip[0])
  labels = np.where(flips, 1 - truth, truth)
  p1 = np.clip(np.where(truth == 1, 0.8, 0.2) + 0.2 * rng.standard_normal(n), 0.001, 0.999)
  return np.stack([1 - p1, p1], 1), labels, truth


def _reference(probs, labels):
  """Confident Learning from its definitions, one pixel at a time."""
  n, k = probs.shape
  t = [np.mean([probs[x, j] for x in range(n) if labels[x] == j]) for j in range(k)]
  c = np.zeros((k, k))
  for x in range(n):
    conf = [j for j in range(k) if probs[x, j] >= t[j] - 1e-6]
    if conf:
      j = conf[0] if len(conf) == 1 else int(np.argmax(probs[x]))
      c[labels[x], j] += 1
  counts = [sum(labels == i) for i in range(k)]
  cal = np.array([[c[i, j] / c[i].sum() * counts[i] for j in range(k)] for i in range(k)])
  q = cal / cal.sum()
  flagged = set()
  for i in range(k):
    for j in range(k):
      if i != j:
        m = int(np.floor(n * q[i, j]))
        mine = sorted((probs[x, i], x) for x in range(n) if labels[x] == i)
        flagged |= {x for _, x in mine[:m]}
  return np.array(t), c, q, flagged


def test_matches_the_formulas():
  probs, labels, _ = _noisy_pixels(n=1500)
  t, c, q, flagged = _reference(probs, labels)
  flag, stats = cl.find_issues(probs, labels)
  np.testing.assert_allclose(stats["thresholds"], t)
  np.testing.assert_array_equal(stats["joint"], c)
  np.testing.assert_allclose(stats["q"], q)
  assert set(np.flatnonzero(flag >= 0)) == flagged
  np.testing.assert_array_equal(flag[flag >= 0], 1 - labels[flag >= 0])


def test_flags_mostly_the_flipped_pixels():
  probs, labels, truth = _noisy_pixels()
  flag, stats = cl.find_issues(probs, labels)
  flipped = labels != truth
  hit = flag >= 0
  # The estimated number of issues is close to the true one, and most
  # flagged pixels really are flipped.
  assert abs(hit.sum() - flipped.sum()) < 0.2 * flipped.sum()
  assert (hit & flipped).sum() > 0.8 * hit.sum()


def test_coded_targets():
  t = np.array([[0, 3, 3], [0, 0, 5]], np.int32)
  flag = np.array([[1, 0, -1], [-1, 0, 1]])
  out = cl.coded_targets(t, flag)
  np.testing.assert_array_equal(out, [[cl.TO_FOREGROUND, cl.TO_BACKGROUND, 3], [0, 0, 5]])


def test_against_cleanlab():
  count = pytest.importorskip("cleanlab.count")
  cfilter = pytest.importorskip("cleanlab.filter")
  probs, labels, _ = _noisy_pixels(n=6000, seed=1)
  flag, stats = cl.find_issues(probs, labels)
  raw = count.compute_confident_joint(labels, probs, calibrate=False)
  # cleanlab's rows are given labels too; it clips the diagonal to >= 1.
  np.testing.assert_array_equal(raw, stats["joint"])
  cal = count.compute_confident_joint(labels, probs, calibrate=True)
  # cleanlab keeps counts (rounded, preserving row totals); ours is Q.
  np.testing.assert_allclose(cal, stats["q"] * len(labels), atol=1.0)
  theirs = cfilter.find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
  ours = flag >= 0
  # Their prune counts are rounded and keep each example whose argmax is
  # its label out; the flagged sets agree up to those few border pixels.
  inter = (ours & theirs).sum()
  assert inter >= 0.95 * max(ours.sum(), theirs.sum())


def test_segmentation_filter_agrees():
  seg = pytest.importorskip("cleanlab.segmentation.filter")
  probs, labels, _ = _noisy_pixels(n=4096, seed=2)
  # cleanlab's segmentation API: labels (N, H, W), pred_probs (N, K, H, W).
  lab_img = labels.reshape(4, 32, 32)
  prob_img = probs.reshape(4, 32, 32, 2).transpose(0, 3, 1, 2)
  theirs = seg.find_label_issues(lab_img, prob_img, n_jobs=1, verbose=False).ravel()
  ours = cl.find_issues(probs, labels)[0] >= 0
  # Its defaults (another filter_by, downsampling) flag fewer pixels: all of
  # them are among ours, and most of ours are among them.
  assert not (theirs & ~ours).any()
  assert theirs.sum() >= 0.7 * ours.sum()
