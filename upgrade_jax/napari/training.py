"""HQ layer pairs -> a saved upgrader, by user mode's training path (no Qt).

`train_upgrader` writes the pairs as TIFFs to a private temporary folder and
then runs what `pipeline.user.run_user` runs: `load_hq_pairs` (its checks,
the seeded 80/20 split, `others`), `engine.fit` of the Upgrade task with the
P the user describes, and `stages.export_upgrader` (model.json +
variables.npz, read back by `export.load_upgrader`). So a model trained here
is the model user mode trains on those files with the same settings.

The upgrader is exported to a `.<name>.*.upgrade_jax.tmp` folder beside the
destination and renamed into place only when training finished and was not
cancelled: the destination holds a whole model or nothing.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tifffile

from upgrade_jax import engine, review, rundir
from upgrade_jax.pipeline import stages, user
from upgrade_jax.pipeline.config import OTHERS_MODES, USER_HAZE, PipelineConfig
from upgrade_jax.rundir import InputError

__all__ = ["GUI_PRESET", "DEFAULTS", "OTHERS_MODES", "Cancelled", "user_config",
           "check_destination", "train_upgrader", "STEP_LINE"]

# A run that fits a laptop, the CLI's preset (experiments/run_flags.py
# CLI_DEFAULTS; tests/test_napari_plugin.py asserts they are equal): the
# library's TrainConfig is paper-scale (5000 steps).
GUI_PRESET = {"max_steps": 400, "steps_per_epoch": 50}
_PIPE = PipelineConfig()
_P = _PIPE.upgrade.task.perturb
# The widget's defaults: user mode's P (PipelineConfig: 70% omission), width, seed.
DEFAULTS = {"omission_rate": _P.omission_rate, "inclusion_rate": _P.inclusion_rate,
            "bias_max": _P.bias_max, "width": _PIPE.upgrade.widths[0],
            "max_steps": GUI_PRESET["max_steps"], "others": _PIPE.data.others,
            "seed": _PIPE.seed}
# engine.fit's progress line ("step 12/400 | loss ..."): the widget's step count.
STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")


class Cancelled(Exception):
  """Training was cancelled (`should_stop` returned True); nothing was saved."""


def user_config(*, omission_rate: float, inclusion_rate: float, bias_max: int,
                max_steps: int, width: int, others: str = DEFAULTS["others"],
                seed: int = DEFAULTS["seed"], haze: float = USER_HAZE) -> PipelineConfig:
  """User mode's PipelineConfig with the user's P and network size (and
  user mode's haze augmentation, pipeline.USER_HAZE, as the CLI's).

  widths follow TrainConfig's shape scaled to `width` (16 -> (16, 32, 64,
  128, 128), as the CLI's --width); log_every 1: engine.fit then calls its
  log once a step, where the widget counts steps and cancels.
  """
  base = _PIPE.upgrade
  perturb = dataclasses.replace(base.task.perturb, omission_rate=float(omission_rate),
                                inclusion_rate=float(inclusion_rate), bias_max=int(bias_max))
  widths = tuple(int(width) * w // base.widths[0] for w in base.widths)
  upgrade = dataclasses.replace(base, task=dataclasses.replace(base.task, perturb=perturb,
                                                               haze=float(haze)),
                                widths=widths, max_steps=int(max_steps),
                                steps_per_epoch=GUI_PRESET["steps_per_epoch"], log_every=1)
  return dataclasses.replace(_PIPE, upgrade=upgrade, lq_perturb=perturb, seed=int(seed),
                             data=dataclasses.replace(_PIPE.data, others=others))


def check_destination(folder) -> Path:
  """The folder to save to, checked: new (or empty), in a folder that exists."""
  if folder is None or str(folder) in ("", "."):
    raise InputError("choose a folder to save the model to")
  folder = Path(folder).expanduser().absolute()
  if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
    raise InputError(f"{folder} exists and is not an empty folder; give a new folder name "
                     "(nothing is overwritten)")
  if not folder.parent.is_dir():
    raise InputError(f"{folder.parent} is not a folder; save the model in a folder that exists")
  return folder


def _photometric(image: np.ndarray, labels: np.ndarray) -> str:
  # A trailing axis beyond the labels' is channels; a short stack stays slices.
  rgb = image.ndim == labels.ndim + 1 and image.shape[-1] in (3, 4)
  return "rgb" if rgb else "minisblack"


def _write_pairs(root: Path, pairs: Sequence, names: Sequence[str]):
  """HQ pairs as user mode's folders under root; returns (images, labels,
  others or "", {temporary path: the layer's words}) for the messages."""
  dirs = {k: root / k for k in ("images", "labels", "others")}
  with_others = any(p[2] is not None for p in pairs)
  words = {}
  for k in dirs:
    if k != "others" or with_others:
      dirs[k].mkdir(parents=True)
      words[f"--hq_{k}={dirs[k]}" if k != "others" else f"--others_labels={dirs[k]}"] = \
          f"the HQ {k} layers"
  for i, ((image, labels, others), name) in enumerate(zip(pairs, names)):
    image, labels = np.asarray(image), np.asarray(labels)
    stem = f"{i:02d}_{re.sub(r'[^A-Za-z0-9._-]', '_', name)}"
    tifffile.imwrite(dirs["images"] / f"{stem}.tif", image,
                     photometric=_photometric(image, labels))
    tifffile.imwrite(dirs["labels"] / f"{stem}.tif", labels, photometric="minisblack")
    words[str(dirs["images"] / f"{stem}.tif")] = f"pair {i + 1}'s image ({name})"
    words[str(dirs["labels"] / f"{stem}.tif")] = f"pair {i + 1}'s labels ({name})"
    if with_others:
      other = np.zeros_like(labels) if others is None else np.asarray(others)
      tifffile.imwrite(dirs["others"] / f"{stem}.tif", other, photometric="minisblack")
      words[str(dirs["others"] / f"{stem}.tif")] = f"pair {i + 1}'s others ({name})"
  return (str(dirs["images"]), str(dirs["labels"]),
          str(dirs["others"]) if with_others else "", words)


def _in_layer_words(err: Exception, words: dict) -> InputError:
  """The loader's one-line error with the temporary paths named as layers."""
  msg = str(err)
  for path in sorted(words, key=len, reverse=True):
    msg = msg.replace(path, words[path])
  return InputError(msg)


def train_upgrader(pairs: Sequence, names: Sequence[str], cfg: PipelineConfig, folder, *,
                   log: Callable[[str], None] = print,
                   should_stop: Callable[[], bool] = lambda: False) -> dict:
  """Trains an upgrader on HQ layer pairs and saves it to `folder`.

  Args:
    pairs: [(image (H, W[, C]) or (Z, H, W[, C]), labels (H, W) or (Z, H, W)
      int HQ instances, others of the labels' shape or None)]: a stack's
      slices are samples; at least 2 samples in all (train + validation).
    names: one name per pair, for messages.
    cfg: user_config(...).
    folder: the new model folder (check_destination).
    log: engine.fit's progress lines (one a step: cfg's log_every is 1).
    should_stop: polled at each of them; True stops training: Cancelled is
      raised and nothing is left under `folder` or beside it.

  Returns:
    {"folder", "best_val_dice", "best_step", "steps", "stop_reason", "n_train", "n_val"}.

  Raises:
    InputError of one line (folders, pairs, no labelled object, < 2 samples);
    Cancelled.
  """
  folder = check_destination(folder)
  if not pairs:
    raise InputError("add at least one (image, labels) pair of HQ annotations")
  if len(names) != len(pairs):
    raise ValueError(f"{len(names)} names for {len(pairs)} pairs")

  def on_log(line: str) -> None:
    if should_stop():
      raise Cancelled()
    log(line)

  with tempfile.TemporaryDirectory(prefix="upgrade_jax_napari_") as tmp:
    tmp = Path(tmp)
    *dirs, words = _write_pairs(tmp / "hq", pairs, names)
    try:
      hq, train_idx, val_idx = user.load_hq_pairs(cfg, *dirs)
    except (ValueError, OSError) as e:   # InputError is a ValueError
      raise _in_layer_words(e, words) from None
    hq_train, hq_val = hq.subset(train_idx), hq.subset(val_idx)
    log(f"{len(hq)} HQ samples ({len(hq_train)} train / {len(hq_val)} validation)")
    fit = engine.fit(dataclasses.replace(cfg.upgrade, seed=cfg.seed), hq_train, hq_val,
                     tmp / "upgrade", log=on_log)
    if should_stop():
      raise Cancelled()
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=rundir.TEMP_SUFFIX,
                                    dir=folder.parent))
    try:
      stages.export_upgrader(cfg, fit, hq.channels, staging, rundir.InputGuard([tmp]),
                             review.max_foreground_fraction(hq_train))
      if should_stop():
        raise Cancelled()
      os.replace(staging / "model", folder)   # onto nothing or an empty folder: atomic
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  return {"folder": str(folder), "best_val_dice": fit.best_val_dice,
          "best_step": fit.best_step, "steps": fit.steps, "stop_reason": fit.stop_reason,
          "n_train": len(hq_train), "n_val": len(hq_val)}
