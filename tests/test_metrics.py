"""Statistics over repetitions: ddof, the paired difference, the
smallest Wilcoxon p a small n can reach. Oracles are hand computations."""

import math

import numpy as np
import pytest

from upgrade_jax import metrics


def test_summarize_uses_the_sample_std():
  s = metrics.summarize([1.0, 2.0, 4.0])
  # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9; / (n - 1) = 7/3.
  assert s["mean"] == pytest.approx(7 / 3)
  assert s["std"] == pytest.approx(math.sqrt(7 / 3))
  assert metrics.summarize([0.5])["std"] is None  # one rep measures no spread


def test_min_wilcoxon_p_matches_the_exact_test():
  assert metrics.min_wilcoxon_p(3) == 0.25 and metrics.min_wilcoxon_p(5) == 0.0625
  for n in (3, 5, 6):
    a = np.arange(1, n + 1) + 10.0          # every difference positive, distinct
    assert metrics.wilcoxon(a, a - np.arange(1, n + 1)) == pytest.approx(
        metrics.min_wilcoxon_p(n))


def test_paired_difference_t_interval_and_signs():
  a = [0.90, 0.85, 0.88, 0.80]
  b = [0.85, 0.86, 0.80, 0.80]
  d = metrics.paired_difference(a, b)
  diffs = [0.05, -0.01, 0.08, 0.0]
  mean = sum(diffs) / 4
  sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 3)
  t = 3.182446305284263   # Student t, 0.975 quantile, 3 degrees of freedom (table)
  assert d["mean_diff"] == pytest.approx(mean)
  assert d["ci_low"] == pytest.approx(mean - t * sd / 2)
  assert d["ci_high"] == pytest.approx(mean + t * sd / 2)
  assert (d["wins"], d["losses"], d["ties"], d["n"]) == (2, 1, 1, 4)
  assert d["min_possible_p"] == 0.125
  one = metrics.paired_difference([0.9], [0.8])
  assert one["ci_low"] is None and one["mean_diff"] == pytest.approx(0.1)


def test_gap_recovered_by_hand():
  # hq 0.80 -> oracle 0.90; a scenario at 0.85 recovers half, 0.78 loses 20%.
  g = metrics.gap_recovered([0.85, 0.78, 0.9], [0.8, 0.8, 0.9], [0.9, 0.9, 0.9])
  assert g["per_rep"][0] == pytest.approx(0.5)
  assert g["per_rep"][1] == pytest.approx(-0.2)
  assert g["per_rep"][2] is None  # oracle == hq: no gap to recover
  # Of the means: (0.8433 - 0.8333) / (0.9 - 0.8333) = 0.15.
  assert g["of_means"] == pytest.approx((2.53 - 2.5) / (2.7 - 2.5))
  with pytest.raises(ValueError, match="shape"):
    metrics.gap_recovered([0.1], [0.1, 0.2], [0.3])


def test_gap_recovered_ignores_a_gap_below_min_gap():
  g = metrics.gap_recovered([0.886], [0.8757], [0.8766], min_gap=0.01)
  assert g["of_means"] is None and g["per_rep"] == [None]   # not +1103%
  assert g["gap"] == pytest.approx(0.0009)


def test_oracle_check_marks_rows_whose_ceiling_is_below_the_floor():
  from upgrade_jax.metrics import NOISE_FLOOR, oracle_check
  # Consistently below HQ only, by far more than the interval: unconverged.
  low = oracle_check([0.70, 0.71, 0.69], [0.80, 0.82, 0.79])
  assert low["unconverged"] and low["mean_diff"] == pytest.approx(-0.1033, abs=1e-4)
  assert low["noise"] == pytest.approx(low["ci_high"] - low["mean_diff"])
  # Below on the mean but within the (wide) paired interval: not marked.
  noisy = oracle_check([0.70, 0.90, 0.80], [0.85, 0.80, 0.78])
  assert noisy["mean_diff"] < 0 and not noisy["unconverged"]
  assert noisy["ci_low"] < 0 < noisy["ci_high"]
  # Above HQ only: fine.
  assert not oracle_check([0.90, 0.91], [0.80, 0.82])["unconverged"]
  # One repetition has no interval: the noise floor decides.
  assert oracle_check([0.80], [0.80 + NOISE_FLOOR / 2])["unconverged"] is False
  one = oracle_check([0.647], [0.659])   # the quickstart's seed 3
  assert one["noise"] == NOISE_FLOOR and one["unconverged"]
  # A tiny interval never makes the noise smaller than the floor.
  tight = oracle_check([0.795, 0.795, 0.795], [0.80, 0.80, 0.80])
  assert tight["noise"] == NOISE_FLOOR and not tight["unconverged"]


def test_resolves_reads_the_interval_half_width():
  from upgrade_jax.metrics import paired_difference, resolves
  tight = paired_difference([0.80, 0.81, 0.82, 0.80, 0.81], [0.78, 0.79, 0.80, 0.77, 0.79])
  wide = paired_difference([0.60, 0.90, 0.70], [0.80, 0.70, 0.75])
  assert resolves(tight) and not resolves(wide)
  assert not resolves(paired_difference([0.8], [0.7]))   # no interval from one pair
  half = (tight["ci_high"] - tight["ci_low"]) / 2
  assert resolves(tight, half + 1e-9) and not resolves(tight, half - 1e-9)
