"""Every shipped flagfile parses and turns into valid configs."""

import contextlib
from pathlib import Path

import pytest
from absl import flags

from experiments import run_config, run_flags, sweep  # noqa: F401  (define every flag)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.cfg"))
# Overlays, only meaningful after another flagfile (tested with their base below).
OVERLAYS = ("cpu_scale", "paper_scale")
RUNS = [p for p in CONFIGS if p.stem not in OVERLAYS]


@contextlib.contextmanager
def parsed(*args):
  """The global FLAGS parsed from `args` for the block, and reset after it."""
  F = flags.FLAGS
  F.unparse_flags()
  F(["prog", *args])
  try:
    yield F
  finally:
    F.unparse_flags()


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_flagfile_builds_a_config(path):
  with parsed(f"--flagfile={path}") as F:
    run_config.check_flag_combination(run_config.FlagView())  # no flag the mode would ignore
    cfg = run_config.build_config()
    assert F.out_dir and F.out_dir.startswith("runs/")
    if F.sweep:
      name, values = sweep.parse_sweep(F.sweep)
      assert len(values) >= 2
      for v in values:  # every swept value is valid for its flag
        F[name].parser.parse(v)
    assert cfg.upgrade.task.name == "upgrade" and cfg.segment.task.name == "segment"
    assert cfg.output == "instances"


ROWS = [p for p in CONFIGS if p.stem.startswith("table_3_1_")]


def _row_and_overlay(row: Path, overlay: str):
  """(the row's config alone, the row + overlay's, its --reps); the overlay
  must pass the mode rules."""
  with parsed(f"--flagfile={row}"):
    alone = run_config.build_config()
  with parsed(f"--flagfile={row}", f"--flagfile={row.parent / overlay}") as F:
    run_config.check_flag_combination(run_config.FlagView())
    return alone, run_config.build_config(), F.reps


@pytest.mark.parametrize("row", ROWS, ids=lambda p: p.stem)
def test_cpu_scale_overrides_the_scale_and_keeps_the_row(row):
  paper, cpu, reps = _row_and_overlay(row, "cpu_scale.cfg")
  assert reps == 3
  assert cpu.data.volume_shape == (32, 256, 256) and cpu.upgrade.widths[0] == 16
  assert (cpu.data.preset, cpu.data.n_hq, cpu.lq_perturb, cpu.upgrade.task) == (
      paper.data.preset, paper.data.n_hq, paper.lq_perturb, paper.upgrade.task)
  assert "oracle" in cpu.scenarios


@pytest.mark.parametrize("row", ROWS, ids=lambda p: p.stem)
def test_paper_scale_trains_whole_slices_and_keeps_the_row(row):
  alone, cfg, reps = _row_and_overlay(row, "paper_scale.cfg")
  assert reps == 5
  assert cfg.data.volume_shape == (75, 565, 807) and cfg.upgrade.widths == (64, 128, 256, 512, 512)
  for net in (cfg.upgrade, cfg.segment):   # whole slices (the crop is clipped to 576x816)
    assert net.crop >= 816 and net.batch_size == 4
  assert (cfg.data, cfg.lq_perturb, cfg.upgrade.task) == (alone.data, alone.lq_perturb,
                                                          alone.upgrade.task)
  assert "oracle" in cfg.scenarios


def test_quickstart_is_the_readme_main_job():
  readme = (CONFIGS[0].parents[2] / "README.md").read_text()
  assert "experiments/configs/quickstart.cfg" in readme


# The paper's Table 3.1 HQ sizes (its "Slices" column).
PAPER_N_HQ = {"table_3_1_omission_granulocytes": 80, "table_3_1_bias_granulocytes": 40,
              "table_3_1_inclusion_granulocytes": 10, "table_3_1_combined_granulocytes": 10,
              "table_3_1_omission_hl60": 10, "table_3_1_bias_hl60": 10}


@pytest.mark.parametrize("name", sorted(PAPER_N_HQ))
def test_table_3_1_configs_use_the_papers_hq_sizes(name):
  with parsed(f"--flagfile={CONFIGS[0].parent / (name + '.cfg')}"):
    cfg = run_config.build_config()
    assert cfg.data.n_hq == PAPER_N_HQ[name]
    assert cfg.data.n_volumes - cfg.data.n_test == 10   # the paper's 10 training volumes


def test_fig_3_6_keeps_ten_percent_hq():
  with parsed(f"--flagfile={CONFIGS[0].parent / 'fig_3_6_cost.cfg'}", "--n_hq=8"):
    cfg = run_config.build_config()
    assert cfg.data.n_hq / (cfg.data.n_hq + cfg.data.n_lq) == pytest.approx(0.1)


def test_sweep_points_read_views_and_leave_the_flags_alone():
  with parsed("--out_dir=runs/x", "--n_hq=10", "--others=felzenszwalb",
              "--felzenszwalb_min_size=500") as F:
    view = run_config.FlagView().with_value("n_hq", "5")
    assert view.n_hq == 5 and F.n_hq == 10 and view.present("n_hq")
    cfg = run_config.build_config(view)
    assert cfg.data.n_hq == 5 and run_config.build_config().data.n_hq == 10
    # The Felzenszwalb settings are part of the data config (and so of results.json).
    assert cfg.data.felzenszwalb.min_size == 500
    with pytest.raises(ValueError):
      run_config.FlagView().with_value("scenarios", "hq,bogus")
    with pytest.raises(ValueError):
      run_config.FlagView().with_value("n_hq", "1")  # below the flag's lower bound


def test_cli_defaults_come_from_the_library_configs():
  from upgrade_jax.engine import TrainConfig
  from upgrade_jax.pipeline import DataConfig, PipelineConfig
  with parsed("--out_dir=runs/x"):
    cfg = run_config.build_config()
  lib = PipelineConfig()
  for f in ("n_volumes", "volume_shape", "n_test", "n_hq", "others", "data_seed",
            "normalisation", "felzenszwalb", "hq_perturb", "source", "preset"):
    assert getattr(cfg.data, f) == getattr(DataConfig(), f), f
  assert cfg.lq_perturb == lib.lq_perturb
  # One default P: the library trains u_θ with the LQ set's perturbation, as the CLI does.
  assert cfg.upgrade.task.perturb == lib.upgrade.task.perturb == lib.lq_perturb
  for f in ("widths", "crop", "batch_size", "lr", "patience", "log_every", "conv_impl"):
    assert getattr(cfg.upgrade, f) == getattr(TrainConfig(), f), f
  # The CLI's own, on purpose: CPU-sized training.
  assert cfg.upgrade.max_steps == run_flags.CLI_DEFAULTS["max_steps"]
  assert cfg.upgrade.steps_per_epoch == run_flags.CLI_DEFAULTS["steps_per_epoch"]
  assert (cfg.scenarios, cfg.reps, cfg.seed) == (lib.scenarios, lib.reps, lib.seed)
  # The whole tree: no flag is missing from build_config, none restates a
  # default of its own. Without flags the CLI runs the library's config and
  # its one preset.
  import dataclasses
  cli = run_flags.CLI_DEFAULTS
  assert cfg == dataclasses.replace(lib, upgrade=dataclasses.replace(lib.upgrade, **cli),
                                    segment=dataclasses.replace(lib.segment, **cli))


def test_every_entry_point_imports_in_one_process():
  # Flags are global: two entry points defining the same flag name would make
  # the second import fail (DuplicateFlagError) in tests and notebooks.
  import importlib
  for m in ("upgrade", "sweep", "apply", "reproduce", "advise", "export"):
    importlib.import_module(f"experiments.{m}")


def test_quickstart_is_the_inclusion_granulocytes_row_at_cpu_scale():
  # The reproduction's inclusion_granulocytes entry then holds the quickstart's own seeds.
  from upgrade_jax.pipeline import run_key
  with parsed(f"--flagfile={CONFIGS[0].parent / 'quickstart.cfg'}"):
    quick = run_config.build_config()
  row = CONFIGS[0].parent / "table_3_1_inclusion_granulocytes.cfg"
  with parsed(f"--flagfile={row}", f"--flagfile={row.parent / 'cpu_scale.cfg'}"):
    cpu = run_config.build_config()
  assert run_key(quick) == run_key(cpu)
  # The row's scenarios but LQ only and HQ + LQ (left out for time), in the row's order.
  assert quick.scenarios == tuple(s for s in cpu.scenarios if s not in ("lq", "hq_lq"))
  assert quick.reps == 1 and quick.threshold_baseline


def test_method_flags_reach_the_configs_and_their_defaults_leave_the_run_key_alone():
  from upgrade_jax.pipeline.config import run_key

  with parsed("--out_dir=runs/x") as F:
    base = run_config.build_config()
  with parsed("--out_dir=runs/x", "--scenarios=hq,confident_learning,partial_labelling",
              "--cl_confidence=0.9", "--cl_folds=3", "--pl_gamma=0.8",
              "--pl_pseudo_weight=0.2", "--pl_separation_weight=0.05",
              "--pl_ramp_start=10", "--pl_ramp_end=20") as F:
    run_config.check_flag_combination(run_config.FlagView())
    cfg = run_config.build_config()
  cl = cfg.options_of("confident_learning")
  assert (cl.confidence, cl.folds) == (0.9, 3)
  pl = cfg.options_of("partial_labelling")
  assert (pl.gamma, pl.pseudo_weight, pl.separation_weight, pl.ramp_start, pl.ramp_end) == (
      0.8, 0.2, 0.05, 10, 20)
  assert base.options == ()  # the registry's defaults
  assert "confident_learning" not in run_key(base)
  key = run_key(cfg)
  assert key["confident_learning"]["confidence"] == 0.9 and key["partial_labelling"]["gamma"] == 0.8


def test_sweep_points_over_lq_flags_build_different_lq_sets():
  # Regression: build_config read the global F.lq_*, not the point's
  # view, so a --sweep=lq_omission_rate=... ran every point on the same LQ set.
  from upgrade_jax.pipeline import data as pipeline_data
  with parsed("--out_dir=runs/x", "--n_volumes=3", "--n_test=1", "--volume_shape=6,96,96",
              "--n_hq=2", "--omission_rate=0.5", "--inclusion_rate=0.0"):
    name, values = sweep.parse_sweep("lq_omission_rate=0.0,0.8")
    cfgs = [run_config.build_config(run_config.FlagView().with_value(name, v)) for v in values]
    plain = run_config.build_config()
  assert [c.lq_perturb.omission_rate for c in cfgs] == [0.0, 0.8]
  assert plain.lq_perturb.omission_rate == 0.5   # unset lq_*: the training perturbation's
  assert all(c.upgrade.task.perturb.omission_rate == 0.5 for c in cfgs)
  volumes = pipeline_data.load_volumes(cfgs[0].data)
  lq = [pipeline_data.prepare_rep(c, volumes, seed=0).lq_masks.targets > 0 for c in cfgs]
  # More omission leaves less foreground in the same slices.
  assert lq[0].sum() > lq[1].sum()


def test_lr_drop_flags_reach_the_networks_they_name():
  from upgrade_jax.pipeline.config import run_key
  with parsed("--out_dir=runs/x", "--seg_lr_drops=1", "--seg_patience_growth=0.5"):
    cfg = run_config.build_config()
    assert (cfg.segment.lr_drops, cfg.segment.patience_growth) == (1, 0.5)
    assert (cfg.upgrade.lr_drops, cfg.upgrade.patience_growth) == (0, 0.0)
    key = run_key(cfg)
    assert key["segment"]["lr_drops"] == 1 and key["upgrade"]["lr_drops"] == 0
  with parsed("--out_dir=runs/x", "--lr_drops=2", "--lr_drop_factor=0.5"):
    cfg = run_config.build_config()
    assert cfg.segment.lr_drops == cfg.upgrade.lr_drops == 2
    assert cfg.segment.lr_drop_factor == cfg.upgrade.lr_drop_factor == 0.5
  with parsed("--out_dir=runs/x", "--lr_drops=2", "--seg_lr_drops=0"):
    assert run_config.build_config().segment.lr_drops == 0
  # anneal joined the key after runs were recorded: absent at its default.
  with parsed("--out_dir=runs/x", "--seg_anneal=0.5"):
    cfg = run_config.build_config()
    key = run_key(cfg)
    assert (cfg.segment.anneal, cfg.upgrade.anneal) == (0.5, 0.0)
    assert key["segment"]["anneal"] == 0.5 and "anneal" not in key["upgrade"]


def test_haze_defaults_on_in_user_mode_only():
  from upgrade_jax.pipeline import USER_HAZE
  user = [f"--{f}=/tmp/x{i}" for i, f in enumerate(run_flags.USER_FLAGS)]
  with parsed("--out_dir=runs/x"):
    assert run_config.build_config().upgrade.task.haze == 0.0   # the paper's protocol
  with parsed("--out_dir=runs/x", *user):
    assert run_config.build_config().upgrade.task.haze == USER_HAZE > 0
  with parsed("--out_dir=runs/x", *user, "--haze=0"):
    assert run_config.build_config().upgrade.task.haze == 0.0
  with parsed("--out_dir=runs/x", "--haze=0.5"):
    assert run_config.build_config().upgrade.task.haze == 0.5


def test_method_flags_are_derived_from_the_registry():
  """One flag per field of each method's options, defaulting to the registry's
  value, with that field's docstring; a bad value names its flag."""
  import dataclasses

  from upgrade_jax.pipeline import REGISTRY

  F = flags.FLAGS
  derived = set()
  for entry in REGISTRY.values():
    if entry.options is None:
      continue
    for field in dataclasses.fields(entry.options):
      name = f"{entry.flag_prefix}_{field.name}"
      derived.add(name)
      assert F[name].default == getattr(entry.options, field.name)
    assert set(run_flags.METHOD_FLAGS[entry.name]) == {
        f"{entry.flag_prefix}_{f.name}" for f in dataclasses.fields(entry.options)}
  assert {"cl_confidence", "cl_folds", "pl_gamma", "pl_ramp_end"} <= derived
  assert "cosine-similarity threshold" in F["pl_gamma"].help
  with parsed("--out_dir=runs/x", "--cl_confidence=0.3"):
    with pytest.raises(ValueError, match="--cl_confidence=0.3: ConfidentLearning.confidence"):
      run_config.build_config()


def test_attribute_docs_reads_shared_and_continued_lines():
  class Doc:
    """Title.

    Attributes:
      a: first line
        continued.
      b, c: shared.
    """

  assert run_flags.attribute_docs(Doc) == {"a": "first line continued.", "b": "shared.",
                                           "c": "shared."}


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_flagfiles_hold_only_what_differs_from_the_defaults(path):
  lines = [l.strip() for l in path.read_text().splitlines() if l.startswith("--")]
  restated = []
  for line in lines:
    name = line[2:].split("=", 1)[0]
    name = name[2:] if name.startswith("no") and name not in flags.FLAGS else name
    with parsed("--out_dir=runs/x", line) as F:
      if name not in ("out_dir", "flagfile") and F[name].value == F[name].default:
        restated.append(line)
  assert not restated, f"{path.name} restates defaults: {restated}"
