"""Algorithm 1 of the paper, end to end, and the comparison scenarios.

    1. train the upgrade network u_θ on the HQ set, with P drawn fresh each step;
    2. upgrade the LQ labels (and the test set's LQ labels, to score them);
    3. train one segmentation network per scenario:
         hq           HQ only
         lq           LQ only
         hq_lq        HQ + LQ
         hq_upgraded  HQ + upgraded LQ
       plus the global-threshold baseline;
    4. score everything on the test set with pooled Dice, over `reps` seeds.

`run` returns a `Results` and leaves per-repetition files in `out_dir`; a
rerun with the same `out_dir` skips finished repetitions and resumes training
runs from their checkpoints. `run_user` is the same method on a user's
folders of real HQ and LQ annotations.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from upgrade_jax import export, instances, metrics, rundir  # export, instances: issue 13
from upgrade_jax import engine
from upgrade_jax.baselines import threshold as threshold_lib
from upgrade_jax.data import io, sampling
from upgrade_jax.data.types import Dataset, concat
from upgrade_jax.engine.tiling import TileConfig
from upgrade_jax.perturb import PerturbConfig, felzenszwalb_objects
from upgrade_jax.rundir import InputError

SCENARIOS = ("hq", "lq", "hq_lq", "hq_upgraded")
OTHERS_MODES = ("labels", "felzenszwalb", "none")
LQ_SOURCES = ("perturb", "predictions")


# --------------------------------------------------------------------------
# Configuration.

@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data come from and how they are split.

  Attributes:
    source: "synthetic", "epfl_mito", "folder" or "stack".
    preset: synthetic preset (see upgrade_jax.data.synthetic.PRESETS).
    data_dir: root of the real data. epfl_mito and stack: a folder with
      train/{images,labels}.tif and test/{images,labels}.tif; folder: a folder
      with images/ and labels/ (and optionally others/).
    n_volumes: synthetic volumes to simulate.
    volume_shape: synthetic (Z, H, W).
    sim_size: synthetic pixel scale: "default", or "paper" (the paper's
      pixel size: cells 1.5x larger in pixels; use with a paper-size shape).
    n_test: volumes (synthetic) or images (folder) held out as the test set;
      epfl_mito and stack use their test stacks.
    n_hq: HQ slices, chosen by the paper's rule (sampling.select_slices).
    n_lq: LQ slices drawn from the remaining training slices (None: all).
    max_test: cap on the number of test slices (evenly spaced), None for all.
    others: what inclusion draws from: "labels" (the other cell type of the
      synthetic presets, or others/ of a folder), "felzenszwalb" segments,
      or "none".
    data_seed: seed of the simulator and of the test hold-out.
    normalisation: per-image "max" or "percentile".
    hq_perturb: imperfect HQ (the paper's Figure 3.5): the HQ labels the
      networks train on are themselves perturbed once with this config
      (identity by default). The test set keeps its ground truth.
  """

  source: str = "synthetic"
  preset: str = "hl60"
  data_dir: str = ""
  n_volumes: int = 10
  volume_shape: tuple[int, int, int] = (32, 256, 256)
  sim_size: str = "default"
  n_test: int = 2
  n_hq: int = 10
  n_lq: int | None = None
  max_test: int | None = None
  others: str = "labels"
  data_seed: int = 0
  normalisation: str = "max"
  hq_perturb: PerturbConfig = PerturbConfig()

  def __post_init__(self):
    if self.source not in io.SOURCES:
      raise ValueError(f"DataConfig.source {self.source!r} unknown; choose one of "
                       f"{sorted(io.SOURCES)}")
    if self.others not in OTHERS_MODES:
      raise ValueError(f"DataConfig.others {self.others!r} unknown; choose one of "
                       f"{list(OTHERS_MODES)}")
    if self.source != "synthetic" and not self.data_dir:
      raise ValueError(f"DataConfig.data_dir is required for source {self.source!r}")
    if self.n_hq < 2:
      raise ValueError(f"DataConfig.n_hq must be >= 2 (train + validation), got {self.n_hq}")
    if self.source == "synthetic" and not 1 <= self.n_test < self.n_volumes:
      raise ValueError(f"--n_test={self.n_test} must be at least 1 and below "
                       f"--n_volumes={self.n_volumes}: lower --n_test or raise --n_volumes")
    object.__setattr__(self, "volume_shape", tuple(int(s) for s in self.volume_shape))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """One run of Algorithm 1 and its scenarios.

  Attributes:
    data: the DataConfig.
    upgrade: TrainConfig of u_θ (task engine.Upgrade); its task's `perturb`
      is the P the network trains with.
    segment: TrainConfig of the segmentation networks (task engine.Segment).
    lq_perturb: the perturbation that makes the fixed LQ set (may differ from
      upgrade.task.perturb: the paper's mismatch study).
    scenarios: segmentation scenarios to train, a subset of SCENARIOS; empty
      means upgrade only.
    threshold_baseline: also score the global-threshold baseline.
    reps: repetitions; repetition r uses seed + r everywhere.
    seed: base seed.
    predict_batch: images per jitted prediction call.
    lq_source: "perturb" (LQ = lq_perturb(GT)) or "predictions" (the
      paper's case study, §3.3.4: LQ = the predictions of a segmentation
      network trained on `predictor_hq` HQ slices).
    predictor_hq: HQ training slices of that predictor.
    output: what the upgraded files hold (issue 13): "instances" (touching
      cells separate, LQ instances as seeds) or "mask" (connected components).
    tiling: how prediction of the written files cuts large images.
  """

  data: DataConfig = DataConfig()
  upgrade: engine.TrainConfig = engine.TrainConfig(task=engine.Upgrade())
  segment: engine.TrainConfig = engine.TrainConfig(task=engine.Segment())
  lq_perturb: PerturbConfig = PerturbConfig(omission_rate=0.7)
  scenarios: tuple[str, ...] = SCENARIOS
  threshold_baseline: bool = True
  reps: int = 1
  seed: int = 0
  predict_batch: int = 8
  lq_source: str = "perturb"
  predictor_hq: int = 10
  output: str = "instances"          # issue 13
  tiling: TileConfig = TileConfig()  # issue 13

  def __post_init__(self):
    if self.output not in instances.OUTPUTS:
      raise ValueError(f"--output={self.output!r}: choose one of {list(instances.OUTPUTS)}")
    if self.lq_source not in LQ_SOURCES:
      raise ValueError(f"PipelineConfig.lq_source {self.lq_source!r} unknown; choose one of "
                       f"{list(LQ_SOURCES)}")
    object.__setattr__(self, "scenarios", tuple(self.scenarios))
    unknown = [s for s in self.scenarios if s not in SCENARIOS]
    if unknown:
      raise ValueError(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    if (not isinstance(self.upgrade.task, engine.Upgrade)
        or not isinstance(self.segment.task, engine.Segment)):
      raise ValueError("PipelineConfig: upgrade.task must be an engine.Upgrade and "
                       "segment.task an engine.Segment")
    if self.reps < 1:
      raise ValueError(f"PipelineConfig.reps must be >= 1, got {self.reps}")


# --------------------------------------------------------------------------
# Data.

def load_volumes(cfg: DataConfig):
  """(train_volumes, test_volumes) for the configured source."""
  if cfg.source == "synthetic":
    vols = io.load_source("synthetic", preset=cfg.preset, seed=cfg.data_seed,
                          n_volumes=cfg.n_volumes, shape=cfg.volume_shape,
                          size=cfg.sim_size)
    return sampling.hold_out(vols, cfg.n_test, seed=cfg.data_seed)
  root = Path(cfg.data_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"data_dir {root} does not exist (source {cfg.source!r})")
  if cfg.source == "folder":
    others = root / "others" if (root / "others").is_dir() else None
    vols = io.load_source("folder", images_dir=root / "images", labels_dir=root / "labels",
                          others_dir=others)
    return sampling.hold_out(vols, cfg.n_test, seed=cfg.data_seed)
  if cfg.source == "epfl_mito":
    return io.epfl_mito(root, "train"), io.epfl_mito(root, "test")
  split = lambda s: io.stack(root / s / "images.tif", root / s / "labels.tif", name=s)  # noqa: E731
  return split("train"), split("test")


def target_area_range(targets, percentiles=(5, 95)) -> tuple[float, float]:
  """Area range (pixels) of the target instances of a stack of (.., H, W) maps."""
  areas = []
  for t in np.asarray(targets).reshape(-1, *np.shape(targets)[-2:]):
    a = np.bincount(t.ravel())[1:]
    areas.append(a[a > 0])
  areas = np.concatenate(areas) if areas else np.zeros(0)
  if areas.size == 0:
    return (0.0, np.inf)
  lo, hi = np.percentile(areas, percentiles)
  return float(lo), float(hi)


def felzenszwalb_volumes(volumes, felz: dict, log=print):
  """`others` of every slice = Felzenszwalb segments off the targets, sized
  like the training targets (5th–95th percentile of their areas). Done once
  per run, at the volume level, so repetitions do not recompute it."""
  train, test = volumes
  area_range = target_area_range(np.concatenate([v.target for v in train]))
  log(f"Felzenszwalb inclusion candidates: segments of {area_range[0]:.0f}-"
      f"{area_range[1]:.0f} px ({felz})")

  def one(v):
    img = v.image.astype(np.float32)
    if img.ndim == 4:
      img = img.mean(-1)
    others = np.stack([felzenszwalb_objects(z / max(float(z.max()), 1e-12), t,
                                            area_range=area_range, **felz)
                       for z, t in zip(img, v.target)])
    return dataclasses.replace(v, others=others)

  return [one(v) for v in train], [one(v) for v in test]


def _with_others(ds: Dataset, mode: str, felz: dict) -> Dataset:
  """Dataset-level `others` (user mode): Felzenszwalb segments or nothing."""
  if mode == "labels" or len(ds) == 0:
    return ds
  if mode == "none":
    return ds.replace(others=np.zeros_like(ds.others))
  area_range = target_area_range(ds.targets)
  out = np.zeros_like(ds.others)
  for i in range(len(ds)):
    h, w = ds.extents[i]
    out[i, :h, :w] = felzenszwalb_objects(ds.images[i, :h, :w], ds.targets[i, :h, :w],
                                          area_range=area_range, **felz)
  return ds.replace(others=out)


def _cap(ds: Dataset, n: int | None) -> Dataset:
  if n is None or len(ds) <= n:
    return ds
  return ds.subset(np.unique(np.linspace(0, len(ds) - 1, n).round().astype(int)))


@dataclasses.dataclass(frozen=True)
class RepData:
  """The data of one repetition. `lq` and `test_lq` hold LQ masks as targets
  (int32 0/1); `lq_gt` is the ground truth of the LQ slices."""
  hq_train: Dataset
  hq_val: Dataset
  lq: Dataset
  lq_gt: Dataset
  test: Dataset
  test_lq: Dataset
  val_lq: Dataset


def prepare_rep(cfg: PipelineConfig, volumes, seed: int, felz: dict | None = None) -> RepData:
  """Splits, `others`, and the fixed LQ sets (made once per seed)."""
  felz = felz or {}
  train_vols, test_vols = volumes
  splits = sampling.make_splits(train_vols, test_vols, n_hq=cfg.data.n_hq, seed=seed,
                                n_lq=cfg.data.n_lq, normalisation=cfg.data.normalisation)
  # Felzenszwalb others are made per volume in `run`; here only "none" acts.
  mode = "labels" if cfg.data.others == "felzenszwalb" else cfg.data.others
  prep = lambda d: _with_others(d, mode, felz)  # noqa: E731
  hq_train, hq_val = prep(splits.hq_train), prep(splits.hq_val)
  lq_gt, test = prep(splits.lq), prep(_cap(splits.test, cfg.data.max_test))
  if not cfg.data.hq_perturb.is_identity:
    hq_train = _imperfect(hq_train, cfg.data.hq_perturb, seed * 5 + 4)
    hq_val = _imperfect(hq_val, cfg.data.hq_perturb, seed * 5 + 5)
  # Independent streams for the LQ training set, the test set's LQ and the
  # LQ validation set of the "lq" scenario.
  lq = sampling.make_lq(lq_gt, cfg.lq_perturb, seed=seed * 5 + 1)
  test_lq = sampling.make_lq(test, cfg.lq_perturb, seed=seed * 5 + 2)
  val_lq = sampling.make_lq(hq_val, cfg.lq_perturb, seed=seed * 5 + 3)
  return RepData(hq_train, hq_val, lq, lq_gt, test, test_lq, val_lq)


def _imperfect(ds: Dataset, config: PerturbConfig, seed: int) -> Dataset:
  """HQ labels with errors: perturbed once, then split back into instances."""
  from skimage.measure import label as connected_components

  masks = sampling.make_lq(ds, config, seed=seed).targets
  targets = np.stack([connected_components(m, connectivity=1) for m in masks])
  return ds.replace(targets=targets.astype(np.int32))


def _predicted_lq(cfg: PipelineConfig, data: RepData, seed: int, workdir: Path,
                  log) -> RepData:
  """The case study's LQ labels: predictions of a segmentation network
  trained on the first `predictor_hq` HQ training slices (validated on the
  HQ validation slices), for the LQ training slices and the test slices."""
  n = min(cfg.predictor_hq, len(data.hq_train))
  log(f"making LQ labels from a segmentation network trained on {n} HQ slices")
  fit = engine.fit(dataclasses.replace(cfg.segment, seed=seed),
                      data.hq_train.subset(np.arange(n)), data.hq_val, workdir, log=log)

  def predicted(ds: Dataset) -> Dataset:
    if len(ds) == 0:
      return ds
    pred = engine.predict(fit.state_best, ds.images, batch_size=cfg.predict_batch,
                             extents=ds.extents)
    return ds.replace(targets=pred.astype(np.int32))

  return dataclasses.replace(data, lq=predicted(data.lq_gt), test_lq=predicted(data.test),
                             val_lq=predicted(data.hq_val))


# --------------------------------------------------------------------------
# Scenarios: how each one's (train, validation) Datasets are made. Every
# scenario validates on the HQ validation slices, except "lq", whose user has
# only LQ labels and so validates on LQ versions of them.

def _hq(d: RepData, upgraded: Dataset):
  return d.hq_train, d.hq_val


def _lq(d: RepData, upgraded: Dataset):
  return d.lq, d.val_lq


def _hq_lq(d: RepData, upgraded: Dataset):
  return concat([d.hq_train, d.lq]), d.hq_val


def _hq_upgraded(d: RepData, upgraded: Dataset):
  return concat([d.hq_train, upgraded]), d.hq_val


SCENARIO_DATA: dict[str, Callable] = {
    "hq": _hq, "lq": _lq, "hq_lq": _hq_lq, "hq_upgraded": _hq_upgraded}


# --------------------------------------------------------------------------
# One repetition.

def _write_json(path: Path, obj, guard: rundir.InputGuard | None = None) -> None:
  io.write_json(path, obj, guard=guard)


def upgrade_labels(state, ds: Dataset, batch_size: int = 8) -> np.ndarray:
  """(N, H, W) bool: u_θ(image, LQ mask) for every sample of `ds` (LQ targets)."""
  return engine.predict(state, ds.images, ds.targets > 0, batch_size=batch_size,
                           extents=ds.extents)


def write_upgraded(directory: Path, ds: Dataset, masks: np.ndarray,
                   guard: rundir.InputGuard | None = None, *, output: str = "mask",
                   lq_labels: np.ndarray | None = None) -> list[Path]:
  """One uint16/uint32 instance-label TIFF per sample, cropped to the
  sample's valid extent, named after it.

  output "mask": connected components of the upgraded mask; "instances"
  (issue 13): touching cells split, seeded by `lq_labels` (N, H, W) where
  they hold instances (instances.instances_from_upgrade).
  """
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, (name, mask, (h, w)) in enumerate(zip(ds.names, masks, ds.extents)):
    if output == "instances":
      lq = None if lq_labels is None else lq_labels[i, :h, :w]
      lab = instances.instances_from_upgrade(mask[:h, :w], lq)
    else:
      lab = instances.components(mask[:h, :w])
    paths.append(io.write_labels(directory / f"{Path(name).stem}.tif", lab, guard=guard))
  return paths


def _export(cfg: PipelineConfig, state, out_dir: Path, ds: Dataset, fit,
            guard) -> "export.Upgrader":
  """Issue 13: saves out_dir/model and returns the upgrader read back from it,
  so the run writes its files exactly as experiments.apply will."""
  up = export.upgrader_from_state(state, image_channels=ds.channels,
                                  normalisation=cfg.data.normalisation, tiling=cfg.tiling)
  export.save_upgrader(out_dir / "model", up, guard=guard, train={
      "best_val_dice": fit.best_val_dice, "best_step": fit.best_step,
      "config": cfg.upgrade.to_json()})
  return export.load_upgrader(out_dir / "model")


def run_rep(cfg: PipelineConfig, volumes, rep: int, out_dir: Path, *,
            log: Callable[[str], None] = print, felz: dict | None = None,
            guard: rundir.InputGuard | None = None) -> dict:
  """Runs repetition `rep`; returns (and saves) its numbers.

  A finished repetition (rep_dir/rep.json) is loaded, not rerun.
  """
  rep_dir = out_dir / f"rep{rep}"
  done = rep_dir / "rep.json"
  if done.exists():
    log(f"[rep {rep}] already finished: {done}")
    return json.loads(done.read_text())
  seed = cfg.seed + rep
  timings = {}
  t0 = time.perf_counter()
  data = prepare_rep(cfg, volumes, seed, felz)
  if cfg.lq_source == "predictions":
    data = _predicted_lq(cfg, data, seed, rep_dir / "lq_predictor", log)
  timings["data_s"] = time.perf_counter() - t0
  log(f"[rep {rep}] HQ train {len(data.hq_train)}, HQ val {len(data.hq_val)}, "
      f"LQ {len(data.lq)}, test {len(data.test)} slices of {data.test.images.shape[1:3]}")

  t0 = time.perf_counter()
  up_cfg = dataclasses.replace(cfg.upgrade, seed=seed)
  log(f"[rep {rep}] training the upgrade network")
  fit = engine.fit(up_cfg, data.hq_train, data.hq_val, rep_dir / "upgrade", log=log)
  timings["upgrade_train_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  upgraded_test = upgrade_labels(fit.state_best, data.test_lq, cfg.predict_batch)
  valid = data.test.valid_mask()
  result = {
      "rep": rep, "seed": seed,
      "annotation_dice": {
          "lq": metrics.pooled_dice_np(data.test_lq.targets, data.test.targets, valid),
          "upgraded": metrics.pooled_dice_np(upgraded_test, data.test.targets, valid)},
      "upgrade_best_val_dice": fit.best_val_dice, "upgrade_best_step": fit.best_step,
      "segmentation_dice": {}, "sizes": {
          "hq_train": len(data.hq_train), "hq_val": len(data.hq_val),
          "lq": len(data.lq), "test": len(data.test)},
  }
  # Issue 13: instance scores (StarDist matching) of the test set's LQ
  # labels (their components) and of its upgraded labels, against GT.
  gt_inst = [t[:h, :w] for t, (h, w) in zip(data.test.targets, data.test.extents)]
  result["annotation_instances"] = {
      "lq": instances.summary_scores(gt_inst, [instances.components(m[:h, :w]) for m, (h, w)
                                               in zip(data.test_lq.targets, data.test.extents)]),
      "upgraded": instances.summary_scores(gt_inst, [
          instances.instances_from_upgrade(m[:h, :w], lq[:h, :w]) for m, lq, (h, w)
          in zip(upgraded_test, data.test_lq.targets, data.test.extents)])}
  upgraded = data.lq
  if rep == 0:  # issue 13: the saved upgrader
    _export(cfg, fit.state_best, out_dir, data.hq_train, fit, guard)
  if len(data.lq):
    masks = upgrade_labels(fit.state_best, data.lq, cfg.predict_batch)
    upgraded = data.lq.replace(targets=masks.astype(np.int32))
    result["annotation_dice"]["lq_train_set"] = {
        "lq": metrics.pooled_dice_np(data.lq.targets, data.lq_gt.targets, data.lq.valid_mask()),
        "upgraded": metrics.pooled_dice_np(masks, data.lq_gt.targets, data.lq.valid_mask())}
    target_dir = out_dir / "upgraded" if rep == 0 else rep_dir / "upgraded"
    write_upgraded(target_dir, data.lq, masks, guard=guard, output=cfg.output,
                   lq_labels=data.lq.targets)
  timings["upgrade_predict_s"] = time.perf_counter() - t0
  log(f"[rep {rep}] annotation Dice on the test set: LQ "
      f"{result['annotation_dice']['lq']:.4f} -> upgraded "
      f"{result['annotation_dice']['upgraded']:.4f}")
  np.savez_compressed(rep_dir / "samples.npz", **_figure_samples(data, upgraded_test))

  for scenario in cfg.scenarios:
    t0 = time.perf_counter()
    train_ds, val_ds = SCENARIO_DATA[scenario](data, upgraded)
    seg_cfg = dataclasses.replace(cfg.segment, seed=seed)
    log(f"[rep {rep}] training the segmentation network: {scenario} "
        f"({len(train_ds)} training slices)")
    seg = engine.fit(seg_cfg, train_ds, val_ds, rep_dir / f"seg_{scenario}", log=log)
    pred = engine.predict(seg.state_best, data.test.images, batch_size=cfg.predict_batch,
                             extents=data.test.extents)
    dice = metrics.pooled_dice_np(pred, data.test.targets, valid)
    result["segmentation_dice"][scenario] = dice
    timings[f"seg_{scenario}_s"] = time.perf_counter() - t0
    log(f"[rep {rep}] segmentation Dice ({scenario}): {dice:.4f}")
  if cfg.threshold_baseline and cfg.scenarios:
    hq_all = concat([data.hq_train, data.hq_val])
    thr = threshold_lib.fit_and_evaluate(hq_all, data.test)
    result["segmentation_dice"]["threshold"] = thr.test_dice
    result["threshold"] = dataclasses.asdict(thr)
    log(f"[rep {rep}] segmentation Dice (threshold at {thr.fraction:.0%} of max): "
        f"{thr.test_dice:.4f}")
  result["timings"] = timings
  _write_json(done, result)
  return result


def _figure_samples(data: RepData, upgraded: np.ndarray, k: int = 3) -> dict:
  """A few test slices (image, GT, LQ, upgraded) for the overlay figure:
  evenly spread over the test slices that hold targets (so they come from
  different places, not three neighbouring slices), cropped to common bounds."""
  n = len(data.test)
  with_cells = np.flatnonzero((data.test.targets > 0).reshape(n, -1).any(1))
  pool = with_cells if len(with_cells) else np.arange(n)
  order = pool[np.unique(np.linspace(0, len(pool) - 1, min(k, len(pool))).round().astype(int))]
  h = int(data.test.extents[order, 0].min())
  w = int(data.test.extents[order, 1].min())
  return {"image": data.test.images[order, :h, :w].mean(-1),
          "gt": data.test.targets[order, :h, :w] > 0,
          "lq": data.test_lq.targets[order, :h, :w] > 0,
          "upgraded": upgraded[order, :h, :w],
          "names": np.array([data.test.names[i] for i in order])}


# --------------------------------------------------------------------------
# All repetitions.

@dataclasses.dataclass
class Results:
  """Per-repetition numbers and their summaries (see `summary`)."""
  config: PipelineConfig
  reps: list
  timings: dict

  def summary(self) -> dict:
    ann = {k: metrics.summarize([r["annotation_dice"][k] for r in self.reps])
           for k in ("lq", "upgraded")}
    names = [s for s in (*SCENARIOS, "threshold") if all(
        s in r["segmentation_dice"] for r in self.reps)]
    seg = {s: metrics.summarize([r["segmentation_dice"][s] for r in self.reps]) for s in names}
    wil = {}
    if "hq_upgraded" in seg:
      for s in names:
        if s != "hq_upgraded":
          wil[f"hq_upgraded_vs_{s}"] = metrics.wilcoxon(
              seg["hq_upgraded"]["per_rep"], seg[s]["per_rep"])
    wil["upgraded_vs_lq_annotations"] = metrics.wilcoxon(
        ann["upgraded"]["per_rep"], ann["lq"]["per_rep"])
    return {"annotation_dice": ann, "segmentation_dice": seg, "wilcoxon": wil}


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
  if n_train < d.n_hq:
    raise InputError(f"--n_hq={d.n_hq} HQ slices asked for, but the {len(train)} training "
                     f"volume(s) hold {n_train} slice(s) with a labelled object: lower --n_hq "
                     f"or {more}")
  if d.n_lq is not None and d.n_lq > n_train - d.n_hq:
    raise InputError(f"--n_lq={d.n_lq} LQ slices asked for, but only {n_train - d.n_hq} "
                     f"training slice(s) are left after --n_hq={d.n_hq}: lower --n_lq (or --n_hq)")


def prepare_run(cfg: PipelineConfig, out_dir, *, log: Callable[[str], None] = print,
                felz: dict | None = None):
  """Loads and checks everything a run needs; creates nothing.

  Returns:
    (volumes, guard): the (train, test) volumes (with Felzenszwalb `others`
    when configured) and the InputGuard of the run's inputs.

  Raises:
    InputError / ValueError / OSError naming the input, setting or out_dir.
  """
  guard = data_inputs(cfg.data)
  rundir.check_out_dir(out_dir, guard)
  volumes = load_volumes(cfg.data)
  check_counts(cfg, volumes)
  if cfg.data.others == "felzenszwalb":
    volumes = felzenszwalb_volumes(volumes, felz or {}, log)
  return volumes, guard


def run(cfg: PipelineConfig, out_dir, *, log: Callable[[str], None] = print,
        felz: dict | None = None, prepared=None) -> Results:
  """Algorithm 1 and the scenarios, `cfg.reps` times; resumable in `out_dir`.

  `prepared` is `prepare_run`'s result (made here when None): everything is
  loaded and checked before `out_dir` is created.
  """
  out_dir = Path(out_dir)
  t0 = time.perf_counter()
  volumes, guard = prepared if prepared is not None else prepare_run(cfg, out_dir, log=log,
                                                                 felz=felz)
  load_s = time.perf_counter() - t0
  log(f"data: {cfg.data.source} ({len(volumes[0])} training / {len(volumes[1])} test "
      f"volumes), loaded in {load_s:.1f}s")
  with rundir.RunLock(out_dir):
    rundir.remove_stale_temps(out_dir)
    reps = [run_rep(cfg, volumes, r, out_dir, log=log, felz=felz, guard=guard)
            for r in range(cfg.reps)]
  return Results(cfg, reps, {"load_s": load_s, "total_s": time.perf_counter() - t0})


# --------------------------------------------------------------------------
# User mode: real HQ and LQ annotations in folders.

@dataclasses.dataclass(frozen=True)
class UserData:
  """Folders of a user's data (StarDist/Cellpose layout: same file names)."""
  hq_images: str
  hq_labels: str
  lq_images: str
  lq_labels: str
  others_labels: str = ""   # non-target objects of the HQ images (inclusion)


@dataclasses.dataclass(frozen=True)
class UserInputs:
  """A user's data, loaded and checked (`prepare_user`)."""
  hq: Dataset             # HQ images with their instance labels (targets)
  lq: Dataset             # LQ images with their LQ masks (targets, int32 0/1)
  train_idx: np.ndarray   # HQ samples u_θ trains on
  val_idx: np.ndarray     # HQ samples of early stopping
  guard: rundir.InputGuard
  lq_instances: np.ndarray | None = None  # issue 13: (N, H, W) the LQ files' own ids


def prepare_user(cfg: PipelineConfig, user: UserData, out_dir, *,
                 felz: dict | None = None) -> UserInputs:
  """Loads and checks a user's folders and the out_dir; creates nothing.

  Raises:
    InputError / ValueError / OSError naming the folder, file or setting.
  """
  folders = {k: v for k, v in dataclasses.asdict(user).items() if v}
  for flag, path in folders.items():
    if not Path(path).is_dir():
      raise InputError(f"--{flag}={path} is not a folder; give the folder that holds the files")
  guard = rundir.InputGuard(folders.values())
  rundir.check_out_dir(out_dir, guard)
  hq_vols = io.folder(user.hq_images, user.hq_labels, user.others_labels or None)
  lq_vols = io.folder(user.lq_images, user.lq_labels)
  def file_ids(folder):
    return {(p.stat().st_dev, p.stat().st_ino): p.name for p in sorted(Path(folder).iterdir())
            if p.is_file()}
  hq_files = file_ids(user.hq_images)
  shared = [name for key, name in file_ids(user.lq_images).items() if key in hq_files]
  if shared:
    raise InputError(f"--lq_images={user.lq_images} holds {len(shared)} of the HQ images "
                     f"themselves (e.g. {shared[0]}); the LQ set must be other images")
  kw = dict(normalisation=cfg.data.normalisation)
  hq = io.volumes_to_dataset(hq_vols, **kw)
  lq = io.volumes_to_dataset(lq_vols, **kw)
  if hq.channels != lq.channels:
    raise InputError(f"the images in --hq_images have {hq.channels} channel(s) but those in "
                     f"--lq_images {lq.channels}; give both in the same channel layout")
  if not np.any(hq.targets > 0):
    raise InputError(f"none of the {len(hq)} label files in --hq_labels={user.hq_labels} holds "
                     "a labelled object (all pixels 0); label the cells with ids > 0")
  train_idx, val_idx = sampling.train_val_split(len(hq), seed=cfg.seed)
  if len(val_idx) == 0:
    raise InputError(f"--hq_images={user.hq_images} holds {len(hq)} image(s); at least 2 HQ "
                     "pairs are needed (training + validation)")
  hq = _with_others(hq, cfg.data.others, felz or {})
  lq_instances = lq.targets
  lq = lq.replace(targets=(lq.targets > 0).astype(np.int32))
  return UserInputs(hq, lq, train_idx, val_idx, guard, lq_instances)


def run_user(cfg: PipelineConfig, user: UserData, out_dir, *,
             log: Callable[[str], None] = print, felz: dict | None = None,
             prepared: UserInputs | None = None) -> dict:
  """Trains u_θ on the HQ pairs and writes out_dir/upgraded/<LQ file name>.tif.

  With "hq_upgraded" in cfg.scenarios it also trains the segmentation network
  on HQ ∪ upgraded and keeps its checkpoints in out_dir/seg_hq_upgraded.
  Input folders are only read; everything is checked (`prepare_user`, or
  `prepared`) before out_dir is created.
  """
  out_dir = Path(out_dir)
  d = prepared if prepared is not None else prepare_user(cfg, user, out_dir, felz=felz)
  hq_train, hq_val = d.hq.subset(d.train_idx), d.hq.subset(d.val_idx)
  log(f"user data: {len(d.hq)} HQ images ({len(hq_train)} train / {len(hq_val)} val), "
      f"{len(d.lq)} LQ images")
  with rundir.RunLock(out_dir):
    rundir.remove_stale_temps(out_dir)
    fit = engine.fit(dataclasses.replace(cfg.upgrade, seed=cfg.seed), hq_train, hq_val,
                        out_dir / "upgrade", log=log)
    # Issue 13: export the upgrader, then upgrade through it, one image at a
    # time (tiled), as experiments.apply does: its files equal these.
    upgrader = _export(cfg, fit.state_best, out_dir, d.hq, fit, d.guard)
    masks = export.upgrade_masks(upgrader, d.lq, d.lq_instances)
    paths = write_upgraded(out_dir / "upgraded", d.lq, masks, guard=d.guard,
                           output=cfg.output, lq_labels=d.lq_instances)
    log(f"wrote {len(paths)} upgraded label files to {out_dir / 'upgraded'}")
    result = {"upgrade_best_val_dice": fit.best_val_dice, "n_hq": len(d.hq),
              "n_lq": len(d.lq), "upgraded": [str(p) for p in paths]}
    if "hq_upgraded" in cfg.scenarios:
      upgraded = d.lq.replace(targets=masks.astype(np.int32))
      seg = engine.fit(dataclasses.replace(cfg.segment, seed=cfg.seed),
                          concat([hq_train, upgraded]), hq_val,
                          out_dir / "seg_hq_upgraded", log=log)
      result["segmentation_best_val_dice"] = seg.best_val_dice
    _write_json(out_dir / "results.json", result, guard=d.guard)
  return result
