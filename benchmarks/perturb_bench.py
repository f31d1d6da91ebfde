"""Jitted, vmapped `perturb` against a host numpy/scipy reference, same run.

Workload: 64 label maps of 256×256 with about 40 cells each;
70% omission, then bias with q_max = 6. The host reference does one mask at a
time with numpy + scipy.ndimage, as a PyTorch DataLoader worker would.

A second host column is the authors' own path: numpy omission (`np.isin`)
and OpenCV's `cv2.dilate` / `cv2.erode` (3×3 kernel, `iterations=q`), one
mask at a time. OpenCV is a benchmark-only extra (`pip install '.[bench]'`);
without it the cv2 fields are null. OpenCV's default erosion border treats
outside pixels as foreground (scipy and this library: as background), so its
masks differ at the image border; only its speed is compared.

Prints one JSON line: masks_per_s_jax, masks_per_s_host, ratio (host / jax
time), masks_per_s_cv2, ratio_vs_cv2, the 1-minute load average before and
after, and the setup.

    python benchmarks/perturb_bench.py [--batch 64] [--size 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage as ndi

from upgrade_jax.perturb import PerturbConfig, perturb
from upgrade_jax.data.labels import relabel_sequential


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


def load_cv2():
  try:
    import cv2
  except ImportError:
    return None
  return cv2


def authors_perturb(cv2, rng, labels, rate, q_max):
  """The authors' path: numpy omission + OpenCV bias, one mask."""
  ids = np.unique(labels)
  ids = ids[ids > 0]
  drop = rng.choice(ids, size=int(rate * len(ids)), replace=False)
  mask = ((labels > 0) & ~np.isin(labels, drop)).astype(np.uint8)
  q = int(rng.integers(1, q_max + 1))
  op = cv2.dilate if rng.random() < 0.5 else cv2.erode
  return op(mask, np.ones((3, 3), np.uint8), iterations=q)


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

  cv2 = load_cv2()

  def run_cv2():
    for lab in labels:
      authors_perturb(cv2, rng, lab, 0.7, 6)

  load_before = os.getloadavg()[0]
  run_host()  # warm caches
  t_jax = time_it(run_jax, args.repeats)
  t_host = time_it(run_host, max(3, args.repeats // 4))
  t_cv2 = None
  if cv2 is not None:
    run_cv2()
    t_cv2 = time_it(run_cv2, max(3, args.repeats // 4))
  print(json.dumps({
      "benchmark": "perturb",
      "batch": args.batch, "size": args.size, "cells": args.cells,
      "mean_cells": float(np.mean([len(np.unique(l)) - 1 for l in labels])),
      "masks_per_s_jax": round(args.batch / t_jax, 1),
      "masks_per_s_host": round(args.batch / t_host, 1),
      "ratio": round(t_host / t_jax, 2),
      "masks_per_s_cv2": round(args.batch / t_cv2, 1) if t_cv2 else None,
      "ratio_vs_cv2": round(t_cv2 / t_jax, 2) if t_cv2 else None,
      "cv2": cv2.__version__ if cv2 is not None else None,
      "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
      "jax": jax.__version__, "backend": jax.default_backend(),
      "devices": jax.device_count(), "machine": platform.machine(),
  }))


if __name__ == "__main__":
  main()
