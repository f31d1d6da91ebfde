"""The HQ-budget advisor: the trend fit and the advice by hand,
and the CLI end to end on a tiny synthetic run."""

import json
import math
from pathlib import Path

import cli
import numpy as np
import pytest
from conftest import XLA_CACHE

from upgrade_jax import advise

ROOT = Path(__file__).resolve().parents[1]


def test_nested_sizes():
  assert advise.nested_sizes(16) == [4, 8, 16]
  assert advise.nested_sizes(5, minimum=2) == [2, 5]   # round(1.25) -> 2 (the minimum)
  with pytest.raises(ValueError, match="at least 2 distinct"):
    advise.nested_sizes(2)


def test_fit_log_trend_recovers_a_and_b():
  ns = np.array([4, 8, 16, 32])
  t = advise.fit_log_trend(ns, 0.7 + 0.05 * np.log(ns))
  assert (t.a, t.b) == pytest.approx((0.7, 0.05))
  with pytest.raises(ValueError, match="distinct"):
    advise.fit_log_trend([4, 4], [0.5, 0.6])


def test_advice_by_hand():
  t = advise.Trend(0.7, 0.05)
  a = advise.advice(t, 16, threshold=0.002)
  assert a["gain_next"] == pytest.approx(0.05 * math.log(17 / 16))
  # 0.05·ln(1 + 1/n) < 0.002 first at n = 25: ln(26/25)·0.05 = 0.00196, ln(25/24)·0.05 = 0.00204.
  assert a["n_stop"] == 25 and "at about 25 pairs" in a["sentence"]
  assert advise.advice(t, 30, 0.002)["sentence"].count("already passed") == 1
  flat = advise.advice(advise.Trend(0.9, -0.01), 16)
  assert flat["n_stop"] is None and "not expected to improve" in flat["sentence"]


def test_advise_cli_on_tiny_synthetic_data(tmp_path):
  out = tmp_path / "advise"
  args = ["--n_volumes=5", "--volume_shape=6,96,96", "--n_test=1", "--n_hq=5", "--max_test=4",
          "--width=4", "--crop=32", "--batch_size=4", "--max_steps=4", "--steps_per_epoch=2",
          "--patience=2", "--fractions=0.5,1.0", f"--compilation_cache={XLA_CACHE}",
          "--predict_n=8", f"--out_dir={out}"]
  proc = cli.run("experiments.advise", args, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  d = json.loads((out / "advice.json").read_text())
  assert [p["n"] for p in d["points"]] == advise.nested_sizes(d["n_train"])
  assert {"val_dice", "test_dice"} <= set(d) and "8" in d["test_dice"]["predicted"]
  assert "HQ label" in proc.stdout + proc.stderr or "trend" in proc.stdout + proc.stderr
  assert (out / "advice.png").stat().st_size > 0
  # Bad inputs: tests/test_contracts.py (advise's cases).
