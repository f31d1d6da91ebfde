"""The README's set-up commands and CI stay in sync."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
  text = (ROOT / "README.md").read_text()
  block = re.search(r"```bash\n(.*?)```", text, re.S)
  assert block, "README.md must open with a bash block of set-up commands"
  return [l.strip() for l in block.group(1).splitlines() if l.strip()]


def test_readme_has_exactly_two_setup_commands():
  cmds = readme_commands()
  assert len(cmds) == 2
  assert "experiments.upgrade" in cmds[0] and "quickstart.cfg" in cmds[0]
  assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
  test_cmd = readme_commands()[1].split("&&")[-1].strip()
  ci = (ROOT / ".ci" / "run").read_text()
  assert test_cmd in ci, f"{test_cmd!r} not in .ci/run"
  assert re.search(r"pip install (-q )?-e '\.\[dev\]'", ci)
