"""Device mesh, shardings, and placing a Dataset on the devices.

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

Multi-host (e.g. a TPU pod slice or several GPU nodes): every process runs the
same program; call `maybe_initialize_distributed(True)` before any other JAX
call, then `make_mesh()` spans the devices of all processes and
`place_dataset` builds global arrays from each process's (identical) copy of
the data. This path is documented, not tested here (one host only).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(enabled: bool) -> None:
  """Calls jax.distributed.initialize() when `enabled` (multi-host runs).

  Must run before any other JAX call in the process. The coordinator address,
  process count and id come from the cluster environment (SLURM, Cloud TPU,
  or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  variables that jax.distributed reads itself). Not testable on one host.
  """
  if enabled:
    jax.distributed.initialize()


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

  images: (N, H, W, C) float32; targets, others: (N, H, W) int32;
  extents: (N, 2) int32 valid (height, width).
  """
  images: Any
  targets: Any
  others: Any
  extents: Any


def place_dataset(dataset, mesh: Mesh) -> DeviceData:
  """Copies a data.types.Dataset once to every device of the mesh."""
  rep = replicated(mesh)
  return DeviceData(
      images=put(dataset.images.astype(np.float32), rep),
      targets=put(dataset.targets.astype(np.int32), rep),
      others=put(dataset.others.astype(np.int32), rep),
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
