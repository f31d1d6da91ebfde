"""The scenarios and competing methods: one registry, `REGISTRY`.

A `Scenario` is everything a segmentation scenario is: its name (the key in
configs, flags and records), its row label, how its (train, validation) sets
are made from a repetition's data and the upgraded LQ set, how its network is
trained (pipeline/methods.py), its options (an engine Task at its defaults;
PipelineConfig.options overrides them, the CLI derives its flags from their
fields) and whether a run trains it unless told otherwise. Adding a scenario
or a competing method is one entry here (plus its trainer or task if new).

Every scenario validates on the HQ validation slices, except "lq", whose
user has only LQ labels and so validates on LQ versions of them, and
"oracle", the ceiling: every training slice (HQ and LQ) with its true labels,
validated on the true HQ validation labels (they differ from hq_val only when
the HQ set is made imperfect on purpose, Figure 3.5). The oracle costs what
annotating every slice well would; it says how much of the hq -> oracle gap a
scenario recovers.

One validation rule serves every scenario (`val_extra`, PipelineConfig.
seg_val_extra): besides the HQ validation slices, `val_extra` of the
scenario's other training slices (the LQ slices, with the labels that
scenario trains on: true ones for the oracle, upgraded ones for
hq_upgraded, LQ masks for hq_lq, lq and the methods) are held out of its
training set and added to its validation set, so that a network trained on
hundreds of slices is not selected on two. The same slices (a seeded draw,
at most a quarter of them) in every scenario of a repetition; HQ only has no
other slices and keeps the HQ validation slices.

The competing methods of the paper's Table 3.3 are opt-in (not default) and
train their own way: "confident_learning" on the HQ + LQ slices as labelled;
"partial_labelling" on the HQ slices, fully labelled, and the LQ slices whose
foreground is labelled and whose background is *unlabelled* (code -1 in the
targets: an LQ annotator who drew some cells said nothing about the rest).
Neither reads the LQ slices' true labels.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from upgrade_jax import engine
from upgrade_jax.data.types import Dataset, concat
from upgrade_jax.pipeline import methods

__all__ = ["CEILING", "DEFAULT_SCENARIOS", "FLOOR", "LABELS", "METHOD", "REGISTRY",
           "SCENARIOS", "Scenario", "partial_labels", "val_extra_index"]


# Salt of the draw of the extra validation slices (independent of the other
# streams of a seed).
_VAL_EXTRA_SALT = 0x7A1


def val_extra_index(n: int, val_extra: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train_idx, val_idx) of a scenario's n other training slices: val_idx
  min(val_extra, n // 4) of them, a seeded draw (the same for every scenario
  of a seed), train_idx the rest; both sorted."""
  k = min(int(val_extra), n // 4)
  perm = np.random.default_rng([seed, _VAL_EXTRA_SALT]).permutation(n)
  return np.sort(perm[k:]), np.sort(perm[:k])


def _sets(hq_train: Dataset, hq_val: Dataset, other: Dataset | None = None,
          other_val: Dataset | None = None, *, val_extra: int = 0, seed: int = 0):
  """(train, validation): HQ train + the rest of `other`; HQ val + the held
  out slices of `other_val` (the same slices as `other`, with the labels
  validation scores against; default `other`)."""
  if other is None or len(other) == 0:
    return hq_train, hq_val
  other_val = other if other_val is None else other_val
  train_idx, val_idx = val_extra_index(len(other), val_extra, seed)
  train = concat([hq_train, other.subset(train_idx)])
  val = concat([hq_val, other_val.subset(val_idx)]) if len(val_idx) else hq_val
  return train, val


def _hq(d, upgraded: Dataset, **kw):
  return d.hq_train, d.hq_val


def _lq(d, upgraded: Dataset, *, val_extra: int = 0, seed: int = 0):
  # No HQ slice to train on: the LQ slices alone, validated on the LQ
  # versions of the HQ validation slices and the held-out LQ slices.
  train_idx, val_idx = val_extra_index(len(d.lq_masks), val_extra, seed)
  val = concat([d.val_lq_masks, d.lq_masks.subset(val_idx)]) if len(val_idx) else \
      d.val_lq_masks
  return d.lq_masks.subset(train_idx), val


def _hq_lq(d, upgraded: Dataset, **kw):
  return _sets(d.hq_train, d.hq_val, d.lq_masks, **kw)


def _hq_upgraded(d, upgraded: Dataset, **kw):
  return _sets(d.hq_train, d.hq_val, upgraded, **kw)


def _oracle(d, upgraded: Dataset, **kw):
  return _sets(d.hq_train_truth, d.hq_val_truth, d.lq_truth, **kw)


def _confident_learning(d, upgraded: Dataset, **kw):
  return _sets(d.hq_train, d.hq_val, d.lq_masks, **kw)


def partial_labels(lq: Dataset) -> Dataset:
  """LQ labels with their background unlabelled: -1 inside each sample's
  extent where the LQ mask is background (padding stays 0 and invalid)."""
  unlabelled = (lq.targets <= 0) & lq.valid_mask()
  return lq.replace(targets=np.where(unlabelled, -1, lq.targets).astype(np.int32))


def _partial_labelling(d, upgraded: Dataset, **kw):
  # Validation scores Dice: its held-out LQ slices count as the LQ masks
  # they are (unlabelled background as background), as for hq_lq.
  return _sets(d.hq_train, d.hq_val, partial_labels(d.lq_masks), d.lq_masks, **kw)


@dataclasses.dataclass(frozen=True)
class Scenario:
  """One segmentation scenario (or competing method) of a run.

  Attributes:
    name: its key in PipelineConfig.scenarios, --scenarios and every record.
    label: its row name in tables and plots.
    data: (RepData, upgraded LQ Dataset, *, val_extra=0, seed=0) ->
      (train Dataset, validation Dataset).
    train: (cfg, train, val, workdir, *, seed, options, log, context) ->
      (engine.FitResult, info), info a JSON-able dict for rep.json.
    options: the method's options at their defaults, an engine Task (whose
      `name` is this scenario's), or None. The trainer receives
      cfg.options_of(name).
    flag_prefix: the CLI sets the options' fields as --<flag_prefix>_<field>.
    default: trained when PipelineConfig.scenarios is not given.
    cost: (sizes, hq_cost) -> what its training and validation labels cost
      in LQ-label units; sizes a rep.json's "sizes" (hq_train, hq_val, lq).
  """

  name: str
  label: str
  data: Callable
  train: Callable = methods.fit_segment
  options: engine.Task | None = None
  flag_prefix: str = ""
  default: bool = False
  cost: Callable | None = None   # None: _hq_plus_lq_cost

  def __post_init__(self):
    if self.cost is None:
      object.__setattr__(self, "cost", _hq_plus_lq_cost)


def _hq_plus_lq_cost(sizes: dict, hq_cost: float) -> float:
  """HQ slices (train + validation) at hq_cost each, LQ slices at 1."""
  return (sizes["hq_train"] + sizes["hq_val"]) * hq_cost + sizes["lq"]


def _hq_cost(sizes: dict, hq_cost: float) -> float:
  return (sizes["hq_train"] + sizes["hq_val"]) * hq_cost


def _lq_cost(sizes: dict, hq_cost: float) -> float:
  # The LQ set, validated on LQ versions of the validation slices.
  return sizes["lq"] + sizes["hq_val"]


def _oracle_cost(sizes: dict, hq_cost: float) -> float:
  # Every slice annotated well.
  return (sizes["hq_train"] + sizes["hq_val"] + sizes["lq"]) * hq_cost


_ENTRIES = (
    Scenario("hq", "HQ only", _hq, default=True, cost=_hq_cost),
    Scenario("lq", "LQ", _lq, default=True, cost=_lq_cost),
    Scenario("hq_lq", "HQ + LQ", _hq_lq, default=True),
    Scenario("hq_upgraded", "HQ + upgraded", _hq_upgraded, default=True),
    Scenario("oracle", "Oracle (all true)", _oracle, default=True, cost=_oracle_cost),
    Scenario("confident_learning", "Confident learn.", _confident_learning,
             methods.fit_confident_learning, engine.ConfidentLearning(), "cl"),
    Scenario("partial_labelling", "Partial labels", _partial_labelling,
             methods.fit_partial_labelling, engine.PartialLabelling(), "pl"),
)
REGISTRY: dict[str, Scenario] = {e.name: e for e in _ENTRIES}
SCENARIOS: tuple[str, ...] = tuple(REGISTRY)
DEFAULT_SCENARIOS: tuple[str, ...] = tuple(e.name for e in _ENTRIES if e.default)
LABELS: dict[str, str] = {e.name: e.label for e in _ENTRIES}
# The roles the summaries compare by: the paper's method against every other
# scenario, and the floor and ceiling of the gap it can recover.
METHOD, FLOOR, CEILING = "hq_upgraded", "hq", "oracle"
