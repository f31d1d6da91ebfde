"""Every shipped flagfile parses and turns into valid configs."""

from pathlib import Path

import pytest
from absl import flags

from experiments import sweep, upgrade  # noqa: F401  (define every flag)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.cfg"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_flagfile_builds_a_config(path):
  F = flags.FLAGS
  F.unparse_flags()
  F(["prog", f"--flagfile={path}"])
  try:
    cfg = upgrade.build_config()
    assert F.out_dir and F.out_dir.startswith("runs/")
    if F.sweep:
      name, values = sweep.parse_sweep(F.sweep)
      assert len(values) >= 2
      for v in values:  # every swept value is valid for its flag
        F[name].parser.parse(v)
    assert cfg.upgrade.task.name == "upgrade" and cfg.segment.task.name == "segment"
  finally:
    F.unparse_flags()


def test_quickstart_is_the_readme_main_job():
  readme = (CONFIGS[0].parents[2] / "README.md").read_text()
  assert "experiments/configs/quickstart.cfg" in readme


# The paper's Table 3.1 HQ sizes (its "Slices" column; issue 10).
PAPER_N_HQ = {"table_3_1_omission_granulocytes": 80, "table_3_1_bias_granulocytes": 40,
              "table_3_1_inclusion_granulocytes": 10, "table_3_1_combined_granulocytes": 10,
              "table_3_1_omission_hl60": 10, "table_3_1_bias_hl60": 10}


@pytest.mark.parametrize("name", sorted(PAPER_N_HQ))
def test_table_3_1_configs_use_the_papers_hq_sizes(name):
  F = flags.FLAGS
  F.unparse_flags()
  F(["prog", f"--flagfile={CONFIGS[0].parent / (name + '.cfg')}"])
  try:
    cfg = upgrade.build_config()
    assert cfg.data.n_hq == PAPER_N_HQ[name]
    assert cfg.data.n_volumes - cfg.data.n_test == 10   # the paper's 10 training volumes
  finally:
    F.unparse_flags()


def test_fig_3_6_keeps_ten_percent_hq():
  F = flags.FLAGS
  F.unparse_flags()
  F(["prog", f"--flagfile={CONFIGS[0].parent / 'fig_3_6_cost.cfg'}", "--n_hq=8"])
  try:
    cfg = upgrade.build_config()
    assert cfg.data.n_hq / (cfg.data.n_hq + cfg.data.n_lq) == pytest.approx(0.1)
  finally:
    F.unparse_flags()
