r"""A saved upgrader applied to a new folder: train once, upgrade many.

    python -m experiments.apply --model=RUN/model --images=DIR --labels=DIR \
        --out_dir=DIR [--output=instances|mask] [--tile=1024 --tile_margin=64] \
        [--naming=upgrade_jax|cellpose|stardist] [--truth=DIR]

reads each image with its LQ label file (same name, any extension) and writes
out_dir/upgraded/<same name>.tif: uint16 (uint32 above 65535 objects)
instance labels, touching cells separate (--output=instances, the default),
or the connected components of the upgraded mask (--output=mask);
--naming=cellpose|stardist lays them out as those tools' training folders
(upgrade_jax/data/layouts.py). The model
folder is what a training run of experiments.upgrade leaves in out_dir/model.
It also writes the review queue: out_dir/review.csv (one row per image, most
doubtful first; upgrade_jax/review.py) and overlays of the first
--review_top images in out_dir/review/. With --truth=DIR (true labels of the
same images, e.g. a few checked by an expert) it scores the LQ and the
upgraded labels against them: apply.json's "scores", and one line each.

As in experiments.upgrade, nothing is created before every input is checked:
the model folder, every file pair (decoded once, then dropped: memory holds
one image at a time), the channel count against the model's, and the
out_dir (never an input folder or the model folder, nor inside or around
one). A problem is one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from absl import app, flags

from experiments import cli, run_flags  # the shared CLI; the run flags apply may share
from upgrade_jax.data import layouts   # the layouts --naming chooses from

F = flags.FLAGS

flags.DEFINE_string("model", None, "The model/ folder a training run left (out_dir/model).")
flags.DEFINE_string("images", None, "Folder of images to upgrade the labels of.")
flags.DEFINE_string("labels", None, "Folder of their LQ labels (same file names).")
flags.DEFINE_enum("naming", layouts.NAMINGS[0], list(layouts.NAMINGS),
                  "How out_dir/upgraded is laid out: upgrade_jax (<name>.tif), cellpose "
                  "(<name>_masks.tif beside a copy of each image: `cellpose --train "
                  "--dir=out_dir/upgraded`) or stardist (images/ and masks/, one file name "
                  "in both). See upgrade_jax/data/layouts.py.")
flags.DEFINE_string("truth", None, "Optional folder of true instance labels of the same images "
                    "(same file names): apply then scores the LQ and the upgraded labels "
                    "against them (instance F1 at IoU 0.5 and 0.75, DSB score, PQ, Dice).")



def check_flags() -> None:
  from upgrade_jax.rundir import InputError

  for name in ("model", "images", "labels"):
    if not getattr(F, name):
      raise InputError(f"--{name} is required")
  ignored = sorted(f"--{f.name}" for f in F.get_flags_for_module(run_flags)
                   if f.present and f.name not in run_flags.APPLY_FLAGS)
  if ignored:
    raise InputError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply "
                     "to experiments.apply (the model folder fixes the network); remove them")


def plan(out_dir: Path):
  """Checks the flags, the model, every file pair and out_dir; creates
  nothing. Returns (upgrader, [(name, image path, label path)], guard)."""
  from upgrade_jax import export, rundir
  from upgrade_jax.data import io
  from upgrade_jax.engine.tiling import TileConfig
  from upgrade_jax.rundir import InputError

  check_flags()
  for flag in ("images", "labels"):
    if not Path(getattr(F, flag)).is_dir():
      raise InputError(f"--{flag}={getattr(F, flag)} is not a folder; give the folder that "
                       "holds the files")
  upgrader = export.load_upgrader(F.model)
  if F["tile"].present or F["tile_margin"].present:
    tiling = upgrader.tiling
    upgrader = dataclasses.replace(upgrader, tiling=TileConfig(
        tile=F.tile if F["tile"].present else tiling.tile,
        margin=F.tile_margin if F["tile_margin"].present else tiling.margin,
        batch=tiling.batch))
  if F.truth and not Path(F.truth).is_dir():
    raise InputError(f"--truth={F.truth} is not a folder; give the folder of true labels")
  guard = rundir.InputGuard([F.images, F.labels, F.model] + ([F.truth] if F.truth else []))
  rundir.check_out_dir(out_dir, guard, owner="apply")
  pairs = io.pair_files(F.images, F.labels)
  try:
    layouts.check_stems([stem for stem, _, _ in pairs], F.naming)
  except ValueError as e:
    raise InputError(f"--naming={F.naming}: {e}") from None
  truth = {}
  if F.truth:
    try:
      truth = {stem: t for stem, _, t in io.pair_files(F.images, F.truth)}
    except ValueError as e:
      raise InputError(f"--truth={F.truth}: {e}") from None
  for stem, image_path, label_path in pairs:  # decode and check every pair now
    image, _ = export.load_sample(image_path, label_path, upgrader)
    shape = io.read_labels(truth[stem]).shape if stem in truth else image.shape[:2]
    if shape != image.shape[:2]:
      raise InputError(f"{truth[stem]}: shape {shape} differs from its image's "
                       f"{image.shape[:2]}")
  return upgrader, [(s, i, l, truth.get(s)) for s, i, l in pairs], guard


def execute(out_dir: Path, upgrader, pairs, guard) -> dict:
  import numpy as np

  from upgrade_jax import export, files, instances, metrics, review, rundir
  from upgrade_jax.data import io

  t0 = time.perf_counter()
  target = out_dir / "upgraded"
  with rundir.RunLock(out_dir, owner="apply"):
    rundir.remove_stale_temps(out_dir)
    for folder in layouts.folders(target, F.naming):
      folder.mkdir(parents=True, exist_ok=True)
    written, rows, packed = [], [], {}
    tallies = {k: instances.InstanceTally() for k in ("lq", "upgraded")}
    dice = {k: np.zeros(3, np.int64) for k in ("lq", "upgraded")}
    truth_flooded = []
    for k, (stem, image_path, label_path, truth_path) in enumerate(pairs):
      image, lq = export.load_sample(image_path, label_path, upgrader)
      # The napari plugin's Upgrade widget runs the same function on its layers.
      mask, labels, row = export.upgrade_reviewed(upgrader, image, lq, stem, F.output)
      written.append(str(io.write_labels(layouts.label_path(target, stem, F.naming), labels,
                                         guard=guard)))
      copy = layouts.image_copy_path(target, stem, image_path, F.naming)
      if copy is not None:   # a training layout: the image beside its labels, byte for byte
        files.write_bytes(copy, Path(image_path).read_bytes(), guard=guard)
      rows.append(row)
      packed[stem] = (np.packbits(mask), mask.shape)   # 1 bit a pixel for the overlays
      if truth_path is not None:
        truth = io.read_labels(truth_path)
        lq_instances = lq if instances.has_instances(lq) else instances.components(lq > 0)
        for name, lab in (("lq", lq_instances), ("upgraded", labels)):
          tallies[name].add(truth, lab)
          dice[name] += metrics.dice_counts_np(lab > 0, truth > 0)
        if review.truth_floods(labels, truth):
          truth_flooded.append(stem)
      cli.log_line(f"[{k + 1}/{len(pairs)}] {stem}: {image.shape[0]}x{image.shape[1]}, "
                   f"{int(lq.max())} LQ -> {int(labels.max())} upgraded objects")
    paths_of = {stem: (image_path, label_path) for stem, image_path, label_path, _ in pairs}

    def sample(stem):   # the top N again from disk: memory holds one image at a time
      image, lq = export.load_sample(*paths_of[stem], upgrader)
      bits, shape = packed[stem]
      return image, lq, np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape) > 0

    ranked = review.write_review(out_dir, rows, sample, top_n=F.review_top, guard=guard)
    flooded = [r["name"] for r in ranked if r["flooded"]]
    if flooded:
      cli.log_line(review.flood_warning(ranked))
    record = {"model": str(Path(F.model).resolve()), "images": F.images, "labels": F.labels,
              "output": F.output, "naming": F.naming, "tiling": dataclasses.asdict(upgrader.tiling),
              "upgraded": written, "review": [r["name"] for r in ranked], "flooded": flooded,
              "seconds": time.perf_counter() - t0,
              "scores": ({k: {**tallies[k].summary(), "dice": metrics.pooled_dice(dice[k]),
                              "images": tallies[k].images} for k in tallies}
                         | {"flooded_vs_truth": truth_flooded}
                         if tallies["lq"].images else None),
              "command": " ".join(sys.argv)}
    files.write_text(out_dir / "apply.json", json.dumps(record, indent=2), guard=guard)
  return record


def main(argv):
  cli.refuse_arguments(argv)
  cli.setup_runtime()
  out_dir = Path(F.out_dir)
  upgrader, pairs, guard = cli.one_line_errors(plan, out_dir, checking=True)
  record = cli.one_line_errors(execute, out_dir, upgrader, pairs, guard)
  cli.log_line(f"wrote {len(record['upgraded'])} upgraded label files to "
               f"{out_dir / 'upgraded'} in {record['seconds']:.1f}s")
  scores = dict(record["scores"] or {})
  if scores:
    floods = scores.pop("flooded_vs_truth")
    cli.log_line(f"flooded against --truth (foreground > half the image where the truth's "
                 f"< 0.3): {len(floods)} of {scores['upgraded']['images']} upgraded labels")
  for name, s in scores.items():
    cli.log_line(f"{name:9} against --truth ({s['images']} images): F1@0.5 {s['f1@0.5']:.4f}, "
                 f"F1@0.75 {s['f1@0.75']:.4f}, DSB score {s['dsb_score']:.4f}, "
                 f"PQ@0.5 {s['panoptic_quality@0.5']:.4f}, Dice {s['dice']:.4f}")
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_one_line)
