"""The flags of one run of experiments.upgrade (and of the entry points built
on it: sweep, advise, apply), each defaulting to its field of the library's
frozen configs. Where a flag means something (user mode, synthetic data, a
competing method, apply) is declared with the flag; the lists the mode rules
read are derived from those declarations.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from experiments import cli  # noqa: F401  (tunes malloc before jax; the process flags)
from upgrade_jax.data.labels import FelzenszwalbConfig
from upgrade_jax.data.synthetic import PRESETS
from upgrade_jax.engine import TrainConfig, Upgrade
from upgrade_jax.engine.tiling import TileConfig
from upgrade_jax.instances import OUTPUTS
from upgrade_jax.perturb import COUNT_ROUNDINGS
from upgrade_jax.pipeline import (USER_HAZE, HQ_COST, LQ_SOURCES, OTHERS_MODES, REGISTRY, SCENARIOS,
                                  SOURCES, DataConfig, PipelineConfig)
from upgrade_jax.data.intensity import check_percentiles as io_check_percentiles

F = flags.FLAGS

# Where a flag means something is declared with the flag (`_scoped`); the
# lists the mode rules read are derived from those declarations:
#   SIMULATED  simulated LQ labels, the splits of one data source, the report of
#              repetitions: user mode has real LQ labels and uses every HQ pair, so
#              giving one there is an error, not a silent no-op;
#   SYNTHETIC  a SIMULATED flag of the synthetic microscope alone;
#   APPLY      also read by experiments.apply (any other flag of this module given
#              to apply is an error);
#   method(s)  an option of competing method s: an error unless s is a scenario.
SIMULATED, SYNTHETIC, APPLY = "simulated", "synthetic", "apply"
_SCOPES: dict[str, list[str]] = {}


def method(scenario: str) -> str:
  return f"method:{scenario}"


def _scoped(scopes, define, name, *args, **kwargs):
  for scope in scopes:
    _SCOPES.setdefault(scope, []).append(name)
  return define(name, *args, **kwargs)


# Every default comes from the library's frozen configs (one place), except
# these, which the CLI sets on purpose: a run from the command line is sized
# for a laptop CPU (the library's TrainConfig defaults are paper-scale).
CLI_DEFAULTS = {"max_steps": 400, "steps_per_epoch": 50}
_DATA, _PIPE, _TRAIN = DataConfig(), PipelineConfig(), TrainConfig()
_LQ, _FELZ, _TILE = _PIPE.lq_perturb, FelzenszwalbConfig(), TileConfig()
_UPGRADE = Upgrade()

# Data.
_scoped((SIMULATED,), flags.DEFINE_enum,
        "data", _DATA.source, sorted(SOURCES), "Data source.")
_scoped((SYNTHETIC,), flags.DEFINE_enum,
        "preset", _DATA.preset, sorted(PRESETS), "Synthetic preset.")
_scoped((SIMULATED,), flags.DEFINE_string,
        "data_dir", _DATA.data_dir, "Root folder of real data (epfl_mito, folder, "
        "stack).")
_scoped((SYNTHETIC,), flags.DEFINE_integer,
        "n_volumes", _DATA.n_volumes, "Synthetic volumes to simulate.",
        lower_bound=2)
_scoped((SYNTHETIC,), flags.DEFINE_list,
        "volume_shape", [str(v) for v in _DATA.volume_shape],
        "Synthetic volume shape Z,H,W.")
_scoped((SYNTHETIC,), flags.DEFINE_enum,
        "sim_size", _DATA.sim_size, ["default", "paper"], "Synthetic pixel scale "
        "('paper': the paper's pixel size, cells 1.5x larger in pixels).")
_scoped((SIMULATED,), flags.DEFINE_integer,
        "n_test", _DATA.n_test, "Volumes (synthetic) or images (folder) held out "
        "for test.", lower_bound=1)
_scoped((SIMULATED,), flags.DEFINE_integer,
        "n_hq", _DATA.n_hq, "High-quality slices (the paper's selection rule).",
        lower_bound=2)
_scoped((SIMULATED,), flags.DEFINE_integer,
        "hq_volumes", _DATA.hq_volumes, "Training volumes the HQ slices come "
        "from (Figure 3.4; default: all).", lower_bound=1)
_scoped((SIMULATED,), flags.DEFINE_integer,
        "n_lq", _DATA.n_lq, "LQ slices drawn from the rest (default: all).",
        lower_bound=0)
_scoped((SIMULATED,), flags.DEFINE_integer,
        "max_test", _DATA.max_test, "Cap on test slices (evenly spaced).",
        lower_bound=1)
flags.DEFINE_enum("others", _DATA.others, list(OTHERS_MODES),
                  "What inclusion draws from: the other cell type's labels, "
                  "Felzenszwalb segments, or nothing.")
_scoped((SIMULATED,), flags.DEFINE_integer,
        "data_seed", _DATA.data_seed, "Seed of the simulator and of the test "
        "hold-out.")
flags.DEFINE_integer("train_tile", _DATA.train_tile, "Cut the HQ and LQ training images "
                     "into tiles of at most this many px a side (the test set stays whole): "
                     "for folders of mixed sizes, which one stack pads to the largest "
                     "(default: whole images).", lower_bound=16)
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
_scoped((SIMULATED,), flags.DEFINE_float,
        "lq_omission_rate", None, "LQ set: omission (default --omission_rate).",
        lower_bound=0.0, upper_bound=1.0)
_scoped((SIMULATED,), flags.DEFINE_float,
        "lq_inclusion_rate", None, "LQ set: inclusion (default --inclusion_rate).",
        lower_bound=0.0, upper_bound=1.0)
_scoped((SIMULATED,), flags.DEFINE_integer,
        "lq_bias_max", None, "LQ set: bias q_max (default --bias_max).",
        lower_bound=0)
_scoped((SIMULATED,), flags.DEFINE_float,
        "lq_salt_pepper_prob", None, "LQ set: salt-and-pepper (default "
        "--salt_pepper_prob).", lower_bound=0.0, upper_bound=1.0)
_scoped((SIMULATED,), flags.DEFINE_bool,
        "lq_per_instance_bias", None, "LQ set: per-instance bias "
        "(default --per_instance_bias).")
_scoped((SIMULATED,), flags.DEFINE_float,
        "hq_omission_rate", _DATA.hq_perturb.omission_rate, "Imperfect HQ (Figure "
        "3.5): omission in the HQ labels themselves.", lower_bound=0.0,
        upper_bound=1.0)
_scoped((SIMULATED,), flags.DEFINE_integer,
        "hq_bias_max", _DATA.hq_perturb.bias_max, "Imperfect HQ: bias q_max in "
        "the HQ labels.", lower_bound=0)
_scoped((SIMULATED,), flags.DEFINE_enum,
        "lq_source", _PIPE.lq_source, list(LQ_SOURCES),
        "LQ labels: perturbed ground truth, or the predictions of a segmentation "
        "network trained on --predictor_hq HQ slices (the case study, §3.3.4).")
_scoped((SIMULATED,), flags.DEFINE_integer,
        "predictor_hq", _PIPE.predictor_hq, "HQ slices of the LQ predictor (--lq_source="
        "predictions).", lower_bound=1)
_scoped((SIMULATED,), flags.DEFINE_integer,
        "cost_budget", None, "Annotation budget in LQ-label units (Figure 3.6): "
        "sets --n_lq = budget - hq_cost * n_hq.", lower_bound=1)
_scoped((SIMULATED,), flags.DEFINE_float,
        "hq_cost", HQ_COST, "Cost of one HQ label in LQ-label units.", lower_bound=0.0)
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
_scoped((SIMULATED,), flags.DEFINE_bool,
        "z_consistent", _DATA.z_consistent, "LQ sets of volumes: omission and "
        "inclusion act on 3-D cells (a cell omitted in every slice), not per slice "
        "(synthetic or stack data).")
_scoped((SIMULATED,), flags.DEFINE_float,
        "lq_per_hq", None, "Sets --n_lq = lq_per_hq * n_hq (Figure 3.6: 9 keeps "
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
flags.DEFINE_float("anneal", _TRAIN.anneal, "At the plateau that would end a run, anneal "
                   "instead: this x the epochs so far more epochs at rates falling along a "
                   "cosine to 0, then stop; 0: stop at the plateau.", lower_bound=0.0)
flags.DEFINE_float("seg_anneal", None, "--anneal of each segmentation network (default "
                   "--anneal).", lower_bound=0.0)
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
flags.DEFINE_float("label_dropout", _UPGRADE.label_dropout, "Probability of zeroing the label input of a "
                   "training sample (anti-shortcut).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_bool("strength_mix", _UPGRADE.strength_mix, "Draw each sample's perturbation rates uniformly "
                  "in [0, rate] (anti-shortcut).")
flags.DEFINE_bool("boundaries", _UPGRADE.boundaries, "u_θ also learns each cell's boundary "
                  "(a third class), and instances are split on its predicted interiors: "
                  "touching cells come apart without LQ instances to seed them.")
flags.DEFINE_float("haze", None, "Largest height of a random smooth background (a ramp or "
                   "a glow, in units of the normalised range) laid over u_θ's training "
                   "images, so a hazy image's background is not upgraded to foreground; 0: "
                   f"none (default {USER_HAZE} in user mode, {_UPGRADE.haze} in simulated runs).",
                   lower_bound=0.0, upper_bound=10.0)
flags.DEFINE_integer("log_every", _TRAIN.log_every, "Steps between progress lines.",
                     lower_bound=1)

# The run.
flags.DEFINE_list("scenarios", list(_PIPE.scenarios), "Segmentation scenarios, a comma list "
                  f"of {', '.join(SCENARIOS)}; empty = upgrade only.")
_scoped((SIMULATED,), flags.DEFINE_bool,
        "threshold_baseline", _PIPE.threshold_baseline, "Score the global-threshold "
        "baseline.")
# The competing methods' options, derived from the registry: one flag per
# field of each method's options Task, --<flag_prefix>_<field>, its default
# the registry's, its help the Task's docstring; only with its scenario.
_DEFINE = {"float": flags.DEFINE_float, "int": flags.DEFINE_integer,
           "bool": flags.DEFINE_bool}


def attribute_docs(cls) -> dict[str, str]:
  """{field: text} of the "Attributes:" section of a class docstring (a
  line "a, b: text" documents both; indented lines continue it)."""
  out, names, in_section = {}, [], False
  for line in (cls.__doc__ or "").splitlines():
    text = line.strip()
    if text == "Attributes:":
      in_section = True
      continue
    if not in_section or not text:
      continue
    head, sep, rest = text.partition(": ")
    if sep and all(n.strip().isidentifier() for n in head.split(",")):
      names = [n.strip() for n in head.split(",")]
      for n in names:
        out[n] = rest
    else:
      for n in names:
        out[n] += " " + text
  return out


def method_flag(entry, field: str) -> str:
  return f"{entry.flag_prefix}_{field}"


for _entry in REGISTRY.values():
  if _entry.options is None:
    continue
  _docs = attribute_docs(type(_entry.options))
  for _field in dataclasses.fields(_entry.options):
    _scoped((SIMULATED, method(_entry.name)), _DEFINE[_field.type],
            method_flag(_entry, _field.name), getattr(_entry.options, _field.name),
            f"--scenarios={_entry.name}: {_docs.get(_field.name, _field.name)}")
_scoped((SIMULATED,), flags.DEFINE_integer,
        "reps", _PIPE.reps, "Repetitions (seeds seed..seed+reps-1).",
        lower_bound=1)
flags.DEFINE_integer("seed", _PIPE.seed, "Base seed.")
_scoped((APPLY,), flags.DEFINE_string,
        "out_dir", None, "Output directory (resumes if it holds a run of the "
        "same config; a different config is refused).")
_scoped((SIMULATED,), flags.DEFINE_bool,
        "fresh", False, "Discard out_dir's own rep*/ folders and upgraded TIFFs "
        "and start over (never the inputs).")
_scoped((SIMULATED,), flags.DEFINE_list,
        "paper", [], "Paper figures for the table, e.g. lq=0.48,upgraded=0.92.")
# User mode.
flags.DEFINE_string("hq_images", "", "User mode: folder of HQ images.")
flags.DEFINE_string("hq_labels", "", "User mode: folder of HQ instance labels.")
flags.DEFINE_string("lq_images", "", "User mode: folder of LQ images.")
flags.DEFINE_string("lq_labels", "", "User mode: folder of LQ labels.")
flags.DEFINE_string("others_labels", "", "User mode: non-target objects of the HQ images.")

# What the upgraded files hold, and how prediction cuts large images.
_scoped((APPLY,), flags.DEFINE_enum,
        "output", _PIPE.output, list(OUTPUTS), "What the upgraded label "
        "files hold: instances (touching cells separate; the LQ label's instances "
        "seed them) or mask (connected components of the upgraded mask).")
_scoped((APPLY,), flags.DEFINE_integer,
        "tile", _TILE.tile, "Prediction: images larger than this run as overlapping "
        "tiles of this side (a multiple of 16; memory grows with tile^2).",
        lower_bound=16)
_scoped((APPLY,), flags.DEFINE_integer,
        "tile_margin", _TILE.margin, "Prediction: context px kept around each tile's "
        "owned part (tiles overlap by 2x this).", lower_bound=0)

_scoped((APPLY,), flags.DEFINE_integer,
        "review_top", _PIPE.review_top, "Overlays in out_dir/review/ for the "
        "first N rows of the review queue (out_dir/review.csv).", lower_bound=0)

flags.mark_flag_as_required("out_dir")

USER_FLAGS = ("hq_images", "hq_labels", "lq_images", "lq_labels")
SYNTHETIC_ONLY = tuple(_SCOPES[SYNTHETIC])
NOT_IN_USER_MODE = tuple(_SCOPES[SIMULATED]) + SYNTHETIC_ONLY
METHOD_FLAGS = {scope.split(":", 1)[1]: tuple(names) for scope, names in _SCOPES.items()
                if scope.startswith("method:")}
APPLY_FLAGS = tuple(_SCOPES[APPLY])


def paper_figures(items) -> dict:
  """--paper's name=value pairs as {name: float}."""
  out = {}
  for item in items:
    k, _, v = item.partition("=")
    out[k.strip()] = float(v)
  return out


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
    paper_figures(v)
    return True
  except ValueError:
    return False


# The single-flag validators, for values a sweep sets without parsing a command line.
VALUE_CHECKS = {"scenarios": _valid_scenarios, "volume_shape": _valid_shape,
                "norm_percentiles": _valid_percentiles,
                "paper": _valid_paper}
