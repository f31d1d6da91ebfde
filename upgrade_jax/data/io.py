"""Reading, validating and writing the data users have; source adapters.

Every source becomes the same in-memory form, a list of `Volume` (a 2-D image
is a Volume with one slice):

  synthetic   the virtual microscope (upgrade_jax.data.synthetic.generate)
  epfl_mito   <root>/{train,test}/{images,labels}.tif stacks (one split per call)
  folder      images/ + labels/ (+ optional others/) with matching file names
              (the StarDist / Cellpose convention; DSB2018 and users' data)
  stack       one TIFF image stack (Z, H, W[, C]) with its label stack

`load_source(name, **kwargs)` picks one by name. `volumes_to_dataset` (or
`stack_samples` for loose 2-D samples) then pads slices of different sizes
into one `Dataset`.

Channel policy: the images of one Dataset share C. `channels="grey"` (the
default) converts RGB(A) to grey with the ITU-R 601 luma weights, so DSB2018's
mix of grey fluorescence and RGB histology becomes C=1; `channels="rgb"`
repeats grey images to 3 channels and keeps RGB. Normalisation to float32 is
per image: "percentile" (the default, as StarDist and Cellpose: csbdeep's
`normalize`, which maps the 1st and 99.8th percentiles of each channel to 0
and 1 without clipping) or "max" (divide by the image's maximum, the paper's);
"none" keeps the raw values as float32.

Matching: an image and its label file match when their names without the
extension are equal (a.png matches a.tif). Label files must hold non-negative
integers; floats are accepted only when every value is integral.

Why ~470 lines in one module: every rule about a user's files (which files
match, what a valid label is, how outputs are written atomically and safely)
lives here, so that the readers and writers cannot disagree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tifffile

from upgrade_jax import rundir
from upgrade_jax.data.types import Dataset, Volume, label_dtype
from upgrade_jax.perturb import relabel_sequential

__all__ = ["IMAGE_SUFFIXES", "read_array", "read_image", "read_labels", "check_labels",
           "normalise", "to_channels", "stack_samples", "volumes_to_dataset",
           "write_labels", "write_bytes", "write_json", "json_safe", "pair_files", "folder", "stack", "epfl_mito", "synthetic", "SOURCES",
           "load_source"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
_TIFF = (".tif", ".tiff")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# --------------------------------------------------------------------------
# Reading and validating single files.

def read_array(path, slices=None) -> np.ndarray:
  """Reads one image file (TIFF via tifffile, others via scikit-image).

  Args:
    path: the file.
    slices: optional slice indices along the first axis of a stack; for a
      multi-page TIFF only those pages are decoded.

  Raises FileNotFoundError if it does not exist and ValueError naming the
  file if it cannot be decoded or `slices` is out of range.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such file: {path}")
  try:
    if path.suffix.lower() in _TIFF:
      with tifffile.TiffFile(path) as tif:
        if slices is None:
          return np.asarray(tif.asarray())
        slices = [int(z) for z in slices]
        n_pages = len(tif.pages)
        if n_pages > 1 and all(0 <= z < n_pages for z in slices):
          arr = np.asarray(tif.asarray(key=slices))
          return arr[None] if len(slices) == 1 else arr
        arr = np.asarray(tif.asarray())
    else:
      import skimage.io
      arr = np.asarray(skimage.io.imread(path))
  except Exception as err:  # decoders raise many types; report one clearly
    raise ValueError(f"cannot read {path}: {type(err).__name__}: {err}") from err
  if slices is None:
    return arr
  if arr.ndim < 3:
    raise ValueError(f"{path}: slices {slices} given for a 2-D image of shape {arr.shape}")
  if any(not 0 <= z < arr.shape[0] for z in slices):
    raise ValueError(f"{path}: slices {slices} out of range for shape {arr.shape}")
  return arr[list(slices)]


def check_labels(labels: np.ndarray, source) -> np.ndarray:
  """Returns `labels` as int32 after checking they are non-negative integers.

  Args:
    labels: array of any shape; integer, bool, or float with integral values.
    source: file name or description used in error messages.
  """
  arr = np.asarray(labels)
  if arr.dtype == bool:
    return arr.astype(np.int32)
  if np.issubdtype(arr.dtype, np.floating):
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
      raise ValueError(f"{source}: labels must be integer ids, found non-integer "
                       f"values (dtype {arr.dtype})")
  elif not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{source}: labels must be integer ids, got dtype {arr.dtype}")
  if arr.size and arr.min() < 0:
    raise ValueError(f"{source}: labels must be >= 0, found {arr.min()}")
  if arr.size and arr.max() > np.iinfo(np.int32).max:
    raise ValueError(f"{source}: label id {arr.max()} does not fit in int32")
  return arr.astype(np.int32)


def read_image(path, slices=None) -> np.ndarray:
  """An image file as stored: (H, W), (H, W, C) or a stack (Z, H, W[, C])."""
  arr = read_array(path, slices)
  if arr.size == 0:
    raise ValueError(f"{path}: holds no pixels (an empty or corrupt file?); replace or "
                     "remove it")
  if arr.ndim < 2:
    raise ValueError(f"{path}: expected an image with at least 2 dimensions, "
                     f"got shape {arr.shape}")
  if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
          or arr.dtype == bool):
    raise ValueError(f"{path}: unsupported image dtype {arr.dtype}")
  if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
    bad = int(arr.size - np.isfinite(arr).sum())
    raise ValueError(f"{path}: {bad} pixel(s) are NaN or infinite; replace them (e.g. with 0) "
                     "before training")
  return arr


def read_labels(path, slices=None) -> np.ndarray:
  """A label file as int32, validated (see `check_labels`)."""
  return check_labels(read_array(path, slices), path)


def _split_channels(image: np.ndarray, label_shape, source) -> np.ndarray:
  """Makes `image` (*label_shape, C): a trailing axis beyond the labels is C."""
  if image.shape == tuple(label_shape):
    return image[..., None]
  if image.shape[:-1] == tuple(label_shape) and image.shape[-1] in (1, 2, 3, 4):
    return image
  raise ValueError(f"{source}: image shape {image.shape} does not match label shape "
                   f"{tuple(label_shape)} (expected equal, or with a trailing channel "
                   "axis of 1-4)")


def to_channels(image: np.ndarray, channels: str) -> np.ndarray:
  """(..., C) float32 image → (..., 1) for "grey" or (..., 3) for "rgb".

  Alpha (C=4, or C=2 grey+alpha) is dropped first.
  """
  img = np.asarray(image, np.float32)
  c = img.shape[-1]
  if c in (2, 4):
    img, c = img[..., :c - 1], c - 1
  if channels == "grey":
    return img if c == 1 else (img @ _LUMA)[..., None]
  if channels == "rgb":
    return np.repeat(img, 3, axis=-1) if c == 1 else img
  raise ValueError(f"channels must be 'grey' or 'rgb', got {channels!r}")


# The normalisation methods `normalise` knows, and the default percentiles
# of "percentile" (StarDist's and Cellpose's: csbdeep.utils.normalize(x, 1, 99.8)).
NORMALISATIONS = ("max", "percentile", "volume", "none")
PERCENTILES = (1.0, 99.8)


def check_percentiles(percentiles) -> tuple[float, float]:
  """(low, high) as floats, with 0 <= low < high <= 100; else ValueError."""
  try:
    lo, hi = (float(p) for p in percentiles)
  except (TypeError, ValueError):
    raise ValueError(f"percentiles must be two numbers (low, high), got {percentiles!r}") \
        from None
  if not 0.0 <= lo < hi <= 100.0:
    raise ValueError(f"percentiles ({lo:g}, {hi:g}) must satisfy 0 <= low < high <= 100")
  return lo, hi


def percentile_affine(image: np.ndarray, percentiles=PERCENTILES) -> tuple[np.ndarray, np.ndarray]:
  """(offset, divisor), each (C,) float32: "percentile" normalisation of an
  (H, W, C) image is (image - offset) / divisor per channel, the channel's
  low and high percentiles mapped to 0 and 1 (csbdeep's normalize with
  axis=(0, 1): channels independently). A flat channel (high == low) gets
  divisor 1, so it becomes 0, not inf."""
  lo_p, hi_p = check_percentiles(percentiles)
  img = np.asarray(image)
  flat = img.reshape(-1, img.shape[-1]).astype(np.float64)
  lo, hi = np.percentile(flat, (lo_p, hi_p), axis=0)
  span = hi - lo
  return lo.astype(np.float32), np.where(span > 0, span, 1.0).astype(np.float32)


def normalise(image: np.ndarray, method: str = "percentile", *,
              percentiles=PERCENTILES) -> np.ndarray:
  """Per-image normalisation to float32.

  Args:
    image: (H, W, C) uint8, uint16, bool or float ((H, W) is one channel).
    method: "percentile" maps each channel's low and high `percentiles` to 0
      and 1 without clipping (csbdeep's `normalize`, as StarDist and
      Cellpose); "max" divides by the image's maximum (the paper's; an
      all-zero image stays zero); "none" only converts to float32 (data
      normalised already, or a global threshold on raw intensities);
      "volume" is "max" over a whole 3-D stack (`volumes_to_dataset`), and
      on one image the same as "max" (an image is a one-slice stack).
    percentiles: (low, high) of "percentile", in [0, 100].

  Returns:
    float32 array of the same shape.
  """
  img = np.asarray(image, np.float32)
  if method in ("max", "volume"):
    top = float(img.max(initial=0.0))
    return img / top if top > 0 else np.zeros_like(img)
  if method == "percentile":
    chans = img if img.ndim >= 3 else img[..., None]
    offset, divisor = percentile_affine(chans, percentiles)
    # float32 throughout: the device's normalisation of a compact set
    # (engine.step.take_samples) computes exactly this.
    return ((chans - offset) / divisor).astype(np.float32).reshape(img.shape)
  if method == "none":
    return img
  raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {method!r}")


# --------------------------------------------------------------------------
# From samples to one padded Dataset.

def stack_samples(samples: Sequence, *, normalisation: str = "percentile",
                  channels: str = "grey", scales: Sequence[float] | None = None,
                  compact: bool | str = False, percentiles=PERCENTILES) -> Dataset:
  """Pads 2-D samples of different sizes into one Dataset.

  Args:
    samples: (image, target, others, name) tuples; image (H, W) or (H, W, C)
      of any numeric dtype, target and others (H, W) integer (others may be
      None). Sizes may differ between samples.
    normalisation: per-image method, see `normalise`; "volume" divides each
      image by its entry of `scales` (without scales: as "max").
    channels: "grey" or "rgb", see `to_channels`.
    scales: per-sample divisors for normalisation="volume" (volumes_to_dataset
      passes each slice its volume's max).
    compact: True keeps integer images in their source dtype with
      Dataset.image_scale (the divisor of each sample) and, for
      "percentile", Dataset.image_offset: normalised on the device by the
      train step, bit for bit as here; 1-2 bytes a pixel instead of 4. Needs
      integer, single-channel images (or RGB under the "rgb" policy with
      "max"/"volume"/"none": a percentile affine is per channel). "auto":
      compact when every sample allows it and is 8 or 16 bits, else float32.
      False: float32.
    percentiles: (low, high) of "percentile" normalisation.

  Returns:
    Dataset with images (N, Hmax, Wmax, C) float32 (or the source integer
    dtype when compact), targets/others relabelled 1..n per sample (int32;
    compact: int8/int16/int32, the smallest that holds the ids), zero
    padding at the bottom/right, and extents (N, 2).
  """
  if not samples:
    raise ValueError("stack_samples: no samples")
  if scales is not None and len(scales) != len(samples):
    raise ValueError(f"stack_samples: {len(scales)} scales for {len(samples)} samples")
  if normalisation not in NORMALISATIONS:
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
  percentiles = check_percentiles(percentiles)
  checked = []
  for image, target, others, name in samples:
    target = check_labels(target, name)
    if target.ndim != 2:
      raise ValueError(f"{name}: target must be (H, W), got shape {target.shape}")
    others = np.zeros_like(target) if others is None else check_labels(others, name)
    if others.shape != target.shape:
      raise ValueError(f"{name}: others shape {others.shape} != target shape {target.shape}")
    checked.append((_split_channels(np.asarray(image), target.shape, name), target, others,
                    name))
  if compact == "auto":
    compact = all(_compact_ok(raw, channels, normalisation) for raw, *_ in checked)
  prepared, divisors, offsets = [], [], []
  for i, (raw, target, others, name) in enumerate(checked):
    img = _compact_channels(raw, channels, name) if compact else to_channels(raw, channels)
    offset = 0.0
    if normalisation == "percentile":
      if compact and img.shape[-1] != 1:
        raise ValueError(f"{name}: compact percentile normalisation needs one channel, got "
                         f"{img.shape[-1]}; use compact=False")
      if compact:   # the device applies the affine (engine.step.take_samples)
        off, div = percentile_affine(img, percentiles)
        offset, top = float(off[0]), float(div[0])
      else:
        img, top = normalise(img, "percentile", percentiles=percentiles), 1.0
    elif normalisation == "volume" and scales is not None:
      top = float(scales[i])
    elif normalisation in ("max", "volume"):
      top = float(img.max(initial=0))
    else:
      top = 1.0
    top = top if top > 0 else 1.0   # an all-zero image stays zero
    if not compact and normalisation not in ("none", "percentile"):
      img = np.asarray(img, np.float32) / top
    divisors.append(top)
    offsets.append(offset)
    prepared.append((img, relabel_sequential(target), relabel_sequential(others), str(name)))
  h = max(p[1].shape[0] for p in prepared)
  w = max(p[1].shape[1] for p in prepared)
  n, c = len(prepared), prepared[0][0].shape[-1]
  dtype = np.result_type(*(p[0].dtype for p in prepared)) if compact else np.float32
  # A compact set also keeps its labels small: the ids are 1..n per sample,
  # so int8 or int16 hold them where a sample has < 128 or < 32768 cells
  # (2000 LQ slices of 1024² then need 4 GiB of host labels, not 16). The
  # engine narrows them the same way for the device.
  label_type = (label_dtype(*(a for p in prepared for a in p[1:3])) if compact
                else np.int32)
  images = np.zeros((n, h, w, c), dtype)
  targets = np.zeros((n, h, w), label_type)
  others = np.zeros((n, h, w), label_type)
  extents = np.zeros((n, 2), np.int32)
  for i, (img, tgt, oth, _) in enumerate(prepared):
    hi, wi = tgt.shape
    images[i, :hi, :wi] = img
    targets[i, :hi, :wi] = tgt
    others[i, :hi, :wi] = oth
    extents[i] = (hi, wi)
  scale = np.asarray(divisors, np.float32) if compact else None
  offset = np.asarray(offsets, np.float32) if compact and normalisation == "percentile" else None
  return Dataset(images, targets, others, extents, tuple(p[3] for p in prepared), scale,
                 offset)


def _compact_ok(image: np.ndarray, channels: str, normalisation: str = "max") -> bool:
  """Whether `compact="auto"` keeps this (H, W, C) image as integers."""
  c = image.shape[-1] - (image.shape[-1] in (2, 4))
  if normalisation == "percentile" and not (c == 1 and channels == "grey"):
    return False   # one affine per sample: one channel
  return (np.issubdtype(image.dtype, np.integer) and image.dtype.itemsize <= 2
          and (c == 1 or (channels == "rgb" and c == 3)))


def _compact_channels(image: np.ndarray, channels: str, name) -> np.ndarray:
  """(H, W, C) integer image after the channel policy, still integer: only
  policies that do not mix channels (grey of 1 channel, rgb of 1 or 3)."""
  if not np.issubdtype(image.dtype, np.integer):
    raise ValueError(f"{name}: compact images must be integers, got {image.dtype}; "
                     "use the float form")
  c = image.shape[-1]
  if c in (2, 4):
    image, c = image[..., :c - 1], c - 1
  if channels == "grey" and c == 1:
    return image
  if channels == "rgb":
    return np.repeat(image, 3, axis=-1) if c == 1 else image
  raise ValueError(f"{name}: a {c}-channel image under the '{channels}' policy is a "
                   "weighted sum, not integers; use the float form")


def volumes_to_dataset(volumes: Sequence[Volume], picks=None, **kwargs) -> Dataset:
  """The slices `picks` [(volume_idx, slice_idx), ...] (default: all) as a Dataset.

  Sample names are "<volume name>_z<slice>" for multi-slice volumes and the
  volume name for single-slice ones. kwargs go to `stack_samples`.
  normalisation="volume" divides every slice by the maximum of its whole
  volume (after the channel policy), so a slice near the volume's edge, with
  few cells, keeps the background level of the rest of its volume; per-image
  "max" would stretch it (a dim edge slice's background rises from ~0.2 to
  ~0.35 of full scale in the synthetic volumes: BUILD_NOTES, "The payoff").
  """
  if picks is None:
    picks = [(v, z) for v, vol in enumerate(volumes) for z in range(vol.num_slices)]
  if kwargs.get("normalisation") == "volume":
    channels = kwargs.get("channels", "grey")
    tops = {v: _volume_max(volumes[v], channels) for v in {v for v, _ in picks}}
    kwargs = {**kwargs, "scales": [tops[v] for v, _ in picks]}
  samples = []
  for v, z in picks:
    vol = volumes[v]
    name = vol.name if vol.num_slices == 1 else f"{vol.name}_z{z:03d}"
    samples.append((vol.image[z], vol.target[z], vol.others[z], name))
  return stack_samples(samples, **kwargs)


def _volume_max(vol: Volume, channels: str) -> float:
  """The maximum of a volume's image after the channel policy (float)."""
  return max(float(to_channels(_split_channels(np.asarray(vol.image[z]), vol.target[z].shape,
                                               vol.name), channels).max(initial=0.0))
             for z in range(vol.num_slices))


# --------------------------------------------------------------------------
# Writing.

def json_safe(x):
  """`x` with numpy scalars as Python numbers, tuples as lists and frozen
  configs (dataclasses) as dicts; a dataclass with a `to_json` method (a
  training task, a TrainConfig) is written as that method says."""
  if hasattr(x, "to_json") and dataclasses.is_dataclass(x):
    return json_safe(x.to_json())
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: json_safe(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, (np.integer, np.floating, np.bool_)):
    return x.item()
  return x


def write_json(path, obj, *, guard: rundir.InputGuard | None = None) -> Path:
  """Writes `obj` (see json_safe) as indented JSON, atomically."""
  return write_text(path, json.dumps(json_safe(obj), indent=2), guard=guard)


def _atomic_write(path: Path, write) -> Path:
  """Calls write(tmp_name) on a temporary file beside `path`, then renames it
  onto `path` in one step: readers never see a partial file, a failure leaves
  none, and a killed run's leftover is removed by `rundir.remove_stale_temps`.
  The file gets the mode `open` would give it (umask), not mkstemp's 0600.

  With several JAX processes (upgrade_jax.parallel) every process runs the
  same program and would write the same file: only process 0 writes, so they
  never race on one path; the others return `path` at once."""
  if not rundir.is_primary_process():
    return path
  fd, tmp = rundir.temp_path_for(path)
  try:
    os.close(fd)
    write(tmp)
    os.chmod(tmp, rundir.output_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def write_text(path, text: str, *, guard: rundir.InputGuard | None = None) -> Path:
  """Writes a text file atomically, creating the folder. For results.json /
  .csv and other run records. `guard` refuses paths that are inputs."""
  path = Path(path)
  if guard is not None:
    guard.check_output(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_bytes(path, data: bytes, *, guard: rundir.InputGuard | None = None) -> Path:
  """Writes bytes (a PNG, an archive) atomically, creating the folder.
  `guard` refuses paths that are inputs."""
  path = Path(path)
  if guard is not None:
    guard.check_output(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_labels(path, labels: np.ndarray, *,
                 guard: rundir.InputGuard | None = None) -> Path:
  """Writes an instance/binary label map as a zlib TIFF, atomically.

  Args:
    path: destination .tif path; its folder must exist.
    labels: (H, W) or (Z, H, W) non-negative integer (or bool) array; stored
      as uint16 when the ids fit, else uint32.
    guard: the run's inputs; writing over any of them raises InputError.

  Returns:
    The destination Path.
  """
  path = Path(path)
  arr = check_labels(labels, f"labels for {path}")
  if guard is not None:
    guard.check_output(path)
  if not path.parent.is_dir():
    raise FileNotFoundError(f"output folder does not exist: {path.parent}")
  arr = arr.astype(np.uint16 if arr.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32)
  # minisblack: a short stack (Z <= 4) must not be stored as one RGB image.
  return _atomic_write(path, lambda tmp: tifffile.imwrite(
      tmp, arr, compression="zlib", photometric="minisblack"))


# --------------------------------------------------------------------------
# Source adapters: each returns a list of Volume.

def _index_folder(directory: Path, role: str) -> dict[str, Path]:
  if not directory.is_dir():
    raise FileNotFoundError(f"{role} folder does not exist: {directory}")
  files = {}
  for p in sorted(directory.iterdir()):
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
      if p.stem in files:
        raise ValueError(f"{role} folder {directory} has two files named {p.stem!r}: "
                         f"{files[p.stem].name} and {p.name}")
      files[p.stem] = p
  if not files:
    raise ValueError(f"{role} folder {directory} is empty (no {'/'.join(IMAGE_SUFFIXES)} "
                     "files)")
  return files


def pair_files(images_dir, labels_dir) -> list[tuple[str, Path, Path]]:
  """(stem, image file, label file) of a folder pair, sorted by stem.

  Raises ValueError naming the files when an image has no label file of the
  same stem or a label file no image (StarDist/Cellpose convention).
  """
  images = _index_folder(Path(images_dir), "images")
  labels = _index_folder(Path(labels_dir), "labels")
  missing = sorted(set(images) - set(labels))
  if missing:
    raise ValueError(f"{len(missing)} image(s) have no label file in {labels_dir}: "
                     f"{', '.join(images[m].name for m in missing[:5])}")
  orphans = sorted(set(labels) - set(images))
  if orphans:
    raise ValueError(f"{len(orphans)} label file(s) have no image in {images_dir}: "
                     f"{', '.join(labels[m].name for m in orphans[:5])}")
  return [(stem, images[stem], labels[stem]) for stem in sorted(images)]


def folder(images_dir, labels_dir, others_dir=None, *, names=None,
           stacks: bool = False) -> list[Volume]:
  """A folder pair images/ + labels/ (+ others/) as Volumes.

  Args:
    images_dir: folder of 2-D images (grey or RGB, any numeric dtype).
    labels_dir: folder of label images with the same names (any extension).
    others_dir: optional folder of non-target object labels, same names.
    names: optional iterable of file stems to read (e.g. a few for a test);
      default all, in sorted order.
    stacks: also accept TIFF stacks: a (Z, H, W) label file with its (Z, H, W)
      or (Z, H, W, C) image (user mode; the label's shape says which it is).

  Returns:
    One Volume per file pair: image (Z, H, W[, C]), target and others
    (Z, H, W); Z = 1 for a 2-D image.
  """
  pairs = pair_files(images_dir, labels_dir)
  images = {stem: im for stem, im, _ in pairs}
  labels = {stem: lab for stem, _, lab in pairs}
  others = _index_folder(Path(others_dir), "others") if others_dir is not None else None
  if others is not None:
    missing = sorted(set(images) - set(others))
    if missing:
      raise ValueError(f"{len(missing)} image(s) have no others file in {others_dir}: "
                       f"{', '.join(images[m].name for m in missing[:5])}")
  stems = sorted(images) if names is None else list(names)
  volumes = []
  for stem in stems:
    if stem not in images:
      raise ValueError(f"no image named {stem!r} in {images_dir}")
    target = read_labels(labels[stem])
    if target.ndim != 2 and not (stacks and target.ndim == 3):
      raise ValueError(f"{labels[stem]}: expected a 2-D label image"
                       f"{' or a (Z, H, W) stack' if stacks else ''}, got shape {target.shape}")
    image = read_image(images[stem])
    image = _split_channels(image, target.shape, f"{images[stem]} vs {labels[stem]}")
    other = np.zeros_like(target)
    if others is not None:
      other = read_labels(others[stem])
      if other.shape != target.shape:
        raise ValueError(f"{others[stem]}: shape {other.shape} does not match label shape "
                         f"{target.shape} of {labels[stem]}")
    c = image.shape[-1]
    if target.ndim == 2:
      image, target, other = image[None], target[None], other[None]
    volumes.append(Volume(image if c > 1 else image[..., 0], target, other, name=stem))
  return volumes


def stack(image_path, label_path, others_path=None, *, name=None,
          slices=None) -> list[Volume]:
  """One TIFF stack (Z, H, W[, C]) with its label stack (Z, H, W) as a Volume.

  A 2-D label image with a 2-D (or (H, W, C)) image becomes one slice.
  `slices` (optional indices along Z) reads only those slices.
  """
  target = read_labels(label_path, slices)
  if target.ndim == 2:
    target = target[None]
  if target.ndim != 3:
    raise ValueError(f"{label_path}: expected label stack (Z, H, W), got shape {target.shape}")
  image = read_image(image_path, slices)
  if image.ndim in (2, 3) and image.shape[:2] == target.shape[1:] and target.shape[0] == 1:
    image = image[None]
  image = _split_channels(image, target.shape, f"{image_path} vs {label_path}")
  others = np.zeros_like(target)
  if others_path is not None:
    others = read_labels(others_path, slices)
    others = others[None] if others.ndim == 2 else others
    if others.shape != target.shape:
      raise ValueError(f"{others_path}: shape {others.shape} does not match label stack "
                       f"{target.shape} of {label_path}")
  if image.shape[-1] == 1:
    image = image[..., 0]
  return [Volume(image, target, others, name=name or Path(image_path).stem)]


def epfl_mito(root, split: str = "train", *, slices=None) -> list[Volume]:
  """The EPFL hippocampus mitochondria stacks: <root>/<split>/{images,labels}.tif.

  Instance ids in the shared copy are per slice; they are kept as they are
  (Datasets relabel per slice anyway). `slices` reads only those slices.
  """
  if split not in ("train", "test"):
    raise ValueError(f"epfl_mito split must be 'train' or 'test', got {split!r}")
  base = Path(root) / split
  return stack(base / "images.tif", base / "labels.tif", name=f"epfl_mito_{split}",
               slices=slices)


def synthetic(preset: str, *, seed: int, n_volumes: int, **kwargs) -> list[Volume]:
  """The virtual microscope; see upgrade_jax.data.synthetic.generate."""
  from upgrade_jax.data import synthetic as sim
  return sim.generate(preset, seed=seed, n_volumes=n_volumes, **kwargs)


SOURCES: dict[str, Callable[..., list[Volume]]] = {
    "synthetic": synthetic,
    "epfl_mito": epfl_mito,
    "folder": folder,
    "stack": stack,
}


def load_source(name: str, **kwargs) -> list[Volume]:
  """Loads a source by name: load_source("folder", images_dir=..., labels_dir=...)."""
  try:
    loader = SOURCES[name]
  except KeyError:
    raise ValueError(f"unknown data source {name!r}; choose one of {sorted(SOURCES)}") from None
  return loader(**kwargs)
