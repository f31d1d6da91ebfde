"""A small virtual fluorescence microscope: 3-D nuclei of two cell types.

The paper's synthetic sets came from a virtual microscope (30 volumes of 129
slices, 565×807, 16-bit) showing HL60 nuclei, granulocytes, or both. We cannot
download them, so this module builds volumes in the same spirit:

  1. Objects. Type A ("HL60"): large, roundish ellipsoids with a bumpy surface
     and a textured interior (smoothed noise, darker nucleoli-like patches).
     Type B ("granulocyte"): small, lobed nuclei, the union of 2-4 small
     ellipsoids along a bent chain. Both are 3-D, so cross-sections grow,
     shrink and split along z. Cells are placed with limited overlap; the
     label maps are disjoint (a voxel belongs to at most one cell).
  2. Optics. Fluorophore density → anisotropic 3-D Gaussian PSF (stronger
     along z) → smooth uneven illumination and attenuation with depth →
     background.
  3. Camera. Poisson shot noise on photon counts, gain, offset, Gaussian read
     noise, clipped to uint16.

Type B is dimmer than type A on average but their brightness ranges overlap,
so a global threshold cannot tell them apart (see benchmarks/threshold_bench.py).

Presets: `hl60` (A only), `granulocytes` (B only), `combined_hl60` (both, A is
the target, B the others) and `combined_granulocytes` (both, B target, A
others). Each volume draws from its own child seed of `seed`, so volume i is
the same whatever `n_volumes` is.

Usage:
  vols = generate("combined_hl60", seed=0, n_volumes=30)            # 32×256×256
  vols = generate("hl60", seed=0, n_volumes=2, size="paper")        # 129×565×807
  python -m upgrade_jax.data.synthetic --preset combined_hl60 --preview /tmp/p.png
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.ndimage as ndi

from upgrade_jax.data.types import Volume

__all__ = ["SimParams", "PRESETS", "DEFAULT_SHAPE", "PAPER_SHAPE", "generate",
           "render_volume", "main"]

DEFAULT_SHAPE = (32, 256, 256)
PAPER_SHAPE = (129, 565, 807)
# Cell sizes and counts are given for a 256×256 field at cell_scale 1 and a
# 32-slice stack; other shapes rescale counts by area and z sizes by depth.
_REF_AREA = 256 * 256
_REF_DEPTH = 32


@dataclasses.dataclass(frozen=True)
class SimParams:
  """Everything the virtual microscope draws from. Ranges are (low, high).

  Counts are per 256×256 field (scaled by image area / cell_scale²); xy radii
  are in pixels at cell_scale 1; z radii are fractions of the stack depth.
  Brightness is relative fluorophore density (photons = brightness·photons).
  """

  # Type A: HL60-like.
  a_count: tuple[float, float] = (5.0, 9.0)
  a_radius_xy: tuple[float, float] = (13.0, 20.0)
  a_radius_z: tuple[float, float] = (0.18, 0.3)
  a_aspect: float = 1.35            # max ratio of the two xy semi-axes
  a_brightness: tuple[float, float] = (0.4, 1.0)
  a_texture: float = 0.45           # std of the interior texture (relative)
  a_surface: float = 0.12           # bumpiness of the surface
  # Type B: granulocyte-like.
  b_count: tuple[float, float] = (8.0, 14.0)
  b_lobes: tuple[int, int] = (2, 4)
  b_lobe_radius_xy: tuple[float, float] = (4.5, 7.0)
  b_lobe_radius_z: tuple[float, float] = (0.08, 0.14)
  b_brightness: tuple[float, float] = (0.3, 0.8)
  b_texture: float = 0.2
  b_surface: float = 0.08
  # Placement.
  max_overlap: float = 0.1          # fraction of a new cell allowed on others
  # Optics and camera.
  cell_scale: float = 1.0           # pixel-size factor (2 = pixels half as big)
  psf_sigma: tuple[float, float, float] = (2.5, 1.8, 1.8)  # (z, y, x) px
  illumination: float = 0.5         # 1 - min/max of the illumination field
  depth_attenuation: float = 0.3    # signal lost from the first to the last slice
  photons: float = 220.0            # photons at brightness 1
  background: float = 25.0          # background photons per pixel
  gain: float = 4.0                 # ADU per photon
  offset: float = 100.0             # camera offset, ADU
  read_noise: float = 12.0          # ADU

  def __post_init__(self):
    for name in ("a_count", "a_radius_xy", "a_radius_z", "a_brightness", "b_count",
                 "b_lobes", "b_lobe_radius_xy", "b_lobe_radius_z", "b_brightness"):
      lo, hi = getattr(self, name)
      if not 0 <= lo <= hi:
        raise ValueError(f"SimParams.{name} must be a range 0 <= low <= high, got {(lo, hi)}")
    if self.cell_scale <= 0 or self.photons <= 0 or self.gain <= 0:
      raise ValueError("SimParams: cell_scale, photons and gain must be positive")
    if not 0 <= self.illumination < 1 or not 0 <= self.depth_attenuation < 1:
      raise ValueError("SimParams: illumination and depth_attenuation must lie in [0, 1)")


# preset -> (parameter overrides, which type is the target: "a" or "b")
PRESETS: dict[str, tuple[dict, str]] = {
    "hl60": ({"b_count": (0.0, 0.0)}, "a"),
    "granulocytes": ({"a_count": (0.0, 0.0)}, "b"),
    "combined_hl60": ({}, "a"),
    "combined_granulocytes": ({}, "b"),
}

# Paper-sized stacks: 129 slices of 565×807 with pixels 1.5× smaller.
_PAPER_PARAMS = {"cell_scale": 1.5}


def generate(preset: str, *, seed: int, n_volumes: int, shape=None,
             size: str = "default", keep_empty: bool = False, **params) -> list[Volume]:
  """Simulates `n_volumes` volumes of `preset`.

  Args:
    preset: one of PRESETS.
    seed: integer seed; the output is a deterministic function of it.
    n_volumes: number of volumes.
    shape: (Z, H, W); defaults to DEFAULT_SHAPE, or PAPER_SHAPE for
      size="paper".
    size: "default" or "paper" (paper shape and pixel size, ~0.6 GB per
      volume in memory with its label maps).
    keep_empty: keep slices whose target is empty (dropped by default, as in
      the paper), so every volume has exactly Z slices.
    **params: overrides of SimParams fields, e.g. read_noise=20.

  Returns:
    A list of Volume: image (Z', H, W) uint16, target and others (Z', H, W)
    int32 instance ids (ids are unique within a volume), Z' <= Z.
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
  if size not in ("default", "paper"):
    raise ValueError(f"size must be 'default' or 'paper', got {size!r}")
  if n_volumes < 0:
    raise ValueError(f"n_volumes must be >= 0, got {n_volumes}")
  overrides, target_type = PRESETS[preset]
  base = dict(_PAPER_PARAMS) if size == "paper" else {}
  unknown = set(params) - {f.name for f in dataclasses.fields(SimParams)}
  if unknown:
    raise ValueError(f"unknown simulator parameters {sorted(unknown)}")
  sim = SimParams(**{**base, **overrides, **params})
  if shape is None:
    shape = PAPER_SHAPE if size == "paper" else DEFAULT_SHAPE
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"shape must be (Z, H, W) of positive ints, got {shape}")

  children = np.random.SeedSequence(seed).spawn(n_volumes)
  volumes = []
  for i, child in enumerate(children):
    image, labels_a, labels_b = render_volume(np.random.default_rng(child), shape, sim)
    target, others = (labels_a, labels_b) if target_type == "a" else (labels_b, labels_a)
    if not keep_empty:
      keep = target.reshape(shape[0], -1).any(axis=1)
      image, target, others = image[keep], target[keep], others[keep]
    volumes.append(Volume(image, target, others, name=f"{preset}_{i:03d}"))
  return volumes


# --------------------------------------------------------------------------
# Rendering.

def _smooth_noise(rng, shape, sigma) -> np.ndarray:
  """Gaussian-smoothed white noise with unit std, float32."""
  field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
  return field / max(float(field.std()), 1e-6)


def _ellipsoid(center, radii, angle, shape, pad=1.35):
  """Bounding-box slices and the quadratic form q (<1 inside) of an ellipsoid.

  The ellipsoid is axis-aligned in z and rotated by `angle` in the xy plane.
  """
  lo = [max(0, int(math.floor(c - pad * r))) for c, r in zip(center, radii)]
  hi = [min(s, int(math.ceil(c + pad * r)) + 1) for c, r, s in zip(center, radii, shape)]
  if any(h <= l for l, h in zip(lo, hi)):
    return None, None
  box = tuple(slice(l, h) for l, h in zip(lo, hi))
  z, y, x = np.ogrid[box]
  dz, dy, dx = z - center[0], y - center[1], x - center[2]
  cos, sin = math.cos(angle), math.sin(angle)
  u, v = cos * dy + sin * dx, -sin * dy + cos * dx
  q = (dz / radii[0]) ** 2 + (u / radii[1]) ** 2 + (v / radii[2]) ** 2
  return box, q.astype(np.float32)


def _cell_type_a(rng, shape, sim, shape_field):
  """One HL60-like nucleus: (box, bool mask in box) or (None, None)."""
  z_n, h, w = shape
  r_xy = rng.uniform(*sim.a_radius_xy) * sim.cell_scale
  aspect = rng.uniform(1.0, sim.a_aspect)
  r_z = max(1.0, rng.uniform(*sim.a_radius_z) * z_n)
  center = (rng.uniform(0.15, 0.85) * z_n, rng.uniform(0, h), rng.uniform(0, w))
  box, q = _ellipsoid(center, (r_z, r_xy * aspect, r_xy), rng.uniform(0, math.pi), shape)
  if box is None:
    return None, None
  return box, q < 1.0 - sim.a_surface * shape_field[box]


def _cell_type_b(rng, shape, sim, shape_field):
  """One granulocyte-like nucleus: 2-4 small lobes along a bent chain."""
  z_n, h, w = shape
  n_lobes = int(rng.integers(sim.b_lobes[0], sim.b_lobes[1] + 1))
  center = np.array([rng.uniform(0.2, 0.8) * z_n, rng.uniform(0, h), rng.uniform(0, w)])
  heading = rng.uniform(0, 2 * math.pi)
  lobes = []
  position = center.copy()
  for _ in range(max(1, n_lobes)):
    r_xy = rng.uniform(*sim.b_lobe_radius_xy) * sim.cell_scale
    r_z = max(1.0, rng.uniform(*sim.b_lobe_radius_z) * z_n)
    lobes.append((position.copy(), (r_z, r_xy * rng.uniform(1.0, 1.3), r_xy)))
    heading += rng.uniform(-1.0, 1.0)  # the chain bends
    step = 1.5 * r_xy
    position = position + np.array([rng.normal(0, 0.3 * r_z),
                                    step * math.sin(heading), step * math.cos(heading)])
  boxes = []
  for c, r in lobes:
    box, _ = _ellipsoid(c, r, 0.0, shape)
    if box is not None:
      boxes.append(box)
  if not boxes:
    return None, None
  box = tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes))
              for d in range(3))
  mask = np.zeros(tuple(s.stop - s.start for s in box), bool)
  offset = np.array([s.start for s in box], float)
  for c, r in lobes:
    sub_box, q = _ellipsoid(c - offset, r, rng.uniform(0, math.pi), mask.shape)
    if sub_box is not None:
      field = shape_field[box][sub_box]
      mask[sub_box] |= q < 1.0 - sim.b_surface * field
  return box, mask


def _place(rng, make_cell, count, labels, next_id, sim, shape, shape_field, tries=20):
  """Adds up to `count` cells to `labels` in place; returns the ids used."""
  ids = []
  for _ in range(count):
    for _ in range(tries):
      box, mask = make_cell(rng, shape, sim, shape_field)
      if box is None or not mask.any():
        continue
      region = labels[box]
      taken = mask & (region > 0)
      if taken.sum() <= sim.max_overlap * mask.sum():
        region[mask & ~taken] = next_id  # disjoint labels: earlier cells win
        ids.append(next_id)
        next_id += 1
        break
  return ids


def _count(rng, count_range, shape, sim) -> int:
  area_factor = shape[1] * shape[2] / (_REF_AREA * sim.cell_scale ** 2)
  return int(round(rng.uniform(*count_range) * area_factor))


def _illumination(rng, shape, strength) -> np.ndarray:
  """(H, W) smooth field in [1 - strength, 1]: an off-centre vignette."""
  _, h, w = shape
  y = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
  x = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
  cy, cx = rng.uniform(-0.6, 0.6, size=2)
  d2 = (y - cy) ** 2 + (x - cx) ** 2
  field = 1.0 - d2 / d2.max()
  return (1.0 - strength) + strength * field


def render_volume(rng: np.random.Generator, shape, sim: SimParams):
  """One volume: (image (Z,H,W) uint16, labels_a, labels_b (Z,H,W) int32)."""
  z_n = shape[0]
  depth_scale = z_n / _REF_DEPTH
  # Low-frequency field that makes surfaces bumpy; high-frequency texture.
  shape_field = _smooth_noise(rng, shape, (1.0 * depth_scale, 5.0 * sim.cell_scale,
                                           5.0 * sim.cell_scale))
  texture = _smooth_noise(rng, shape, (0.7 * depth_scale, 1.3 * sim.cell_scale,
                                       1.3 * sim.cell_scale))

  labels = np.zeros(shape, np.int32)
  ids_a = _place(rng, _cell_type_a, _count(rng, sim.a_count, shape, sim), labels, 1, sim,
                 shape, shape_field)
  ids_b = _place(rng, _cell_type_b, _count(rng, sim.b_count, shape, sim), labels,
                 len(ids_a) + 1, sim, shape, shape_field)

  # Fluorophore density: per-cell brightness times (1 + texture).
  brightness = np.zeros(len(ids_a) + len(ids_b) + 1, np.float32)
  brightness[ids_a] = rng.uniform(*sim.a_brightness, size=len(ids_a))
  brightness[ids_b] = rng.uniform(*sim.b_brightness, size=len(ids_b))
  tex_amp = np.zeros_like(brightness)
  tex_amp[ids_a] = sim.a_texture
  tex_amp[ids_b] = sim.b_texture
  density = brightness[labels] * np.clip(1.0 + tex_amp[labels] * texture, 0.15, None)

  # Optics: blur, uneven illumination, attenuation with depth, background.
  sigma = (sim.psf_sigma[0] * depth_scale, sim.psf_sigma[1] * sim.cell_scale,
           sim.psf_sigma[2] * sim.cell_scale)
  signal = ndi.gaussian_filter(density, sigma)
  illum = _illumination(rng, shape, sim.illumination)
  depth = 1.0 - sim.depth_attenuation * np.linspace(0, 1, z_n, dtype=np.float32)
  expected = (sim.photons * signal + sim.background) * illum[None] * depth[:, None, None]

  # Camera: shot noise, gain, offset, read noise, 16 bits.
  counts = rng.poisson(expected).astype(np.float32)
  adu = sim.gain * counts + sim.offset + sim.read_noise * rng.standard_normal(
      shape, dtype=np.float32)
  image = np.clip(np.rint(adu), 0, 65535).astype(np.uint16)

  in_a = np.isin(labels, ids_a)
  labels_a = np.where(in_a, labels, 0).astype(np.int32)
  labels_b = np.where(~in_a & (labels > 0), labels, 0).astype(np.int32)
  return image, labels_a, labels_b


# --------------------------------------------------------------------------
# Preview (the paper's Figure 3.1): sample slices with target/other contours.

def preview(path, *, presets=None, seed: int = 0, size: str = "default",
            slices_per_preset: int = 3):
  """Writes a PNG grid: one row per preset, contours of target (red) and
  others (cyan) on the percentile-normalised image."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  presets = list(presets or PRESETS)
  fig, axes = plt.subplots(len(presets), slices_per_preset,
                           figsize=(3.2 * slices_per_preset, 3.2 * len(presets)),
                           squeeze=False)
  for row, name in enumerate(presets):
    volume = generate(name, seed=seed, n_volumes=1, size=size)[0]
    picks = np.linspace(0, volume.num_slices - 1, slices_per_preset + 2)[1:-1].round()
    for col, z in enumerate(picks.astype(int)):
      img = volume.image[z].astype(np.float32)
      lo, hi = np.percentile(img, (0.5, 99.8))
      ax = axes[row, col]
      ax.imshow(np.clip((img - lo) / max(hi - lo, 1), 0, 1), cmap="gray")
      if volume.others[z].any():
        ax.contour(volume.others[z] > 0, levels=[0.5], colors="cyan", linewidths=0.7)
      if volume.target[z].any():
        ax.contour(volume.target[z] > 0, levels=[0.5], colors="red", linewidths=0.7)
      ax.set_title(f"{name} z={z}", fontsize=8)
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="combined_hl60", choices=sorted(PRESETS))
  parser.add_argument("--preview", required=True, help="output PNG path")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", default="default", choices=["default", "paper"])
  parser.add_argument("--only", action="store_true",
                      help="show only --preset (default: every preset, --preset first)")
  args = parser.parse_args(argv)
  presets = [args.preset] if args.only else [args.preset] + [
      p for p in PRESETS if p != args.preset]
  preview(args.preview, presets=presets, seed=args.seed, size=args.size)
  print(f"wrote {args.preview}")


if __name__ == "__main__":
  main()
