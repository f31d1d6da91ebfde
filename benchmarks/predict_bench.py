"""Inference throughput of the upgrade UNet: JAX (`engine.predict_proba`) against PyTorch.

Workload: the upgrade network (2 input channels: image + LQ mask)
predicting full images of 256x256 and 1024x1024, batch 8 as the pipeline's
`predict_batch`, widths (w, 2w, 4w, 8w, 8w) for w = 16 (the quickstart) and
32. The JAX side is the library call users run, `engine.predict_proba`, from
host numpy images and masks to host numpy probabilities. The PyTorch side is
the same network (benchmarks/torch_unet.py) in eval mode under
`torch.no_grad()` (BatchNorm with running statistics), fed the same batches
from numpy and returning numpy foreground probabilities (softmax channel 1).

The PyTorch model gets the JAX model's weights and (randomised) BatchNorm
statistics, and the largest difference of the two probability maps is
reported (`max_abs_diff`), so both sides compute the same function.

Both libraries use the same cores and are timed in alternating rounds (one
call of each per round after a warm-up call); the medians are reported.
Process set-up as in train_bench.py: glibc malloc keeps freed memory
(`--no_malloc_tuning` to measure the defaults), and PyTorch's OpenMP threads
wait passively (bench_common.py says why).

Prints one JSON line; `ratio` is img/s JAX / img/s PyTorch (higher is better
for JAX), per size and width and their minimum. PyTorch is optional
(`pip install '.[bench]'`); without it the torch fields are null.

    python benchmarks/predict_bench.py [--widths 16,32] [--sizes 256,1024]
        [--n 32,8] [--batch 8] [--rounds 3] [--torch_layout channels_last]
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
  p.add_argument("--sizes", default="256,1024", help="image sides, comma separated")
  p.add_argument("--n", default="32,8", help="images per size (same order as --sizes)")
  p.add_argument("--batch", type=int, default=8, help="images per call (predict_batch)")
  p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
  p.add_argument("--threads", type=int, default=2, help="cores for both libraries")
  p.add_argument("--torch_layout", default="channels_last", choices=["nchw", "channels_last"],
                 help="PyTorch memory format (channels_last is its faster one here)")
  p.add_argument("--omp_wait_policy", default="auto", choices=["auto", "active", "passive"])
  p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before JAX starts")
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--no_malloc_tuning", action="store_true")
  return p.parse_args(argv)


ARGS = parse_args()
MALLOC_TUNED = prepare_cpu_benchmark(
    omp_wait_policy=ARGS.omp_wait_policy, xla_flags=ARGS.xla_flags,
    malloc_tuning=not ARGS.no_malloc_tuning, threads=ARGS.threads)["malloc_tuned"]

import jax  # noqa: E402
import numpy as np  # noqa: E402

from upgrade_jax import engine  # noqa: E402
from upgrade_jax.models.unet import UNet  # noqa: E402

WIDTH_MULT = (1, 2, 4, 8, 8)


def make_inputs(rng, n: int, size: int):
  """(n, size, size, 1) float32 images in [0, 1] and (n, size, size) bool masks of discs."""
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((n, size, size), bool)
  for i in range(n):
    for _ in range(size * size // 2000):
      cy, cx = rng.uniform(0, size, 2)
      r = rng.uniform(5, 12)
      masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
  images = np.clip(masks * 0.6 + rng.normal(0.2, 0.15, masks.shape), 0, 1)
  return images[..., None].astype(np.float32), masks


def jax_model(width: int, key):
  """(model, variables): random weights, randomised BatchNorm statistics."""
  model = UNet(widths=tuple(width * m for m in WIDTH_MULT))
  variables = engine.init_variables(model, 2, key)
  k1, k2, k3, k4 = jax.random.split(key, 4)

  def randomise(path, x):
    name = path[-1].key
    if name == "mean":
      return 0.1 * jax.random.normal(jax.random.fold_in(k1, x.size), x.shape)
    if name == "var":
      return jax.random.uniform(jax.random.fold_in(k2, x.size), x.shape, minval=0.5, maxval=2.0)
    if name == "scale" and len(path) > 2 and path[-2].key.startswith("BatchNorm"):
      return jax.random.uniform(jax.random.fold_in(k3, x.size), x.shape, minval=0.8, maxval=1.2)
    if name == "bias":
      return 0.05 * jax.random.normal(jax.random.fold_in(k4, x.size), x.shape)
    return x

  variables = jax.tree_util.tree_map_with_path(randomise, variables)
  return model, variables


def torch_model(torch, width: int, variables, channels_last: bool):
  """The PyTorch UNet in eval mode holding the JAX model's weights."""
  from torch_unet import UNet as TorchUNet  # the shared reference network

  params = jax.device_get(variables["params"])
  stats = jax.device_get(variables["batch_stats"])
  net = TorchUNet(tuple(width * m for m in WIDTH_MULT), 2)
  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # own, writable copies

  def load_block(block, name):
    for i in range(2):
      conv, bn = block[3 * i], block[3 * i + 1]
      conv.weight.data = t(params[name][f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1))
      bn.weight.data = t(params[name][f"BatchNorm_{i}"]["scale"])
      bn.bias.data = t(params[name][f"BatchNorm_{i}"]["bias"])
      bn.running_mean.data = t(stats[name][f"BatchNorm_{i}"]["mean"])
      bn.running_var.data = t(stats[name][f"BatchNorm_{i}"]["var"])
      bn.eps = 1e-5

  for level in range(4):
    load_block(net.down[level], f"down{level}")
  load_block(net.bottleneck, "bottleneck")
  for j, level in enumerate(reversed(range(4))):
    up = params[f"upconv{level}"]
    # UpConv2x2 applies its (2, 2, Cin, F) kernel spatially flipped.
    net.upconv[j].weight.data = t(up["kernel"][::-1, ::-1].transpose(2, 3, 0, 1))
    net.upconv[j].bias.data = t(up["bias"])
    load_block(net.up[j], f"up{level}")
  net.head.weight.data = t(params["head"]["kernel"].transpose(3, 2, 0, 1))
  net.head.bias.data = t(params["head"]["bias"])
  net.eval()
  if channels_last:
    net = net.to(memory_format=torch.channels_last)
  return net


def torch_predict(torch, net, images, masks, batch: int, channels_last: bool):
  """(N, H, W) float32 foreground probabilities, batch by batch from numpy."""
  out = []
  with torch.no_grad():
    for i in range(0, len(images), batch):
      x = np.concatenate([images[i:i + batch], masks[i:i + batch, ..., None]], -1)
      # NHWC numpy viewed as NCHW is already channels_last in memory.
      xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).permute(0, 3, 1, 2)
      if not channels_last:
        xt = xt.contiguous()
      out.append(torch.softmax(net(xt), 1)[:, 1].numpy())
  return np.concatenate(out)


def bench_case(torch, width: int, size: int, n: int) -> dict:
  rng = np.random.default_rng(size + width)
  images, masks = make_inputs(rng, n, size)
  model, variables = jax_model(width, jax.random.key(width))
  task = engine.Upgrade()  # prediction input: image channels + the LQ mask
  runs = {"jax": lambda: engine.predict_proba((model, variables), images, masks,
                                              batch_size=ARGS.batch, task=task)}
  cl = ARGS.torch_layout == "channels_last"
  if torch is not None:
    net = torch_model(torch, width, variables, cl)
    runs["torch"] = lambda: torch_predict(torch, net, images, masks, ARGS.batch, cl)
  first = {name: fn() for name, fn in runs.items()}  # compile / warm up
  times = {name: [] for name in runs}
  for _ in range(ARGS.rounds):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  med = {name: float(np.median(ts)) for name, ts in times.items()}
  out = {"n": n, "img_per_s_jax": n / med["jax"], "s_jax": med["jax"],
         "img_per_s_torch": None, "s_torch": None, "ratio": None, "max_abs_diff": None}
  if torch is not None:
    out.update(img_per_s_torch=n / med["torch"], s_torch=med["torch"],
               ratio=med["torch"] / med["jax"],
               max_abs_diff=float(np.max(np.abs(first["jax"] - first["torch"]))))
  return out


def main():
  torch = load_torch(ARGS.threads, disabled=ARGS.no_torch, who="predict_bench")
  load_before = os.getloadavg()[0]
  widths = [int(w) for w in ARGS.widths.split(",")]
  sizes = [int(s) for s in ARGS.sizes.split(",")]
  ns = [int(n) for n in ARGS.n.split(",")]
  if len(ns) != len(sizes):
    raise SystemExit("--n needs one count per --sizes entry")
  cases = {}
  for size, n in zip(sizes, ns):
    for width in widths:
      cases[f"{size}_w{width}"] = bench_case(torch, width, size, n)
  ratios = [c["ratio"] for c in cases.values() if c["ratio"] is not None]
  rnd = lambda v: float(f"{v:.4g}") if isinstance(v, float) else v
  result = {
      "benchmark": "predict",
      "ratio_min": min(ratios) if ratios else None,
      "cases": {k: {kk: rnd(vv) for kk, vv in c.items()} for k, c in cases.items()},
      "batch": ARGS.batch, "rounds": ARGS.rounds, "threads": ARGS.threads,
      "torch_layout": ARGS.torch_layout if torch is not None else None,
      "malloc_tuned": MALLOC_TUNED, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "omp_wait_policy": os.environ["OMP_WAIT_POLICY"].lower() if torch is not None else None,
      "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
      "jax": jax.__version__, "torch": torch.__version__ if torch is not None else None,
      "cpu": platform.processor() or platform.machine(),
  }
  print(json.dumps({k: rnd(v) for k, v in result.items()}))


if __name__ == "__main__":
  main()
