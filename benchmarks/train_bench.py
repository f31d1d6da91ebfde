"""Train-step throughput of the upgrade UNet: JAX (this library) against PyTorch.

Workload: batch 4, 128x128 crops, UNet widths (w, 2w, 4w, 8w, 8w)
for w = 16 and 32, soft Dice, Adam. The JAX side is the library's own step
(`engine.make_train_step`): crop sampling, flips, the pair function, the
forward/backward pass, Adam and the Dice counts, all in one jitted program.
The PyTorch side is the same network (3x3 conv without bias + BatchNorm +
ReLU twice per block, 2x2 max-pool, 2x2 stride-2 transposed conv, skip
concat, 1x1 head; benchmarks/torch_unet.py) with softmax soft Dice and Adam
on a fixed batch.

Two JAX steps are timed:
  given     task "segment" on 2-channel images (image, perturbed label) made
            once on the host: the network's work, as PyTorch does it;
  perturb   task "upgrade": the label channel is perturbed on the device
            inside the step (70 % omission, bias up to 6 pixels).
perturb_overhead = time(perturb) / time(given).

Both libraries use the same 2 cores. The steps are timed in alternating
blocks (a warm-up step, then `--steps` timed steps) for `--rounds` rounds and
the medians are reported, so machine load hits both sides alike. The achieved
GFLOP/s use XLA's cost analysis of the compiled step; gflops_matmul is a
2048x2048 float32 matmul timed in the same run (the practical ceiling).

Process set-up (before JAX or PyTorch allocate): glibc malloc is told to keep
freed memory (no per-allocation mmap, no trimming, one arena). XLA:CPU
allocates its large temporary buffers afresh every step; with glibc's
defaults every step page-faults them in again (~30-60k faults per step here,
a fifth of the step). `--no_malloc_tuning` measures the defaults.
PyTorch's OpenMP threads wait passively (`--omp_wait_policy auto`, recorded in
the JSON): spinning threads would take the cores from JAX's turn in the
alternation, and collapse (3-10x) when other processes share the cores.

Prints one JSON line. PyTorch is optional (`pip install .[bench]`); without
it the torch fields are null.

    python benchmarks/train_bench.py [--widths 16,32] [--conv_impl xla]
        [--steps 6] [--rounds 4] [--no_torch] [--no_malloc_tuning]
        [--xla_flags=--xla_cpu_experimental_ynn_fusion_type=+individual_dot]

On XLA:CPU the library compiles without YNNPACK fusions (engine/xla_options.py);
an `xla_cpu_experimental_ynn_fusion_type` in --xla_flags replaces that choice:
`=+individual_dot` is YNNPACK's default set, for an A/B against it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from bench_common import load_torch, prepare_cpu_benchmark  # no jax import: safe before jax


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--widths", default="16,32", help="base widths w, comma separated")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=128, help="crop side")
  p.add_argument("--conv_impl", default="xla", help="models.conv.get_conv name")
  p.add_argument("--steps", type=int, default=6, help="timed steps per block")
  p.add_argument("--rounds", type=int, default=4, help="alternating blocks per step kind")
  p.add_argument("--threads", type=int, default=2, help="cores for both libraries")
  p.add_argument("--torch_layout", default="best", choices=["best", "nchw", "channels_last"],
                 help="PyTorch memory format; 'best' times both and reports the faster")
  p.add_argument("--omp_wait_policy", default="auto", choices=["auto", "active", "passive"],
                 help="PyTorch's OpenMP threads; 'auto' is 'passive' (spinning threads take "
                      "the cores from JAX's turn in the alternation: bench_common.py)")
  p.add_argument("--xla_flags", default="",
                 help="appended to XLA_FLAGS before JAX starts, e.g. "
                      "--xla_cpu_experimental_ynn_fusion_type=+individual_dot (YNNPACK's "
                      "default, which the library otherwise turns off on CPU)")
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--no_malloc_tuning", action="store_true")
  p.add_argument("--no_split", action="store_true", help="skip the forward/backward split")
  return p.parse_args(argv)


ARGS = parse_args()
# Both libraries on the same cores: XLA:CPU sizes its pool from the affinity mask.
MALLOC_TUNED = prepare_cpu_benchmark(
    omp_wait_policy=ARGS.omp_wait_policy, xla_flags=ARGS.xla_flags,
    malloc_tuning=not ARGS.no_malloc_tuning, threads=ARGS.threads)["malloc_tuned"]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from upgrade_jax import engine, parallel  # noqa: E402
from upgrade_jax.data.types import Dataset  # noqa: E402
from upgrade_jax.losses import dice_loss_from_logits  # noqa: E402
from upgrade_jax.perturb import PerturbConfig, perturb  # noqa: E402

PERTURB = PerturbConfig(omission_rate=0.7, bias_max=6)


# --------------------------------------------------------------------------
# Data: random discs, ~10-40 cells per crop.

def make_dataset(rng, n: int, size: int) -> Dataset:
  """n images (size, size, 1) with disc-shaped cells; targets are instance ids."""
  yy, xx = np.mgrid[:size, :size]
  images = np.zeros((n, size, size, 1), np.float32)
  targets = np.zeros((n, size, size), np.int32)
  for i in range(n):
    cells = rng.integers(10, 41)
    for k in range(1, cells + 1):
      cy, cx = rng.uniform(0, size, 2)
      r = rng.uniform(4, 9)
      disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
      targets[i][disc & (targets[i] == 0)] = k
    images[i, ..., 0] = (targets[i] > 0) * 0.6 + rng.normal(0, 0.2, (size, size))
  # Sequential ids: drop ids that overlaps hid completely.
  for i in range(n):
    ids = np.unique(targets[i])
    lut = np.zeros(ids.max() + 1, np.int32)
    lut[ids] = np.arange(len(ids))
    targets[i] = lut[targets[i]]
  return Dataset(images=images, targets=targets, others=np.zeros_like(targets),
                 extents=np.full((n, 2), size, np.int32),
                 names=tuple(f"disc{i}" for i in range(n)))


def with_label_channel(ds: Dataset) -> Dataset:
  """The dataset with its perturbed label (made once, on the device) as a 2nd channel."""
  keys = jax.random.split(jax.random.PRNGKey(1), len(ds))
  lq = jax.jit(jax.vmap(lambda k, t, o: perturb(k, t, o, PERTURB, max_label=ds.max_label)))(
      keys, jnp.asarray(ds.targets), jnp.asarray(ds.others))
  images = np.concatenate([ds.images, np.asarray(lq, np.float32)[..., None]], -1)
  return ds.replace(images=images)


# --------------------------------------------------------------------------
# JAX: the library's step.

def jax_step(width: int, task: str, ds: Dataset, mesh):
  """(run_one_step, flops, forward_fn) for the library train step."""
  task_obj = engine.Upgrade(perturb=PERTURB) if task == "upgrade" else engine.make_task(task)
  config = engine.TrainConfig(task=task_obj, widths=tuple(width * m for m in (1, 2, 4, 8, 8)),
                              conv_impl=ARGS.conv_impl, crop=ARGS.size,
                              batch_size=ARGS.batch, flips=True)
  channels = engine.network_channels(config, ds.channels)
  state = engine.create_train_state(config, channels, jax.random.PRNGKey(0), mesh)
  data = parallel.place_dataset(ds, mesh)
  step = engine.make_train_step(config, mesh, ds.max_label)
  compiled = step.lower(state, data).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], data)
    metrics["loss"].block_until_ready()

  # Forward only (training-mode BatchNorm + loss) on one fixed batch, for the split.
  x = jnp.asarray(ds.images[:ARGS.batch, :ARGS.size, :ARGS.size])
  if task == "upgrade":
    x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (1,), x.dtype)], -1)
  t = jnp.asarray(ds.targets[:ARGS.batch, :ARGS.size, :ARGS.size] > 0)

  @jax.jit
  def forward(variables):
    logits, _ = holder[0].model.apply(variables, x, train=True, mutable=["batch_stats"])
    return dice_loss_from_logits(logits, t)

  def run_forward():
    forward(holder[0].variables).block_until_ready()

  return run, float(cost["flops"]), run_forward


def jax_matmul(n: int = 2048):
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return (lambda: f(a).block_until_ready()), 2.0 * n ** 3


# --------------------------------------------------------------------------
# PyTorch: the same network (torch_unet.py).

def torch_step(width: int, channels_last: bool, x_np, t_np):
  import torch
  from torch_unet import UNet  # the shared reference network (benchmarks/torch_unet.py)

  torch.manual_seed(0)
  model = UNet(tuple(width * m for m in (1, 2, 4, 8, 8)), x_np.shape[-1])
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
  t = torch.from_numpy(t_np.astype(np.float32))
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)

  def loss_fn():
    p = torch.softmax(model(x), 1)[:, 1]
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)

  def run():
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.step()

  def run_forward():
    loss_fn()  # with autograd recording, as in training

  return run, run_forward


def torch_matmul(n: int = 2048):
  import torch
  a = torch.randn(n, n)
  return (lambda: a @ a), 2.0 * n ** 3


# --------------------------------------------------------------------------
# Timing.

def time_blocks(runs: dict, steps: int, rounds: int) -> dict:
  """Alternating blocks: one warm-up call, then `steps` timed calls, per name.

  Returns {name: (median seconds, min seconds, mean process CPU seconds)}.
  The CPU time (user + sys of the whole process, all threads) hardly depends
  on how many other processes share the cores, unlike the wall time.
  """
  times = {name: [] for name in runs}
  cpu = {name: 0.0 for name in runs}
  for _ in range(rounds):
    for name, fn in runs.items():
      fn()
      c0 = time.process_time()
      for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
      cpu[name] += time.process_time() - c0
  return {name: (float(np.median(ts)), float(np.min(ts)), cpu[name] / len(ts))
          for name, ts in times.items()}


def bench_width(width: int, torch, mesh, ds1: Dataset, ds2: Dataset) -> dict:
  runs, fwd = {}, {}
  runs["given"], flops, fwd["given"] = jax_step(width, "segment", ds2, mesh)
  runs["perturb"], flops_p, _ = jax_step(width, "upgrade", ds1, mesh)
  layouts = []
  if torch is not None:
    x_np = ds2.images[:ARGS.batch, :ARGS.size, :ARGS.size]
    t_np = ds2.targets[:ARGS.batch, :ARGS.size, :ARGS.size] > 0
    layouts = (["nchw", "channels_last"] if ARGS.torch_layout == "best"
               else [ARGS.torch_layout])
    for lay in layouts:
      runs["torch_" + lay], fwd["torch_" + lay] = torch_step(
          width, lay == "channels_last", x_np, t_np)
  timed = time_blocks(runs, ARGS.steps, ARGS.rounds)
  med = {k: v[0] for k, v in timed.items()}
  mins = {k: v[1] for k, v in timed.items()}
  cpus = {k: v[2] for k, v in timed.items()}
  split = time_blocks(fwd, ARGS.steps, max(1, ARGS.rounds // 2)) if not ARGS.no_split else {}
  split = {k: v[0] for k, v in split.items()}
  b = ARGS.batch
  out = {
      "img_per_s_jax": b / med["given"],
      "img_per_s_jax_perturb": b / med["perturb"],
      "step_ms_jax": 1e3 * med["given"],
      "step_ms_jax_perturb": 1e3 * med["perturb"],
      "gflop_per_step": flops / 1e9,
      "gflops_jax": flops / med["given"] / 1e9,
      "perturb_overhead": med["perturb"] / med["given"],
      "fwd_ms_jax": 1e3 * split["given"] if split else None,
      "cpu_ms_jax": 1e3 * cpus["given"],
  }
  if layouts:
    best = min(layouts, key=lambda lay: med["torch_" + lay])
    for lay in layouts:
      out[f"step_ms_torch_{lay}"] = 1e3 * med["torch_" + lay]
      out[f"cpu_ms_torch_{lay}"] = 1e3 * cpus["torch_" + lay]
      if split:
        out[f"fwd_ms_torch_{lay}"] = 1e3 * split["torch_" + lay]
    out.update(torch_layout=best, img_per_s_torch=b / med["torch_" + best],
               ratio_vs_torch=med["torch_" + best] / med["given"],
               ratio_vs_torch_perturb=med["torch_" + best] / med["perturb"],
               ratio_vs_torch_min=min(mins["torch_" + lay] for lay in layouts) / mins["given"],
               cpu_ratio_vs_torch=cpus["torch_" + best] / cpus["given"],
               gflops_torch=flops / med["torch_" + best] / 1e9)
  else:
    out.update(torch_layout=None, img_per_s_torch=None, ratio_vs_torch=None,
               ratio_vs_torch_perturb=None, ratio_vs_torch_min=None, cpu_ratio_vs_torch=None, gflops_torch=None)
  return out


def main():
  torch = load_torch(ARGS.threads, disabled=ARGS.no_torch, who="train_bench")
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  ds1 = make_dataset(rng, 8, ARGS.size)
  ds2 = with_label_channel(ds1)
  load_before = os.getloadavg()
  widths = [int(w) for w in ARGS.widths.split(",")]
  per_width = {w: bench_width(w, torch, mesh, ds1, ds2) for w in widths}
  mm = {"jax": jax_matmul()}
  if torch is not None:
    mm["torch"] = torch_matmul()
  mm_med = {k: v[0] for k, v in time_blocks({k: v[0] for k, v in mm.items()}, 5, 3).items()}
  head = per_width[widths[0]]
  rnd = lambda v: round(v, 3) if isinstance(v, float) else v
  result = {
      "img_per_s_jax": head["img_per_s_jax"],
      "img_per_s_torch": head["img_per_s_torch"],
      "ratio_vs_torch": head["ratio_vs_torch"],
      "gflops_jax": head["gflops_jax"],
      "gflops_matmul": mm["jax"][1] / mm_med["jax"] / 1e9,
      "gflops_matmul_torch": mm["torch"][1] / mm_med["torch"] / 1e9 if torch is not None else None,
      "perturb_overhead": head["perturb_overhead"],
      "width": widths[0],
      "per_width": {str(w): {k: rnd(v) for k, v in r.items()} for w, r in per_width.items()},
      "conv_impl": ARGS.conv_impl, "batch": ARGS.batch, "size": ARGS.size,
      "threads": ARGS.threads, "malloc_tuned": MALLOC_TUNED,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "omp_wait_policy": os.environ["OMP_WAIT_POLICY"].lower() if torch is not None else None,
      "steps": ARGS.steps, "rounds": ARGS.rounds,
      "load_avg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
      "jax": jax.__version__, "torch": torch.__version__ if torch is not None else None,
      "cpu": platform.processor() or platform.machine(),
  }
  print(json.dumps({k: rnd(v) for k, v in result.items()}))


if __name__ == "__main__":
  main()
