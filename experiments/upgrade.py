r"""Algorithm 1 end to end: flags → configs → pipeline → report.

    python -m experiments.upgrade --flagfile=experiments/configs/quickstart.cfg

Synthetic or real data with simulated LQ labels (--data=synthetic|epfl_mito|
folder|stack) gives the paper's Table 3.1: annotation Dice of the LQ and
upgraded test labels and segmentation Dice per scenario. User mode takes real
LQ annotations:

    python -m experiments.upgrade --hq_images=DIR --hq_labels=DIR \
        --lq_images=DIR --lq_labels=DIR --out_dir=DIR [--scenarios=hq_upgraded]

and writes out_dir/upgraded/<LQ file name>.tif. Rerunning with the same
--out_dir resumes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from absl import app, flags, logging

from upgrade_jax.runtime import tune_malloc

tune_malloc()  # before jax is imported: see upgrade_jax/runtime.py

from upgrade_jax.data.io import check_percentiles as io_check_percentiles  # noqa: E402
from upgrade_jax.data.synthetic import PRESETS  # noqa: E402  (after tune_malloc)
from upgrade_jax.engine import TrainConfig  # noqa: E402
from upgrade_jax.engine.tiling import TileConfig  # noqa: E402
from upgrade_jax.instances import OUTPUTS  # noqa: E402
from upgrade_jax.perturb import COUNT_ROUNDINGS, FelzenszwalbConfig, PerturbConfig  # noqa: E402
from upgrade_jax.pipeline import (LQ_SOURCES, OTHERS_MODES, SCENARIOS, SOURCES,  # noqa: E402
                                  DataConfig, PipelineConfig)

F = flags.FLAGS

# Every default comes from the library's frozen configs (one place), except
# these, which the CLI sets on purpose: a run from the command line is sized
# for a laptop CPU (the library's TrainConfig defaults are paper-scale).
CLI_DEFAULTS = {"max_steps": 400, "steps_per_epoch": 50}
_DATA, _PIPE, _TRAIN = DataConfig(), PipelineConfig(), TrainConfig()
_LQ, _FELZ, _TILE = _PIPE.lq_perturb, FelzenszwalbConfig(), TileConfig()

# Data.
flags.DEFINE_enum("data", _DATA.source, sorted(SOURCES), "Data source.")
flags.DEFINE_enum("preset", _DATA.preset, sorted(PRESETS), "Synthetic preset.")
flags.DEFINE_string("data_dir", _DATA.data_dir, "Root folder of real data (epfl_mito, folder, "
                    "stack).")
flags.DEFINE_integer("n_volumes", _DATA.n_volumes, "Synthetic volumes to simulate.",
                     lower_bound=2)
flags.DEFINE_list("volume_shape", [str(v) for v in _DATA.volume_shape],
                  "Synthetic volume shape Z,H,W.")
flags.DEFINE_enum("sim_size", _DATA.sim_size, ["default", "paper"], "Synthetic pixel scale "
                  "('paper': the paper's pixel size, cells 1.5x larger in pixels).")
flags.DEFINE_integer("n_test", _DATA.n_test, "Volumes (synthetic) or images (folder) held out "
                     "for test.", lower_bound=1)
flags.DEFINE_integer("n_hq", _DATA.n_hq, "High-quality slices (the paper's selection rule).",
                     lower_bound=2)
flags.DEFINE_integer("hq_volumes", _DATA.hq_volumes, "Training volumes the HQ slices come "
                     "from (Figure 3.4; default: all).", lower_bound=1)
flags.DEFINE_integer("n_lq", _DATA.n_lq, "LQ slices drawn from the rest (default: all).",
                     lower_bound=0)
flags.DEFINE_integer("max_test", _DATA.max_test, "Cap on test slices (evenly spaced).",
                     lower_bound=1)
flags.DEFINE_enum("others", _DATA.others, list(OTHERS_MODES),
                  "What inclusion draws from: the other cell type's labels, "
                  "Felzenszwalb segments, or nothing.")
flags.DEFINE_integer("data_seed", _DATA.data_seed, "Seed of the simulator and of the test "
                     "hold-out.")
flags.DEFINE_bool("compact_images", _DATA.compact_images, "Keep 8/16-bit single-channel "
                  "images in their source dtype, normalised on the device (2-4x less "
                  "memory, the same results); --nocompact_images: float32 on the host.")
flags.DEFINE_enum("normalisation", _DATA.normalisation, ["percentile", "max", "volume"],
                  "Network input normalisation: per image by its percentiles (StarDist's and "
                  "Cellpose's), by its max (the paper's), or by the max of each 3-D volume "
                  "(stacks and synthetic volumes; a 2-D image is a one-slice volume).")
flags.DEFINE_list("norm_percentiles", [f"{p:g}" for p in _DATA.percentiles],
                  "Low,high percentiles of --normalisation=percentile (mapped to 0 and 1).")

# The perturbation u_θ trains with, and the one that makes the LQ set; both
# default to the pipeline's LQ perturbation (PipelineConfig.lq_perturb).
flags.DEFINE_float("omission_rate", _LQ.omission_rate, "Fraction of target cells omitted.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("inclusion_rate", _LQ.inclusion_rate, "Fraction of non-target objects "
                   "included.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("bias_max", _LQ.bias_max, "q_max of the dilate/erode bias (0 = off).",
                     lower_bound=0)
flags.DEFINE_float("salt_pepper_prob", _LQ.salt_pepper_prob, "Salt-and-pepper: fraction of "
                   "pixels flipped.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_bool("per_instance_bias", _LQ.per_instance_bias, "Bias each cell on its own.")
flags.DEFINE_float("lq_omission_rate", None, "LQ set: omission (default --omission_rate).",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("lq_inclusion_rate", None, "LQ set: inclusion (default --inclusion_rate).",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("lq_bias_max", None, "LQ set: bias q_max (default --bias_max).",
                     lower_bound=0)
flags.DEFINE_float("lq_salt_pepper_prob", None, "LQ set: salt-and-pepper (default "
                   "--salt_pepper_prob).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_bool("lq_per_instance_bias", None, "LQ set: per-instance bias "
                  "(default --per_instance_bias).")
flags.DEFINE_float("hq_omission_rate", _DATA.hq_perturb.omission_rate, "Imperfect HQ (Figure "
                   "3.5): omission in the HQ labels themselves.", lower_bound=0.0,
                   upper_bound=1.0)
flags.DEFINE_integer("hq_bias_max", _DATA.hq_perturb.bias_max, "Imperfect HQ: bias q_max in "
                     "the HQ labels.", lower_bound=0)
flags.DEFINE_enum("lq_source", _PIPE.lq_source, list(LQ_SOURCES),
                  "LQ labels: perturbed ground truth, or the predictions of a segmentation "
                  "network trained on --predictor_hq HQ slices (the case study, §3.3.4).")
flags.DEFINE_integer("predictor_hq", _PIPE.predictor_hq, "HQ slices of the LQ predictor (--lq_source="
                     "predictions).", lower_bound=1)
flags.DEFINE_integer("cost_budget", None, "Annotation budget in LQ-label units (Figure 3.6): "
                     "sets --n_lq = budget - hq_cost * n_hq.", lower_bound=1)
flags.DEFINE_float("hq_cost", 5.0, "Cost of one HQ label in LQ-label units.", lower_bound=0.0)
flags.DEFINE_float("felzenszwalb_scale", _FELZ.scale, "Felzenszwalb scale (--others="
                   "felzenszwalb); segments are kept if sized like the targets.",
                   lower_bound=0.0)
flags.DEFINE_float("felzenszwalb_sigma", _FELZ.sigma, "Felzenszwalb Gaussian sigma.",
                   lower_bound=0.0)
flags.DEFINE_integer("felzenszwalb_min_size", _FELZ.min_size, "Felzenszwalb min_size (pixels).",
                     lower_bound=1)
flags.DEFINE_enum("count_rounding", _LQ.count_rounding, list(COUNT_ROUNDINGS),
                  "Cells omitted/objects included for rate r of n: floor(r·n)+Bernoulli("
                  "frac), floor(r·n), or max(1, int(r·n)) (authors' code).")
flags.DEFINE_bool("z_consistent", _DATA.z_consistent, "LQ sets of volumes: omission and "
                  "inclusion act on 3-D cells (a cell omitted in every slice), not per slice "
                  "(synthetic or stack data).")
flags.DEFINE_float("lq_per_hq", None, "Sets --n_lq = lq_per_hq * n_hq (Figure 3.6: 9 keeps "
                   "10% of the slices HQ).", lower_bound=0.0)

# Training.
flags.DEFINE_integer("width", _TRAIN.widths[0], "UNet base width: widths w,2w,4w,8w,8w "
                     "(paper: 64).", lower_bound=1)
flags.DEFINE_string("conv_impl", _TRAIN.conv_impl, "Convolution implementation "
                    "(models/conv.py).")
flags.DEFINE_enum("data_placement", _TRAIN.data_placement,
                  ["auto", "replicate", "shard", "stream"],
                  "Where a training set lives: a copy on every device, its samples sharded "
                  "over the devices, streamed from the host one batch a step, or auto (the "
                  "first that fits in half a device's memory). Same results in each.")
flags.DEFINE_integer("crop", _TRAIN.crop, "Square training crop side.", lower_bound=16)
flags.DEFINE_integer("batch_size", _TRAIN.batch_size, "Global batch size.", lower_bound=1)
flags.DEFINE_float("lr", _TRAIN.lr, "Adam learning rate.", lower_bound=0.0)
flags.DEFINE_integer("max_steps", CLI_DEFAULTS["max_steps"], "Max train steps of the upgrade "
                     "network.", lower_bound=1)
flags.DEFINE_integer("seg_val_extra", _PIPE.seg_val_extra, "Validation of every segmentation "
                     "network: this many of its non-HQ training slices (at most a quarter), "
                     "with its own labels, validate it beside the HQ validation slices.",
                     lower_bound=0)
flags.DEFINE_integer("seg_patience", None, "Early-stopping patience (validations without a "
                     "better validation Dice) of each segmentation network (default "
                     "--patience): with --seg_max_steps, the rule every scenario stops by.",
                     lower_bound=1)
flags.DEFINE_integer("seg_max_steps", None, "Max train steps of each segmentation network "
                     "(default --max_steps).", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", CLI_DEFAULTS["steps_per_epoch"], "Steps between "
                     "validations.", lower_bound=1)
flags.DEFINE_integer("patience", _TRAIN.patience, "Early-stopping patience in epochs.",
                     lower_bound=1)
flags.DEFINE_integer("lr_drops", _TRAIN.lr_drops, "Plateaus that lower the learning rate "
                     "(by --lr_drop_factor) before one ends the run.", lower_bound=0)
flags.DEFINE_float("lr_drop_factor", _TRAIN.lr_drop_factor, "What a plateau multiplies the "
                   "learning rate by.", lower_bound=1e-6, upper_bound=0.999)
flags.DEFINE_float("patience_growth", _TRAIN.patience_growth, "A stage's patience becomes "
                   "max(--patience, ceil(this x the epochs the stage took to reach its "
                   "best)); 0: fixed patience.", lower_bound=0.0)
flags.DEFINE_integer("seg_lr_drops", None, "--lr_drops of each segmentation network "
                     "(default --lr_drops).", lower_bound=0)
flags.DEFINE_float("seg_patience_growth", None, "--patience_growth of each segmentation "
                   "network (default --patience_growth).", lower_bound=0.0)
flags.DEFINE_integer("checkpoint_every", _TRAIN.checkpoint_every, "Steps between "
                     "checkpoints (one also at the end); a killed run resumes from the last "
                     "and replays the steps since, exactly.", lower_bound=1)
flags.DEFINE_float("ema_decay", _TRAIN.ema_decay, "Decay of the moving average of the "
                   "weights that validation, checkpoint selection and prediction use "
                   "(0: the raw weights).", lower_bound=0.0, upper_bound=0.9999)
flags.DEFINE_float("label_dropout", 0.0, "Probability of zeroing the label input of a "
                   "training sample (anti-shortcut).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_bool("strength_mix", False, "Draw each sample's perturbation rates uniformly "
                  "in [0, rate] (anti-shortcut).")
flags.DEFINE_integer("log_every", _TRAIN.log_every, "Steps between progress lines.",
                     lower_bound=1)

# The run.
flags.DEFINE_list("scenarios", list(_PIPE.scenarios), "Segmentation scenarios, a comma list "
                  f"of {', '.join(SCENARIOS)}; empty = upgrade only.")
flags.DEFINE_bool("threshold_baseline", _PIPE.threshold_baseline, "Score the global-threshold "
                  "baseline.")
# The competing methods of Table 3.3 (--scenarios=...,confident_learning,partial_labelling).
_CL, _PL = _PIPE.confident_learning, _PIPE.partial_labelling
flags.DEFINE_float("cl_confidence", _CL.confidence, "Confident Learning: soft target of a "
                   "corrected pixel towards its new class (the authors' 0.8/0.2).",
                   lower_bound=0.5, upper_bound=1.0)
flags.DEFINE_integer("cl_folds", _CL.folds, "Confident Learning: folds of the cross-fitted "
                     "teachers (K teachers, each predicts the fold it did not see).",
                     lower_bound=2)
flags.DEFINE_float("pl_gamma", _PL.gamma, "Partial Labelling: cosine-similarity threshold of a "
                   "pseudo-label.", lower_bound=-1.0, upper_bound=1.0)
flags.DEFINE_float("pl_pseudo_weight", _PL.pseudo_weight, "Partial Labelling: maximum weight "
                   "of the pseudo-label term.", lower_bound=0.0)
flags.DEFINE_float("pl_separation_weight", _PL.separation_weight, "Partial Labelling: maximum "
                   "weight of the Fisher-style separation term.", lower_bound=0.0)
flags.DEFINE_integer("pl_ramp_start", _PL.ramp_start, "Partial Labelling: train step where the "
                     "two weights start to ramp up from 0.", lower_bound=0)
flags.DEFINE_integer("pl_ramp_end", _PL.ramp_end, "Partial Labelling: train step where they "
                     "reach their maximum.", lower_bound=0)
METHOD_FLAGS = {"confident_learning": ("cl_confidence", "cl_folds"),
                "partial_labelling": ("pl_gamma", "pl_pseudo_weight", "pl_separation_weight",
                                      "pl_ramp_start", "pl_ramp_end")}
flags.DEFINE_integer("reps", _PIPE.reps, "Repetitions (seeds seed..seed+reps-1).",
                     lower_bound=1)
flags.DEFINE_integer("seed", _PIPE.seed, "Base seed.")
flags.DEFINE_string("out_dir", None, "Output directory (resumes if it holds a run of the "
                    "same config; a different config is refused).")
flags.DEFINE_bool("fresh", False, "Discard out_dir's own rep*/ folders and upgraded TIFFs "
                  "and start over (never the inputs).")
flags.DEFINE_list("paper", [], "Paper figures for the table, e.g. lq=0.48,upgraded=0.92.")
flags.DEFINE_string("compilation_cache", str(Path.home() / ".cache" / "upgrade_jax" / "xla"),
                    "Persistent XLA compilation cache directory ('' = off): reruns, resumes "
                    "and sweep points skip most compilation.")
flags.DEFINE_bool("distributed", False, "Run as one of several processes (multi-host, or several "
                  "processes on one machine): calls jax.distributed.initialize(), with the "
                  "three flags below or, without them, JAX's cluster auto-detection "
                  "(SLURM, Cloud TPU, JAX_COORDINATOR_ADDRESS/...). Process 0 writes the files.")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0's "
                    "coordinator, e.g. 127.0.0.1:12345 (default: auto-detected).")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes (default: "
                     "auto-detected).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "--distributed: this process's index in "
                     "[0, num_processes) (default: auto-detected).", lower_bound=0)
flags.DEFINE_bool("debug", False, "Show the Python traceback of input errors too "
                  "(they are one line on stderr otherwise).")

# User mode.
flags.DEFINE_string("hq_images", "", "User mode: folder of HQ images.")
flags.DEFINE_string("hq_labels", "", "User mode: folder of HQ instance labels.")
flags.DEFINE_string("lq_images", "", "User mode: folder of LQ images.")
flags.DEFINE_string("lq_labels", "", "User mode: folder of LQ labels.")
flags.DEFINE_string("others_labels", "", "User mode: non-target objects of the HQ images.")

# What the upgraded files hold, and how prediction cuts large images.
flags.DEFINE_enum("output", _PIPE.output, list(OUTPUTS), "What the upgraded label "
                  "files hold: instances (touching cells separate; the LQ label's instances "
                  "seed them) or mask (connected components of the upgraded mask).")
flags.DEFINE_integer("tile", _TILE.tile, "Prediction: images larger than this run as overlapping "
                     "tiles of this side (a multiple of 16; memory grows with tile^2).",
                     lower_bound=16)
flags.DEFINE_integer("tile_margin", _TILE.margin, "Prediction: context px kept around each tile's "
                     "owned part (tiles overlap by 2x this).", lower_bound=0)

flags.DEFINE_integer("review_top", _PIPE.review_top, "Overlays in out_dir/review/ for the "
                     "first N rows of the review queue (out_dir/review.csv).", lower_bound=0)

flags.mark_flag_as_required("out_dir")

USER_FLAGS = ("hq_images", "hq_labels", "lq_images", "lq_labels")
# Flags that describe simulated LQ labels, splits of one data source or the
# report of repetitions: user mode has real LQ labels and uses every HQ pair,
# so giving one of them there is an error, not a silent no-op.
NOT_IN_USER_MODE = (
    "data", "preset", "data_dir", "n_volumes", "volume_shape", "sim_size", "n_test", "n_hq",
    "n_lq", "max_test", "data_seed", "lq_omission_rate", "lq_inclusion_rate", "lq_bias_max",
    "lq_salt_pepper_prob", "lq_per_instance_bias", "hq_omission_rate", "hq_bias_max",
    "lq_source", "predictor_hq", "cost_budget", "hq_cost", "reps", "paper",
    "threshold_baseline", "hq_volumes", "lq_per_hq", "fresh", "z_consistent",
    "cl_confidence", "cl_folds", "pl_gamma", "pl_pseudo_weight", "pl_separation_weight",
    "pl_ramp_start", "pl_ramp_end")
SYNTHETIC_ONLY = ("preset", "n_volumes", "volume_shape", "sim_size")


@flags.validator("scenarios", message=f"--scenarios must be a comma list of {SCENARIOS}")
def _valid_scenarios(v):
  return all(s in SCENARIOS for s in v)


@flags.validator("norm_percentiles", message="--norm_percentiles must be two numbers LOW,HIGH "
                 "with 0 <= LOW < HIGH <= 100, e.g. 1,99.8")
def _valid_percentiles(v):
  try:
    io_check_percentiles(v)
    return len(v) == 2
  except ValueError:
    return False


@flags.validator("volume_shape", message="--volume_shape must be three positive ints Z,H,W")
def _valid_shape(v):
  return len(v) == 3 and all(s.isdigit() and int(s) > 0 for s in v)


@flags.validator("paper", message="--paper must be name=value pairs, e.g. lq=0.48")
def _valid_paper(v):
  try:
    _paper(v)
    return True
  except ValueError:
    return False


# The single-flag validators, for values a sweep sets without parsing a command line.
VALUE_CHECKS = {"scenarios": _valid_scenarios, "volume_shape": _valid_shape,
                "norm_percentiles": _valid_percentiles,
                "paper": _valid_paper}


def _paper(items) -> dict:
  out = {}
  for item in items:
    k, _, v = item.partition("=")
    out[k.strip()] = float(v)
  return out


class FlagView:
  """The flag values, some overridden: one sweep point's flags, read without
  changing the global FLAGS (every reader below takes a view).

  Args:
    overrides: {flag name: parsed value}.
  """

  def __init__(self, overrides: dict | None = None):
    self._overrides = dict(overrides or {})

  def __getattr__(self, name):
    if name.startswith("_"):
      raise AttributeError(name)
    return self._overrides[name] if name in self._overrides else getattr(F, name)

  def present(self, name: str) -> bool:
    """Whether the flag was given (command line, flagfile or override)."""
    return name in self._overrides or F[name].present

  def with_value(self, name: str, text: str) -> "FlagView":
    """A view with --name=text parsed and checked as the command line would."""
    value = F[name].parser.parse(text)  # type and bounds
    check = VALUE_CHECKS.get(name)
    if check is not None and not check(value):
      raise ValueError(f"{value!r} is not valid for --{name}")
    return FlagView({**self._overrides, name: value})


def log_line(msg: str) -> None:
  """A timestamped progress line on stdout (the CLI's `log`)."""
  print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def _or(value, default):
  """A seg_* flag's value, or its general flag's where it was not given."""
  return default if value is None else value


def build_config(v: "FlagView | None" = None) -> PipelineConfig:
  """The flags (or a sweep point's view of them) as frozen configs; the
  library never sees a flag."""
  from upgrade_jax import engine
  from upgrade_jax.engine import Segment, Upgrade

  v = v or FlagView()

  train_p = PerturbConfig(omission_rate=v.omission_rate, inclusion_rate=v.inclusion_rate,
                          bias_max=v.bias_max, per_instance_bias=v.per_instance_bias,
                          salt_pepper_prob=v.salt_pepper_prob, count_rounding=v.count_rounding)

  def lq(name):
    # The view's value, not the global flag's: a sweep point may set lq_*.
    value = getattr(v, f"lq_{name}")
    return getattr(train_p, name) if value is None else value

  lq_p = PerturbConfig(omission_rate=lq("omission_rate"), inclusion_rate=lq("inclusion_rate"),
                       bias_max=lq("bias_max"), per_instance_bias=lq("per_instance_bias"),
                       salt_pepper_prob=lq("salt_pepper_prob"), count_rounding=v.count_rounding)
  hq_p = PerturbConfig(omission_rate=v.hq_omission_rate, bias_max=v.hq_bias_max,
                       count_rounding=v.count_rounding)
  n_lq = v.n_lq
  if v.lq_per_hq is not None:
    if v.cost_budget is not None:
      raise ValueError("--lq_per_hq and --cost_budget both set n_lq: give one")
    n_lq = int(round(v.lq_per_hq * v.n_hq))
  if v.cost_budget is not None:
    n_lq = int(v.cost_budget - v.hq_cost * v.n_hq)
    if n_lq < 0:
      raise ValueError(f"--cost_budget={v.cost_budget} is below the cost of --n_hq={v.n_hq} "
                       f"HQ labels at --hq_cost={v.hq_cost}")
  w = v.width
  common = dict(widths=(w, 2 * w, 4 * w, 8 * w, 8 * w), conv_impl=v.conv_impl, crop=v.crop,
                batch_size=v.batch_size, lr=v.lr, steps_per_epoch=v.steps_per_epoch,
                patience=v.patience, log_every=v.log_every, data_placement=v.data_placement,
                ema_decay=v.ema_decay, checkpoint_every=v.checkpoint_every,
                lr_drops=v.lr_drops, lr_drop_factor=v.lr_drop_factor,
                patience_growth=v.patience_growth)
  upgrade = TrainConfig(task=Upgrade(perturb=train_p, label_dropout=v.label_dropout,
                                     strength_mix=v.strength_mix),
                        max_steps=v.max_steps, **common)
  segment = TrainConfig(task=Segment(), max_steps=v.seg_max_steps or v.max_steps,
                        **{**common, "patience": v.seg_patience or v.patience,
                           "lr_drops": _or(v.seg_lr_drops, v.lr_drops),
                           "patience_growth": _or(v.seg_patience_growth,
                                                  v.patience_growth)})
  data = DataConfig(source=v.data, preset=v.preset, data_dir=v.data_dir,
                    n_volumes=v.n_volumes, volume_shape=tuple(int(s) for s in v.volume_shape),
                    sim_size=v.sim_size,
                    n_test=v.n_test, n_hq=v.n_hq, hq_volumes=v.hq_volumes, n_lq=n_lq,
                    max_test=v.max_test,
                    others=v.others, data_seed=v.data_seed, normalisation=v.normalisation,
                    percentiles=tuple(float(p) for p in v.norm_percentiles),
                    compact_images=v.compact_images,
                    hq_perturb=hq_p, z_consistent=v.z_consistent,
                    felzenszwalb=FelzenszwalbConfig(scale=v.felzenszwalb_scale,
                                                    sigma=v.felzenszwalb_sigma,
                                                    min_size=v.felzenszwalb_min_size))
  return PipelineConfig(data=data, upgrade=upgrade, segment=segment, lq_perturb=lq_p,
                        scenarios=tuple(v.scenarios), threshold_baseline=v.threshold_baseline,
                        reps=v.reps, seed=v.seed, lq_source=v.lq_source,
                        predictor_hq=v.predictor_hq, output=v.output,
                        tiling=TileConfig(tile=v.tile, margin=v.tile_margin),
                        review_top=v.review_top, seg_val_extra=v.seg_val_extra,
                        confident_learning=engine.ConfidentLearning(
                            confidence=v.cl_confidence, folds=v.cl_folds),
                        partial_labelling=engine.PartialLabelling(
                            gamma=v.pl_gamma, pseudo_weight=v.pl_pseudo_weight,
                            separation_weight=v.pl_separation_weight,
                            ramp_start=v.pl_ramp_start, ramp_end=v.pl_ramp_end))


def setup_runtime() -> None:
  """Process-wide settings from flags: log level, compilation cache, hosts."""
  if not F["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    # tifffile warns about a corrupt file before raising; the one-line error
    # that follows names the file, so the warning would only be a second line.
    import logging as py_logging
    py_logging.getLogger("tifffile").setLevel(py_logging.ERROR)
  one_line_errors(check_distributed_flags, checking=True)
  import jax
  if F.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", F.compilation_cache)
  from upgrade_jax import parallel
  parallel.maybe_initialize_distributed(F.distributed, coordinator_address=F.coordinator_address,
                                        num_processes=F.num_processes,
                                        process_id=F.process_id)


def check_distributed_flags() -> None:
  """Refuses process flags that would be ignored or cannot work (one line),
  before JAX starts or anything is written."""
  from upgrade_jax.rundir import InputError

  given = [f"--{n}" for n in ("coordinator_address", "num_processes", "process_id")
           if getattr(F, n) is not None]
  if given and not F.distributed:
    raise InputError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only "
                     "with --distributed; add it")
  if (F.num_processes is None) != (F.process_id is None):
    raise InputError("--num_processes and --process_id go together: give both (or neither, "
                     "for JAX's cluster auto-detection)")
  if F.process_id is not None and F.process_id >= F.num_processes:
    raise InputError(f"--process_id={F.process_id} must be below "
                     f"--num_processes={F.num_processes} (ids count from 0)")
  address = F.coordinator_address
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise InputError(f"--coordinator_address={address} must be host:port, e.g. "
                       "127.0.0.1:12345")


def check_flag_combination(v: FlagView, user_flags: tuple[str, ...] = USER_FLAGS) -> None:
  """Refuses flags that would be silently ignored in this mode (one line).

  user_flags: the folders user mode needs all of (experiments.upgrade: HQ and
  LQ; experiments.advise learns from the HQ pairs alone)."""
  from upgrade_jax.rundir import InputError

  given = v.present  # set on the command line, in a flagfile or by a sweep
  folders = [k for k in USER_FLAGS if getattr(v, k)]
  if folders and any(not getattr(v, k) for k in user_flags):
    missing = [f"--{k}" for k in user_flags if not getattr(v, k)]
    raise InputError(f"user mode needs all of {', '.join('--' + k for k in user_flags)}: "
                     f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
  if v.hq_images:
    ignored = [f"--{n}" for n in NOT_IN_USER_MODE if given(n)]
    if ignored:
      raise InputError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply "
                       "in user mode (--hq_images ...): "
                       "every HQ pair is used and the LQ labels are yours; remove them")
    other = [s for s in v.scenarios if s != "hq_upgraded"] if given("scenarios") else []
    if other:
      raise InputError(f"--scenarios={','.join(v.scenarios)}: user mode trains only "
                       "hq_upgraded (it has no test set); use --scenarios=hq_upgraded or none")
    return
  if given("others_labels"):
    raise InputError("--others_labels applies only in user mode (with --hq_images ...); "
                     "for --data=folder put the files in DATA_DIR/others/")
  if v.data == "synthetic" and given("data_dir"):
    raise InputError("--data_dir does not apply to --data=synthetic; remove it or set --data")
  if v.data != "synthetic":
    ignored = [f"--{n}" for n in SYNTHETIC_ONLY if given(n)]
    if ignored:
      raise InputError(f"{', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} "
                       "only to --data=synthetic, not "
                       f"--data={v.data}; remove them")
  for scenario, names in METHOD_FLAGS.items():
    ignored = [f"--{n}" for n in names if given(n)]
    if ignored and scenario not in v.scenarios:
      raise InputError(f"{', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} "
                       f"only with {scenario} in --scenarios; add it or remove them")
  if given("norm_percentiles") and v.normalisation != "percentile":
    raise InputError(f"--norm_percentiles applies only with --normalisation=percentile, not "
                     f"--normalisation={v.normalisation}; remove one")
  if given("predictor_hq") and v.lq_source != "predictions":
    raise InputError("--predictor_hq applies only with --lq_source=predictions")
  if given("hq_cost") and v.cost_budget is None:
    raise InputError("--hq_cost applies only with --cost_budget")


@dataclasses.dataclass
class Plan:
  """A run checked from the flags, before anything is written."""
  cfg: PipelineConfig
  out_dir: Path
  prepared: object
  flags: FlagView
  user: object = None


def plan_from_flags(out_dir: Path, v: FlagView | None = None) -> Plan:
  """Builds the configs from the flags (or view `v`) and loads and checks every
  input and the out_dir. Creates nothing; every problem raises InputError/
  ValueError/OSError with a message naming the culprit."""
  from upgrade_jax import pipeline

  v = v or FlagView()
  check_flag_combination(v)
  cfg = build_config(v)
  if v.hq_images:
    if not v.present("scenarios"):  # user mode: upgrade only unless asked
      cfg = dataclasses.replace(cfg, scenarios=())
    user = pipeline.UserData(v.hq_images, v.hq_labels, v.lq_images, v.lq_labels,
                             v.others_labels)
    return Plan(cfg, out_dir, pipeline.prepare_user(cfg, user, out_dir), v, user)
  prepared = pipeline.prepare_run(cfg, out_dir, log=log_line, fresh=v.fresh)
  return Plan(cfg, out_dir, prepared, v)


def execute(plan: Plan) -> dict | None:
  """Runs a checked plan; returns the results.json dict (None in user mode,
  whose results.json holds the upgraded file list)."""
  from upgrade_jax import pipeline, report, rundir

  t0 = time.perf_counter()
  out_dir = plan.out_dir
  if plan.user is not None:
    pipeline.run_user(plan.cfg, plan.user, out_dir, log=log_line, prepared=plan.prepared)
    log_line(f"done in {time.perf_counter() - t0:.0f}s; upgraded labels in "
             f"{out_dir / 'upgraded'}")
    return None
  results = pipeline.run(plan.cfg, out_dir, log=log_line, prepared=plan.prepared,
                         fresh=plan.flags.fresh)
  paper = _paper(plan.flags.paper)
  d = report.write_results(out_dir, results, extra={"paper": paper,
                                                    "command": " ".join(sys.argv)})
  if not rundir.is_primary_process():  # several processes: process 0 reports
    return d
  figures = report.write_figures(out_dir, d, paper or None)
  print()
  print(report.format_table(d, paper or None))
  print()
  log_line(f"done in {time.perf_counter() - t0:.0f}s; results in {out_dir / 'results.json'}, "
       f"figures {', '.join(p.name for p in figures)}")
  return d


def run_from_flags(out_dir: Path) -> dict | None:
  """Checks, then runs, with the current flags (see plan_from_flags, execute)."""
  return execute(plan_from_flags(out_dir))


def one_line_errors(fn, *args, checking: bool = False):
  """Calls fn(*args); an input error becomes one line on stderr and exit 2.

  Input errors are InputError at any time (e.g. an out_dir in use) and, when
  `checking` (fn only reads and validates, before anything is written), any
  ValueError or OSError. Later ones are bugs and keep their traceback, as
  does everything with --debug.
  """
  from upgrade_jax.rundir import InputError

  try:
    return fn(*args)
  except (InputError, ValueError, OSError) as e:
    if F.debug:
      raise
    if not isinstance(e, InputError) and not checking:
      raise  # after the checks, anything else is a bug: keep its traceback
    msg = " ".join(str(e).split()) or type(e).__name__
    sys.stderr.write(f"error: {msg}\n")
    sys.exit(2)


def parse_flags_one_line(argv):
  """absl's flag parsing, with a bad flag reported as one line (exit 2)."""
  try:
    return F(argv)
  except flags.Error as e:
    msg = " ".join(str(e).split())
    sys.stderr.write(f"error: {msg}\n")
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    sys.stderr.write(f"error: unexpected arguments {argv[1:]}; every option is a --flag\n")
    return 2
  setup_runtime()
  out_dir = Path(F.out_dir)
  plan = one_line_errors(plan_from_flags, out_dir, checking=True)
  one_line_errors(execute, plan)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_one_line)
