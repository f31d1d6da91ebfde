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
    assert cfg.upgrade.task.name == "upgrade" and cfg.output == "instances"
  finally:
    F.unparse_flags()


def test_quickstart_is_the_readme_main_job():
  readme = (CONFIGS[0].parents[2] / "README.md").read_text()
  assert "experiments/configs/quickstart.cfg" in readme
