"""Where upgraded labels go, so that other segmenters train on them directly.

    upgrade_jax  upgraded/<stem>.tif                      (the default)
    cellpose     upgraded/<stem><ext>, upgraded/<stem>_masks.tif
                 (`cellpose --train --dir upgraded`: images and masks in one
                 folder, the masks named by Cellpose's `--mask_filter _masks`)
    stardist     upgraded/images/<stem><ext>, upgraded/masks/<stem>.tif
                 (StarDist's training folders: one file name in both)

The two training layouts hold a byte copy of each image beside its labels:
both tools read images and masks from one folder tree, and a copy (not a
link) leaves the user's originals out of reach of whatever trains there.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["NAMINGS", "CELLPOSE_MASK_SUFFIX", "label_path", "image_copy_path", "check_stems",
           "folders"]

NAMINGS = ("upgrade_jax", "cellpose", "stardist")
CELLPOSE_MASK_SUFFIX = "_masks"


def _check(naming: str) -> None:
  if naming not in NAMINGS:
    raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")


def folders(target: Path, naming: str) -> list[Path]:
  """The folders a layout writes into (to create), under `target`."""
  _check(naming)
  target = Path(target)
  return [target / "images", target / "masks"] if naming == "stardist" else [target]


def label_path(target: Path, stem: str, naming: str) -> Path:
  """The upgraded label file of image `stem` under `target`."""
  _check(naming)
  target = Path(target)
  if naming == "cellpose":
    return target / f"{stem}{CELLPOSE_MASK_SUFFIX}.tif"
  if naming == "stardist":
    return target / "masks" / f"{stem}.tif"
  return target / f"{stem}.tif"


def image_copy_path(target: Path, stem: str, image_path: Path, naming: str) -> Path | None:
  """Where a training layout puts the copy of the image (its own suffix), or None."""
  _check(naming)
  suffix = Path(image_path).suffix
  if naming == "cellpose":
    return Path(target) / f"{stem}{suffix}"
  if naming == "stardist":
    return Path(target) / "images" / f"{stem}{suffix}"
  return None


def check_stems(stems, naming: str) -> None:
  """Raises ValueError when a layout cannot hold these image names: under
  Cellpose's naming an image whose name ends in "_masks" would be read as
  the masks of another."""
  _check(naming)
  if naming == "cellpose":
    bad = sorted(s for s in stems if s.endswith(CELLPOSE_MASK_SUFFIX))
    if bad:
      raise ValueError(f"{len(bad)} image name(s) end in '{CELLPOSE_MASK_SUFFIX}', which "
                       f"Cellpose reads as masks: {', '.join(bad[:5])}; rename them or use "
                       "another --naming")
