"""Confident Learning on pixels (Northcutt et al., JAIR 2021), pure numpy.

The counting half of the competing method of the paper's Table 3.3 (after
Xu et al.'s segmentation use); the networks around it live in
pipeline/methods.py. Every pixel is one example with K = 2 classes
(0 background, 1 foreground), its given (noisy) label and out-of-sample
probabilities p (N, K):

  thresholds     t_j = mean p_j over the pixels labelled j
  confident_joint  C[i, j] = #{labelled i, confidently j}: p_l >= t_l for
                 some l; if for several, j is the argmax of p among all
                 classes (cleanlab's rule), otherwise the one
  calibrate      C[i, :] rescaled to the count of label i, then Q = C / ΣC
  num_issues     n·Q[i, j] per off-diagonal direction (floor)
  find_issues    per direction i -> j, that many pixels labelled i with the
                 lowest self-confidence p_i (for K = 2 the same order as
                 cleanlab's prune_by_noise_rate: largest margin p_j - p_i)
  coded_targets  the corrections as codes in int32 targets (see CODES)

Nothing here comes from cleanlab (AGPL); tests/test_confident.py checks
these against it when it is installed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["thresholds", "confident_joint", "calibrate", "num_issues", "find_issues",
           "coded_targets", "TO_BACKGROUND", "TO_FOREGROUND"]

# Codes of corrected pixels in a Dataset's int32 targets (instance ids are
# >= 0, so a negative code cannot be mistaken for one). The ConfidentLearning
# task turns them into soft targets.
TO_BACKGROUND = -1   # labelled foreground, corrected towards background
TO_FOREGROUND = -2   # labelled background, corrected towards foreground


def _check(probs, labels):
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels).astype(np.int64).ravel()
  if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
    raise ValueError(f"confident: probs {probs.shape} must be (N, K) for {labels.shape[0]} labels")
  if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
    raise ValueError(f"confident: labels must lie in [0, {probs.shape[1]})")
  return probs, labels


def thresholds(probs, labels) -> np.ndarray:
  """(K,) float64: t_j = mean of p_j over the pixels labelled j (1.0 for
  a class no pixel carries: nothing is confidently of it).

  Args: probs (N, K) float probabilities; labels (N,) int in [0, K).
  """
  probs, labels = _check(probs, labels)
  k = probs.shape[1]
  counts = np.bincount(labels, minlength=k)
  sums = np.array([probs[labels == j, j].sum() for j in range(k)])
  return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def confident_joint(probs, labels, t=None) -> np.ndarray:
  """(K, K) int64 confident joint, rows = given label, columns = confident class.

  A pixel counts once, in the column of the class it is confidently of
  (p_j >= t_j; the argmax of p when several are), or nowhere when none
  is. The 1e-6 slack on t is cleanlab's, so a pixel whose p equals the
  mean (e.g. every pixel alike) counts.
  """
  probs, labels = _check(probs, labels)
  t = thresholds(probs, labels) if t is None else np.asarray(t, np.float64)
  k = probs.shape[1]
  above = probs >= t - 1e-6
  n_above = above.sum(1)
  guess = np.where(n_above > 1, probs.argmax(1), above.argmax(1))
  keep = n_above > 0
  joint = np.zeros((k, k), np.int64)
  np.add.at(joint, (labels[keep], guess[keep]), 1)
  return joint


def calibrate(joint, labels, k: int | None = None) -> np.ndarray:
  """(K, K) float64 Q: each row of C rescaled to its label's count, then
  normalised to sum 1 (a row with no confident pixel stays zero).

  Args: joint (K, K) counts; labels (N,) the given labels.
  """
  joint = np.asarray(joint, np.float64)
  k = joint.shape[0] if k is None else k
  counts = np.bincount(np.asarray(labels).astype(np.int64).ravel(), minlength=k)
  rows = joint.sum(1, keepdims=True)
  cal = np.where(rows > 0, joint / np.maximum(rows, 1e-12), 0.0) * counts[:, None]
  total = cal.sum()
  return cal / total if total > 0 else cal


def num_issues(q, n: int) -> np.ndarray:
  """(K, K) int64: floor(n·Q[i, j]) off the diagonal, 0 on it: how many
  pixels labelled i are estimated to be truly j."""
  out = np.floor(n * np.asarray(q, np.float64)).astype(np.int64)
  np.fill_diagonal(out, 0)
  return out


def find_issues(probs, labels) -> tuple[np.ndarray, dict]:
  """The pixels Confident Learning flags, and the statistics behind them.

  Args: probs (N, K) out-of-sample probabilities; labels (N,) given labels.

  Returns:
    (flag, stats): flag (N,) int64, -1 for a pixel kept, else the class it
    is corrected to; stats = {"thresholds", "joint", "q", "num_issues"}
    (numpy arrays). Direction i -> j flags the num_issues[i, j] pixels
    labelled i with the lowest p_i (ties broken by index: stable sort). With
    K > 2 the directions out of one label take consecutive runs of that
    order, so no pixel is picked twice.
  """
  probs, labels = _check(probs, labels)
  t = thresholds(probs, labels)
  joint = confident_joint(probs, labels, t)
  q = calibrate(joint, labels, probs.shape[1])
  counts = num_issues(q, labels.size)
  flag = np.full(labels.shape, -1, np.int64)
  for i in range(probs.shape[1]):
    idx = np.flatnonzero(labels == i)
    order = idx[np.argsort(probs[idx, i], kind="stable")]
    start = 0
    for j in range(probs.shape[1]):
      if j == i or counts[i, j] == 0:
        continue
      take = order[start:start + counts[i, j]]
      flag[take] = j
      start += counts[i, j]
  return flag, {"thresholds": t, "joint": joint, "q": q, "num_issues": counts}


def coded_targets(targets, flag_fg) -> np.ndarray:
  """int32 targets with corrected pixels coded (TO_BACKGROUND, TO_FOREGROUND).

  Args:
    targets: (..., H, W) int instance ids (> 0 foreground) of the given labels.
    flag_fg: same shape, int: -1 kept, 0 corrected to background, 1 to
      foreground (find_issues' flag, reshaped).
  """
  targets = np.asarray(targets).astype(np.int32)
  flag_fg = np.asarray(flag_fg)
  if flag_fg.shape != targets.shape:
    raise ValueError(f"coded_targets: flag {flag_fg.shape} != targets {targets.shape}")
  out = np.where((flag_fg == 0) & (targets > 0), TO_BACKGROUND, targets)
  return np.where((flag_fg == 1) & (targets <= 0), TO_FOREGROUND, out).astype(np.int32)
