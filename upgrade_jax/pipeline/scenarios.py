"""The segmentation scenarios: how each one's (train, validation) sets are made.

One registry, `SCENARIO_DATA` (name -> function of the repetition's data and
the upgraded LQ set); `SCENARIOS` is its key order and `DEFAULT_SCENARIOS`
what a run trains unless told otherwise. Every scenario validates on the HQ
validation slices, except "lq", whose user has only LQ labels and so
validates on LQ versions of them, and "oracle", the ceiling: every training
slice (HQ and LQ) with its true labels, validated on the true HQ validation
labels (they differ from hq_val only when the HQ set is made imperfect on
purpose, Figure 3.5). The oracle costs what annotating every slice well
would; it says how much of the hq -> oracle gap a scenario recovers.

The competing methods of the paper's Table 3.3 are opt-in (not in
DEFAULT_SCENARIOS) and train their own way (pipeline/methods.py):
"confident_learning" on the HQ + LQ slices as labelled; "partial_labelling"
on the HQ slices, fully labelled, and the LQ slices whose foreground is
labelled and whose background is *unlabelled* (code -1 in the targets: an
LQ annotator who drew some cells said nothing about the rest). Neither
reads the LQ slices' true labels.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from upgrade_jax.data.types import Dataset, concat

__all__ = ["DEFAULT_SCENARIOS", "SCENARIO_DATA", "SCENARIOS", "partial_labels"]


def _hq(d, upgraded: Dataset):
  return d.hq_train, d.hq_val


def _lq(d, upgraded: Dataset):
  return d.lq_masks, d.val_lq_masks


def _hq_lq(d, upgraded: Dataset):
  return concat([d.hq_train, d.lq_masks]), d.hq_val


def _hq_upgraded(d, upgraded: Dataset):
  return concat([d.hq_train, upgraded]), d.hq_val


def _oracle(d, upgraded: Dataset):
  return concat([d.hq_train_truth, d.lq_truth]), d.hq_val_truth


def _confident_learning(d, upgraded: Dataset):
  return concat([d.hq_train, d.lq_masks]), d.hq_val


def partial_labels(lq: Dataset) -> Dataset:
  """LQ labels with their background unlabelled: -1 inside each sample's
  extent where the LQ mask is background (padding stays 0 and invalid)."""
  unlabelled = (lq.targets <= 0) & lq.valid_mask()
  return lq.replace(targets=np.where(unlabelled, -1, lq.targets).astype(np.int32))


def _partial_labelling(d, upgraded: Dataset):
  return concat([d.hq_train, partial_labels(d.lq_masks)]), d.hq_val


# name -> (RepData, upgraded LQ Dataset) -> (train Dataset, validation Dataset)
SCENARIO_DATA: dict[str, Callable] = {
    "hq": _hq, "lq": _lq, "hq_lq": _hq_lq, "hq_upgraded": _hq_upgraded,
    "oracle": _oracle, "confident_learning": _confident_learning,
    "partial_labelling": _partial_labelling}
SCENARIOS: tuple[str, ...] = tuple(SCENARIO_DATA)
DEFAULT_SCENARIOS: tuple[str, ...] = ("hq", "lq", "hq_lq", "hq_upgraded", "oracle")
