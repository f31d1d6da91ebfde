r"""Runs the paper's experiments at CPU scale and writes docs/reproduction.md.

    python -m experiments.reproduce                       # run what is missing, then write
    python -m experiments.reproduce --only=table_3_1_inc  # some entries (id prefixes)
    python -m experiments.reproduce --norun               # only rewrite the document
    python -m experiments.reproduce --status              # the entries and their state

Each entry (experiments/reproduction/entries.py) is an experiments.upgrade or
experiments.sweep command run in its own process into out_root/<id>/, with
its log in out_root/<id>.log. Runs resume: finished repetitions are skipped,
a killed one restarts from its checkpoint. Every finished repetition's
rep.json is copied into the committed record (--records,
docs/reproduction/reps/; experiments/reproduction/records.py), and a run
folder is seeded from the record before its entry runs, so a repetition
finished on any machine is not computed again. The document is made from the
record and the paper's numbers (experiments/reproduction/paper_numbers.json),
never typed by hand; an entry that has not run shows as such. The discussion
paragraphs come from experiments/reproduction/discussion.md.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from experiments import cli   # one-line refusals: flags and stray words
from experiments.reproduction import figures, records, render
from experiments.reproduction.entries import PAPER_NUMBERS, select
from upgrade_jax.files import write_text
from upgrade_jax.pipeline.config import HQ_COST

ROOT = Path(__file__).resolve().parents[1]
DISCUSSION = ROOT / "experiments" / "reproduction" / "discussion.md"

F = flags.FLAGS
flags.DEFINE_string("out_root", "runs/reproduction", "Folder of the entries' run folders.")
flags.DEFINE_string("records", "docs/reproduction/reps", "The committed record of finished "
                    "repetitions the document is made from (see records.py).")
flags.DEFINE_string("doc", "docs/reproduction.md", "The markdown to write (its figures go "
                    "beside it, in <doc stem>/).")
flags.DEFINE_list("only", [], "Entry id prefixes to run (default: all); the document always "
                  "covers every entry.")
flags.DEFINE_bool("run", True, "Run the missing entries before writing (--norun: only write).")
flags.DEFINE_bool("status", False, "Print the entries, their finished repetitions and exit.")
flags.DEFINE_enum("scale", "cpu", ["cpu", "paper"], "cpu: the record of docs/reproduction.md "
                  "(every entry, at the 2-core CPU scale). paper: the Table 3.1 rows at the "
                  "paper's scale (experiments/configs/paper_scale.cfg, for a GPU node), into "
                  "their own --out_root, --records and --doc (defaults: SCALE_DEFAULTS).")
flags.DEFINE_string("epfl_dir", "../shared/datasets/epfl_mito", "EPFL mitochondria folder "
                    "(entries that need it are skipped when it is absent).")
flags.DEFINE_string("dsb_dir", "../shared/datasets/dsb2018", "DSB2018 nuclei folder (images/ "
                    "and labels/; entries that need it are skipped when it is absent).")


# Where --scale=paper keeps its runs, record and document unless told: apart
# from the CPU scale's, which stay as they are.
SCALE_DEFAULTS = {"paper": {"out_root": "runs/reproduction_paper",
                            "records": "docs/reproduction/paper_reps",
                            "doc": "docs/reproduction_paper.md"}}


def _scaled(name: str) -> str:
  """--out_root, --records or --doc: as given, else the default of --scale."""
  if F.scale in SCALE_DEFAULTS and not F[name].present:
    return SCALE_DEFAULTS[F.scale][name]
  return getattr(F, name)


def check_scale() -> None:
  """A paper-scale run never writes into the CPU scale's runs, record or
  document (nor the reverse): their numbers would mix."""
  if F.scale == "cpu":
    return
  for name in ("out_root", "records", "doc"):
    if Path(_scaled(name)).resolve() == Path(F[name].default).resolve():
      raise ValueError(f"--{name}={_scaled(name)} is the CPU scale's; --scale={F.scale} keeps "
                       f"its own (default {SCALE_DEFAULTS[F.scale][name]})")


def _data_dirs() -> dict:
  return {"epfl": str(Path(F.epfl_dir).resolve()), "dsb": str(Path(F.dsb_dir).resolve())}


def _finished(entry, root: Path) -> int:
  run_dir = root / entry.id
  if entry.sweep:
    return sum(len(render.load_reps(p)) for _, _, p in render.sweep_points(run_dir))
  return len(render.load_reps(run_dir))


def run_entry(entry, root: Path, data_dirs: dict) -> int:
  """Runs one entry in a subprocess (resuming); returns its exit code."""
  if entry.needs and not Path(data_dirs[entry.needs]).is_dir():
    print(f"skip {entry.id}: {data_dirs[entry.needs]} is absent", flush=True)
    return 0
  cmd = [sys.executable, *entry.command(root / entry.id, data_dirs)]
  log = root / f"{entry.id}.log"
  root.mkdir(parents=True, exist_ok=True)
  print(f"run {entry.id}: {' '.join(cmd[1:])} (log {log})", flush=True)
  t0 = time.time()
  with open(log, "a") as f:
    f.write(f"\n### {datetime.datetime.now().isoformat(timespec='seconds')} "
            f"{' '.join(cmd)}\n")
    f.flush()
    code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  print(f"  {entry.id}: exit {code} after {time.time() - t0:.0f} s", flush=True)
  return code


def _commit() -> str:
  """The repository's short HEAD, the document's provenance."""
  return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                        capture_output=True, text=True).stdout.strip() or "unknown"


def document(root: Path, doc: Path, data_dirs: dict, root_label: str | None = None) -> str:
  """The whole markdown document (figures written beside it, in <doc stem>/)."""
  paper = json.loads(PAPER_NUMBERS.read_text())
  entries = select([])
  fig_dir = doc.parent / doc.stem
  commit = _commit()
  out = [
      "# The paper's experiments, reproduced at CPU scale",
      "",
      f"Generated by `python -m experiments.reproduce` on "
      f"{datetime.date.today().isoformat()} at commit `{commit}` from the finished "
      f"repetitions in `{root_label or root}`; do not edit by hand. Paper: {paper['source']}",
      "",
      "Each cell: **ours** mean ± std (ddof = 1) over the finished repetitions (n), pooled "
      "test Dice; the paper's value in brackets. The best of HQ / HQ + upg. / HQ + LQ / "
      "LQ only / threshold is bold (the oracle, every training slice with its true labels, is "
      "the ceiling and not ranked). *Gap recovered* = (HQ + upg. − HQ) / (Oracle − HQ) of the "
      "means. *vs* columns: wins/losses/ties of HQ + upg. over the repetitions and the "
      "two-sided Wilcoxon p (with 3 pairs the smallest possible p is 0.25: read the signs).",
      "",
      "## Scale",
      "",
      "CPU (2 cores), float32. The paper trains 4+4-block UNets of widths 64…512 on 565×807 "
      "CytoPacq slices (10 training volumes) for up to thousands of epochs; here the Table 3.1 "
      "rows take their paper flagfile followed by `experiments/configs/cpu_scale.cfg`. "
      "What each entry actually ran with, from its rep.json:",
      "",
      render.scale(entries, root),
      "",
      "## Table 3.1: annotation and segmentation Dice",
      "",
  ]
  t31, found = render.table_3_1(entries, root, paper)
  out += [t31, "", "The paper's findings, row by row (means):", "",
          render.table_3_1_findings(found, paper), ""]
  out += ["## Table 3.2: u_θ trained at another level than the LQ set holds", "",
          "Upgraded-annotation Dice on the test set. The LQ set holds 30% omission, "
          "30% inclusion or bias 4.", "",
          render.table_3_2(entries, root, paper)]
  out += ["## Real data: EPFL mitochondria (§3.3.3)", "",
          render.epfl(entries, root, paper, data_dirs), ""]
  for e in (e for e in entries if e.table in ("figure_3_4", "figure_3_6")):
    if e.table == "figure_3_4":
      cols = (("annotation_dice", "lq", "LQ"), ("annotation_dice", "upgraded", "upgraded"),
              ("segmentation_dice", "hq", "seg. HQ"),
              ("segmentation_dice", "hq_upgraded", "seg. HQ + upg."))
      title = "Figure 3.4: upgraded annotations against the number of HQ slices"
    else:
      cols = (("annotation_dice", "upgraded", "upgraded"), ("segmentation_dice", "hq", "seg. HQ"),
              ("segmentation_dice", "lq", "seg. LQ"),
              ("segmentation_dice", "hq_upgraded", "seg. HQ + upg."))
      title = "Figure 3.6: segmentation Dice against annotation cost (10% HQ)"
    table, pts = render.sweep_table(e, root, cols)
    out += [f"## {title}", "", f"Paper: {paper[e.table]['claim']}", "", table, ""]
    if pts:
      png = fig_dir / f"{e.table}.png"
      (figures.plot_figure_3_4 if e.table == "figure_3_4" else figures.plot_figure_3_6)(pts, png)
      out += [f"![{e.table}]({fig_dir.name}/{png.name})", ""]
      if e.table == "figure_3_6":
        out += ["Costs: " + "; ".join(
            f"n_hq={v}: " + ", ".join(f"{k} {render.annotation_cost(d, k, HQ_COST):g}"
                                       for k in ("hq", "lq", "hq_upgraded")
                                       if k in d["segmentation_dice"])
            for v, d in pts), ""]
  out += ["## The payoff on real data: DSB2018 nuclei and EPFL mitochondria", "",
          "Per HQ size: pooled test Dice and the instance scores of each network's test "
          "predictions (F1 at IoU 0.5 and the DSB2018 score, the mean of TP/(TP+FP+FN) over "
          "IoU 0.5:0.05:0.95, StarDist's matching pooled over the test set), mean ± std over "
          "the repetitions; *cost* = HQ images × 5 + LQ images; the HQ + upg. − HQ row is "
          "the paired difference with its 95% t interval ((wide): it does not resolve "
          "±0.03). On nuclei the instance scores are the primary metrics.", ""]
  for e in (e for e in entries if e.table == "payoff"):
    table, pts = render.payoff(e, root)
    if not pts and e.needs and not Path(data_dirs.get(e.needs, "")).is_dir():
      table = "dataset absent"
    out += [f"### {e.row}", "", table, ""]
    if pts:
      png = fig_dir / f"cost_{e.id}.png"
      figures.plot_cost_curve(pts, png, e.row)
      out += [f"![cost curve {e.id}]({fig_dir.name}/{png.name})", ""]
  out += ["## Table 3.3: the competing methods", "", _table_3_3(entries, root, paper), ""]
  out += ["## Checks of the explanations", "", _checks(entries, root), ""]
  if DISCUSSION.exists():
    out += [DISCUSSION.read_text().strip(), ""]
  return "\n".join(out)


def paper_document(root: Path, doc: Path, root_label: str | None = None) -> str:
  """docs/reproduction_paper.md: the Table 3.1 rows at the paper's scale."""
  paper = json.loads(PAPER_NUMBERS.read_text())
  entries = select([], "paper")
  commit = _commit()
  t31, found = render.table_3_1(entries, root, paper)
  return "\n".join([
      "# Table 3.1 at the paper's scale",
      "",
      f"Generated by `python -m experiments.reproduce --scale=paper` on "
      f"{datetime.date.today().isoformat()} at commit `{commit}` from the finished "
      f"repetitions in `{root_label or root}`; do not edit by hand. Each row is its paper "
      "flagfile followed by `experiments/configs/paper_scale.cfg` (whole 565×807 slices, "
      "widths 64…512, batch 4). The CPU-scale record, with every other entry, is "
      "`docs/reproduction.md`; the cells read as there. `python -m benchmarks.paper_scale` "
      "times this scale's steps on a device and projects the table's wall time.",
      "",
      "## Scale",
      "",
      render.scale(entries, root),
      "",
      "## Table 3.1: annotation and segmentation Dice",
      "",
      t31,
      "",
      "The paper's findings, row by row (means):",
      "",
      render.table_3_1_findings(found, paper),
      ""])


def _table_3_3(entries, root: Path, paper: dict) -> str:
  t = paper["table_3_3"]
  cols = ("omission", "inclusion", "bias")
  mine = {e.row: render.summary(render.load_reps(root / e.id))
          for e in entries if e.table == "table_3_3"}
  lines = ["| method | " + " | ".join(cols) + " |", "|---|---|---|---|"]
  for method in (*t["rows"], "threshold"):
    cells = []
    for c in cols:
      d = mine.get(c)
      s = d["segmentation_dice"].get(method) if d else None
      cells.append(render.cell(s, t["rows"].get(method, {}).get(c)))
    label = method if method in t["rows"] else f"{method} (ours only)"
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  n = {c: len(d["segmentation_dice"].get("hq_upgraded", {}).get("per_rep", []))
       for c, d in mine.items() if d}
  lines += ["", "Repetitions: " + (", ".join(f"{c} {k}" for c, k in n.items()) or
                                   "none finished yet") + "."]
  verdict = table_3_3_verdict(t["rows"], {c: d["segmentation_dice"] for c, d in mine.items()
                                          if d}, cols)
  if verdict:
    lines += ["", "The paper's ordering, column by column (computed):", "", *verdict]
  lines += ["", t["note"]]
  return "\n".join(lines)


# Confident Learning is "weak" on a column when it is this far below the
# upgrade's mean (the paper's omission column: 0.381 against 0.923).
WEAK_GAP = 0.1


def table_3_3_verdict(paper_rows: dict, ours: dict, cols) -> list[str]:
  """Markdown bullets: per column, the paper's and our ranking, and whether
  the upgrade is the best, comparable (the best method does not beat it in
  every repetition) or worse (it does); then whether Confident Learning is
  weak on omission (WEAK_GAP below the upgrade) here as in the paper.

  ours: {column: segmentation_dice summary with per_rep lists}."""
  out = []
  for c in cols:
    d = ours.get(c)
    if not d or "hq_upgraded" not in d:
      continue
    methods = [m for m in paper_rows if m in d]
    rank = lambda means: " > ".join(sorted(means, key=means.get, reverse=True))  # noqa: E731
    paper_rank = rank({m: paper_rows[m][c] for m in paper_rows})
    our_rank = rank({m: d[m]["mean"] for m in methods})
    best = max(methods, key=lambda m: d[m]["mean"])
    up = d["hq_upgraded"]["per_rep"]
    if best == "hq_upgraded":
      word = "the upgrade is best"
    else:
      other = d[best]["per_rep"]
      wins = sum(o > u for o, u in zip(other, up))
      word = (f"{best} is best (+{d[best]['mean'] - d['hq_upgraded']['mean']:.3f} on the "
              f"means, higher in {wins} of {len(up)} repetitions): the upgrade is "
              + ("worse" if wins == len(up) else "comparable"))
    out.append(f"- {c}: paper {paper_rank}; ours {our_rank}; {word}.")
  d = ours.get("omission")
  if d and "confident_learning" in d and "hq_upgraded" in d:
    gap = d["hq_upgraded"]["mean"] - d["confident_learning"]["mean"]
    p = paper_rows["hq_upgraded"]["omission"] - paper_rows["confident_learning"]["omission"]
    holds = "holds" if gap >= WEAK_GAP else "does not hold"
    out.append(f"- Confident Learning weak on omission (≥ {WEAK_GAP} below the upgrade): "
               f"paper {p:+.3f}, ours {gap:+.3f}: {holds} here.")
  return out


def _converged_text(check, d: dict, entries, root: Path) -> str:
  """The convergence check of the protocol: the oracle trained 4x longer
  against its row's rep-0 oracle at the rule's stop (same seed)."""
  row = next((e for e in entries if e.table == "table_3_1" and e.row == check.row), None)
  reps = render.load_reps(root / row.id) if row else []
  if not reps or "oracle" not in reps[0]["segmentation_dice"]:
    return "Its row's rep 0 has no oracle yet."
  at_rule = reps[0]["segmentation_dice"]["oracle"]
  steps = reps[0].get("segmentation_training", {}).get("oracle", {}).get("steps")
  long = d["segmentation_dice"]["oracle"]["mean"]
  long_steps = (d.get("segmentation_training") or {}).get("oracle", {}).get("steps", [None])[0]
  ok = "within 0.01: converged" if long - at_rule <= 0.01 else "NOT within 0.01"
  return (f"Oracle at the rule's stop ({steps} steps) {at_rule:.3f}, at {long_steps} steps "
          f"{long:.3f}: {long - at_rule:+.3f}, {ok}.")


def _checks(entries, root: Path) -> str:
  lines = []
  for e in (e for e in entries if e.table == "check"):
    d = render.summary(render.load_reps(root / e.id))
    flags_text = " ".join(e.flags)
    if d is None:
      lines.append(f"- `{e.id}` ({flags_text}): not run yet.")
      continue
    seg = ", ".join(f"{k} {render.cell(v)}" for k, v in d["segmentation_dice"].items())
    n = len(render.load_reps(root / e.id))
    text = (f"- `{e.id}` on row {e.row} ({flags_text}; {n} rep.): segmentation Dice "
            f"{seg}.")
    if e.id.startswith("check_seg_converged_"):
      text += " " + _converged_text(e, d, entries, root)
    lines.append(text)
  r = 0.7
  lines.append(
      f"- Soft Dice under pure omission (arithmetic): with a fraction r = {r} of "
      f"indistinguishable cells left out of the labels, predicting every cell scores an "
      f"expected training Dice of 2(1−r)/(2−r) = {2 * (1 - r) / (2 - r):.3f}, and predicting "
      f"any fraction f of them 2f(1−r)/(f + 1 − r) < that for f < 1: the Dice-trained LQ-only "
      f"network is pushed to segment every cell.")
  return "\n".join(lines)


def main(argv):
  hint = (f" (did you mean --only={argv[1]}?)"
          if len(argv) > 1 and not argv[1].startswith("-") else "")
  cli.refuse_arguments(argv, hint)
  root = Path(_scaled("out_root")).resolve()   # the runs' cwd is the repository
  doc, record = Path(_scaled("doc")), Path(_scaled("records"))
  data_dirs = _data_dirs()
  try:
    check_scale()
    entries = select(F.only, F.scale)
  except ValueError as e:
    sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
    return 2
  if F.status:
    for e in entries:
      print(f"{e.id}\t{_finished(e, root)} finished rep(s) in {root}, "
            f"{_finished(e, record)} in the record\t"
            f"{' '.join(e.command(root / e.id, data_dirs))}")
    return 0
  failed = []
  if F.run:
    for e in entries:
      seeded = records.seed_run(e.id, record, root)
      if seeded:
        print(f"  {e.id}: {seeded} repetition(s) taken from {record}", flush=True)
      if run_entry(e, root, data_dirs) != 0:
        failed.append(e.id)
      records.sync([e.id], root, record)  # after each entry: a later kill keeps it
  records.sync([e.id for e in select([], F.scale)], root, record)
  text = (document(record, doc, data_dirs, str(record)) if F.scale == "cpu"
          else paper_document(record, doc, str(record)))
  write_text(doc, text)
  print(f"wrote {doc}" + (f"; failed: {', '.join(failed)} (see their logs)" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_one_line)
