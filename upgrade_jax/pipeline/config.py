"""The configuration of a run of Algorithm 1, and its key.

  DataConfig, PipelineConfig   frozen configs (every default lives here)
  run_key                      the part of a config every number depends on;
                               stored with each repetition and checkpoint
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from upgrade_jax import engine, files, instances
from upgrade_jax.data import intensity
from upgrade_jax.engine.tiling import TileConfig
from upgrade_jax.perturb import PerturbConfig
from upgrade_jax.data.labels import FelzenszwalbConfig
from upgrade_jax.pipeline.others import OTHERS
from upgrade_jax.pipeline.scenarios import DEFAULT_SCENARIOS, REGISTRY, SCENARIOS
from upgrade_jax.pipeline.sources import SOURCES

__all__ = ["DataConfig", "PipelineConfig", "OTHERS_MODES", "LQ_SOURCES", "HQ_COST", "USER_HAZE",
           "run_key",
           "check_rep", "ConfigMismatch"]

ConfigMismatch = engine.ConfigMismatch

# u_θ's haze augmentation (Upgrade.haze) when it trains on a user's images:
# real images have hazy and unevenly lit backgrounds that flooded upgraded
# labels (39-40 of 40 hazed DSB2018 images without it, 0-1 with it; 0.012
# lower F1@0.5 on the clean ones: BUILD_NOTES "Upgrade as a tool"). The
# simulated protocol (the paper's) keeps Upgrade's default, no haze.
USER_HAZE = 1.0
OTHERS_MODES = tuple(OTHERS)   # what inclusion draws from (pipeline.others)
LQ_SOURCES = ("perturb", "predictions")
# The LQ set's perturbation when none is given: 70% of the cells omitted.
_DEFAULT_LQ = PerturbConfig(omission_rate=0.7)
# What one HQ label costs in LQ labels (Figure 3.6's cost axis, --cost_budget).
HQ_COST = 5.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data come from and how they are split.

  Attributes:
    source: "synthetic", "epfl_mito", "folder" or "stack".
    preset: synthetic preset (see upgrade_jax.data.synthetic.PRESETS).
    data_dir: root of the real data. epfl_mito and stack: a folder with
      train/{images,labels}.tif and test/{images,labels}.tif; folder: a folder
      with images/ and labels/ (and optionally others/).
    n_volumes: synthetic volumes to simulate.
    volume_shape: synthetic (Z, H, W).
    sim_size: synthetic pixel scale: "default", or "paper" (the paper's
      pixel size: cells 1.5x larger in pixels; use with a paper-size shape).
    n_test: volumes (synthetic) or images (folder) held out as the test set;
      epfl_mito and stack use their test stacks. Synthetic: the first n_test
      volumes of the simulator, so the test set is the same for every
      n_volumes (sampling.hold_out_first).
    n_hq: HQ slices, chosen by the paper's rule (sampling.select_slices).
    hq_volumes: number of training volumes the HQ slices are drawn from (the
      paper's Figure 3.4 axis), the first ones; None: all training volumes.
    n_lq: LQ slices drawn from the remaining training slices (None: all).
    max_test: cap on the number of test slices (evenly spaced), None for all.
    others: what inclusion draws from: "labels" (the other cell type of the
      synthetic presets, or others/ of a folder), "felzenszwalb" segments,
      or "none".
    data_seed: seed of the simulator and of the test hold-out.
    normalisation: network inputs per image: "percentile" (the default, as
      StarDist and Cellpose: each image's `percentiles` mapped to 0 and 1),
      "max" (the paper's: x / the image's max), or "volume": one scale per
      3-D volume, x / the volume's max, so dim slices near a volume's edge
      keep its background level (stacking.volumes_to_dataset). The threshold
      baseline reads percentile-normalised images under "percentile" and
      raw intensities otherwise (the paper's).
    percentiles: (low, high) percentiles of "percentile" normalisation.
    compact_images: keep 8- and 16-bit single-channel images in their
      source dtype on the host and the devices, normalised on the device by
      the train step (stacking.stack_samples compact="auto"): 2-4x less memory,
      the same results bit for bit. Float or mixed-channel sources stay
      float32.
    felzenszwalb: the segments inclusion draws from with others="felzenszwalb"
      (the paper's case study, §3.3.4).
    hq_perturb: imperfect HQ (the paper's Figure 3.5): the HQ labels the
      networks train on are themselves perturbed once with this config
      (identity by default). The test set keeps its ground truth.
    train_tile: None keeps every training slice whole. An int cuts the HQ
      (train and validation) and LQ slices into tiles of at most
      train_tile² px after the HQ train/validation split (which stays one of
      whole slices; sampling.make_splits); the test set stays whole. For a
      folder of mixed sizes: one stack pads every image to the largest height
      and the largest width (DSB2018: 1024×1272), which multiplied the
      memory of a 400-image run by ~9 and ran out of 24 GB. Each tile is
      normalised as part of its whole image. At least every crop.
    z_consistent: the fixed LQ sets (LQ training, test and validation
      slices) omit and include whole 3-D instances: a cell omitted is
      omitted in every slice, as an annotator skipping a cell would
      (upgrade_jax.data.lq_volumes); salt-and-pepper and bias stay per slice. Off:
      each slice chooses on its own (the paper's P). Needs volumes with 3-D
      ids: synthetic or stack sources, others "labels" or "none".
  """

  source: str = "synthetic"
  preset: str = "hl60"
  data_dir: str = ""
  n_volumes: int = 10
  volume_shape: tuple[int, int, int] = (32, 256, 256)
  sim_size: str = "default"
  n_test: int = 2
  n_hq: int = 10
  hq_volumes: int | None = None
  n_lq: int | None = None
  max_test: int | None = None
  others: str = "labels"
  data_seed: int = 0
  normalisation: str = "percentile"
  percentiles: tuple[float, float] = intensity.PERCENTILES
  compact_images: bool = True
  hq_perturb: PerturbConfig = PerturbConfig()
  felzenszwalb: FelzenszwalbConfig = FelzenszwalbConfig()
  z_consistent: bool = False
  train_tile: int | None = None

  @property
  def compact(self):
    """stacking.stack_samples' `compact` argument for this config."""
    return "auto" if self.compact_images else False

  @property
  def image_kwargs(self) -> dict:
    """How images become network inputs: stacking.stack_samples' (and
    volumes_to_dataset's, sampling.make_splits') keyword arguments."""
    return {"normalisation": self.normalisation, "percentiles": self.percentiles,
            "compact": self.compact}

  def __post_init__(self):
    if self.z_consistent and self.source in ("folder", "epfl_mito"):
      why = ("holds 2-D images, no volumes" if self.source == "folder" else
             "labels carry per-slice ids, not 3-D instances")
      raise ValueError(f"--z_consistent needs volumes with 3-D instance ids; --data="
                       f"{self.source} {why}: use --data=synthetic or --data=stack")
    if self.z_consistent and self.others == "felzenszwalb":
      raise ValueError("--z_consistent with --others=felzenszwalb: the segments are made per "
                       "slice, so they have no 3-D identity; use --others=labels or none")
    if self.source not in SOURCES:
      raise ValueError(f"DataConfig.source {self.source!r} unknown; choose one of "
                       f"{sorted(SOURCES)}")
    if self.others not in OTHERS_MODES:
      raise ValueError(f"DataConfig.others {self.others!r} unknown; choose one of "
                       f"{list(OTHERS_MODES)}")
    if self.source != "synthetic" and not self.data_dir:
      raise ValueError(f"DataConfig.data_dir is required for source {self.source!r}")
    if self.n_hq < 2:
      raise ValueError(f"DataConfig.n_hq must be >= 2 (train + validation), got {self.n_hq}")
    if self.source == "synthetic" and not 1 <= self.n_test < self.n_volumes:
      raise ValueError(f"--n_test={self.n_test} must be at least 1 and below "
                       f"--n_volumes={self.n_volumes}: lower --n_test or raise --n_volumes")
    if self.hq_volumes is not None and self.hq_volumes < 1:
      raise ValueError(f"DataConfig.hq_volumes must be >= 1, got {self.hq_volumes}")
    if self.train_tile is not None and self.train_tile < 16:
      raise ValueError(f"--train_tile={self.train_tile} must be at least 16 px")
    object.__setattr__(self, "volume_shape", tuple(int(s) for s in self.volume_shape))
    object.__setattr__(self, "percentiles", intensity.check_percentiles(self.percentiles))
    if self.normalisation not in intensity.NORMALISATIONS or self.normalisation == "none":
      raise ValueError(f"--normalisation={self.normalisation!r}: choose one of percentile, "
                       "max, volume")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """One run of Algorithm 1 and its scenarios.

  Attributes:
    data: the DataConfig.
    upgrade: TrainConfig of u_θ (task engine.Upgrade); its task's `perturb`
      is the P the network trains with.
    segment: TrainConfig of the segmentation networks (task engine.Segment).
    lq_perturb: the perturbation that makes the fixed LQ set (may differ from
      upgrade.task.perturb: the paper's mismatch study).
    scenarios: segmentation scenarios to train, a subset of SCENARIOS; empty
      means upgrade only.
    threshold_baseline: also score the global-threshold baseline.
    reps: repetitions; repetition r uses seed + r everywhere.
    seed: base seed.
    predict_batch: images per jitted prediction call.
    lq_source: "perturb" (LQ = lq_perturb(GT)) or "predictions" (the
      paper's case study, §3.3.4: LQ = the predictions of a segmentation
      network trained on `predictor_hq` HQ slices).
    predictor_hq: HQ training slices of that predictor.
    output: what the upgraded files hold: "instances" (touching cells
      separate, the LQ label's instances as seeds) or "mask" (connected
      components of the upgraded mask); see upgrade_jax.instances.
    tiling: how prediction of the written files cuts large images.
    review_top: overlays written to review/ for the first N rows of the
      review queue (upgrade_jax.review).
    options: the competing methods' options that differ from their
      registry defaults (pipeline.scenarios): engine Tasks, at most one per
      method, each trained with segment's other settings, e.g.
      (engine.ConfidentLearning(folds=3),). See `options_of`.
    seg_val_extra: the validation rule of every segmentation scenario:
      this many of its non-HQ training slices (at most a quarter), with its
      own labels, are held out and validate it beside the HQ validation
      slices (pipeline.scenarios); 0 validates on the HQ slices alone.
  """

  data: DataConfig = DataConfig()
  # u_θ trains with the same P that makes the LQ set unless told otherwise (the
  # CLI's default too): one default perturbation, _DEFAULT_LQ.
  upgrade: engine.TrainConfig = engine.TrainConfig(task=engine.Upgrade(perturb=_DEFAULT_LQ))
  segment: engine.TrainConfig = engine.TrainConfig(task=engine.Segment())
  lq_perturb: PerturbConfig = _DEFAULT_LQ
  scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
  threshold_baseline: bool = True
  reps: int = 1
  seed: int = 0
  predict_batch: int = 8
  lq_source: str = "perturb"
  predictor_hq: int = 10
  output: str = "instances"
  tiling: TileConfig = TileConfig()
  review_top: int = 20
  options: tuple[engine.Task, ...] = ()
  # 6: with the 2 HQ validation slices of the CPU-scale rows (10 HQ), one
  # validation batch of 8 (eval_batch_size) and no padded batch.
  seg_val_extra: int = 6

  def __post_init__(self):
    if self.review_top < 0:
      raise ValueError(f"PipelineConfig.review_top must be >= 0, got {self.review_top}")
    if self.output not in instances.OUTPUTS:
      raise ValueError(f"--output={self.output!r}: choose one of {list(instances.OUTPUTS)}")
    if self.lq_source not in LQ_SOURCES:
      raise ValueError(f"PipelineConfig.lq_source {self.lq_source!r} unknown; choose one of "
                       f"{list(LQ_SOURCES)}")
    object.__setattr__(self, "scenarios", tuple(self.scenarios))
    unknown = [s for s in self.scenarios if s not in SCENARIOS]
    if unknown:
      raise ValueError(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    if (not isinstance(self.upgrade.task, engine.Upgrade)
        or not isinstance(self.segment.task, engine.Segment)):
      raise ValueError("PipelineConfig: upgrade.task must be an engine.Upgrade and "
                       "segment.task an engine.Segment")
    object.__setattr__(self, "options", tuple(self.options))
    with_options = {n: e.options for n, e in REGISTRY.items() if e.options is not None}
    for task in self.options:
      default = with_options.get(getattr(task, "name", None))
      if default is None or type(task) is not type(default):
        raise ValueError(f"PipelineConfig.options: {task!r} is not the options of a method; "
                         "give one of " + ", ".join(
                             f"engine.{type(d).__name__} ({n})" for n, d in with_options.items()))
    names = [t.name for t in self.options]
    if len(set(names)) < len(names):
      raise ValueError(f"PipelineConfig.options: one Task per method, got {names}")
    crop = max(self.upgrade.crop, self.segment.crop)
    if self.data.train_tile is not None and self.data.train_tile < crop:
      raise ValueError(f"--train_tile={self.data.train_tile} is smaller than the training crop "
                       f"{crop}: raise --train_tile or lower --crop")
    if self.seg_val_extra < 0:
      raise ValueError(f"PipelineConfig.seg_val_extra must be >= 0, got {self.seg_val_extra}")
    if self.reps < 1:
      raise ValueError(f"PipelineConfig.reps must be >= 1, got {self.reps}")

  def options_of(self, scenario: str) -> engine.Task | None:
    """The options `scenario` trains with: the one in `options`, else its
    registry default (None for a scenario without options)."""
    for task in self.options:
      if task.name == scenario:
        return task
    return REGISTRY[scenario].options


# Settings that change no number: left out of `run_key`, so changing them
# resumes. `reps`, `scenarios` and `threshold_baseline` only say how much to
# compute: more repetitions or scenarios extend a finished run.
_RUNTIME_FIELDS = ("reps", "scenarios", "threshold_baseline", "predict_batch", "review_top")
_RUNTIME_TRAIN_FIELDS = ("log_every", "checkpoint_every", "eval_batch_size", "conv_impl",
                         "data_placement")
# Training fields added after runs were recorded: in the key only away from
# their defaults, so the runs made before them still match.
_LATER_FIELDS = {"upgrade": {"anneal": 0.0}, "segment": {"anneal": 0.0},
                 "data": {"train_tile": None}}


def run_key(cfg: PipelineConfig) -> dict:
  """The JSON config every number of a repetition depends on: data, LQ and
  training perturbations, training settings, seeds (and the Felzenszwalb
  settings when inclusion draws from them). Stored in rep.json and with every
  checkpoint; a resume with another key is refused."""
  d = files.json_safe(cfg)
  for k in _RUNTIME_FIELDS:
    d.pop(k)
  for net in ("upgrade", "segment"):
    for k in _RUNTIME_TRAIN_FIELDS:
      d[net].pop(k)
  if cfg.data.others != "felzenszwalb":   # its settings change nothing then
    d["data"].pop("felzenszwalb")
  for part, later in _LATER_FIELDS.items():
    for k, default in later.items():
      if d[part][k] == default:
        d[part].pop(k)
  d["data"].pop("compact_images")   # the same numbers either way
  if cfg.data.normalisation != "percentile":   # unused then
    d["data"].pop("percentiles")
  # A method's options enter the key under its name, and only where they
  # differ from the registry's defaults: a finished run asked for a method
  # at its defaults (--scenarios, not in the key) extends, as for any
  # other scenario.
  d.pop("options")
  for task in cfg.options:
    if task != REGISTRY[task.name].options:
      d[task.name] = files.json_safe(task)
  # A JSON round trip, so that tuples and lists compare equal to a stored key.
  return json.loads(json.dumps(d))


def check_rep(stored: dict, key: dict, path: Path) -> None:
  if "config" not in stored:
    raise ConfigMismatch(f"{path} has no stored config (written by an older version); "
                         "use another out_dir or start fresh")
  diff = engine.config_diff(stored["config"], key)
  if diff:
    raise ConfigMismatch(f"{path} was made with a different config ({', '.join(diff)}); "
                         "use another out_dir, the same flags, or start fresh (--fresh)")
