"""Device mesh, shardings, placing a Dataset on the devices, and processes.

Data parallelism is expressed with `jax.jit` and `NamedSharding` over a 1-D
mesh whose single axis is `data`: the train step is written for the global
batch, its batch dimension is constrained to `P("data")`, and XLA's SPMD
partitioner splits the work, all-reduces the gradients and computes
BatchNorm statistics over the global batch (the cross-device mean). The same
code runs on 1 CPU, on 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8) or on a GPU/TPU host.

A training set that fits (`choose_placement`) is replicated on every device
once (`place_dataset`) and each step gathers its samples on the device:
nothing crosses from the host in the hot loop. One that fits only in pieces
is sharded over `data` (1/D a device; XLA turns the gather into a masked
local gather and an all-reduce of the batch). Labels are stored in the
smallest integer type, and compact images (Dataset.image_scale) in their
source dtype, normalised on the device. A set too large for a device stays
on the host, and each step is sent the B whole samples it draws (`put_batch`,
sharded over `data`); the host draws them with the step's own keys
(step.draw_indices), so both placements train identically.

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

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from upgrade_jax.data.types import label_dtype  # noqa: F401  (part of this module's API)

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
  """A Dataset's arrays on the devices: the whole set (replicated, or its
  samples sharded over `data`), or one streamed batch of it (`put_batch`).

  images: (N, H, W, C) float32, or compact: the source integers (uint8,
  uint16) with `scale` (N,) float32, normalised on the device as
  (images - offset) / scale (Dataset.image_scale, image_offset; offset None
  is 0); targets, others: (N, H, W) in the
  smallest signed integer type that holds their values (`label_dtype`: int8
  for up to 127 ids, else int16, else int32), widened to int32 by the train
  step after it gathers a batch; extents: (N, 2) int32 valid (height, width);
  count: () int32, the number of real samples (a sharded set's N is padded
  to a multiple of the devices with samples never drawn); None for a batch.
  """
  images: Any
  targets: Any
  others: Any
  extents: Any
  scale: Any = None
  count: Any = None
  offset: Any = None


def bytes_per_pixel(data) -> float:
  """Bytes a training pixel costs (images + targets + others) in a
  DeviceData, or in a Dataset as place_dataset would store it."""
  if isinstance(data, DeviceData):
    arrays = (data.images, data.targets, data.others)
    n_px = int(np.prod(data.targets.shape))
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays) / n_px
  dt = label_dtype(data.targets, data.others)
  return data.images.dtype.itemsize * data.channels + 2 * dt.itemsize


def dataset_bytes(dataset) -> int:
  """Bytes one copy of `dataset` takes on a device (place_dataset's layout)."""
  return int(np.prod(dataset.targets.shape) * bytes_per_pixel(dataset))


def _host_arrays(dataset, index=None, labels_as=None) -> DeviceData:
  """The arrays place_dataset / put_batch send, on the host (labels as
  `labels_as`, default: the set's label_dtype)."""
  pick = (lambda x: x) if index is None else (lambda x: x[index])  # noqa: E731
  dt = label_dtype(dataset.targets, dataset.others) if labels_as is None else labels_as
  images = pick(dataset.images)
  compact = dataset.image_scale is not None
  return DeviceData(
      images=images if compact else images.astype(np.float32, copy=False),
      targets=pick(dataset.targets).astype(dt, copy=False),
      others=pick(dataset.others).astype(dt, copy=False),
      extents=pick(dataset.extents).astype(np.int32),
      scale=pick(dataset.image_scale).astype(np.float32) if compact else None,
      count=np.int32(len(dataset) if index is None else len(index)),
      offset=(None if dataset.image_offset is None
              else pick(dataset.image_offset).astype(np.float32)))


def _pad_samples(x: np.ndarray, n: int) -> np.ndarray:
  """x with its leading axis zero-padded to n."""
  if x.ndim == 0 or x.shape[0] == n:
    return x
  return np.concatenate([x, np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)])


def place_dataset(dataset, mesh: Mesh, *, shard: bool = False) -> DeviceData:
  """Copies a data.types.Dataset once to the devices of the mesh; labels in
  `label_dtype`, compact images in their source dtype (12 -> 4 bytes a pixel
  for a uint16, 1-channel set with < 128 ids).

  shard=False: a whole copy on every device. shard=True: the samples split
  over `data` (N padded to a multiple of the devices), 1/D of the set a
  device; the step's gather of global indices is then partitioned by XLA as
  a masked local gather and an all-reduce of the batch (exact: one device
  contributes each sample, the others zeros), so it trains as replicated.
  """
  host = _host_arrays(dataset)
  if not shard:
    return jax.tree.map(lambda x: put(x, replicated(mesh)), host)
  d = mesh.shape[DATA_AXIS]
  n = -(-len(dataset) // d) * d
  arrays = host._replace(count=None)
  placed = jax.tree.map(lambda x: put(_pad_samples(x, n), batch_sharding(mesh)), arrays)
  return placed._replace(count=put(host.count, replicated(mesh)))


def put_batch(dataset, index: np.ndarray, mesh: Mesh, labels_as=None) -> DeviceData:
  """The samples `index` (B,) of a host Dataset as one batch on the devices,
  its leading axis split over `data` (the streaming placement: the set stays
  on the host, each step sends B whole samples). `labels_as`: the set's
  label_dtype, computed once by the caller (a scan of the whole set).
  count is None: every row of a batch is real (the layout of the train
  step's own device gather, so both run one step program)."""
  host = _host_arrays(dataset, index, labels_as)
  return jax.tree.map(lambda x: put(x, batch_sharding(mesh)), host._replace(count=None))


# The placements of a training set (TrainConfig.data_placement).
PLACEMENTS = ("auto", "replicate", "shard", "stream")


def device_memory(device) -> int:
  """Bytes a training set may use on `device`: its allocator's limit where
  it reports one (GPU, TPU); on CPU, where every device and the host share
  the host's RAM, physical memory divided by (local devices + 1): the host's
  copy of the set counts too."""
  try:
    stats = device.memory_stats()
  except Exception:   # noqa: BLE001 -- backends without allocator statistics raise
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(phys // (jax.local_device_count() + 1))


# Share of a device's memory the training set may take; the rest is for the
# model, activations and XLA's buffers.
DEVICE_SET_FRACTION = 0.5


def choose_placement(requested: str, dataset, mesh: Mesh) -> str:
  """The placement of `dataset`: `requested` unless "auto", which takes the
  first that fits in DEVICE_SET_FRACTION of a device's memory:
  "replicate" (a copy on every device: no traffic), "shard" (1/D of the set a
  device, several devices: an all-reduce of the batch each step), "stream"
  (the set on the host, the batch sent each step). All three train
  identically (tests/test_large_sets.py, test_parallel.py)."""
  if requested not in PLACEMENTS:
    raise ValueError(f"data_placement must be one of {PLACEMENTS}, got {requested!r}")
  if requested != "auto":
    return requested
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  budget = DEVICE_SET_FRACTION * device_memory(local[0] if local else jax.local_devices()[0])
  size, d = dataset_bytes(dataset), mesh.shape[DATA_AXIS]
  if size <= budget:
    choice = "replicate"
  elif d > 1 and -(-len(dataset) // d) * size / len(dataset) <= budget:
    choice = "shard"
  else:
    choice = "stream"
  if jax.process_count() > 1:   # every process must run the same program: process 0 decides
    pick = multihost_utils.broadcast_one_to_all(np.int32(PLACEMENTS.index(choice)))
    choice = PLACEMENTS[int(pick)]
  return choice


def shard_batch(tree, mesh: Mesh):
  """Inside jit: constrains the leading axis of every leaf to `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def replicate_tree(tree, mesh: Mesh):
  """Host or device pytree -> replicated on the mesh (params, opt state)."""
  rep = replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), rep), tree)
