"""The stages of one repetition of Algorithm 1, in the order `run_rep` calls them.

  prepare_data      the repetition's sets and fixed LQ labels
  train_upgrader    u_θ on the HQ slices, P drawn fresh each step
  upgrade_lq_sets   u_θ on the LQ labels of the test and training slices:
                    annotation Dice and instance scores, the saved upgrader
                    (out_dir/model, repetition 0), upgraded TIFFs, the
                    review queue (review.csv, review/), the overlay samples
  train_scenarios   one segmentation network per scenario (its data and
                    trainer from scenarios.REGISTRY), test Dice
  score_threshold   the global-threshold baseline

Each stage takes the config, what earlier stages made and the repetition's
`RepRun` (folder, seed, run key, log, timings, result), adds its numbers to
`RepRun.result`, and returns what later stages need.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from upgrade_jax import engine, export, instances, metrics, parallel, review, rundir
from upgrade_jax.baselines import threshold as threshold_lib
from upgrade_jax.data import io, stacking
from upgrade_jax.data.types import Dataset, concat
from upgrade_jax.pipeline.config import PipelineConfig
from upgrade_jax.pipeline.data import RepData, predicted_lq, prepare_rep
from upgrade_jax.pipeline.scenarios import REGISTRY

__all__ = ["RepRun", "prepare_data", "train_upgrader", "upgrade_lq_sets", "train_scenarios",
           "score_threshold", "upgrade_probs", "upgrade_labels", "upgrader_of", "write_upgraded",
           "export_upgrader", "threshold_baseline", "figure_samples"]


@dataclasses.dataclass
class RepRun:
  """What every stage of one repetition shares.

  rep_dir: the repetition's folder; out_dir: the run's; seed, key: its seed
  and run key (stored with each checkpoint); result: the rep.json dict being
  built; timings: seconds per stage; guard: the run's inputs.
  """
  rep: int
  rep_dir: Path
  out_dir: Path
  seed: int
  key: dict
  log: Callable[[str], None]
  result: dict
  timings: dict
  guard: rundir.InputGuard | None = None

  def timed(self, name: str, t0: float) -> None:
    self.timings[name] = time.perf_counter() - t0


def _rate(x) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def prepare_data(cfg: PipelineConfig, volumes, run: RepRun) -> RepData:
  t0 = time.perf_counter()
  data = prepare_rep(cfg, volumes, run.seed)
  if cfg.lq_source == "predictions":
    data = predicted_lq(cfg, data, run.seed, run.rep_dir / "lq_predictor", run.log,
                        context=run.key)
  run.timed("data_s", t0)
  run.log(f"[rep {run.rep}] HQ train {len(data.hq_train)}, HQ val {len(data.hq_val)}, "
          f"LQ {len(data.lq_masks)}, test {len(data.test)} slices of "
          f"{data.test.images.shape[1:3]}")
  if data.effective_rates is not None:
    r = data.effective_rates
    run.log(f"[rep {run.rep}] effective LQ rates: omission {_rate(r['omission'])} "
            f"({r['omitted']}/{r['targets']} cells), inclusion {_rate(r['inclusion'])} "
            f"({r['included']}/{r['others']} objects)")
  run.result.update(effective_rates=data.effective_rates, sizes={
      "hq_train": len(data.hq_train), "hq_val": len(data.hq_val),
      "lq": len(data.lq_masks), "test": len(data.test)})
  return data


def train_upgrader(cfg: PipelineConfig, data: RepData, run: RepRun) -> engine.FitResult:
  t0 = time.perf_counter()
  run.log(f"[rep {run.rep}] training the upgrade network")
  fit = engine.fit(dataclasses.replace(cfg.upgrade, seed=run.seed), data.hq_train,
                   data.hq_val, run.rep_dir / "upgrade", log=run.log, context=run.key)
  run.timed("upgrade_train_s", t0)
  run.result.update(upgrade_best_val_dice=fit.best_val_dice, upgrade_best_step=fit.best_step)
  return fit


def upgrade_lq_sets(cfg: PipelineConfig, data: RepData, fit: engine.FitResult,
                    run: RepRun) -> Dataset:
  """Scores the upgrade on the test slices' LQ labels, upgrades the LQ
  training set (TIFFs of repetition 0 in out_dir/upgraded, others in
  rep_dir/upgraded; beside them review.csv and review/, the review queue
  with each slice's Dice against the truth) and returns it as a Dataset of
  upgraded masks."""
  t0 = time.perf_counter()
  # Every upgraded label of the run, scored or written, comes from the Upgrader
  # `experiments.apply` loads (rep 0 saves it to out_dir/model): one path.
  hq_fg = review.max_foreground_fraction(data.hq_train)
  if run.rep == 0:
    upgrader = export_upgrader(cfg, fit, data.hq_train.channels, run.out_dir, run.guard, hq_fg)
  else:
    upgrader = upgrader_of(cfg, fit, data.hq_train.channels, hq_fg)
  test_probs, test_interior = upgrade_maps(upgrader, data.test_lq_masks)
  upgraded_test = test_probs > metrics.FOREGROUND_THRESHOLD
  valid = data.test.valid_mask()
  ann = {"lq": metrics.pooled_dice_np(data.test_lq_masks.targets, data.test.targets, valid),
         "upgraded": metrics.pooled_dice_np(upgraded_test, data.test.targets, valid)}
  # Instance scores (StarDist matching) of the test set's LQ labels (their
  # components) and of its upgraded labels, against the ground truth.
  crop = lambda a: [x[:h, :w] for x, (h, w) in zip(a, data.test.extents)]  # noqa: E731
  run.result["annotation_instances"] = {
      "lq": instances.summary_scores(crop(data.test.targets), [
          instances.components(m) for m in crop(data.test_lq_masks.targets)]),
      "upgraded": instances.summary_scores(crop(data.test.targets), [
          instances.labels_from_mask(m, lq, "instances", q) for m, lq, q
          in zip(crop(upgraded_test), crop(data.test_lq_masks.targets),
                 crop(test_interior) if test_interior is not None
                 else [None] * len(data.test))])}
  # Floods by the truth (review.truth_floods), of the test set's and the LQ
  # training set's upgraded labels: simulated data can check what the
  # review queue only suspects.
  floods = {"test": [n for n, m, t in zip(data.test.names, crop(upgraded_test),
                                          crop(data.test.targets)) if review.truth_floods(m, t)]}
  upgraded = data.lq_masks
  if len(data.lq_masks):
    # The probabilities once: the masks are those of upgrade_labels, and the
    # review queue gets their doubt.
    probs, interior = upgrade_maps(upgrader, data.lq_masks)
    masks = probs > metrics.FOREGROUND_THRESHOLD
    upgraded = data.lq_masks.replace(targets=masks.astype(np.int32))
    lq_valid = data.lq_masks.valid_mask()
    ann["lq_train_set"] = {
        "lq": metrics.pooled_dice_np(data.lq_masks.targets, data.lq_truth.targets, lq_valid),
        "upgraded": metrics.pooled_dice_np(masks, data.lq_truth.targets, lq_valid)}
    target_dir = run.out_dir / "upgraded" if run.rep == 0 else run.rep_dir / "upgraded"
    write_upgraded(target_dir, data.lq_masks, masks, guard=run.guard, output=cfg.output,
                   lq_labels=data.lq_masks.targets, interior=interior)
    # review.csv + review/ beside upgraded/; simulated data know the truth.
    ranked = review.write_dataset_review(
        target_dir.parent, data.lq_masks, masks, probs, truth=data.lq_truth.targets,
        top_n=cfg.review_top, guard=run.guard,
        hq_foreground_fraction=upgrader.hq_foreground_fraction)
    run.result["flooded"] = [r["name"] for r in ranked if r["flooded"]]
    floods["lq_train_set"] = [r["name"] for r in ranked if r.get("flooded_vs_truth")]
    if run.result["flooded"]:
      run.log(f"[rep {run.rep}] {review.flood_warning(ranked)}")
  run.timed("upgrade_predict_s", t0)
  run.result["flooded_vs_truth"] = floods
  if any(floods.values()):
    # Counts and the first names: the full lists are in results.json (a run on
    # 400 real images once logged 270 names in one line).
    named = "; ".join(f"{split} {len(names)}: {review.first_names(names, 3)}"
                      for split, names in floods.items() if names)
    run.log(f"[rep {run.rep}] WARNING: upgraded labels flooded against the truth ({named}; "
            "all in results.json, flooded_vs_truth)")
  run.result["annotation_dice"] = ann
  run.log(f"[rep {run.rep}] annotation Dice on the test set: LQ {ann['lq']:.4f} -> "
          f"upgraded {ann['upgraded']:.4f}")
  if rundir.is_primary_process():  # several JAX processes: process 0 writes
    np.savez_compressed(run.rep_dir / "samples.npz", **figure_samples(data, upgraded_test))
  return upgraded


def train_scenarios(cfg: PipelineConfig, data: RepData, upgraded: Dataset,
                    run: RepRun) -> None:
  """One segmentation network per scenario not yet in the result: its test
  Dice, the instance scores of its test predictions (the instances `apply`
  writes, StarDist matching) and how its training stopped."""
  seg_dice = run.result["segmentation_dice"]
  seg_inst = run.result.setdefault("segmentation_instances", {})
  seg_comp = run.result.setdefault("segmentation_components", {})
  training = run.result.setdefault("segmentation_training", {})
  valid = data.test.valid_mask()
  truth = [t[:h, :w] for t, (h, w) in zip(data.test.targets, data.test.extents)]
  for scenario in cfg.scenarios:
    if scenario in seg_dice:
      continue   # finished before with this very run key
    t0 = time.perf_counter()
    entry = REGISTRY[scenario]
    train_ds, val_ds = entry.data(data, upgraded, val_extra=cfg.seg_val_extra, seed=run.seed)
    run.log(f"[rep {run.rep}] training the segmentation network: {scenario} "
            f"({len(train_ds)} training, {len(val_ds)} validation slices)")
    seg, info = entry.train(cfg, train_ds, val_ds, run.rep_dir / f"seg_{scenario}",
                            seed=run.seed, options=cfg.options_of(scenario), log=run.log,
                            context=run.key)
    if info:
      run.result.setdefault("methods", {})[scenario] = info
    training[scenario] = {**seg.summary(cfg.segment.max_steps),
                          "train_slices": len(train_ds), "val_slices": len(val_ds)}
    pred = engine.predict(seg.state_best, data.test, batch_size=cfg.predict_batch,
                          extents=data.test.extents)
    seg_dice[scenario] = metrics.pooled_dice_np(pred, data.test.targets, valid)
    masks = [m[:h, :w] for m, (h, w) in zip(pred, data.test.extents)]
    # The instances `apply` would write (cfg.output; a segmentation network
    # has no LQ label to seed them), and the plain connected components.
    seg_inst[scenario] = instances.summary_scores(
        truth, [instances.labels_from_mask(m, None, cfg.output) for m in masks])
    seg_comp[scenario] = instances.summary_scores(truth, [instances.components(m)
                                                          for m in masks])
    run.timed(f"seg_{scenario}_s", t0)
    t = training[scenario]
    run.log(f"[rep {run.rep}] segmentation ({scenario}): Dice {seg_dice[scenario]:.4f}, "
            f"instance F1@0.5 {seg_inst[scenario]['f1@0.5']:.4f}, DSB score "
            f"{seg_inst[scenario]['dsb_score']:.4f} (best val {t['best_val_dice']:.4f} at step "
            f"{t['best_step']} of {t['steps']}: {t['stop_reason']})")


def score_threshold(cfg: PipelineConfig, volumes, data: RepData, run: RepRun) -> None:
  """The global-threshold baseline, unless scored before or not asked for."""
  seg_dice = run.result["segmentation_dice"]
  if not (cfg.threshold_baseline and cfg.scenarios) or "threshold" in seg_dice:
    return
  thr = threshold_baseline(cfg, volumes, data)
  seg_dice["threshold"] = thr.test_dice
  intensities = threshold_intensities(cfg)
  run.result["threshold"] = {**dataclasses.asdict(thr), "intensities": intensities}
  side = "at" if thr.polarity == "bright" else "below"   # "dark": foreground < threshold
  run.log(f"[rep {run.rep}] segmentation Dice (threshold {side} {thr.fraction:.0%} of the max "
          f"{intensities} intensity): {thr.test_dice:.4f}")


# --------------------------------------------------------------------------
# Helpers of the stages.



def upgrade_probs(upgrader: export.Upgrader, ds: Dataset) -> np.ndarray:
  """(N, H, W) float32: u_θ's foreground probability for every sample of
  `ds` (LQ targets as the label input), 0 outside each extent; each sample
  predicted alone and tiled, as `experiments.apply` predicts a file."""
  return export.upgrade_probs(upgrader, ds, ds.targets)


def upgrade_maps(upgrader: export.Upgrader, ds: Dataset):
  """upgrade_probs and the (N, H, W) interior probability of an upgrader
  with boundaries (None without)."""
  return export.upgrade_maps(upgrader, ds, ds.targets)


def upgrade_labels(upgrader: export.Upgrader, ds: Dataset) -> np.ndarray:
  """(N, H, W) bool: u_θ(image, LQ mask) for every sample of `ds` (LQ targets)."""
  return upgrade_probs(upgrader, ds) > metrics.FOREGROUND_THRESHOLD


def upgrader_of(cfg: PipelineConfig, fit: engine.FitResult, image_channels: int,
                hq_foreground_fraction: float | None = None) -> export.Upgrader:
  """The Upgrader of a fit (its best u_θ, the run's normalisation and tiling,
  the HQ training images' largest foreground fraction)."""
  return export.upgrader_from_state(fit.state_best, image_channels=image_channels,
                                    normalisation=cfg.data.normalisation, tiling=cfg.tiling,
                                    percentiles=cfg.data.percentiles,
                                    hq_foreground_fraction=hq_foreground_fraction)


def write_upgraded(directory: Path, ds: Dataset, masks: np.ndarray,
                   guard: rundir.InputGuard | None = None, *, output: str = "mask",
                   lq_labels: np.ndarray | None = None,
                   interior: np.ndarray | None = None) -> list[Path]:
  """One uint16/uint32 instance-label TIFF per sample, cropped to the
  sample's valid extent, named after it.

  output "mask": connected components of the upgraded mask; "instances":
  touching cells split, seeded by `lq_labels` (N, H, W) where they hold
  instances (instances.instances_from_upgrade), or split on the (N, H, W)
  `interior` probability of an upgrader with boundaries.
  """
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, (name, mask, (h, w)) in enumerate(zip(ds.names, masks, ds.extents)):
    lq = None if lq_labels is None else lq_labels[i, :h, :w]
    q = None if interior is None else interior[i, :h, :w]
    lab = instances.labels_from_mask(mask[:h, :w], lq, output, q)
    paths.append(io.write_labels(directory / f"{Path(name).stem}.tif", lab, guard=guard))
  return paths


def export_upgrader(cfg: PipelineConfig, fit: engine.FitResult, image_channels: int,
                    out_dir: Path, guard,
                    hq_foreground_fraction: float | None = None) -> export.Upgrader:
  """Saves out_dir/model (the best u_θ, its config, normalisation and tiling)
  and returns the upgrader read back from it, so that a run writes its files
  exactly as `experiments.apply` will."""
  up = upgrader_of(cfg, fit, image_channels, hq_foreground_fraction)
  export.save_upgrader(out_dir / "model", up, guard=guard, train={
      "best_val_dice": fit.best_val_dice, "best_step": fit.best_step,
      "config": cfg.upgrade.to_json()})
  # Several processes: process 0 alone wrote the files; the others read them
  # only once they are complete.
  parallel.barrier("upgrade_jax:export_upgrader")
  return export.load_upgrader(out_dir / "model")


def threshold_intensities(cfg: PipelineConfig) -> str:
  """What the threshold baseline thresholds: "percentile" (normalised) images
  when the networks read them, else "raw" intensities (the paper's)."""
  return "percentile" if cfg.data.normalisation == "percentile" else "raw"


def threshold_baseline(cfg: PipelineConfig, volumes, data: RepData):
  """The paper's global threshold: one threshold for the data set, chosen in
  1% steps of the training set's maximum intensity on the HQ slices (train +
  validation, with their labels as given), scored on the test slices;
  bright (>=, the paper's) or dark (<) foreground, whichever fits the HQ
  slices better (EM objects are dark). On raw intensities (the paper's)
  unless the networks read percentile-normalised images: then on those, as
  a user of StarDist or Cellpose would threshold. Per-image *max*
  normalisation would make it a per-image threshold (hl60 0.858 normalised
  vs 0.894 raw; granulocytes 0.464 vs 0.752), so "max" keeps raw."""
  train_vols, test_vols = volumes
  norm = ({"normalisation": "percentile", "percentiles": cfg.data.percentiles}
          if threshold_intensities(cfg) == "percentile" else {"normalisation": "none"})
  raw = lambda vols, picks, tile=None: stacking.volumes_to_dataset(  # noqa: E731
      vols, picks, tile=tile, **norm)
  hq = concat([data.hq_train, data.hq_val])
  hq_raw = raw(train_vols, list(data.hq_picks), cfg.data.train_tile)   # HQ's own tiles
  index = {n: i for i, n in enumerate(hq_raw.names)}
  hq_raw = hq_raw.subset(np.array([index[n] for n in hq.names]))
  if hq_raw.targets.shape != hq.targets.shape:
    raise AssertionError("threshold baseline: raw HQ slices do not match the HQ set")
  hq_raw = hq_raw.replace(targets=hq.targets)   # imperfect HQ keeps its labels
  test_picks = [(v, z) for v, vol in enumerate(test_vols) for z in range(vol.num_slices)]
  n = len(test_picks)
  if cfg.data.max_test is not None and n > cfg.data.max_test:   # the same slices as _cap
    idx = np.unique(np.linspace(0, n - 1, cfg.data.max_test).round().astype(int))
    test_picks = [test_picks[i] for i in idx]
  test_raw = raw(test_vols, test_picks)
  if test_raw.names != data.test.names:
    raise AssertionError("threshold baseline: raw test slices do not match the test set")
  return threshold_lib.fit_and_evaluate(hq_raw, test_raw)


def figure_samples(data: RepData, upgraded: np.ndarray, k: int = 3) -> dict:
  """A few test slices (image, GT, LQ, upgraded) for the overlay figure.

  Slices that show the method: several cells and an LQ label that differs
  from the truth (a single-cell slice whose LQ equals the truth shows
  nothing). Among them, k spread evenly from the worst to the best upgraded
  per-slice Dice, so the figure shows failures too. Falls back to slices
  with cells when too few qualify. Cropped to common bounds.
  """
  n = len(data.test)
  valid = data.test.valid_mask()
  gt = (data.test.targets > 0) & valid
  lq = (data.test_lq_masks.targets > 0) & valid
  cells = np.array([len(np.unique(t[t > 0])) for t in data.test.targets])
  differs = (gt != lq).reshape(n, -1).any(1)
  dice = np.array([metrics.pooled_dice_np(upgraded[i], gt[i], valid[i]) for i in range(n)])
  pool = np.flatnonzero((cells >= 2) & differs)
  if len(pool) < k:
    pool = np.flatnonzero((cells >= 1) & differs)
  if len(pool) < k:
    pool = np.flatnonzero(cells >= 1) if np.any(cells >= 1) else np.arange(n)
  ranked = pool[np.argsort(dice[pool], kind="stable")]   # worst to best
  order = ranked[np.unique(np.linspace(0, len(ranked) - 1, min(k, len(ranked)))
                           .round().astype(int))]
  h = int(data.test.extents[order, 0].min())
  w = int(data.test.extents[order, 1].min())
  return {"image": data.test.normalised(order)[:, :h, :w].mean(-1),
          "gt": data.test.targets[order, :h, :w] > 0,
          "lq": data.test_lq_masks.targets[order, :h, :w] > 0,
          "upgraded": upgraded[order, :h, :w],
          "names": np.array([data.test.names[i] for i in order])}
