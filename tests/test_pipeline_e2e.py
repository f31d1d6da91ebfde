"""Algorithm 1 end to end through the CLI: one 2-repetition run, its results,
files and record, then reruns of it (resume, a refused config, one more
scenario)."""

import json

import numpy as np
import pytest
import tifffile

from test_pipeline import TINY, run_cli


END_TO_END = TINY + ["--scenarios=hq_upgraded", "--reps=2"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
  """One finished 2-repetition CLI run: (out_dir, its stdout, results.json)."""
  out = tmp_path_factory.mktemp("e2e") / "run"
  proc = run_cli(END_TO_END + [f"--out_dir={out}"])
  return out, proc.stdout, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_cli_results_hold_statistics_of_every_repetition(e2e):
  out, stdout, d = e2e
  assert "Annotations" in stdout and "Segmentation" in stdout  # the table
  for k in ("lq", "upgraded"):
    assert set(d["annotation_dice"][k]) >= {"mean", "std", "per_rep"}
    assert len(d["annotation_dice"][k]["per_rep"]) == 2
    assert 0.0 <= d["annotation_dice"][k]["mean"] <= 1.0
  assert set(d["segmentation_dice"]) == {"hq_upgraded", "threshold"}
  assert "hq_upgraded_vs_threshold" in d["wilcoxon"]
  for k in ("config", "versions", "timings"):
    assert d[k]
  assert d["versions"]["jax"]
  assert d["config"]["upgrade"]["task"]["perturb"]["omission_rate"] == 0.7
  # mean/std really are the statistics of the per-rep values.
  per = d["segmentation_dice"]["hq_upgraded"]["per_rep"]
  assert d["segmentation_dice"]["hq_upgraded"]["mean"] == pytest.approx(np.mean(per))
  assert d["segmentation_dice"]["hq_upgraded"]["std"] == pytest.approx(np.std(per, ddof=1))
  assert "smallest possible Wilcoxon p is 0.5" in stdout


@pytest.mark.slow
def test_cli_reports_instance_scores_and_saves_the_upgrader(e2e):
  out, stdout, d = e2e
  assert set(d["annotation_instances"]) == {"lq", "upgraded"}
  assert len(d["annotation_instances"]["upgraded"]["f1@0.5"]["per_rep"]) == 2
  assert "Instances" in stdout and (out / "model" / "model.json").is_file()


@pytest.mark.slow
def test_cli_writes_csv_figures_and_one_label_per_lq_slice(e2e):
  out, _, _ = e2e
  assert (out / "results.csv").read_text().startswith("kind,name,rep,dice")
  for fig in ("scenarios.png", "overlays.png"):
    assert (out / fig).stat().st_size > 1000
  tifs = sorted((out / "upgraded").glob("*.tif"))
  assert len(tifs) == 6  # one per LQ slice (--n_lq=6)
  lab = tifffile.imread(tifs[0])
  assert lab.dtype == np.uint16 and lab.ndim == 2


@pytest.mark.slow
def test_cli_records_each_repetitions_config_and_effective_rates(e2e):
  _, stdout, d = e2e
  assert d["reps"][0]["config"]["data"]["preset"] == "hl60"
  rates = d["reps"][0]["effective_rates"]
  assert 0.0 <= rates["omission"] <= 1.0 and rates["targets"] > 0
  assert rates["omission"] == pytest.approx(rates["omitted"] / rates["targets"])
  assert len(d["effective_rates"]["omission"]["per_rep"]) == 2
  assert "Effective LQ perturbation rates" in stdout


# The tests below change the finished run; they run in this order, after the
# ones above (--dist=loadfile runs a file's tests on one worker, in order).
@pytest.mark.slow
def test_cli_rerun_of_a_finished_run_trains_nothing(e2e, tmp_path):
  out, _, _ = e2e
  args = END_TO_END + [f"--out_dir={out}"]
  before = json.loads((out / "rep0" / "rep.json").read_text())
  again = run_cli(args)
  assert again.stdout.count("already finished") == 2
  assert "training the upgrade network" not in again.stdout
  assert json.loads((out / "rep0" / "rep.json").read_text()) == before
  # The reproduction's record (rep.json only, no checkpoints) seeds a folder on
  # another machine: the CLI takes its repetitions as finished.
  from experiments.reproduction import records
  records.sync([out.name], out.parent, tmp_path / "record")
  assert records.seed_run(out.name, tmp_path / "record", tmp_path / "new") == 2
  seeded = run_cli(END_TO_END + [f"--out_dir={tmp_path / 'new' / out.name}"])
  assert seeded.stdout.count("already finished") == 2
  assert "training the" not in seeded.stdout
  # Another preset into the same out_dir: refused with one line naming it.
  bad = run_cli(args + ["--preset=granulocytes"], check=False)
  assert bad.returncode != 0
  err = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "data.preset" in err[0], bad.stderr[-2000:]
  assert json.loads((out / "rep0" / "rep.json").read_text()) == before


@pytest.mark.slow
def test_cli_another_scenario_trains_only_that_scenario(e2e):
  out, _, _ = e2e
  before = json.loads((out / "rep0" / "rep.json").read_text())
  proc = run_cli(TINY + ["--scenarios=hq_upgraded,hq", "--reps=1", f"--out_dir={out}"])
  assert "adding hq" in proc.stdout and "training the upgrade network" in proc.stdout
  assert "training the segmentation network: hq_upgraded" not in proc.stdout
  after = json.loads((out / "rep0" / "rep.json").read_text())
  assert after["segmentation_dice"]["hq_upgraded"] == before["segmentation_dice"]["hq_upgraded"]
  assert "hq" in after["segmentation_dice"]
