"""benchmarks/paper_scale.py --smoke on CPU: one JSON line per measure and a
summary, every field present and sane (the GPU run is the same code at the
paper's scale)."""

import json

import cli
import pytest

from benchmarks import paper_scale


@pytest.fixture(scope="module")
def smoke():
  proc = cli.run("benchmarks.paper_scale", ["--smoke", "--budget_s=200"], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  return {(d.get("measure", "summary"), d.get("network", d.get("side"))): d for d in lines}


def test_every_measure_is_there_and_measured(smoke):
  side = paper_scale.SMOKE["predict_sides"]
  torch = {("torch_step", "segment"), ("torch_step", "upgrade")}   # with PyTorch installed
  assert set(smoke) - torch == {("train_step", "segment"), ("train_step", "upgrade"),
                                ("perturbation", None), ("predict", side[0]),
                                ("predict", side[1]), ("projection", None), ("summary", None)}
  assert torch <= set(smoke) or not torch & set(smoke)
  s = smoke[("summary", None)]
  assert s["smoke"] and s["within_budget"] and s["elapsed_s"] < s["budget_s"]
  assert s["platform"] == "cpu" and s["slice"] == [64, 96] and s["width"] == 4
  # With 200 s a tiny problem measures everything; nothing is only projected.
  assert all(d.get("measured") for k, d in smoke.items() if k[0] != "summary" and
             k[0] != "projection"), {k: d.get("measured") for k, d in smoke.items()}


@pytest.mark.parametrize("network", ["segment", "upgrade"])
def test_train_steps_are_sane(smoke, network):
  d = smoke[("train_step", network)]
  channels = 2 if network == "upgrade" else 1
  assert d["input"] == [paper_scale.SMOKE["batch"], 64, 96, channels]
  assert d["widths"] == [4, 8, 16, 32, 32] and d["slice"] == [57, 90]
  assert 0 < d["step_s"] < 10 and d["compile_s"] > 0 and d["timed_steps"] >= 1
  assert d["steps_per_s"] == pytest.approx(1 / d["step_s"], rel=1e-3)
  assert d["img_per_s"] == pytest.approx(paper_scale.SMOKE["batch"] / d["step_s"], rel=1e-3)
  assert d["gflop_per_step"] > 0 and d["gflops"] > 0
  assert d["program_bytes"] > 0 and d["peak_device_bytes"] is None   # a CPU reports none
  t = smoke.get(("torch_step", network))
  if t is not None:   # PyTorch installed: the same step, timed on the same device
    assert t["measured"] and t["torch_device"] == "cpu" and t["jax_step_s"] == d["step_s"]
    assert t["ratio_vs_torch"] == pytest.approx(t["torch_step_s"] / d["step_s"], rel=1e-3)


def test_perturbation_predict_and_projection_are_sane(smoke):
  p = smoke[("perturbation", None)]
  assert 0 < p["perturb_s"] and 0 < p["share_of_upgrade_step"] < 1
  if p["share_by_identity_step"] is not None:
    assert -1 < p["share_by_identity_step"] < 1 and p["identity_step_s"] > 0
  for side in paper_scale.SMOKE["predict_sides"]:
    d = smoke[("predict", side)]
    assert d["s_per_image"] > 0 and d["gflop_per_image"] > 0
    assert d["tile"] == 64 and d["tiles"] == {128: 9, 192: 16}[side]   # tiled as apply tiles
    assert d["mpx_per_s"] == pytest.approx(side * side / 1e6 / d["s_per_image"], rel=1e-3)
  j = smoke[("projection", None)]
  up, seg = smoke[("train_step", "upgrade")], smoke[("train_step", "segment")]
  reps = paper_scale.TABLE_3_1["rows"] * paper_scale.TABLE_3_1["reps"]
  by_hand = reps * (paper_scale.RULE_STEPS["upgrade"] * up["step_s"]
                    + 5 * paper_scale.RULE_STEPS["segment"] * seg["step_s"]) / 3600
  assert j["hours_at_rule_steps"] == pytest.approx(by_hand, rel=1e-3)
  assert j["hours_at_cap_steps"] > j["hours_at_rule_steps"] and j["from_measured_steps"]


def test_a_measure_that_does_not_fit_is_projected_not_run():
  from benchmarks import paper_scale_jax as pj
  from upgrade_jax.engine.tiling import TileConfig
  problem = pj.Problem(paper_scale.SMOKE["slice_hw"], 4, 2, paper_scale.PERTURB)
  d = pj.predict(problem, 192, paper_scale.Budget(0.0), 10.0,
                 TileConfig(**paper_scale.SMOKE["tiling"]))
  assert not d["measured"] and d["tiles"] == 16
  assert d["s_per_image"] == pytest.approx(d["gflop_per_image"] / 10.0)   # at 10 GFLOP/s
