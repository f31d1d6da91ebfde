"""Time to simulate the default synthetic data set, with a reference alongside.

Workload: 30 volumes of 32×256×256 of a preset (default
combined_hl60, both cell types). The reference, timed in the same run, is the
bare image-formation cost of one volume: one 3-D Gaussian blur, a Poisson draw
and the uint16 conversion, times n_volumes. The ratio says how much the cell
geometry and the rest cost on top, independent of how busy the machine is.

Prints one JSON line.

    python benchmarks/data_bench.py [--preset combined_hl60] [--n_volumes 30] [--size default]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import scipy.ndimage as ndi

from upgrade_jax.data import synthetic


def reference(shape, n_volumes, seed=0):
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for _ in range(n_volumes):
    x = rng.random(shape, dtype=np.float32)
    y = ndi.gaussian_filter(x, (2.5, 1.8, 1.8))
    np.clip(rng.poisson(200 * y), 0, 65535).astype(np.uint16)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="combined_hl60", choices=sorted(synthetic.PRESETS))
  parser.add_argument("--n_volumes", type=int, default=30)
  parser.add_argument("--size", default="default", choices=["default", "paper"])
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  shape = synthetic.PAPER_SHAPE if args.size == "paper" else synthetic.DEFAULT_SHAPE

  start = time.perf_counter()
  vols = synthetic.generate(args.preset, seed=args.seed, n_volumes=args.n_volumes,
                            size=args.size)
  seconds = time.perf_counter() - start
  ref = reference(shape, args.n_volumes)
  print(json.dumps({
      "bench": "data_generation", "preset": args.preset, "n_volumes": args.n_volumes,
      "shape": list(shape), "seconds": round(seconds, 2),
      "seconds_per_volume": round(seconds / max(args.n_volumes, 1), 3),
      "slices_kept": int(sum(v.num_slices for v in vols)),
      "reference": "blur + poisson + uint16 per volume",
      "reference_seconds": round(ref, 2), "ratio_to_reference": round(seconds / ref, 2),
      "under_60s": seconds < 60, "cpus": os.cpu_count(), "python": platform.python_version(),
  }))


if __name__ == "__main__":
  main()
