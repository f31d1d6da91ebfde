"""Data sources of a run: how each is read and split into (train, test) volumes.

One registry, `SOURCES` (name -> DataConfig -> (train volumes, test volumes)),
consulted by DataConfig's check and by `data.load_volumes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from upgrade_jax.data import io, sampling

__all__ = ["SOURCES"]


def _synthetic(cfg):
  vols = io.synthetic(cfg.preset, seed=cfg.data_seed, n_volumes=cfg.n_volumes,
                      shape=cfg.volume_shape, size=cfg.sim_size)
  # Volume i does not depend on n_volumes, so neither does this test set.
  return sampling.hold_out_first(vols, cfg.n_test)


def _folder(cfg):
  root = Path(cfg.data_dir)
  others = root / "others" if (root / "others").is_dir() else None
  vols = io.folder(root / "images", root / "labels", others)
  return sampling.hold_out(vols, cfg.n_test, seed=cfg.data_seed)


def _epfl_mito(cfg):
  return io.epfl_mito(cfg.data_dir, "train"), io.epfl_mito(cfg.data_dir, "test")


def _stack(cfg):
  root = Path(cfg.data_dir)
  split = lambda s: io.stack(root / s / "images.tif", root / s / "labels.tif", name=s)  # noqa: E731
  return split("train"), split("test")


# source -> DataConfig -> (train volumes, test volumes): how each source is
# read and split into training and test volumes.
SOURCES: dict[str, Callable] = {"synthetic": _synthetic, "folder": _folder,
                                "epfl_mito": _epfl_mito, "stack": _stack}
