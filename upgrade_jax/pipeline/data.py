"""The data of a run: volumes from a source, `others`, one repetition's sets.

  load_volumes     (train, test) volumes from the source registry (sources.py)
  prepare_rep      one repetition's HQ / LQ / test sets and fixed LQ labels
  check_counts     the slices asked for exist (before anything is written)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from upgrade_jax import engine, rundir
from upgrade_jax.data import lq_volumes
from upgrade_jax.data import sampling
from upgrade_jax.data.types import Dataset
from upgrade_jax.perturb import PerturbConfig
from upgrade_jax.pipeline.config import DataConfig, PipelineConfig
from upgrade_jax.pipeline.others import with_others
from upgrade_jax.pipeline.sources import SOURCES
from upgrade_jax.rundir import InputError

__all__ = ["load_volumes", "hq_picks", "RepData", "prepare_rep", "predicted_lq",
           "data_inputs", "check_counts"]


def load_volumes(cfg: DataConfig):
  """(train_volumes, test_volumes) for the configured source (registry
  pipeline.sources.SOURCES)."""
  if cfg.source != "synthetic" and not Path(cfg.data_dir).is_dir():
    raise FileNotFoundError(f"--data_dir={cfg.data_dir} is not a folder (source "
                            f"{cfg.source!r}); give the folder that holds the data")
  return SOURCES[cfg.source](cfg)


def hq_picks(cfg: DataConfig, train_volumes) -> list[tuple[int, int]]:
  """The HQ slices (volume_idx, slice_idx) of the training volumes; the same
  for every repetition (the paper's rule has no randomness)."""
  return sampling.select_hq(train_volumes, cfg.n_hq, cfg.hq_volumes)


def _cap(ds: Dataset, n: int | None) -> Dataset:
  if n is None or len(ds) <= n:
    return ds
  return ds.subset(np.unique(np.linspace(0, len(ds) - 1, n).round().astype(int)))


@dataclasses.dataclass(frozen=True)
class RepData:
  """The data of one repetition.

  Ground truth as targets (int32 instance ids): hq_train, hq_val (the HQ
  slices, possibly made imperfect on purpose), lq_truth (the LQ slices'
  truth, for scoring only) and test. LQ labels as targets (int32 0/1
  masks): lq_masks (of the LQ slices), test_lq_masks (of the test slices) and
  val_lq_masks (of the HQ validation slices, for the "lq" scenario).
  hq_train_truth / hq_val_truth are the HQ slices' true labels (the same
  objects as hq_train / hq_val unless the HQ set is imperfect on purpose;
  None -> hq_train / hq_val), for the "oracle" scenario.
  `hq_picks` are the HQ slices' (volume, slice) pairs; `effective_rates` the
  perturbation rates the fixed LQ sets really have (sampling.effective_rates),
  or None when the LQ labels are not perturbations."""
  hq_train: Dataset
  hq_val: Dataset
  lq_masks: Dataset
  lq_truth: Dataset
  test: Dataset
  test_lq_masks: Dataset
  val_lq_masks: Dataset
  hq_picks: tuple = ()
  effective_rates: dict | None = None
  hq_train_truth: Dataset | None = None
  hq_val_truth: Dataset | None = None

  def __post_init__(self):
    for name, same in (("hq_train_truth", self.hq_train), ("hq_val_truth", self.hq_val)):
      if getattr(self, name) is None:
        object.__setattr__(self, name, same)


def prepare_rep(cfg: PipelineConfig, volumes, seed: int) -> RepData:
  """Splits, `others`, and the fixed LQ sets (made once per seed)."""
  train_vols, test_vols = volumes
  splits = sampling.make_splits(train_vols, test_vols, n_hq=cfg.data.n_hq, seed=seed,
                                n_lq=cfg.data.n_lq, **cfg.data.image_kwargs,
                                hq_volumes=cfg.data.hq_volumes, train_tile=cfg.data.train_tile)
  # Felzenszwalb others are made per volume in `run`; here only "none" acts.
  mode = "labels" if cfg.data.others == "felzenszwalb" else cfg.data.others
  prep = lambda d: with_others(d, mode, cfg.data.felzenszwalb)  # noqa: E731
  hq_train, hq_val = prep(splits.hq_train), prep(splits.hq_val)
  hq_train_truth, hq_val_truth = hq_train, hq_val
  lq_truth, test = prep(splits.lq_truth), prep(_cap(splits.test, cfg.data.max_test))
  if not cfg.data.hq_perturb.is_identity:
    hq_train = _imperfect(hq_train, cfg.data.hq_perturb, seed * 5 + 4)
    hq_val = _imperfect(hq_val, cfg.data.hq_perturb, seed * 5 + 5)
  # Independent streams for the LQ training set, the test set's LQ and the
  # LQ validation set of the "lq" scenario.
  if cfg.data.z_consistent:   # whole 3-D cells omitted / included
    lq, c_lq = lq_volumes.make_lq(lq_truth, train_vols, cfg.lq_perturb, seed=seed * 5 + 1)
    test_lq, c_test = lq_volumes.make_lq(test, test_vols, cfg.lq_perturb, seed=seed * 5 + 2)
    val_lq, _ = lq_volumes.make_lq(hq_val, train_vols, cfg.lq_perturb, seed=seed * 5 + 3)
    counts = {"lq_set": c_lq, "test_lq_set": c_test}
  else:
    lq = sampling.make_lq(lq_truth, cfg.lq_perturb, seed=seed * 5 + 1)
    test_lq = sampling.make_lq(test, cfg.lq_perturb, seed=seed * 5 + 2)
    val_lq = sampling.make_lq(hq_val, cfg.lq_perturb, seed=seed * 5 + 3)
    # The rates the fixed LQ sets really have (same seeds, same draws),
    # pooled over the LQ training set and the test set's LQ labels.
    counts = {"lq_set": sampling.lq_counts(lq_truth, cfg.lq_perturb, seed=seed * 5 + 1),
              "test_lq_set": sampling.lq_counts(test, cfg.lq_perturb, seed=seed * 5 + 2)}
  rates = sampling.effective_rates(np.concatenate(list(counts.values())))
  rates.update({k: sampling.effective_rates(c) for k, c in counts.items()})
  return RepData(hq_train, hq_val, lq, lq_truth, test, test_lq, val_lq,
                 hq_picks=splits.hq_picks, effective_rates=rates,
                 hq_train_truth=hq_train_truth, hq_val_truth=hq_val_truth)


def _imperfect(ds: Dataset, config: PerturbConfig, seed: int) -> Dataset:
  """HQ labels with errors: perturbed once, then split back into instances."""
  from skimage.measure import label as connected_components

  masks = sampling.make_lq(ds, config, seed=seed).targets
  targets = np.stack([connected_components(m, connectivity=1) for m in masks])
  return ds.replace(targets=targets.astype(np.int32))


def predicted_lq(cfg: PipelineConfig, data: RepData, seed: int, workdir: Path,
                  log, context: dict | None = None) -> RepData:
  """The case study's LQ labels: predictions of a segmentation network
  trained on the first `predictor_hq` HQ training slices (validated on the
  HQ validation slices), for the LQ training slices and the test slices."""
  n = min(cfg.predictor_hq, len(data.hq_train))
  log(f"making LQ labels from a segmentation network trained on {n} HQ slices")
  fit = engine.fit(dataclasses.replace(cfg.segment, seed=seed),
                   data.hq_train.subset(np.arange(n)), data.hq_val, workdir, log=log,
                   context=context)

  def predicted(ds: Dataset) -> Dataset:
    if len(ds) == 0:
      return ds
    pred = engine.predict(fit.state_best, ds, batch_size=cfg.predict_batch,
                          extents=ds.extents)
    return ds.replace(targets=pred.astype(np.int32))

  return dataclasses.replace(data, lq_masks=predicted(data.lq_truth),
                             test_lq_masks=predicted(data.test),
                             val_lq_masks=predicted(data.hq_val), effective_rates=None)


def data_inputs(cfg: DataConfig) -> rundir.InputGuard:
  """The user's files a run on `cfg` reads (none for synthetic data)."""
  return rundir.InputGuard([cfg.data_dir] if cfg.source != "synthetic" else [])


def check_counts(cfg: PipelineConfig, volumes) -> None:
  """Raises InputError, naming the setting to change, when the loaded
  volumes cannot give the slices the config asks for."""
  train, test = volumes
  n_train = sum(v.num_slices for v in train)
  n_test = sum(v.num_slices for v in test)
  d = cfg.data
  if d.source == "synthetic":
    more = (f"raise --n_volumes, or the Z of --volume_shape={','.join(map(str, d.volume_shape))}"
            " (slices without a cell are dropped)")
  else:
    more = f"add data to --data_dir={d.data_dir}"
  if n_test == 0:
    raise InputError(f"the test set ({len(test)} volume(s)) holds no slice with a labelled "
                     f"object: {more}")
  if d.hq_volumes is not None and d.hq_volumes > len(train):
    raise InputError(f"--hq_volumes={d.hq_volumes}, but there are {len(train)} training "
                     f"volume(s): lower --hq_volumes or {more}")
  pool = train[:d.hq_volumes] if d.hq_volumes is not None else train
  n_pool = sum(v.num_slices for v in pool)
  if n_pool < d.n_hq:
    where = (f"the first --hq_volumes={d.hq_volumes} training volume(s)"
             if d.hq_volumes is not None else f"the {len(train)} training volume(s)")
    raise InputError(f"--n_hq={d.n_hq} HQ slices asked for, but {where} hold {n_pool} "
                     f"slice(s) with a labelled object: lower --n_hq or {more}")
  if d.n_lq is not None and d.n_lq > n_train - d.n_hq:
    raise InputError(f"--n_lq={d.n_lq} LQ slices asked for, but only {n_train - d.n_hq} "
                     f"training slice(s) are left after --n_hq={d.n_hq}: lower --n_lq (or --n_hq)")
