"""The measures of benchmarks/paper_scale.py (imports jax: load it after the
process settings). Each returns a dict of one JSON line; a measure that does
not fit the Budget is not run and says `"measured": false`, its time
projected from its compiled FLOPs at the GFLOP/s achieved so far."""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from upgrade_jax import engine, export, parallel
from upgrade_jax.data.types import Dataset
from upgrade_jax.engine.tiling import TileConfig, _tile_side, tile_starts
from upgrade_jax.perturb import PerturbConfig, perturb

MULTIPLE = 16   # the UNet's 4 poolings


@dataclasses.dataclass(frozen=True)
class Problem:
  """Slices of (H, W) padded to multiples of 16, a UNet of `width`, a batch."""
  slice_hw: tuple[int, int]
  width: int
  batch: int
  perturb: dict

  @property
  def padded_hw(self) -> tuple[int, int]:
    return tuple(-(-n // MULTIPLE) * MULTIPLE for n in self.slice_hw)

  @property
  def widths(self) -> tuple[int, ...]:
    return tuple(self.width * m for m in (1, 2, 4, 8, 8))

  def dataset(self, n: int | None = None, seed: int = 0) -> Dataset:
    """n slices of discs (~0.5 % of the slice each) on noise, zero-padded
    to padded_hw with their extents: the shapes a padded set has."""
    n = n or 2 * self.batch
    return _discs(np.random.default_rng(seed), n, self.slice_hw, self.padded_hw)

  def config(self, network: str) -> engine.TrainConfig:
    task = (engine.Upgrade(perturb=PerturbConfig(**self.perturb)) if network == "upgrade"
            else engine.make_task("segment"))
    # crop = the longer padded side: crop_and_flip clips it to (H, W), so
    # every step trains on whole slices.
    return engine.TrainConfig(task=task, widths=self.widths, crop=max(self.padded_hw),
                              batch_size=self.batch, flips=True)


def _discs(rng, n: int, hw, padded_hw) -> Dataset:
  h, w = hw
  yy, xx = np.mgrid[:h, :w]
  images = np.zeros((n, *padded_hw, 1), np.float32)
  targets = np.zeros((n, *padded_hw), np.int32)
  r_max = max(3.0, 0.04 * min(h, w))
  cells = max(4, int(h * w / (np.pi * r_max ** 2) * 0.3))
  for i in range(n):
    lab = np.zeros((h, w), np.int32)
    for k in range(1, cells + 1):
      cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.5, 1.0) * r_max
      lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (lab == 0)] = k
    ids = np.unique(lab)
    lut = np.zeros(cells + 1, np.int32)
    lut[ids] = np.arange(len(ids))
    targets[i, :h, :w] = lut[lab]
    images[i, :h, :w, 0] = (lab > 0) * 0.6 + rng.normal(0.2, 0.1, (h, w))
  return Dataset(images=images, targets=targets, others=np.zeros_like(targets),
                 extents=np.full((n, 2), hw, np.int32), names=tuple(f"s{i}" for i in range(n)))


def matmul_gflops(n: int = 2048) -> float:
  """GFLOP/s of an n×n float32 matmul: the first guess of a step's rate."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(3):
    f(a).block_until_ready()
  return 2.0 * n ** 3 * 3 / (time.perf_counter() - t0) / 1e9


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _program_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries of a compiled program (XLA's
  memory analysis; what it needs on the device at once, about)."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:   # noqa: BLE001 - not every backend reports it
    return None


def _peak_device_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _timed(fn, budget, max_steps: int, reserve_s: float = 0.0) -> list[float]:
  """Times fn once, then again while another call fits the budget with
  `reserve_s` left over (what the measures after it need)."""
  times = []
  while len(times) < max_steps and (
      not times or budget.fits(1.2 * float(np.median(times)) + reserve_s)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def _step(config, ds: Dataset):
  """(run, compiled, compile s): the library's train step on ds, compiled;
  run() takes one step (the state is donated and carried) and waits for it."""
  mesh = parallel.make_mesh()
  channels = engine.network_channels(config, ds.channels)
  holder = [engine.create_train_state(config, channels, jax.random.PRNGKey(0), mesh)]
  data = parallel.place_dataset(ds, mesh)
  t0 = time.perf_counter()
  compiled = engine.make_train_step(config, mesh, ds.max_label).lower(holder[0], data).compile()
  compile_s = time.perf_counter() - t0

  def run():
    holder[0], metrics = compiled(holder[0], data)
    metrics["loss"].block_until_ready()

  return run, compiled, compile_s


def train_step(problem: Problem, network: str, budget, rate_gflops: float,
               max_steps: int, room_after: float = 0.0) -> dict:
  """One network's train step at the problem's scale (see paper_scale.py).
  `room_after`: what the measures after it need, in steps of this one's
  cost (the next network, PyTorch's warm-up and step); steps beyond the
  first leave them that room (breadth before repetitions)."""
  ds = problem.dataset()
  run, compiled, compile_s = _step(problem.config(network), ds)
  flops = _flops(compiled)
  projected = flops / (rate_gflops * 1e9)
  out = {"network": network, "input": [problem.batch, *problem.padded_hw,
                                       1 + (network == "upgrade")],
         "slice": list(problem.slice_hw), "widths": list(problem.widths),
         "compile_s": compile_s, "gflop_per_step": flops / 1e9,
         "program_bytes": _program_bytes(compiled)}
  if not budget.fits(projected):
    return {**out, "measured": False, "step_s": projected, "steps_per_s": 1 / projected,
            "img_per_s": problem.batch / projected, "gflops": None, "timed_steps": 0,
            "peak_device_bytes": None}
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  reserve = room_after * (compile_s + first)
  times = [first] + (_timed(run, budget, max_steps - 1, reserve) if max_steps > 1 and
                     budget.fits(1.2 * first + reserve) else [])
  step_s = float(np.median(times))
  return {**out, "measured": True, "step_s": step_s, "steps_per_s": 1 / step_s,
          "img_per_s": problem.batch / step_s, "gflops": flops / step_s / 1e9,
          "timed_steps": len(times), "first_step_s": times[0],
          "peak_device_bytes": _peak_device_bytes()}


def perturbation(problem: Problem, upgrade: dict, budget, rate_gflops: float) -> dict:
  """P alone on the step's batch, and its share of the u_θ step."""
  ds = problem.dataset(problem.batch)
  config = PerturbConfig(**problem.perturb)
  keys = jax.random.split(jax.random.PRNGKey(1), problem.batch)
  fn = jax.jit(jax.vmap(lambda k, t, o: perturb(k, t, o, config, max_label=ds.max_label)))
  t, o = jnp.asarray(ds.targets), jnp.asarray(ds.others)
  fn(keys, t, o).block_until_ready()
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    fn(keys, t, o).block_until_ready()
    times.append(time.perf_counter() - t0)
  p_s = float(np.median(times))
  out = {"perturb_s": p_s, "share_of_upgrade_step": p_s / upgrade["step_s"],
         "upgrade_step_measured": upgrade["measured"], "share_by_identity_step": None,
         "measured": True}
  # The identity: the same network on the same 2-channel input, the label
  # made beforehand (task segment on image + P(label)); it costs a compile.
  if upgrade["measured"] and budget.fits(upgrade["compile_s"] + 2 * upgrade["step_s"]):
    lq = np.asarray(fn(keys, t, o), np.float32)
    given = ds.replace(images=np.concatenate([ds.images, lq[..., None]], -1))
    run, _, _ = _step(problem.config("segment"), given)
    given_s = float(np.median(_timed(run, budget, 3)))
    out.update(identity_step_s=given_s,
               share_by_identity_step=1 - given_s / upgrade["step_s"])
  return out


def predict(problem: Problem, side: int, budget, rate_gflops: float,
            tiling: TileConfig = TileConfig()) -> dict:
  """apply's path (export.upgrade_sample, apply's default tiling) on one
  side×side image."""
  config = problem.config("upgrade")
  state = engine.create_train_state(config, 2, jax.random.PRNGKey(0))
  up = export.upgrader_from_state(state, image_channels=1, tiling=tiling)
  t = _tile_side(side, tiling)
  n_tiles = len(tile_starts(side, t, tiling.margin)[0]) ** 2 if side > t else 1
  fwd = jax.jit(lambda v, x: state.model.apply(v, x, train=False))
  # XLA's cost analysis of the lowered tile program (no compile needed).
  flops = _flops(fwd.lower(state.variables, jnp.zeros((1, t, t, 2), jnp.float32)))
  projected = n_tiles * flops / (rate_gflops * 1e9)
  out = {"side": side, "tile": t, "tiles": n_tiles, "margin": tiling.margin,
         "gflop_per_image": n_tiles * flops / 1e9}
  if not budget.fits(2.5 * projected):   # a first call (it compiles), then a timed one
    return {**out, "measured": False, "s_per_image": projected,
            "mpx_per_s": side * side / 1e6 / projected}
  rng = np.random.default_rng(side)
  ds = _discs(rng, 1, (side, side), (side, side)) if side <= 1024 else None   # else: specks
  image = (ds.images[0] if ds is not None
           else rng.normal(0.3, 0.1, (side, side, 1)).astype(np.float32))
  labels = (ds.targets[0] if ds is not None
            else (rng.uniform(size=(side, side)) > 0.995).astype(np.int32))
  export.upgrade_sample(up, image, labels)   # compiles this tile shape
  t0 = time.perf_counter()
  export.upgrade_sample(up, image, labels)
  s = time.perf_counter() - t0
  return {**out, "measured": True, "s_per_image": s, "mpx_per_s": side * side / 1e6 / s,
          "peak_device_bytes": _peak_device_bytes()}


# --------------------------------------------------------------------------
# PyTorch on the same device (benchmarks/torch_unet.py), when it has one.

def torch_for(device):
  """torch when it runs on this JAX device's kind (CPU, or CUDA for a GPU), else None."""
  try:
    import torch
  except ImportError:
    return None
  if device.platform == "gpu" and torch.cuda.is_available():
    return torch
  if device.platform == "cpu":
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    return torch
  return None


def torch_step(torch, problem: Problem, network: str, budget, jax_m: dict,
               reserve_s: float = 0.0) -> dict:
  """The same step in PyTorch: same network, input, soft Dice and Adam.
  Steps after the first leave `reserve_s` for the measures after it."""
  from benchmarks.torch_unet import UNet

  if not jax_m["measured"] or not budget.fits(2.5 * jax_m["step_s"]):
    return {"torch_device": None, "torch_step_s": None, "ratio_vs_torch": None,
            "measured": False}
  dev = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  ds = problem.dataset(problem.batch)
  c = 1 + (network == "upgrade")
  x_np = np.concatenate([ds.images] + ([ds.targets[..., None] > 0] if c == 2 else []), -1)
  torch.manual_seed(0)
  model = UNet(problem.widths, c).to(dev).to(memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2), np.float32)).to(dev)
  x = x.contiguous(memory_format=torch.channels_last)
  t = torch.from_numpy((ds.targets > 0).astype(np.float32)).to(dev)

  def run():
    opt.zero_grad(set_to_none=True)
    p = torch.softmax(model(x), 1)[:, 1]
    (1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)).backward()
    opt.step()
    if dev == "cuda":
      torch.cuda.synchronize()

  run()   # warm-up (cuDNN's algorithm search)
  s = float(np.median(_timed(run, budget, 3, reserve_s)))
  return {"torch_device": dev, "torch_step_s": s, "ratio_vs_torch": s / jax_m["step_s"],
          "jax_step_s": jax_m["step_s"], "measured": True}
