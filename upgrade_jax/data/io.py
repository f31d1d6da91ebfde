"""Reading, validating and writing the data users have; source adapters.

Every source becomes the same in-memory form, a list of `Volume` (a 2-D image
is a Volume with one slice):

  synthetic   the virtual microscope (upgrade_jax.data.synthetic.generate)
  epfl_mito   <root>/{train,test}/{images,labels}.tif stacks (one split per call)
  folder      images/ + labels/ (+ optional others/) with matching file names
              (the StarDist / Cellpose convention; DSB2018 and users' data)
  stack       one TIFF image stack (Z, H, W[, C]) with its label stack

`data.stacking.volumes_to_dataset` (or `stack_samples` for loose 2-D samples)
then pads slices of different sizes into one `Dataset`; `data.normalise` holds
the channel policy and the normalisations.

Matching: an image and its label file match when their names without the
extension are equal (a.png matches a.tif). Label files must hold non-negative
integers; floats are accepted only when every value is integral.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from upgrade_jax import rundir
from upgrade_jax.data.types import Volume
from upgrade_jax.files import atomic_write

__all__ = ["IMAGE_SUFFIXES", "read_array", "read_image", "read_labels", "check_labels",
           "write_labels", "label_file_array", "pair_files", "folder", "stack", "epfl_mito", "synthetic"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
_TIFF = (".tif", ".tiff")


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


def label_file_array(labels: np.ndarray, source="labels") -> np.ndarray:
  """labels as `write_labels` stores them: checked, uint16, or uint32 above
  65535 ids (so an array in memory, e.g. a napari layer, equals the file)."""
  arr = check_labels(labels, source)
  return arr.astype(np.uint16 if arr.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32)


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
  arr = label_file_array(labels, f"labels for {path}")
  if guard is not None:
    guard.check_output(path)
  if not path.parent.is_dir():
    raise FileNotFoundError(f"output folder does not exist: {path.parent}")
  # minisblack: a short stack (Z <= 4) must not be stored as one RGB image.
  return atomic_write(path, lambda tmp: tifffile.imwrite(
      tmp, arr, compression="zlib", photometric="minisblack"), size=arr.nbytes)



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

