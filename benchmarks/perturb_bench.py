"""Jitted, vmapped `perturb` against a host numpy/scipy reference, same run.

Workload (issue 2): 64 label maps of 256×256 with about 40 cells each;
70% omission, then bias with q_max = 6. The host reference does one mask at a
time with numpy + scipy.ndimage, as a PyTorch DataLoader worker would.

Prints one JSON line: masks_per_s_jax, masks_per_s_host, ratio, and the setup.

    python benchmarks/perturb_bench.py [--batch 64] [--size 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi

from upgrade_jax.perturb import PerturbConfig, perturb, relabel_sequential


def make_labels(rng, batch, size, cells):
  """(batch, size, size) int32 maps of `cells` random discs (overlaps resolved)."""
  yy, xx = np.mgrid[:size, :size]
  out = np.zeros((batch, size, size), np.int32)
  for b in range(batch):
    lab = out[b]
    for i in range(cells):
      cy, cx = rng.integers(0, size, 2)
      r = rng.uniform(6, 14)
      lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (lab == 0)] = i + 1
    out[b] = relabel_sequential(lab)
  return out


def host_perturb(rng, labels, rate, q_max):
  """The reference: numpy omission + scipy.ndimage bias, one mask."""
  ids = np.unique(labels)
  ids = ids[ids > 0]
  drop = rng.choice(ids, size=int(np.floor(rate * len(ids))), replace=False)
  mask = (labels > 0) & ~np.isin(labels, drop)
  q = int(rng.integers(1, q_max + 1))
  op = ndi.binary_dilation if rng.random() < 0.5 else ndi.binary_erosion
  return op(mask, structure=np.ones((3, 3), bool), iterations=q, border_value=0)


def time_it(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--cells", type=int, default=40)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  labels = make_labels(rng, args.batch, args.size, args.cells)
  max_label = int(labels.max())
  # floor: the count rule of the host reference below (like for like).
  cfg = PerturbConfig(omission_rate=0.7, bias_max=6, count_rounding="floor")

  fn = jax.jit(jax.vmap(functools.partial(perturb, config=cfg, max_label=max_label)))
  labels_d = jnp.asarray(labels)
  others_d = jnp.zeros_like(labels_d)
  keys = jax.random.split(jax.random.key(0), args.batch)
  fn(keys, labels_d, others_d).block_until_ready()  # compile

  step = [0]

  def run_jax():
    step[0] += 1
    k = jax.random.split(jax.random.fold_in(jax.random.key(1), step[0]), args.batch)
    fn(k, labels_d, others_d).block_until_ready()

  def run_host():
    for lab in labels:
      host_perturb(rng, lab, 0.7, 6)

  run_host()  # warm caches
  t_jax = time_it(run_jax, args.repeats)
  t_host = time_it(run_host, max(3, args.repeats // 4))
  print(json.dumps({
      "benchmark": "perturb",
      "batch": args.batch, "size": args.size, "cells": args.cells,
      "mean_cells": float(np.mean([len(np.unique(l)) - 1 for l in labels])),
      "masks_per_s_jax": round(args.batch / t_jax, 1),
      "masks_per_s_host": round(args.batch / t_host, 1),
      "ratio": round(t_host / t_jax, 2),
      "jax": jax.__version__, "backend": jax.default_backend(),
      "devices": jax.device_count(), "machine": platform.machine(),
  }))


if __name__ == "__main__":
  main()
