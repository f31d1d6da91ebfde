"""Device bytes per training pixel, before (float32 + int32 + int32) and after
compact labels (parallel.label_dtype) and compact images (source dtype,
normalised on the device: DataConfig.compact_images), on the omission_hl60 row's (CPU scale)
training sets; and what that means per device for the issue's larger sets.
Prints one JSON line.

    python -m benchmarks.data_bytes
"""

from __future__ import annotations

import json


from upgrade_jax import parallel, pipeline
from upgrade_jax.data.types import concat


def main() -> None:
  cfg = pipeline.PipelineConfig(data=pipeline.DataConfig(
      n_volumes=8, n_test=2, volume_shape=(32, 256, 256), n_hq=10, max_test=32))
  volumes, _ = pipeline.prepare_run(cfg, "/nonexistent_out_dir_for_checks_only", log=lambda s: None)
  d = pipeline.prepare_rep(cfg, volumes, seed=0)
  sets = {"hq": d.hq_train, "hq_upgraded": concat([d.hq_train, d.lq_masks]),
          "oracle": concat([d.hq_train_truth, d.lq_truth])}
  out = {}
  for name, ds in sets.items():
    c = ds.images.shape[-1]
    dt = parallel.label_dtype(ds.targets, ds.others)
    out[name] = {"slices": len(ds), "label_dtype": dt.name, "max_id": int(ds.targets.max()),
                 "image_dtype": ds.images.dtype.name,
                 "bytes_per_pixel_before": 4 * c + 4 + 4,
                 "bytes_per_pixel_compact_labels": 4 * c + 2 * dt.itemsize,
                 "bytes_per_pixel_after": parallel.bytes_per_pixel(ds)}
  after = out["oracle"]["bytes_per_pixel_after"]
  gb = lambda n, h, w, b: round(n * h * w * b / 2 ** 30, 2)  # noqa: E731
  out["per_device_GiB"] = {
      "paper_800x565x807": {"before": gb(800, 565, 807, 12), "after": gb(800, 565, 807, after)},
      "lab_2000x1024x1024": {"before": gb(2000, 1024, 1024, 12),
                             "after": gb(2000, 1024, 1024, after)}}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
