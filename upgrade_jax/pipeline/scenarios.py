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
"""

from __future__ import annotations

from typing import Callable

from upgrade_jax.data.types import Dataset, concat

__all__ = ["DEFAULT_SCENARIOS", "SCENARIO_DATA", "SCENARIOS"]


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


# name -> (RepData, upgraded LQ Dataset) -> (train Dataset, validation Dataset)
SCENARIO_DATA: dict[str, Callable] = {
    "hq": _hq, "lq": _lq, "hq_lq": _hq_lq, "hq_upgraded": _hq_upgraded,
    "oracle": _oracle}
SCENARIOS: tuple[str, ...] = tuple(SCENARIO_DATA)
DEFAULT_SCENARIOS: tuple[str, ...] = ("hq", "lq", "hq_lq", "hq_upgraded", "oracle")
