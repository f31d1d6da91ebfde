"""docs/reproduction.md is generated from rep.json files and the paper's
numbers: fake finished repetitions in, markdown cells out."""

import json

import pytest

from experiments.reproduction import entries, figures, render


def _rep(out, r, seg, ann=(0.5, 0.9), sizes=None):
  d = out / f"rep{r}"
  d.mkdir(parents=True)
  (d / "rep.json").write_text(json.dumps({
      "rep": r, "annotation_dice": {"lq": ann[0], "upgraded": ann[1]},
      "segmentation_dice": seg, "sizes": sizes or {"hq_train": 8, "hq_val": 2, "lq": 90, "test": 4},
      "config": {"data": {"source": "synthetic", "preset": "hl60", "n_volumes": 8, "n_test": 2,
                          "volume_shape": [32, 256, 256], "n_hq": 10},
                 "upgrade": {"widths": [16], "crop": 64, "batch_size": 8, "max_steps": 800, "lr": 1e-3},
                 "segment": {"max_steps": 400}}}))


def test_table_3_1_cells_hold_ours_and_the_papers_numbers(tmp_path):
  paper = json.loads(entries.PAPER_NUMBERS.read_text())
  run = tmp_path / "table_3_1_inclusion_hl60"
  for r, (hq, hqu, orc) in enumerate([(0.80, 0.85, 0.90), (0.82, 0.86, 0.92), (0.81, 0.80, 0.91)]):
    _rep(run, r, {"hq": hq, "hq_upgraded": hqu, "hq_lq": 0.7, "lq": 0.6, "threshold": 0.75,
                  "oracle": orc})
  md, found = render.table_3_1(list(entries.ENTRIES), tmp_path, paper)
  row = next(line for line in md.splitlines() if line.startswith("| 70% inclusion, HL60*"))
  # mean ± std (ddof=1) of hq: 0.81 ± 0.01, paper 0.913 in brackets; hq_upgraded is the best.
  assert "0.810 ± 0.010 (0.913)" in row and "**0.837 ± 0.032** (0.962)" in row
  # gap of the means: (0.8367 - 0.81) / (0.91 - 0.81) = +27%; signs 2/1/0 vs hq.
  assert "+27%" in row and "2/1/0, p 0.5" in row and "3/0/0" in row
  assert "| 70% omission, HL60 | 0 | not run yet" in md
  findings = render.table_3_1_findings(found, paper)
  assert "| HQ + upgraded beats HQ only | 7/8:" in findings
  assert "1/1: inclusion_hl60 |" in findings.splitlines()[3]  # ours beats HQ in our one row


def test_sweep_points_order_numerically_and_costs(tmp_path):
  for v in ("16", "2", "4"):
    _rep(tmp_path / "figure_3_6_cost" / f"n_hq={v}", 0, {"hq": 0.8, "lq": 0.7, "hq_upgraded": 0.9},
         sizes={"hq_train": int(v), "hq_val": 1, "lq": 9 * int(v), "test": 4})
  e = next(e for e in entries.ENTRIES if e.table == "figure_3_6")
  md, pts = render.sweep_table(e, tmp_path, (("segmentation_dice", "hq", "HQ"),))
  assert [v for v, _ in pts] == ["2", "4", "16"]
  d = pts[0][1]
  # n_hq=2: HQ labels (2 train + 1 val) at 5 each; LQ 18 + 1 LQ val label.
  assert render.annotation_cost(d, "hq", 5.0) == 15
  assert render.annotation_cost(d, "lq", 5.0) == 19
  assert render.annotation_cost(d, "hq_upgraded", 5.0) == 33
  assert render.annotation_cost(d, "oracle", 5.0) == 105   # every slice annotated well
  figures.plot_figure_3_6(pts, tmp_path / "f.png")
  assert (tmp_path / "f.png").stat().st_size > 0


def test_entries_commands_and_selection(tmp_path):
  e = entries.select(["table_3_1_bias_hl60"])
  assert [x.id for x in e] == ["table_3_1_bias_hl60"]
  cmd = e[0].command(tmp_path / "x", {})
  assert cmd[:2] == ["-m", "experiments.upgrade"] and cmd[-1] == f"--out_dir={tmp_path / 'x'}"
  assert cmd[3].endswith("cpu_scale.cfg")  # the CPU scale comes after the paper flagfile
  for x in entries.ENTRIES:  # every flagfile exists
    assert all((entries.CONFIGS / f).is_file() for f in x.flagfiles), x.id
  with pytest.raises(ValueError, match="matches no entry"):
    entries.select(["nonsense"])


def test_paper_scale_entries_are_the_table_3_1_rows_after_their_flagfile(tmp_path):
  paper = entries.select([], "paper")
  assert [e.row for e in paper] == list(entries.TABLE_3_1_ROWS)
  for e in paper:
    cmd = e.command(tmp_path / e.id, {})
    assert cmd[2].endswith(f"table_3_1_{e.row}.cfg") and cmd[3].endswith("paper_scale.cfg")
    assert all((entries.CONFIGS / f).is_file() for f in e.flagfiles)
  assert [e.id for e in entries.select(["table_3_1_bias"], "paper")] == [
      "table_3_1_bias_hl60", "table_3_1_bias_granulocytes"]
  with pytest.raises(ValueError, match="at --scale=paper"):
    entries.select(["epfl"], "paper")


def test_document_renders_with_partial_results(tmp_path):
  from experiments import reproduce
  _rep(tmp_path / "table_3_1_bias_hl60", 0, {"hq": 0.8, "hq_upgraded": 0.9, "oracle": 0.95})
  for v in ("5", "10"):
    _rep(tmp_path / "figure_3_4_hq_size" / f"n_hq={v}", 0, {"hq": 0.8, "hq_upgraded": 0.9},
         ann=(0.5, 0.85 + int(v) / 100))
  _rep(tmp_path / "epfl_bias", 0, {"hq": 0.8, "hq_upgraded": 0.85, "oracle": 0.84,
                                    "threshold": 0.23})
  doc = tmp_path / "docs" / "reproduction.md"
  md = reproduce.document(tmp_path, doc, {"epfl": str(tmp_path / "absent")})
  assert "| bias 6, HL60 | 1 |" in md and "dataset absent" in md
  row = next(l for l in md.splitlines() if l.startswith("| bias | 1 |"))
  assert row.split(" | ")[3:7] == ["0.800", "**0.850**", "0.230", "0.840"], row
  assert "![figure_3_4](reproduction/figure_3_4.png)" in md
  assert (doc.parent / "reproduction" / "figure_3_4.png").is_file()
  assert "2(1−r)/(2−r) = 0.462" in md  # the Dice-under-omission arithmetic at r = 0.7


def test_table_3_3_verdict_ranks_and_compares_per_repetition():
  from experiments.reproduce import table_3_3_verdict
  paper = {"partial_labelling": {"omission": 0.906, "inclusion": 0.859},
           "confident_learning": {"omission": 0.381, "inclusion": 0.888},
           "hq_upgraded": {"omission": 0.923, "inclusion": 0.962}}
  s = lambda *v: {"mean": sum(v) / len(v), "per_rep": list(v)}  # noqa: E731
  ours = {"omission": {"hq_upgraded": s(0.70, 0.83, 0.83), "confident_learning": s(0.80, 0.82, 0.82),
                       "partial_labelling": s(0.6, 0.6, 0.6)},
          "inclusion": {"hq_upgraded": s(0.7, 0.7, 0.7), "confident_learning": s(0.8, 0.8, 0.8),
                        "partial_labelling": s(0.6, 0.6, 0.6)}}
  out = table_3_3_verdict(paper, ours, ("omission", "inclusion", "bias"))
  assert len(out) == 3   # two columns (bias not run) and the CL-on-omission line
  assert out[0].startswith("- omission: paper hq_upgraded > partial_labelling > "
                           "confident_learning; ours confident_learning > hq_upgraded")
  assert "higher in 1 of 3 repetitions): the upgrade is comparable" in out[0]
  assert "higher in 3 of 3 repetitions): the upgrade is worse" in out[1]
  # 0.787 - 0.813 = -0.027 here, +0.542 in the paper.
  assert "paper +0.542, ours -0.027: does not hold here" in out[2]
  ours["omission"]["confident_learning"] = s(0.5, 0.5, 0.5)
  out = table_3_3_verdict(paper, ours, ("omission",))
  assert "the upgrade is best" in out[0] and out[1].endswith("holds here.")


def test_record_keeps_finished_reps_without_digests_and_seeds_a_new_machine(tmp_path):
  from experiments.reproduction import records
  runs, record = tmp_path / "runs", tmp_path / "record"
  _rep(runs / "table_3_1_bias_hl60", 0, {"hq": 0.8, "hq_upgraded": 0.9})
  _rep(runs / "figure_3_4_hq_size" / "n_hq=5", 1, {"hq": 0.7})
  (runs / "table_3_1_bias_hl60" / "rep1").mkdir()   # unfinished: no rep.json
  ck = runs / "table_3_1_bias_hl60" / "rep0" / "ckpt.json"   # not a record
  ck.write_text(json.dumps({"train_digest": "ab12"}))
  rep0 = runs / "table_3_1_bias_hl60" / "rep0" / "rep.json"
  d = json.loads(rep0.read_text())
  d["config"]["upgrade"]["train_digest"] = "ab12"   # a hash of pixels: never recorded
  rep0.write_text(json.dumps(d))
  ids = ["table_3_1_bias_hl60", "figure_3_4_hq_size"]
  written = records.sync(ids, runs, record)
  assert sorted(p.relative_to(record).as_posix() for p in written) == [
      "figure_3_4_hq_size/n_hq=5/rep1/rep.json", "table_3_1_bias_hl60/rep0/rep.json"]
  kept = json.loads((record / "table_3_1_bias_hl60/rep0/rep.json").read_text())
  assert "train_digest" not in kept["config"]["upgrade"]
  assert kept["segmentation_dice"] == {"hq": 0.8, "hq_upgraded": 0.9}
  assert records.sync(ids, runs, record) == []   # unchanged: nothing rewritten
  # The renderer reads the record as it reads a run folder.
  assert render.load_reps(record / "table_3_1_bias_hl60") == [kept]
  # A new machine: the run folders are gone; seeding restores the rep.json files.
  fresh = tmp_path / "new_runs"
  assert records.seed_run("table_3_1_bias_hl60", record, fresh) == 1
  assert records.seed_run("figure_3_4_hq_size", record, fresh) == 1
  assert json.loads((fresh / "table_3_1_bias_hl60/rep0/rep.json").read_text()) == kept
  assert records.seed_run("table_3_1_bias_hl60", record, fresh) == 0   # never overwrites
  assert records.seed_run("absent_entry", record, fresh) == 0


def test_unconverged_rows_are_marked_and_left_out_of_the_findings(tmp_path):
  paper = json.loads(entries.PAPER_NUMBERS.read_text())
  run = tmp_path / "table_3_1_omission_hl60"
  for r, (hq, hqu, orc) in enumerate([(0.85, 0.80, 0.70), (0.86, 0.81, 0.72), (0.84, 0.79, 0.71)]):
    _rep(run, r, {"hq": hq, "hq_upgraded": hqu, "hq_lq": 0.7, "lq": 0.6, "threshold": 0.75,
                  "oracle": orc})
  md, found = render.table_3_1(list(entries.ENTRIES), tmp_path, paper)
  row = next(line for line in md.splitlines() if line.startswith("| 70% omission, HL60 |"))
  assert "**unconverged** -0.140" in row
  assert "-0.050 [" in row   # HQ + upg. - HQ with its interval
  findings = render.table_3_1_findings(found, paper)
  assert "unconverged" in findings and "omission_hl60" in findings.splitlines()[-1]
  assert all("0/0" in line for line in findings.splitlines()[2:7])   # no verdict from it
  assert render.protocol({"segment": {"max_steps": 400}}).startswith("before issue 28")


def test_payoff_sweep_renders_dice_instances_and_a_cost_curve(tmp_path):
  e = next(e for e in entries.ENTRIES if e.id == "dsb_payoff_omission")
  inst = lambda f1: {"f1@0.5": f1, "f1@0.75": f1, "accuracy@0.5": f1,  # noqa: E731
                     "panoptic_quality@0.5": f1, "dsb_score": f1 / 2, "precision@0.5": f1,
                     "recall@0.5": f1}
  for v in ("2", "5"):
    for r in range(2):
      _rep(tmp_path / e.id / f"n_hq={v}", r, {"hq": 0.8, "hq_upgraded": 0.82 + r / 100,
                                              "oracle": 0.85},
           sizes={"hq_train": int(v) - 1, "hq_val": 1, "lq": 100, "test": 80})
      p = tmp_path / e.id / f"n_hq={v}" / f"rep{r}" / "rep.json"
      d = json.loads(p.read_text())
      d["segmentation_instances"] = {"hq": inst(0.5), "hq_upgraded": inst(0.6 + r / 100),
                                     "oracle": inst(0.7)}
      p.write_text(json.dumps(d))
  md, pts = render.payoff(e, tmp_path)
  assert [v for v, _ in pts] == ["2", "5"]
  up = next(line for line in md.splitlines() if line.startswith("| 2 | 2 | HQ + upg. |"))
  assert "| 110 |" in up and "0.605 ± 0.007" in up    # cost 2·5 + 100; F1 mean ± std
  diff = next(line for line in md.splitlines() if "HQ + upg. − HQ" in line)
  assert "+0.025 [" in diff and "+0.105 [" in diff     # Dice and F1 paired differences
  figures.plot_cost_curve(pts, tmp_path / "c.png", "dsb")
  assert (tmp_path / "c.png").stat().st_size > 0
