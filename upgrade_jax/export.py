"""A trained upgrade network saved as a tool: train once, apply to many folders.

A run that trains u_θ leaves `out_dir/model/`:

    model.json      what a person (and `load_upgrader`) reads: the format and
                    package version, the network (UNet widths, conv_impl),
                    the task with its perturbation P, the input policy
                    (channels, normalisation, image channels), the tiling
                    used for prediction, the training run's best validation
                    Dice and step, and the sha256 of variables.npz
    variables.npz   the best variables, one array per leaf, named by its
                    path: "params/down0/Conv_0/kernel", "batch_stats/..."
                    (numpy.load reads it; no Orbax, no training state)

`load_upgrader(dir)` gives an `Upgrader`; `upgrade_sample` turns one (image,
LQ label) into an upgraded mask and the labels written to disk. The training
run writes its own upgraded files through the same functions, so
`python -m experiments.apply` with its model reproduces them bit for bit.
`load_sample` reads a file pair, `prepare_arrays` takes the same arrays in
memory (the napari plugin's layers); `upgrade_reviewed` adds the review row.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io as _bytes_io
import json
from pathlib import Path

import jax
import numpy as np

import upgrade_jax
from upgrade_jax import files, instances, review, rundir
from upgrade_jax.data import intensity, io, stacking
from upgrade_jax.data.types import Dataset
from upgrade_jax.engine.state import TrainState
from upgrade_jax.engine.tasks import Task, task_from_json
from upgrade_jax.engine.tiling import TileConfig, predict_image
from upgrade_jax.metrics import FOREGROUND_THRESHOLD
from upgrade_jax.models.unet import MULTIPLE, UNet
from upgrade_jax.rundir import InputError

__all__ = ["FORMAT", "FORMAT_VERSION", "MODEL_JSON", "VARIABLES", "Upgrader",
           "save_upgrader", "load_upgrader", "upgrader_from_state", "load_sample",
           "prepare_arrays", "upgrade_sample", "upgrade_reviewed", "sample_maps",
           "sample_probability", "upgrade_probs", "upgrade_maps"]

FORMAT = "upgrade_jax.upgrader"
# Bumped when a saved model's meaning changes; a loader refuses newer formats.
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
VARIABLES = "variables.npz"


@dataclasses.dataclass(frozen=True)
class Upgrader:
  """A trained upgrade network with everything needed to apply it.

  Attributes:
    model: the UNet; variables: its {'params', 'batch_stats'}.
    task: the training task (builds the network input from image + label).
    image_channels: C of the images after the channel policy.
    channels: the channel policy ("grey" or "rgb", see intensity.to_channels).
    normalisation: the input normalisation ("percentile", "max", "volume": on
      one image as "max"; see intensity.normalise).
    tiling: how prediction cuts large images.
    percentiles: (low, high) of "percentile" normalisation.
    meta: model.json as read (None for an upgrader made in memory).
    hq_foreground_fraction: the largest foreground fraction of the HQ
      training images (None: unknown, a model saved before the field): the
      review queue's reference for a flooded upgrade (review.py).
  """

  model: UNet
  variables: dict
  task: Task
  image_channels: int
  channels: str = "grey"
  normalisation: str = "percentile"
  tiling: TileConfig = TileConfig()
  meta: dict | None = dataclasses.field(default=None, compare=False)
  percentiles: tuple[float, float] = intensity.PERCENTILES
  hq_foreground_fraction: float | None = None


def upgrader_from_state(state: TrainState, *, image_channels: int, channels: str = "grey",
                        normalisation: str = "percentile",
                        tiling: TileConfig = TileConfig(),
                        percentiles=intensity.PERCENTILES,
                        hq_foreground_fraction: float | None = None) -> Upgrader:
  """The Upgrader of a trained TrainState (its variables on the host)."""
  variables = jax.tree.map(np.asarray, jax.device_get(state.variables))
  return Upgrader(state.model, variables, state.task, image_channels, channels,
                  normalisation, tiling, percentiles=intensity.check_percentiles(percentiles),
                  hq_foreground_fraction=hq_foreground_fraction)


def _flatten(tree, prefix="") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(_flatten(v, name))
    else:
      out[name] = np.asarray(v)
  return out


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for name, v in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def save_upgrader(directory, upgrader: Upgrader, *, train: dict | None = None,
                  guard: rundir.InputGuard | None = None) -> Path:
  """Writes `upgrader` to `directory` (model.json + variables.npz), atomically.

  Args:
    directory: the folder (created); usually out_dir/model.
    upgrader: what to save.
    train: facts of the training run for model.json (best_val_dice, ...).
    guard: the run's inputs; writing over one raises InputError.

  Returns:
    The folder.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  buf = _bytes_io.BytesIO()
  np.savez(buf, **_flatten(upgrader.variables))
  data = buf.getvalue()
  path = directory / VARIABLES
  if guard is not None:
    guard.check_output(path)
  files.atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), size=len(data))
  meta = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "package_version": upgrade_jax.__version__,
      "model": {"kind": "UNet", "widths": list(upgrader.model.widths),
                "num_classes": upgrader.model.num_classes,
                "conv_impl": upgrader.model.conv_impl},
      "task": upgrader.task.to_json(),
      "input": {"image_channels": upgrader.image_channels,
                "network_channels": upgrader.image_channels + upgrader.task.extra_channels,
                "channels": upgrader.channels, "normalisation": upgrader.normalisation,
                "percentiles": list(upgrader.percentiles),
                "label_input": "LQ label > 0, a 0/1 channel after the image channels"},
      "reference": {"hq_foreground_fraction": upgrader.hq_foreground_fraction},
      "prediction": {"threshold": FOREGROUND_THRESHOLD, **dataclasses.asdict(upgrader.tiling)},
      "train": train or {},
      "versions": {"jax": jax.__version__, "numpy": np.__version__},
      "files": {VARIABLES: hashlib.sha256(data).hexdigest()},
  }
  # model.json last: a folder without it is an incomplete export.
  files.write_json(directory / MODEL_JSON, meta, guard=guard)
  return directory


def _fail(directory, what: str) -> InputError:
  return InputError(f"--model={directory}: {what}")


def load_upgrader(directory) -> Upgrader:
  """Reads a saved upgrader; every problem is an InputError of one line.

  Checks: the folder and both files exist, model.json parses and is of this
  format and a version this package reads, variables.npz matches its
  checksum and has exactly the shapes of the network model.json describes.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise _fail(directory, "is not a folder; give the model/ folder of a training run")
  mj = directory / MODEL_JSON
  if not mj.is_file():
    raise _fail(directory, f"holds no {MODEL_JSON}; give the model/ folder of a training run "
                "(out_dir/model)")
  try:
    meta = json.loads(mj.read_text())
  except (ValueError, OSError) as e:
    raise _fail(directory, f"{MODEL_JSON} is not readable JSON ({e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise _fail(directory, f"{MODEL_JSON} is not an upgrade_jax upgrader (format "
                f"{meta.get('format') if isinstance(meta, dict) else None!r})")
  version = meta.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
    raise _fail(directory, f"saved by upgrade_jax {meta.get('package_version')} in format "
                f"{version}; this upgrade_jax {upgrade_jax.__version__} reads format "
                f"{FORMAT_VERSION}: install a matching upgrade_jax")
  vp = directory / VARIABLES
  if not vp.is_file():
    raise _fail(directory, f"holds no {VARIABLES} (the network's variables); copy the whole "
                "model/ folder")
  data = vp.read_bytes()
  if hashlib.sha256(data).hexdigest() != meta.get("files", {}).get(VARIABLES):
    raise _fail(directory, f"{VARIABLES} does not match the checksum in {MODEL_JSON} "
                "(a partial copy, or files of two models); copy the model/ folder again")
  try:
    m, inp, pred = meta["model"], meta["input"], meta["prediction"]
    task = task_from_json(meta["task"])
    model = UNet(widths=tuple(m["widths"]), num_classes=int(m["num_classes"]),
                 conv_impl=m["conv_impl"])
    tiling = TileConfig(tile=int(pred["tile"]), margin=int(pred["margin"]),
                        batch=int(pred["batch"]))
    image_channels = int(inp["image_channels"])
    # Models saved before the field existed used the then-default (1, 99.8).
    percentiles = intensity.check_percentiles(inp.get("percentiles", intensity.PERCENTILES))
    with np.load(_bytes_io.BytesIO(data)) as z:
      variables = _unflatten({k: z[k] for k in z.files})
  except (KeyError, TypeError, ValueError) as e:
    raise _fail(directory, f"{MODEL_JSON} or {VARIABLES} is incomplete or invalid "
                f"({type(e).__name__}: {e})") from None
  want = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, MULTIPLE, MULTIPLE,
                                              image_channels + task.extra_channels), np.float32))
  want_flat = {k: tuple(v.shape) for k, v in _flatten_shapes(want).items()}
  have_flat = {k: tuple(v.shape) for k, v in _flatten(variables).items()}
  if want_flat != have_flat:
    diff = sorted(set(want_flat.items()) ^ set(have_flat.items()))[:2]
    raise _fail(directory, f"{VARIABLES} does not fit the network in {MODEL_JSON} "
                f"({image_channels} image channel(s)); e.g. {diff}")
  hq_fg = (meta.get("reference") or {}).get("hq_foreground_fraction")
  return Upgrader(model, variables, task, image_channels, inp["channels"],
                  inp["normalisation"], tiling, meta, percentiles,
                  None if hq_fg is None else float(hq_fg))


def _flatten_shapes(tree, prefix=""):
  out = {}
  for k, v in dict(tree).items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if hasattr(v, "shape") and not isinstance(v, dict):
      out[name] = v
    else:
      out.update(_flatten_shapes(v, name))
  return out


# --------------------------------------------------------------------------
# Applying it.

def load_sample(image_path, label_path, upgrader: Upgrader) -> tuple[np.ndarray, np.ndarray]:
  """One (image, LQ label) file pair as the network sees it.

  Returns:
    image (H, W, C) float32 after the upgrader's channel policy and
    normalisation (exactly as a training run's Dataset holds it), labels
    (H, W) int32 relabelled 1..n.

  Raises:
    ValueError naming the file; InputError when the channel count differs
    from the network's.
  """
  labels = _check_2d(io.read_labels(label_path), label_path)
  image = io.read_image(image_path)
  return prepare_arrays(image, labels, upgrader, image_name=image_path, label_name=label_path)


def _check_2d(labels: np.ndarray, label_name) -> np.ndarray:
  if labels.ndim != 2:
    raise ValueError(f"{label_name}: expected a 2-D label image, got shape {labels.shape}")
  return labels


def prepare_arrays(image: np.ndarray, labels: np.ndarray, upgrader: Upgrader, *,
                   image_name="image", label_name="labels") -> tuple[np.ndarray, np.ndarray]:
  """`load_sample` of arrays already in memory (a napari layer's, say).

  Args:
    image: (H, W) or (H, W, C), C in 1-4, of any numeric dtype, as a file holds it.
    labels: (H, W) LQ labels, non-negative integers (or bool).
    image_name, label_name: what error messages call them.

  Returns:
    (image (H, W, C) float32, labels (H, W) int32 relabelled 1..n), exactly
    as load_sample returns them for files holding these arrays.

  Raises:
    ValueError naming them (bad ids, shapes that differ); InputError when
    the channel count differs from the network's.
  """
  labels = _check_2d(io.check_labels(labels, label_name), label_name)
  ds = stacking.stack_samples([(image, labels, None, f"{image_name} vs {label_name}")],
                        normalisation=upgrader.normalisation, channels=upgrader.channels,
                        percentiles=upgrader.percentiles)
  if ds.channels != upgrader.image_channels:
    raise InputError(f"{image_name}: {ds.channels} channel(s) after the model's "
                     f"'{upgrader.channels}' policy, but the model takes "
                     f"{upgrader.image_channels}; use a model trained on such images")
  return ds.images[0], ds.targets[0]


def upgrade_sample(upgrader: Upgrader, image: np.ndarray, lq_labels: np.ndarray,
                   output: str = "instances") -> tuple[np.ndarray, np.ndarray]:
  """Upgrades one sample.

  Args:
    image: (H, W, C) float32 (see load_sample); lq_labels: (H, W) int LQ
      instance labels (or a 0/1 mask).
    output: "instances" (touching cells separate; LQ instances seed them) or
      "mask" (connected components of the upgraded mask).

  Returns:
    (mask (H, W) bool, labels (H, W) int32).
  """
  _, mask, labels = _upgrade(upgrader, image, lq_labels, output)
  return mask, labels


def upgrade_reviewed(upgrader: Upgrader, image: np.ndarray, lq_labels: np.ndarray, name: str,
                     output: str = "instances") -> tuple[np.ndarray, np.ndarray, dict]:
  """`upgrade_sample` with the sample's review row: what apply writes of one
  image (the label file and its row of review.csv), and the napari plugin shows.

  Returns:
    (mask (H, W) bool, labels (H, W) int32, review.image_review's row named `name`).
  """
  probs, mask, labels = _upgrade(upgrader, image, lq_labels, output)
  return mask, labels, review.image_review(
      lq_labels, mask, probs, name, hq_foreground_fraction=upgrader.hq_foreground_fraction)


def _upgrade(upgrader, image, lq_labels, output):
  """(probabilities, mask, labels) of one sample: the probabilities computed
  once; the mask is them > FOREGROUND_THRESHOLD."""
  if output not in instances.OUTPUTS:
    raise ValueError(f"output must be one of {instances.OUTPUTS}, got {output!r}")
  probs, interior = sample_maps(upgrader, image, lq_labels)
  mask = probs > FOREGROUND_THRESHOLD
  return probs, mask, instances.labels_from_mask(mask, lq_labels, output, interior)


def sample_maps(upgrader: Upgrader, image: np.ndarray,
                lq_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
  """((H, W) foreground probability, (H, W) interior probability or None)
  of u_θ for one (H, W, C) image and its (H, W) LQ labels; the interior
  comes from an upgrader with boundaries (engine.Upgrade.boundaries)."""
  out = predict_image(upgrader.model, upgrader.variables, upgrader.task, image,
                      lq_labels > 0, config=upgrader.tiling)
  return (out[..., 0], out[..., 1]) if out.ndim == 3 else (out, None)


def sample_probability(upgrader: Upgrader, image: np.ndarray,
                       lq_labels: np.ndarray) -> np.ndarray:
  """(H, W) float32: u_θ's foreground probability for one (H, W, C) image and
  its (H, W) LQ labels; the upgraded mask is this > FOREGROUND_THRESHOLD."""
  return sample_maps(upgrader, image, lq_labels)[0]


def upgrade_probs(upgrader: Upgrader, ds: Dataset, lq_labels: np.ndarray) -> np.ndarray:
  """Foreground probabilities of a Dataset, each sample predicted alone on its
  extent (as upgrade_sample does), so their masks equal a folder's apply bit
  for bit.

  Args:
    ds: images (N, H, W, C), float32 or compact; lq_labels: (N, H, W) int LQ labels (>0 is
      foreground).

  Returns:
    (N, H, W) float32, 0 outside each sample's extent.
  """
  return upgrade_maps(upgrader, ds, lq_labels)[0]


def upgrade_maps(upgrader: Upgrader, ds: Dataset,
                 lq_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
  """(foreground, interior) probabilities of a Dataset, each (N, H, W)
  float32, 0 outside each extent, each sample predicted alone (as
  upgrade_probs); interior None unless the upgrader has boundaries."""
  probs = np.zeros(ds.targets.shape, np.float32)
  interior = np.zeros(ds.targets.shape, np.float32) if upgrader.task.num_classes == 3 else None
  for i, (h, w) in enumerate(ds.extents):
    p, q = sample_maps(upgrader, ds.normalised([i])[0, :h, :w], lq_labels[i, :h, :w])
    probs[i, :h, :w] = p
    if interior is not None:
      interior[i, :h, :w] = q
  return probs, interior
