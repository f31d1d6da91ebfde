"""How each scenario's segmentation network is trained (a Scenario's `train`).

Most scenarios train one network with the pipeline's segmentation config
(`fit_segment`). The competing methods of the paper's Table 3.3 train their
own way, on the same engine and UNet:

  partial_labelling    one network with the PartialLabelling task
  confident_learning   K teachers (the Segment task) cross-fitted over K
                       folds of the training slices, so every pixel's
                       probability comes from a network that did not see it;
                       Confident Learning on those probabilities
                       (baselines.confident); then a fresh network with the
                       ConfidentLearning task on the corrected labels

A trainer is (cfg, train, val, workdir, *, seed, options, log, context) ->
(FitResult, info): `options` the method's engine Task (cfg.options_of its
scenario; None for fit_segment), info a JSON-able dict for rep.json ({} for
none).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
import numpy as np

from upgrade_jax import engine
from upgrade_jax.baselines import confident
from upgrade_jax.data.types import Dataset

__all__ = ["fit_segment", "fit_partial_labelling", "fit_confident_learning",
           "cross_fit_probs", "correct_labels", "fold_of"]


def fit_segment(cfg, train: Dataset, val: Dataset, workdir, *, seed, options=None, log,
                context):
  """One network with cfg.segment (the Segment task)."""
  del options
  fit = engine.fit(dataclasses.replace(cfg.segment, seed=seed), train, val, workdir,
                   log=log, context=context)
  return fit, {}


def fit_partial_labelling(cfg, train: Dataset, val: Dataset, workdir, *, seed, options,
                          log, context):
  """One network with `options` (an engine.PartialLabelling) as its task."""
  seg = dataclasses.replace(cfg.segment, seed=seed, task=options)
  fit = engine.fit(seg, train, val, workdir, log=log, context=context)
  n = int((train.targets < 0).sum())
  return fit, {"unlabelled_pixels": n}


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
  """(n,) int fold of each sample: a seeded permutation dealt round robin,
  so folds differ in size by at most one."""
  perm = np.random.default_rng(seed).permutation(n)
  out = np.empty(n, np.int64)
  out[perm] = np.arange(n) % folds
  return out


def cross_fit_probs(seg_cfg: engine.TrainConfig, train: Dataset, val: Dataset, folds: int,
                    workdir, *, seed, log, context, predict_batch: int = 8) -> np.ndarray:
  """(N, H, W) f32 out-of-sample foreground probabilities of `train`.

  Teacher k trains on the samples outside fold k (validated on `val`, early
  stopping as usual) and predicts fold k. Each teacher sees (K-1)/K of the
  data: K = 2 is the cheapest cross-fit (two teachers, each on half).
  """
  fold = fold_of(len(train), folds, seed)
  probs = np.zeros(train.targets.shape, np.float32)
  for k in range(folds):
    inside = np.flatnonzero(fold != k)
    held = np.flatnonzero(fold == k)
    if len(inside) == 0 or len(held) == 0:
      raise ValueError(f"confident learning: {len(train)} training slices cannot fill "
                       f"{folds} folds; lower the folds")
    log(f"confident learning: teacher {k + 1}/{folds} on {len(inside)} slices, "
        f"predicting {len(held)}")
    fit = engine.fit(seg_cfg, train.subset(inside), val, Path(workdir) / f"teacher{k}",
                     log=log, context=context)
    part = train.subset(held)
    probs[held] = engine.predict_proba(fit.state_best, part, batch_size=predict_batch,
                                       extents=part.extents)
  return probs


def correct_labels(train: Dataset, probs_fg: np.ndarray) -> tuple[Dataset, dict]:
  """`train` with Confident Learning's corrections coded in its targets.

  Every valid pixel is one example (labels: target > 0; probabilities:
  1 - p, p). Returns the coded Dataset and the statistics (thresholds, Q,
  the estimated issues per direction, the pixels flagged) as JSON-able
  lists.
  """
  valid = train.valid_mask()
  labels = (train.targets > 0)[valid].astype(np.int64)
  p = np.asarray(probs_fg, np.float64)[valid]
  flag, stats = confident.find_issues(np.stack([1.0 - p, p], 1), labels)
  full = np.full(train.targets.shape, -1, np.int64)
  full[valid] = flag
  coded = train.replace(targets=confident.coded_targets(train.targets, full))
  info = {k: np.asarray(v).tolist() for k, v in stats.items()}
  info.update(pixels=int(valid.sum()), to_background=int((flag == 0).sum()),
              to_foreground=int((flag == 1).sum()))
  return coded, info


def fit_confident_learning(cfg, train: Dataset, val: Dataset, workdir, *, seed, options,
                           log, context):
  """Teachers, Confident Learning, then the student on the corrected labels;
  `options` an engine.ConfidentLearning."""
  task = options
  teacher_cfg = dataclasses.replace(cfg.segment, seed=seed)
  probs = cross_fit_probs(teacher_cfg, train, val, task.folds, workdir, seed=seed, log=log,
                          context=context, predict_batch=cfg.predict_batch)
  coded, info = correct_labels(train, probs)
  log(f"confident learning: {info['to_background']} of {info['pixels']} pixels corrected "
      f"towards background, {info['to_foreground']} towards foreground")
  student = dataclasses.replace(cfg.segment, seed=seed, task=task)
  fit = engine.fit(student, coded, val, Path(workdir) / "student", log=log, context=context)
  return fit, info
