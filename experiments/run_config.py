"""From flags to a PipelineConfig: a read-only view of the flags (or of one sweep
point's values), `build_config`, and the rules on which flags go together.
"""

from __future__ import annotations

from absl import flags

from experiments.run_flags import (METHOD_FLAGS, NOT_IN_USER_MODE, SYNTHETIC_ONLY,
                                   USER_FLAGS, VALUE_CHECKS, method_flag)
from upgrade_jax.engine import TrainConfig, Upgrade
from upgrade_jax.engine.tiling import TileConfig
from upgrade_jax.perturb import PerturbConfig
from upgrade_jax.data.labels import FelzenszwalbConfig
from upgrade_jax.pipeline import REGISTRY, USER_HAZE, DataConfig, PipelineConfig
from upgrade_jax.pipeline.scenarios import METHOD

F = flags.FLAGS


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


def _or(value, default):
  """A seg_* flag's value, or its general flag's where it was not given."""
  return default if value is None else value


def method_options(v: FlagView) -> tuple:
  """The competing methods' options Tasks that the flags change from the
  registry's defaults; a bad combination is one line naming its flags."""
  import dataclasses

  out = []
  for entry in REGISTRY.values():
    if entry.options is None:
      continue
    values = {f.name: getattr(v, method_flag(entry, f.name))
              for f in dataclasses.fields(entry.options)}
    try:
      task = dataclasses.replace(entry.options, **values)
    except ValueError as e:
      given = [f"--{method_flag(entry, k)}={x}" for k, x in values.items()
               if v.present(method_flag(entry, k))]
      raise ValueError(f"{', '.join(given) or entry.name}: {e}") from None
    if task != entry.options:
      out.append(task)
  return tuple(out)


def build_config(v: "FlagView | None" = None) -> PipelineConfig:
  """The flags (or a sweep point's view of them) as frozen configs; the
  library never sees a flag."""
  from upgrade_jax.engine import Segment

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
                patience_growth=v.patience_growth, anneal=v.anneal)
  upgrade = TrainConfig(task=Upgrade(perturb=train_p, label_dropout=v.label_dropout,
                                     strength_mix=v.strength_mix, boundaries=v.boundaries,
                                     haze=_or(v.haze, USER_HAZE if v.hq_images else
                                              Upgrade().haze)),
                        max_steps=v.max_steps, **common)
  segment = TrainConfig(task=Segment(), max_steps=v.seg_max_steps or v.max_steps,
                        **{**common, "patience": v.seg_patience or v.patience,
                           "lr_drops": _or(v.seg_lr_drops, v.lr_drops),
                           "patience_growth": _or(v.seg_patience_growth,
                                                  v.patience_growth),
                           "anneal": _or(v.seg_anneal, v.anneal)})
  data = DataConfig(source=v.data, preset=v.preset, data_dir=v.data_dir,
                    n_volumes=v.n_volumes, volume_shape=tuple(int(s) for s in v.volume_shape),
                    sim_size=v.sim_size,
                    n_test=v.n_test, n_hq=v.n_hq, hq_volumes=v.hq_volumes, n_lq=n_lq,
                    max_test=v.max_test,
                    others=v.others, data_seed=v.data_seed, normalisation=v.normalisation,
                    percentiles=tuple(float(p) for p in v.norm_percentiles),
                    compact_images=v.compact_images,
                    hq_perturb=hq_p, z_consistent=v.z_consistent, train_tile=v.train_tile,
                    felzenszwalb=FelzenszwalbConfig(scale=v.felzenszwalb_scale,
                                                    sigma=v.felzenszwalb_sigma,
                                                    min_size=v.felzenszwalb_min_size))
  return PipelineConfig(data=data, upgrade=upgrade, segment=segment, lq_perturb=lq_p,
                        scenarios=tuple(v.scenarios), threshold_baseline=v.threshold_baseline,
                        reps=v.reps, seed=v.seed, lq_source=v.lq_source,
                        predictor_hq=v.predictor_hq, output=v.output,
                        tiling=TileConfig(tile=v.tile, margin=v.tile_margin),
                        review_top=v.review_top, seg_val_extra=v.seg_val_extra,
                        options=method_options(v))


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
    other = [s for s in v.scenarios if s != METHOD] if given("scenarios") else []
    if other:
      raise InputError(f"--scenarios={','.join(v.scenarios)}: user mode trains only "
                       f"{METHOD} (it has no test set); use --scenarios={METHOD} or none")
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
