"""Writing a run's outputs: JSON of configs and results, atomic text, bytes.

Every file a run writes goes through `atomic_write`: a temporary file beside
the destination, renamed onto it in one step, so a reader never sees a
partial file and a killed run leaves no file under a final name. `engine`
(checkpoint records) and `data` (label TIFFs) both write through it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from upgrade_jax import rundir

__all__ = ["json_safe", "write_json", "write_text", "write_bytes", "atomic_write"]


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


def atomic_write(path: Path, write, *, size: int | None = None) -> Path:
  """Calls write(tmp_name) on a temporary file beside `path`, then renames it
  onto `path` in one step: readers never see a partial file, a failure leaves
  none, and a killed run's leftover is removed by `rundir.remove_stale_temps`.
  The file gets the mode `open` would give it (umask), not mkstemp's 0600.

  With several JAX processes (upgrade_jax.parallel) every process runs the
  same program and would write the same file: only process 0 writes, so they
  never race on one path; the others return `path` at once.

  A write that runs out of space raises rundir.DiskFull (one line: the
  file, `size` (its bytes, where the caller knows them) and what is free)."""
  if not rundir.is_primary_process():
    return path
  fd, tmp = rundir.temp_path_for(path)
  try:
    os.close(fd)
    write(tmp)
    os.chmod(tmp, rundir.output_mode())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    full = rundir.disk_full(e, path, size)
    if full is not None:
      raise full from None
    raise
  return path


def write_text(path, text: str, *, guard: rundir.InputGuard | None = None) -> Path:
  """Writes a text file atomically, creating the folder. For results.json /
  .csv and other run records. `guard` refuses paths that are inputs."""
  path = Path(path)
  if guard is not None:
    guard.check_output(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return atomic_write(path, lambda tmp: Path(tmp).write_text(text), size=len(text.encode()))


def write_bytes(path, data: bytes, *, guard: rundir.InputGuard | None = None) -> Path:
  """Writes bytes (a PNG, an archive) atomically, creating the folder.
  `guard` refuses paths that are inputs."""
  path = Path(path)
  if guard is not None:
    guard.check_output(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), size=len(data))

