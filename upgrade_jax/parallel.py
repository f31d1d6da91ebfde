"""Device mesh, shardings, placing a Dataset on the devices, and processes.

Data parallelism is expressed with `jax.jit` and `NamedSharding` over a 1-D
mesh whose single axis is `data`: the train step is written for the global
batch, its batch dimension is constrained to `P("data")`, and XLA's SPMD
partitioner splits the work, all-reduces the gradients and computes
BatchNorm statistics over the global batch (the cross-device mean). The same
code runs on 1 CPU, on 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8) or on a GPU/TPU host.

The HQ training set is small (tens of 2-D slices), so it is replicated on
every device once (`place_dataset`) and each step gathers its crops on the
device: nothing crosses from the host in the hot loop.

Several processes (a TPU pod slice, several GPU nodes, or several CPU
processes on one machine): every process runs the same program on the same
inputs; `maybe_initialize_distributed` runs before any other JAX call, then
`make_mesh()` spans the devices of all processes and `put` builds global
arrays from each process's identical host copy. Results that are sharded
over devices of other processes come back with `fetch` (an all-gather).
Files are written by process 0 only (`rundir.is_primary_process`; data.io's
writers skip the others), with a `barrier` where another process reads what
it wrote. tests/test_multiprocess.py runs 2 processes x 2 CPU
devices on localhost (gloo collectives) against 1 process x 4 devices.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(enabled: bool, *, coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Calls jax.distributed.initialize() when `enabled` (several processes).

  Must run before any other JAX call in the process. Arguments left None come
  from the cluster environment (SLURM, Cloud TPU, or the
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables
  that jax.distributed reads itself). On CPU the processes talk over gloo,
  JAX's default CPU collectives (jax_cpu_collectives_implementation).

  Args:
    enabled: False: a single process; nothing is called.
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: how many processes the run has.
    process_id: this process's index in [0, num_processes).
  """
  if enabled:
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)` (no-op for one process).

  Used where a process reads a file the primary process has just written.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def fetch(tree):
  """jax.device_get that also takes arrays spanning other processes' devices.

  Such an array (e.g. a prediction batch sharded over the global `data`
  axis) is all-gathered first, so every process gets the whole value; a
  fully addressable or fully replicated array is fetched as device_get
  would (one process: exactly device_get).
  """
  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree.map(get, tree)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) axis over `data`; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Raises ValueError unless batch_size splits evenly over the data axis."""
  n = mesh.shape[DATA_AXIS]
  if batch_size <= 0 or batch_size % n:
    raise ValueError(f"{what}={batch_size} must be a positive multiple of the "
                     f"{n} devices of the mesh")


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Host array -> global jax.Array with `sharding` (works multi-host too).

  Every process must hold the same full `x`; each device takes its slice.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


class DeviceData(NamedTuple):
  """A Dataset's arrays resident on the devices (replicated).

  images: (N, H, W, C) float32; targets, others: (N, H, W) in the smallest
  signed integer type that holds their values (`label_dtype`: int8 for up to
  127 ids, else int16, else int32), widened to int32 by the train step after
  it gathers a batch; extents: (N, 2) int32 valid (height, width).
  """
  images: Any
  targets: Any
  others: Any
  extents: Any


def label_dtype(*arrays) -> np.dtype:
  """The smallest signed integer dtype holding every value of `arrays`.

  Signed, because targets may carry negative codes (the competing methods'
  corrected / unlabelled pixels); lossless, so training reads the same ids.
  """
  lo = min((int(a.min()) for a in arrays if a.size), default=0)
  hi = max((int(a.max()) for a in arrays if a.size), default=0)
  for dt in (np.int8, np.int16, np.int32):
    if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
      return np.dtype(dt)
  raise ValueError(f"label ids {lo}..{hi} do not fit in int32")


def bytes_per_pixel(data: DeviceData) -> float:
  """Device bytes a training pixel costs (images + targets + others), per copy."""
  n_px = int(np.prod(data.targets.shape))
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize
             for a in (data.images, data.targets, data.others)) / n_px


def place_dataset(dataset, mesh: Mesh) -> DeviceData:
  """Copies a data.types.Dataset once to every device of the mesh; labels in
  `label_dtype` (12 -> 6 bytes a pixel for a 1-channel set with < 128 ids)."""
  rep = replicated(mesh)
  dt = label_dtype(dataset.targets, dataset.others)
  return DeviceData(
      images=put(dataset.images.astype(np.float32), rep),
      targets=put(dataset.targets.astype(dt), rep),
      others=put(dataset.others.astype(dt), rep),
      extents=put(dataset.extents.astype(np.int32), rep))


def shard_batch(tree, mesh: Mesh):
  """Inside jit: constrains the leading axis of every leaf to `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def replicate_tree(tree, mesh: Mesh):
  """Host or device pytree -> replicated on the mesh (params, opt state)."""
  rep = replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), rep), tree)
