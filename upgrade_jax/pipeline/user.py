"""User mode: Algorithm 1 on a user's folders of real HQ and LQ annotations.

  prepare_user   loads and checks the folders and the out_dir; creates nothing
  run_user       trains u_θ on the HQ pairs and writes
                 out_dir/upgraded/<LQ file name>.tif and the review queue
                 (out_dir/review.csv, out_dir/review/)

Files may be 2-D images or TIFF stacks (Z, H, W[, C]) with (Z, H, W) labels.
A stack is upgraded slice by slice (each slice a sample, as in training) and
written back as one (Z, H, W) stack under its own name, instance ids unique
over the stack (2-D instances per slice: no linking across slices). The
review queue has one row per slice, named <stack>_z<slice>.
"""

from __future__ import annotations

import dataclasses
import filecmp
from pathlib import Path
from typing import Callable

import numpy as np

from upgrade_jax import engine, files, instances, metrics, review, rundir
from upgrade_jax.data import io, sampling, stacking
from upgrade_jax.data.types import Dataset, concat
from upgrade_jax.pipeline.config import PipelineConfig, run_key
from upgrade_jax.pipeline.others import with_others
from upgrade_jax.pipeline.scenarios import METHOD
from upgrade_jax.pipeline.stages import export_upgrader, upgrade_maps
from upgrade_jax.rundir import InputError

__all__ = ["UserData", "UserInputs", "OPTIMISTIC", "prepare_user", "run_user", "stack_labels",
           "write_user_labels"]


@dataclasses.dataclass(frozen=True)
class UserData:
  """Folders of a user's data (StarDist/Cellpose layout: same file names)."""
  hq_images: str
  hq_labels: str
  lq_images: str
  lq_labels: str
  others_labels: str = ""   # non-target objects of the HQ images (inclusion)


# User mode has no test set: its only score is the early-stopping set's.
OPTIMISTIC = ("optimistic: the best over epochs on the early-stopping validation set, "
              "which chose the epoch; not a test score")


def _refuse_shared_images(hq_dir: Path, lq_dir: Path) -> None:
  """InputError when an LQ image is an HQ image: the same file under any name
  (link), or a file of the same name with identical content. Upgrading labels
  of the very images u_θ trained on would score and train on leaked pairs."""
  hq = {p.stem: p for p in sorted(hq_dir.iterdir()) if p.is_file()}
  hq_ids = {(p.stat().st_dev, p.stat().st_ino): p for p in hq.values()}
  for p in sorted(lq_dir.iterdir()):
    if not p.is_file():
      continue
    q = hq_ids.get((p.stat().st_dev, p.stat().st_ino)) or hq.get(p.stem)
    if q is not None and (p.samefile(q) or filecmp.cmp(p, q, shallow=False)):
      raise InputError(f"--lq_images: {p} is the HQ image {q}; the LQ set must be other "
                       "images than the HQ ones")


@dataclasses.dataclass(frozen=True)
class UserInputs:
  """A user's data, loaded and checked (`prepare_user`)."""
  hq: Dataset             # HQ images with their instance labels (targets)
  lq_masks: Dataset       # LQ images with their LQ masks (targets, int32 0/1)
  train_idx: np.ndarray   # HQ samples u_θ trains on
  val_idx: np.ndarray     # HQ samples of early stopping
  guard: rundir.InputGuard
  lq_instances: np.ndarray | None = None  # (N, H, W) the LQ files' own ids (seeds)
  # (file stem, slices) of each LQ file, in sample order: a file of Z > 1
  # slices is a stack, written back as one; () = one sample per file.
  lq_files: tuple = ()

  def files(self) -> tuple:
    return self.lq_files or tuple((n, 1) for n in self.lq_masks.names)


def load_hq_pairs(cfg: PipelineConfig, hq_images, hq_labels, others_labels=""):
  """A user's HQ pairs (2-D files or stacks), checked, with their `others`,
  and the seeded train / early-stopping split.

  Returns:
    (hq Dataset, train_idx, val_idx).
  Raises:
    InputError naming the folder when no file holds a labelled object or
    fewer than 2 pairs exist; io's errors for unreadable or mismatched files.
  """
  vols = io.folder(hq_images, hq_labels, others_labels or None, stacks=True)
  hq = stacking.volumes_to_dataset(vols, **cfg.data.image_kwargs)
  if not np.any(hq.targets > 0):
    raise InputError(f"none of the {len(vols)} label files in --hq_labels={hq_labels} holds "
                     "a labelled object (all pixels 0); label the cells with ids > 0")
  train_idx, val_idx = sampling.train_val_split(len(hq), seed=cfg.seed)
  if len(val_idx) == 0:
    raise InputError(f"--hq_images={hq_images} holds {len(hq)} image(s); at least 2 HQ "
                     "pairs are needed (training + validation)")
  return with_others(hq, cfg.data.others, cfg.data.felzenszwalb), train_idx, val_idx


def prepare_user(cfg: PipelineConfig, user: UserData, out_dir) -> UserInputs:
  """Loads and checks a user's folders and the out_dir; creates nothing.

  Raises:
    InputError / ValueError / OSError naming the folder, file or setting.
  """
  folders = {k: v for k, v in dataclasses.asdict(user).items() if v}
  for flag, path in folders.items():
    if not Path(path).is_dir():
      raise InputError(f"--{flag}={path} is not a folder; give the folder that holds the files")
  guard = rundir.InputGuard(folders.values())
  rundir.check_out_dir(out_dir, guard, owner="upgrade")
  _refuse_shared_images(Path(user.hq_images), Path(user.lq_images))
  hq, train_idx, val_idx = load_hq_pairs(cfg, user.hq_images, user.hq_labels,
                                         user.others_labels)
  lq_vols = io.folder(user.lq_images, user.lq_labels, stacks=True)
  lq = stacking.volumes_to_dataset(lq_vols, **cfg.data.image_kwargs)
  if hq.channels != lq.channels:
    raise InputError(f"the images in --hq_images have {hq.channels} channel(s) but those in "
                     f"--lq_images {lq.channels}; give both in the same channel layout")
  lq_instances = lq.targets
  # Binary masks: int8 is enough (1 byte a pixel on the host, not 4).
  lq = lq.replace(targets=(lq.targets > 0).astype(np.int8))
  return UserInputs(hq, lq, train_idx, val_idx, guard, lq_instances,
                    tuple((v.name, v.num_slices) for v in lq_vols))


def stack_labels(slices) -> np.ndarray:
  """(Z, H, W) int32 from Z (H, W) instance maps, the ids of slice z offset
  past those of the slices before it: ids are unique over the stack, so no
  tool reads two slices' 2-D instances as one 3-D object."""
  out, top = [], 0
  for lab in slices:
    out.append(np.where(lab > 0, lab + top, 0).astype(np.int32))
    top += int(lab.max(initial=0))
  return np.stack(out)


def write_user_labels(directory: Path, d: UserInputs, masks: np.ndarray,
                      output: str, interior: np.ndarray | None = None) -> list[Path]:
  """One label file per LQ file: (H, W) for an image, (Z, H, W) for a stack
  (see `stack_labels`), uint16/uint32 via io.write_labels, named after it."""
  directory.mkdir(parents=True, exist_ok=True)
  paths, start = [], 0
  for stem, z in d.files():
    labs = []
    for i in range(start, start + z):
      h, w = d.lq_masks.extents[i]
      lq = None if d.lq_instances is None else d.lq_instances[i, :h, :w]
      q = None if interior is None else interior[i, :h, :w]
      labs.append(instances.labels_from_mask(masks[i, :h, :w], lq, output, q))
    start += z
    arr = labs[0] if z == 1 else stack_labels(labs)
    paths.append(io.write_labels(directory / f"{stem}.tif", arr, guard=d.guard))
  return paths


def validation_instances(cfg: PipelineConfig, upgrader, hq_val: Dataset) -> dict:
  """{"lq", "upgraded": instances.summary_scores} on the HQ validation pairs:
  their labels perturbed once by the P u_θ trained with (the LQ, scored as
  its components), and their upgrade (the instances a file would hold),
  against the HQ labels. The only instances user mode can score; the
  validation set chose u_θ's epoch, so they are optimistic. {} without
  validation pairs."""
  if len(hq_val) == 0:
    return {}
  lq = sampling.make_lq(hq_val, cfg.upgrade.task.perturb, seed=cfg.seed)
  probs, interior = upgrade_maps(upgrader, lq)
  crop = lambda a: [x[:h, :w] for x, (h, w) in zip(a, hq_val.extents)]  # noqa: E731
  truth, lq_masks = crop(hq_val.targets), crop(lq.targets)
  upgraded = [instances.labels_from_mask(m > metrics.FOREGROUND_THRESHOLD, l, cfg.output, q)
              for m, l, q in zip(crop(probs), lq_masks,
                                 crop(interior) if interior is not None else [None] * len(lq))]
  return {"lq": instances.summary_scores(truth, [instances.components(m > 0) for m in lq_masks]),
          "upgraded": instances.summary_scores(truth, upgraded)}


def run_user(cfg: PipelineConfig, user: UserData, out_dir, *,
             log: Callable[[str], None] = print,
             prepared: UserInputs | None = None) -> dict:
  """Trains u_θ on the HQ pairs and writes out_dir/upgraded/<LQ file name>.tif.

  With the method (scenarios.METHOD, "hq_upgraded") in cfg.scenarios it also
  trains the segmentation network on HQ ∪ upgraded and keeps its checkpoints
  in out_dir/seg_hq_upgraded.
  Input folders are only read; everything is checked (`prepare_user`, or
  `prepared`) before out_dir is created.
  """
  out_dir = Path(out_dir)
  d = prepared if prepared is not None else prepare_user(cfg, user, out_dir)
  hq_train, hq_val = d.hq.subset(d.train_idx), d.hq.subset(d.val_idx)
  log(f"user data: {len(d.hq)} HQ images ({len(hq_train)} train / {len(hq_val)} val), "
      f"{len(d.lq_masks)} LQ images")
  key = {"user": dataclasses.asdict(user), "run": run_key(cfg)}
  with rundir.RunLock(out_dir, owner="upgrade"):
    rundir.remove_stale_temps(out_dir)
    fit = engine.fit(dataclasses.replace(cfg.upgrade, seed=cfg.seed), hq_train, hq_val,
                     out_dir / "upgrade", log=log, context=key)
    log(f"upgrade network: best validation Dice {fit.best_val_dice:.4f} ({OPTIMISTIC})")
    # Export the upgrader, then upgrade through it one image at a time
    # (tiled), as experiments.apply does: its files equal these.
    upgrader = export_upgrader(cfg, fit, d.hq.channels, out_dir, d.guard,
                               review.max_foreground_fraction(hq_train))
    val_inst = validation_instances(cfg, upgrader, hq_val)
    if val_inst:
      log("instances on the HQ validation pairs, their labels perturbed by P (optimistic): "
          + "; ".join(f"{k} F1@0.5 {v['f1@0.5']:.4f}, DSB score {v['dsb_score']:.4f}"
                      for k, v in val_inst.items()))
    probs, interior = upgrade_maps(upgrader, d.lq_masks)
    masks = probs > metrics.FOREGROUND_THRESHOLD
    paths = write_user_labels(out_dir / "upgraded", d, masks, cfg.output, interior)
    log(f"wrote {len(paths)} upgraded label files to {out_dir / 'upgraded'}")
    ranked = review.write_dataset_review(out_dir, d.lq_masks, masks, probs,
                                         top_n=cfg.review_top, guard=d.guard,
                                         hq_foreground_fraction=upgrader.hq_foreground_fraction)
    flooded = [r["name"] for r in ranked if r["flooded"]]
    if flooded:
      log(review.flood_warning(ranked))
    log(f"review queue: {out_dir / 'review.csv'} (most doubtful first: "
        f"{ranked[0]['name']}), overlays of the first {min(len(ranked), cfg.review_top)} "
        f"in {out_dir / 'review'}")
    result = {"upgrade_best_val_dice": fit.best_val_dice, "val_dice_note": OPTIMISTIC,
              "n_hq": len(d.hq), "n_lq": len(d.lq_masks), "upgraded": [str(p) for p in paths],
              "flooded": flooded, "validation_instances": val_inst}
    if METHOD in cfg.scenarios:
      upgraded = d.lq_masks.replace(targets=masks.astype(np.int8))
      seg = engine.fit(dataclasses.replace(cfg.segment, seed=cfg.seed),
                       concat([hq_train, upgraded]), hq_val,
                       out_dir / f"seg_{METHOD}", log=log, context=key)
      result["segmentation_best_val_dice"] = seg.best_val_dice
      log(f"segmentation network: best validation Dice {seg.best_val_dice:.4f} ({OPTIMISTIC})")
    files.write_json(out_dir / "results.json", result, guard=d.guard)
  return result
