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

F = flags.FLAGS

# Data.
flags.DEFINE_enum("data", "synthetic", ["synthetic", "epfl_mito", "folder", "stack"],
                  "Data source.")
flags.DEFINE_string("preset", "hl60", "Synthetic preset: hl60, granulocytes, combined_hl60, "
                    "combined_granulocytes.")
flags.DEFINE_string("data_dir", "", "Root folder of real data (epfl_mito, folder, stack).")
flags.DEFINE_integer("n_volumes", 10, "Synthetic volumes to simulate.", lower_bound=2)
flags.DEFINE_list("volume_shape", ["32", "256", "256"], "Synthetic volume shape Z,H,W.")
flags.DEFINE_enum("sim_size", "default", ["default", "paper"], "Synthetic pixel scale "
                  "('paper': the paper's pixel size, cells 1.5x larger in pixels).")
flags.DEFINE_integer("n_test", 2, "Volumes (synthetic) or images (folder) held out for test.",
                     lower_bound=1)
flags.DEFINE_integer("n_hq", 10, "High-quality slices (the paper's selection rule).",
                     lower_bound=2)
flags.DEFINE_integer("n_lq", None, "LQ slices drawn from the rest (default: all).",
                     lower_bound=0)
flags.DEFINE_integer("max_test", None, "Cap on test slices (evenly spaced).", lower_bound=1)
flags.DEFINE_enum("others", "labels", ["labels", "felzenszwalb", "none"],
                  "What inclusion draws from: the other cell type's labels, "
                  "Felzenszwalb segments, or nothing.")
flags.DEFINE_integer("data_seed", 0, "Seed of the simulator and of the test hold-out.")
flags.DEFINE_enum("normalisation", "max", ["max", "percentile"], "Per-image normalisation.")

# The perturbation u_θ trains with, and the one that makes the LQ set.
flags.DEFINE_float("omission_rate", 0.7, "Fraction of target cells omitted.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("inclusion_rate", 0.0, "Fraction of non-target objects included.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("bias_max", 0, "q_max of the dilate/erode bias (0 = off).", lower_bound=0)
flags.DEFINE_float("salt_pepper_prob", 0.0, "Salt-and-pepper probability.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_bool("per_instance_bias", False, "Bias each cell on its own.")
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
flags.DEFINE_float("hq_omission_rate", 0.0, "Imperfect HQ (Figure 3.5): omission in the "
                   "HQ labels themselves.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("hq_bias_max", 0, "Imperfect HQ: bias q_max in the HQ labels.",
                     lower_bound=0)
flags.DEFINE_enum("lq_source", "perturb", ["perturb", "predictions"],
                  "LQ labels: perturbed ground truth, or the predictions of a segmentation "
                  "network trained on --predictor_hq HQ slices (the case study, §3.3.4).")
flags.DEFINE_integer("predictor_hq", 10, "HQ slices of the LQ predictor (--lq_source="
                     "predictions).", lower_bound=1)
flags.DEFINE_integer("cost_budget", None, "Annotation budget in LQ-label units (Figure 3.6): "
                     "sets --n_lq = budget - hq_cost * n_hq.", lower_bound=1)
flags.DEFINE_float("hq_cost", 5.0, "Cost of one HQ label in LQ-label units.", lower_bound=0.0)
flags.DEFINE_float("felzenszwalb_scale", 300.0, "Felzenszwalb scale (--others=felzenszwalb); "
                   "segments are kept if sized like the targets.", lower_bound=0.0)
flags.DEFINE_float("felzenszwalb_sigma", 1.0, "Felzenszwalb Gaussian sigma.", lower_bound=0.0)
flags.DEFINE_integer("felzenszwalb_min_size", 100, "Felzenszwalb min_size (pixels).",
                     lower_bound=1)

# Training.
flags.DEFINE_integer("width", 16, "UNet base width: widths w,2w,4w,8w,8w (paper: 64).",
                     lower_bound=1)
flags.DEFINE_string("conv_impl", "xla", "Convolution implementation (models/conv.py).")
flags.DEFINE_integer("crop", 128, "Square training crop side.", lower_bound=16)
flags.DEFINE_integer("batch_size", 8, "Global batch size.", lower_bound=1)
flags.DEFINE_float("lr", 1e-3, "Adam learning rate.", lower_bound=0.0)
flags.DEFINE_integer("max_steps", 400, "Max train steps of the upgrade network.", lower_bound=1)
flags.DEFINE_integer("seg_max_steps", None, "Max train steps of each segmentation network "
                     "(default --max_steps).", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", 50, "Steps between validations.", lower_bound=1)
flags.DEFINE_integer("patience", 10, "Early-stopping patience in epochs.", lower_bound=1)
flags.DEFINE_float("label_dropout", 0.0, "Probability of zeroing the label input of a "
                   "training sample (anti-shortcut).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_bool("strength_mix", False, "Draw each sample's perturbation rates uniformly "
                  "in [0, rate] (anti-shortcut).")
flags.DEFINE_integer("log_every", 50, "Steps between progress lines.", lower_bound=1)

# The run.
flags.DEFINE_list("scenarios", ["hq", "lq", "hq_lq", "hq_upgraded"],
                  "Segmentation scenarios; empty = upgrade only.")
flags.DEFINE_bool("threshold_baseline", True, "Score the global-threshold baseline.")
flags.DEFINE_integer("reps", 1, "Repetitions (seeds seed..seed+reps-1).", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Base seed.")
flags.DEFINE_string("out_dir", None, "Output directory (resumes if it holds a run).")
flags.DEFINE_list("paper", [], "Paper figures for the table, e.g. lq=0.48,upgraded=0.92.")
flags.DEFINE_string("compilation_cache", str(Path.home() / ".cache" / "upgrade_jax" / "xla"),
                    "Persistent XLA compilation cache directory ('' = off): reruns, resumes "
                    "and sweep points skip most compilation.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_bool("debug", False, "Show the Python traceback of input errors too "
                  "(they are one line on stderr otherwise).")

# User mode.
flags.DEFINE_string("hq_images", "", "User mode: folder of HQ images.")
flags.DEFINE_string("hq_labels", "", "User mode: folder of HQ instance labels.")
flags.DEFINE_string("lq_images", "", "User mode: folder of LQ images.")
flags.DEFINE_string("lq_labels", "", "User mode: folder of LQ labels.")
flags.DEFINE_string("others_labels", "", "User mode: non-target objects of the HQ images.")

# Issue 13: the saved upgrader, tiled prediction, instance labels out.
flags.DEFINE_enum("output", "instances", ["instances", "mask"], "What the upgraded label "
                  "files hold: instances (touching cells separate; the LQ label's instances "
                  "seed them) or mask (connected components of the upgraded mask).")
flags.DEFINE_integer("tile", 1024, "Prediction: images larger than this run as overlapping "
                     "tiles of this side (a multiple of 16; memory grows with tile^2).",
                     lower_bound=16)
flags.DEFINE_integer("tile_margin", 64, "Prediction: context px kept around each tile's "
                     "owned part (tiles overlap by 2x this).", lower_bound=0)

flags.mark_flag_as_required("out_dir")

USER_FLAGS = ("hq_images", "hq_labels", "lq_images", "lq_labels")
SCENARIO_NAMES = ("hq", "lq", "hq_lq", "hq_upgraded")
# Flags that describe simulated LQ labels, splits of one data source or the
# report of repetitions: user mode has real LQ labels and uses every HQ pair,
# so giving one of them there is an error, not a silent no-op.
NOT_IN_USER_MODE = (
    "data", "preset", "data_dir", "n_volumes", "volume_shape", "sim_size", "n_test", "n_hq",
    "n_lq", "max_test", "data_seed", "lq_omission_rate", "lq_inclusion_rate", "lq_bias_max",
    "lq_salt_pepper_prob", "lq_per_instance_bias", "hq_omission_rate", "hq_bias_max",
    "lq_source", "predictor_hq", "cost_budget", "hq_cost", "reps", "paper",
    "threshold_baseline")
SYNTHETIC_ONLY = ("preset", "n_volumes", "volume_shape", "sim_size")


@flags.multi_flags_validator(list(USER_FLAGS), message="user mode needs all of --hq_images, "
                             "--hq_labels, --lq_images and --lq_labels")
def _user_flags_together(d):
  given = [bool(d[k]) for k in USER_FLAGS]
  return all(given) or not any(given)


@flags.validator("scenarios", message=f"--scenarios must be a comma list of {SCENARIO_NAMES}")
def _valid_scenarios(v):
  return all(s in SCENARIO_NAMES for s in v)


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


def _paper(items) -> dict:
  out = {}
  for item in items:
    k, _, v = item.partition("=")
    out[k.strip()] = float(v)
  return out


def _log(msg: str) -> None:
  print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def build_config():
  """The flags as frozen configs (the library never sees a flag)."""
  from upgrade_jax.perturb import PerturbConfig
  from upgrade_jax.pipeline import DataConfig, PipelineConfig
  from upgrade_jax.engine import Segment, TrainConfig, Upgrade
  from upgrade_jax.engine.tiling import TileConfig

  train_p = PerturbConfig(omission_rate=F.omission_rate, inclusion_rate=F.inclusion_rate,
                          bias_max=F.bias_max, per_instance_bias=F.per_instance_bias,
                          salt_pepper_prob=F.salt_pepper_prob)

  def lq(name):
    v = getattr(F, f"lq_{name}")
    return getattr(train_p, name) if v is None else v

  lq_p = PerturbConfig(omission_rate=lq("omission_rate"), inclusion_rate=lq("inclusion_rate"),
                       bias_max=lq("bias_max"), per_instance_bias=lq("per_instance_bias"),
                       salt_pepper_prob=lq("salt_pepper_prob"))
  hq_p = PerturbConfig(omission_rate=F.hq_omission_rate, bias_max=F.hq_bias_max)
  n_lq = F.n_lq
  if F.cost_budget is not None:
    n_lq = int(F.cost_budget - F.hq_cost * F.n_hq)
    if n_lq < 0:
      raise ValueError(f"--cost_budget={F.cost_budget} is below the cost of --n_hq={F.n_hq} "
                       f"HQ labels at --hq_cost={F.hq_cost}")
  w = F.width
  common = dict(widths=(w, 2 * w, 4 * w, 8 * w, 8 * w), conv_impl=F.conv_impl, crop=F.crop,
                batch_size=F.batch_size, lr=F.lr, steps_per_epoch=F.steps_per_epoch,
                patience=F.patience, log_every=F.log_every)
  upgrade = TrainConfig(task=Upgrade(perturb=train_p, label_dropout=F.label_dropout,
                                     strength_mix=F.strength_mix),
                        max_steps=F.max_steps, **common)
  segment = TrainConfig(task=Segment(), max_steps=F.seg_max_steps or F.max_steps, **common)
  data = DataConfig(source=F.data, preset=F.preset, data_dir=F.data_dir,
                    n_volumes=F.n_volumes, volume_shape=tuple(int(s) for s in F.volume_shape),
                    sim_size=F.sim_size,
                    n_test=F.n_test, n_hq=F.n_hq, n_lq=n_lq, max_test=F.max_test,
                    others=F.others, data_seed=F.data_seed, normalisation=F.normalisation,
                    hq_perturb=hq_p)
  return PipelineConfig(data=data, upgrade=upgrade, segment=segment, lq_perturb=lq_p,
                        scenarios=tuple(F.scenarios), threshold_baseline=F.threshold_baseline,
                        reps=F.reps, seed=F.seed, lq_source=F.lq_source,
                        predictor_hq=F.predictor_hq, output=F.output,  # issue 13
                        tiling=TileConfig(tile=F.tile, margin=F.tile_margin))


def setup_runtime() -> None:
  """Process-wide settings from flags: log level, compilation cache, hosts."""
  if not F["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    # tifffile warns about a corrupt file before raising; the one-line error
    # that follows names the file, so the warning would only be a second line.
    import logging as py_logging
    py_logging.getLogger("tifffile").setLevel(py_logging.ERROR)
  import jax
  if F.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", F.compilation_cache)
  from upgrade_jax import parallel
  parallel.maybe_initialize_distributed(F.distributed)


def check_flag_combination() -> None:
  """Refuses flags that would be silently ignored in this mode (one line)."""
  from upgrade_jax.rundir import InputError

  given = lambda name: F[name].present  # noqa: E731  (set on the command line or a flagfile)
  if F.hq_images:
    ignored = [f"--{n}" for n in NOT_IN_USER_MODE if given(n)]
    if ignored:
      raise InputError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply "
                       "in user mode (--hq_images ...): "
                       "every HQ pair is used and the LQ labels are yours; remove them")
    other = [s for s in F.scenarios if s != "hq_upgraded"] if given("scenarios") else []
    if other:
      raise InputError(f"--scenarios={','.join(F.scenarios)}: user mode trains only "
                       "hq_upgraded (it has no test set); use --scenarios=hq_upgraded or none")
    return
  if given("others_labels"):
    raise InputError("--others_labels applies only in user mode (with --hq_images ...); "
                     "for --data=folder put the files in DATA_DIR/others/")
  if F.data == "synthetic" and given("data_dir"):
    raise InputError("--data_dir does not apply to --data=synthetic; remove it or set --data")
  if F.data != "synthetic":
    ignored = [f"--{n}" for n in SYNTHETIC_ONLY if given(n)]
    if ignored:
      raise InputError(f"{', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} "
                       "only to --data=synthetic, not "
                       f"--data={F.data}; remove them")
  if given("predictor_hq") and F.lq_source != "predictions":
    raise InputError("--predictor_hq applies only with --lq_source=predictions")
  if given("hq_cost") and F.cost_budget is None:
    raise InputError("--hq_cost applies only with --cost_budget")


@dataclasses.dataclass
class Plan:
  """A run checked from the flags, before anything is written."""
  cfg: object
  out_dir: Path
  felz: dict
  prepared: object
  user: object = None


def plan_from_flags(out_dir: Path) -> Plan:
  """Builds the configs from the flags and loads and checks every input and
  the out_dir. Creates nothing; every problem raises InputError/ValueError/
  OSError with a message naming the culprit."""
  from upgrade_jax import pipeline

  check_flag_combination()
  cfg = build_config()
  felz = {"scale": F.felzenszwalb_scale, "sigma": F.felzenszwalb_sigma,
          "min_size": F.felzenszwalb_min_size}
  if F.hq_images:
    if not F["scenarios"].present:  # user mode: upgrade only unless asked
      cfg = dataclasses.replace(cfg, scenarios=())
    user = pipeline.UserData(F.hq_images, F.hq_labels, F.lq_images, F.lq_labels,
                             F.others_labels)
    return Plan(cfg, out_dir, felz, pipeline.prepare_user(cfg, user, out_dir, felz=felz), user)
  return Plan(cfg, out_dir, felz, pipeline.prepare_run(cfg, out_dir, log=_log, felz=felz))


def execute(plan: Plan) -> dict | None:
  """Runs a checked plan; returns the results.json dict (None in user mode,
  whose results.json holds the upgraded file list)."""
  from upgrade_jax import pipeline, report

  t0 = time.perf_counter()
  out_dir = plan.out_dir
  if plan.user is not None:
    pipeline.run_user(plan.cfg, plan.user, out_dir, log=_log, felz=plan.felz,
                      prepared=plan.prepared)
    _log(f"done in {time.perf_counter() - t0:.0f}s; upgraded labels in {out_dir / 'upgraded'}")
    return None
  results = pipeline.run(plan.cfg, out_dir, log=_log, felz=plan.felz, prepared=plan.prepared)
  paper = _paper(F.paper)
  d = report.write_results(out_dir, results, extra={"paper": paper,
                                                    "command": " ".join(sys.argv)})
  figures = report.write_figures(out_dir, d, paper or None)
  print()
  print(report.format_table(d, paper or None))
  print()
  _log(f"done in {time.perf_counter() - t0:.0f}s; results in {out_dir / 'results.json'}, "
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
