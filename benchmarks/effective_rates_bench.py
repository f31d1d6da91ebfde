"""Effective omission rate of the omission_hl60 row's fixed LQ sets (CPU scale) per count rule.

The data (hl60, 8 volumes of 32×256×256, 2 test volumes, 10 HQ
slices, 32 test slices), repetition 0's seeds; for nominal omission 0.3 and
0.7 and each `PerturbConfig.count_rounding`: removed target cells / target
cells, pooled over the LQ training set and the test set's LQ labels (what
results.json reports). No training. Prints one JSON line.

    python benchmarks/effective_rates_bench.py
"""

from __future__ import annotations

import json
import time

from upgrade_jax import pipeline
from upgrade_jax.perturb import COUNT_ROUNDINGS, PerturbConfig


def main():
  start = time.perf_counter()
  data = pipeline.DataConfig(preset="hl60", n_volumes=8, n_test=2,
                             volume_shape=(32, 256, 256), n_hq=10, max_test=32)
  volumes = pipeline.load_volumes(data)
  out = {"bench": "effective_rates", "rates": {}}
  for rate in (0.3, 0.7):
    for rounding in COUNT_ROUNDINGS:
      cfg = pipeline.PipelineConfig(data=data, lq_perturb=PerturbConfig(
          omission_rate=rate, count_rounding=rounding))
      r = pipeline.prepare_rep(cfg, volumes, seed=0).effective_rates
      out["rates"][f"{rate}/{rounding}"] = {
          "effective": round(r["omission"], 4), "omitted": r["omitted"],
          "targets": r["targets"]}
  out["seconds"] = round(time.perf_counter() - start, 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
