"""docs/reproduction.md from the runs' rep.json files and paper_numbers.json.

Everything here reads finished repetitions (`rep<r>/rep.json`, written only
when a repetition is complete) and writes markdown and PNGs; nothing trains.
An entry without finished repetitions shows as "not run yet", so the document
can be completed over several sittings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


from experiments.reproduction.entries import TABLE_3_1_ROWS, Entry
from upgrade_jax.pipeline import REGISTRY
from upgrade_jax.pipeline.config import HQ_COST
from upgrade_jax.pipeline.run import Results

SEG_COLUMNS = (("hq", "HQ"), ("hq_upgraded", "HQ + upg."), ("hq_lq", "HQ + LQ"),
               ("lq", "LQ only"), ("threshold", "Thrs."), ("oracle", "Oracle"))


# --------------------------------------------------------------------------
# Reading.

def load_reps(run_dir: Path) -> list[dict]:
  """The finished repetitions of one run folder, in rep order."""
  found = []
  for p in Path(run_dir).glob("rep*/rep.json"):
    if re.fullmatch(r"rep\d+", p.parent.name):
      found.append(json.loads(p.read_text()))
  return sorted(found, key=lambda r: r["rep"])


def summary(reps: list[dict]) -> dict | None:
  """Results.summary() of finished repetitions (None when there are none)."""
  return Results(None, reps, {}).summary() if reps else None


def sweep_points(run_dir: Path) -> list[tuple[str, str, Path]]:
  """(flag, value, folder) of a sweep's point folders `<flag>=<value>/`."""
  points = []
  for p in sorted(Path(run_dir).glob("*=*")):
    if p.is_dir():
      flag, _, value = p.name.partition("=")
      points.append((flag, value, p))
  return sorted(points, key=lambda t: float(t[1]) if _is_number(t[1]) else t[1])


def _is_number(v: str) -> bool:
  try:
    float(v)
    return True
  except ValueError:
    return False


# --------------------------------------------------------------------------
# Formatting.

def cell(s: dict | None, paper: float | None = None, bold: bool = False) -> str:
  """'0.881 ± 0.010 (0.823)': ours mean ± std, the paper's in brackets."""
  if s is None:
    ours = "–"
  else:
    ours = f"{s['mean']:.3f}" + ("" if s["std"] is None else f" ± {s['std']:.3f}")
    if bold:
      ours = f"**{ours}**"
  return ours + ("" if paper is None else f" ({paper:.3f})")


def sign_cell(d: dict, key: str) -> str:
  """'2/1/0, p 0.75': wins/losses/ties of a paired comparison and its p."""
  v = d["paired"].get(key)
  if v is None:
    return "–"
  p = d["wilcoxon"].get(key)
  return f"{v['wins']}/{v['losses']}/{v['ties']}" + ("" if p is None else f", p {p:.2g}")


def gap_cell(d: dict, key: str = "hq_upgraded") -> str:
  g = (d.get("oracle_gap_recovered") or {}).get(key)
  if not g:
    return "–"
  if g["of_means"] is None:  # the ceiling is not (or barely) above HQ only
    return f"no gap (oracle − HQ {g['gap']:+.3f})" if g.get("gap") is not None else "no gap"
  return f"{g['of_means']:+.0%}"


def diff_cell(v: dict | None) -> str:
  """'+0.041 [-0.010, +0.092]': a paired mean difference and its 95% interval;
  '(wide)' when the interval does not resolve ±0.03."""
  if not v or v.get("mean_diff") is None:
    return "–"
  if v.get("ci_low") is None:
    return f"{v['mean_diff']:+.3f} (1 rep)"
  wide = "" if v.get("resolves", True) else " (wide)"
  return f"{v['mean_diff']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]{wide}"


def oracle_cell(d: dict) -> str:
  """Oracle − HQ only with its noise, and the *unconverged* mark."""
  o = d.get("oracle_check")
  if not o or o.get("mean_diff") is None:
    return "–"
  text = f"{o['mean_diff']:+.3f} ± {o['noise']:.3f}"
  return f"**unconverged** {text}" if o["unconverged"] else text


def unconverged(d: dict) -> bool:
  """Whether a row's oracle is below HQ only by more than the noise (no
  verdict is drawn from such a row)."""
  return bool((d.get("oracle_check") or {}).get("unconverged"))


def stops_cell(d: dict) -> str:
  """'hq 450/1200 e, oracle 2950 cap': the segmentation networks' steps per
  repetition and how they stopped (e: early stop, cap: max_steps)."""
  parts = []
  for s, t in (d.get("segmentation_training") or {}).items():
    how = ["cap" if r == "max_steps" else "e" for r in t["stop_reasons"]]
    parts.append(f"{s} " + "/".join(f"{n}{h[0] if h == 'e' else ' cap'}"
                                    for n, h in zip(t["steps"], how)))
  return "; ".join(parts) or "not recorded (before issue 28)"


def _best(seg: dict, keys) -> str | None:
  have = {k: seg[k]["mean"] for k in keys if k in seg}
  return max(have, key=have.get) if have else None


# --------------------------------------------------------------------------
# Sections.

def table_3_1(entries: list[Entry], root: Path, paper: dict) -> tuple[str, dict]:
  """The Table 3.1 section and {row: summary} of the rows that ran."""
  rows = paper["table_3_1"]["rows"]
  head = ("| row | n | LQ → upgraded annotations | " + " | ".join(c for _, c in SEG_COLUMNS)
          + " | oracle − HQ | HQ+upg. − HQ [95%] | gap recovered | HQ+upg. vs HQ | "
          "HQ+upg. vs HQ+LQ |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  found = {}
  by_row = {e.row: e for e in entries if e.table == "table_3_1"}
  for row in TABLE_3_1_ROWS:
    p = rows[row]
    e = by_row.get(row)
    reps = load_reps(root / e.id) if e else []
    d = summary(reps)
    if d is None:
      lines.append(f"| {p['label']} | 0 | not run yet (paper {p['annotation']['lq']:.3f} → "
                   f"{p['annotation']['upgraded']:.3f}) |" + " |" * (len(SEG_COLUMNS) + 5))
      continue
    found[row] = d
    ann = d["annotation_dice"]
    seg = d["segmentation_dice"]
    best = _best(seg, ("hq", "hq_upgraded", "hq_lq", "lq", "threshold"))
    cells = [cell(seg.get(k), p["segmentation"].get(k), bold=(k == best)) for k, _ in SEG_COLUMNS]
    lines.append(
        f"| {p['label']} | {len(reps)} | {cell(ann['lq'], p['annotation']['lq'])} → "
        f"{cell(ann['upgraded'], p['annotation']['upgraded'])} | " + " | ".join(cells)
        + f" | {oracle_cell(d)} | {diff_cell(d['paired'].get('hq_upgraded_vs_hq'))} | "
        f"{gap_cell(d)} | {sign_cell(d, 'hq_upgraded_vs_hq')} | "
        f"{sign_cell(d, 'hq_upgraded_vs_hq_lq')} |")
  return "\n".join(lines), found


def table_3_1_findings(found: dict, paper: dict) -> str:
  """The paper's Table 3.1 claims, each checked row by row on ours."""
  rows = paper["table_3_1"]["rows"]
  claims = [
      ("the upgrade improves the annotations (upgraded > LQ)",
       lambda a, s: a["upgraded"] > a["lq"]),
      ("HQ + upgraded beats HQ only",
       lambda a, s: s["hq_upgraded"] > s["hq"]),
      ("HQ + upgraded beats HQ + LQ",
       lambda a, s: s["hq_upgraded"] > s["hq_lq"]),
      ("HQ + upgraded is the best of the five columns",
       lambda a, s: s["hq_upgraded"] >= max(s[k] for k in ("hq", "hq_lq", "lq", "threshold"))),
      ("LQ only collapses (≥ 0.1 below HQ only)",
       lambda a, s: s["lq"] < s["hq"] - 0.1),
  ]
  lines = ["| finding | paper: rows where it holds | ours: rows where it holds (unconverged "
           "rows left out) |", "|---|---|---|"]
  skipped = [r for r, d in found.items() if unconverged(d)]
  found = {r: d for r, d in found.items() if r not in skipped}
  for text, holds in claims:
    theirs = [r for r in TABLE_3_1_ROWS
              if holds(rows[r]["annotation"], rows[r]["segmentation"])]
    ours = []
    for r, d in found.items():
      a = {k: v["mean"] for k, v in d["annotation_dice"].items()}
      s = {k: v["mean"] for k, v in d["segmentation_dice"].items()}
      try:
        if holds(a, s):
          ours.append(r)
      except KeyError:
        pass
    lines.append(f"| {text} | {len(theirs)}/8: {', '.join(theirs) or '—'} | "
                 f"{len(ours)}/{len(found)}: {', '.join(ours) or '—'} |")
  if skipped:
    lines.append("")
    lines.append(f"Left out as *unconverged* (oracle below HQ only by more than the noise: "
                 f"no verdict): {', '.join(skipped)}.")
  return "\n".join(lines)


def epfl(entries: list[Entry], root: Path, paper: dict, data_dirs: dict) -> str:
  lines = ["| perturbation | n | LQ → upgraded annotations | HQ | HQ + upg. | Thrs. | Oracle | "
           "gap recovered |", "|---|---|---|---|---|---|---|---|"]
  for e in (e for e in entries if e.table == "epfl"):
    d = summary(load_reps(root / e.id))
    if d is None:
      why = "dataset absent" if not Path(data_dirs.get("epfl", "")).is_dir() else "not run yet"
      lines.append(f"| {e.row} | 0 | {why} | | | | | |")
      continue
    a, s = d["annotation_dice"], d["segmentation_dice"]
    best = _best(s, ("hq", "hq_upgraded", "threshold"))
    lines.append(f"| {e.row} | {len(d['annotation_dice']['lq']['per_rep'])} | "
                 f"{cell(a['lq'])} → {cell(a['upgraded'])} | "
                 + " | ".join(cell(s.get(k), bold=k == best)
                              for k in ("hq", "hq_upgraded", "threshold", "oracle"))
                 + f" | {gap_cell(d)} |")
  lines.append("")
  lines.append(f"Paper: {paper['epfl']['claim']} ({paper['epfl']['note']})")
  lines.append("")
  lines.append("Thrs.: one global threshold on raw intensities, bright or dark foreground, "
               "whichever fits the HQ slices (mitochondria are darker than their surround).")
  return "\n".join(lines)


def table_3_2(entries: list[Entry], root: Path, paper: dict) -> str:
  rows = paper["table_3_2"]["rows"]
  lines = []
  for e in (e for e in entries if e.table == "table_3_2"):
    points = sweep_points(root / e.id)
    values = list(rows["hl60"][e.row])
    done = {v: summary(load_reps(p)) for _, v, p in points}
    lines.append(f"| u_θ trains at {e.row} = | " + " | ".join(values) + " | LQ set |")
    lines.append("|---|" + "---|" * (len(values) + 1))
    ours = [cell(done[v]["annotation_dice"]["upgraded"]) if done.get(v) else "not run yet"
            for v in values]
    lq = next((d["annotation_dice"]["lq"] for d in done.values() if d), None)
    best = max((v for v in values if done.get(v)),
               key=lambda v: done[v]["annotation_dice"]["upgraded"]["mean"], default=None)
    ours = [f"**{c}**" if v == best and not c.startswith("**") else c
            for v, c in zip(values, ours)]
    lines.append("| ours, HL60-like | " + " | ".join(ours) + f" | {cell(lq)} |")
    for who in ("hl60", "granulocytes"):
      lines.append(f"| paper, {who} | " + " | ".join(f"{rows[who][e.row][v]:.3f}" for v in values)
                   + " | |")
    lines.append("")
  return "\n".join(lines)


def sweep_table(e: Entry, root: Path, columns) -> tuple[str, list]:
  """A sweep's points as a table; returns (markdown, [(value, summary)])."""
  pts = []
  for _, v, p in sweep_points(root / e.id):
    reps = load_reps(p)
    if reps:  # the data sizes (for annotation costs) ride along with the summary
      pts.append((v, {**summary(reps), "sizes": reps[0].get("sizes", {})}))
  if not pts:
    return "not run yet", []
  lines = [f"| {e.row} | n | " + " | ".join(c for _, _, c in columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for v, d in pts:
    n = len(d["annotation_dice"]["lq"]["per_rep"])
    lines.append(f"| {v} | {n} | " + " | ".join(cell(d[g].get(k)) for g, k, _ in columns) + " |")
  return "\n".join(lines), pts


def annotation_cost(d: dict, scenario: str, hq_cost: float) -> float:
  """What a scenario's training + validation labels cost in LQ-label units
  (its registry entry's `cost` of the summary's "sizes")."""
  return REGISTRY[scenario].cost(d["sizes"], hq_cost)


def scale(entries: list[Entry], root: Path) -> str:
  """The scale the runs actually used, read from their rep.json configs."""
  seen = {}
  for e in entries:
    dirs = [p for _, _, p in sweep_points(root / e.id)] if e.sweep else [root / e.id]
    for dd in dirs:
      reps = load_reps(dd)
      if reps:
        c = reps[0]["config"]
        seen[e.id] = c
        break
  if not seen:
    return "No runs yet."
  lines = ["| entry | data | volumes (test) | shape | HQ slices | width | crop × batch | "
           "steps u_θ / seg. | lr | normalisation | segmentation protocol |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for k, c in seen.items():
    dc, up, sg = c["data"], c["upgrade"], c["segment"]
    src = dc.get("source", "synthetic")
    preset = dc.get("preset", "")
    shape = "×".join(str(s) for s in dc.get("volume_shape", [])) if src == "synthetic" else "files"
    lines.append(
        f"| {k} | {src} {preset if src == 'synthetic' else ''} | {dc.get('n_volumes', '')} "
        f"({dc.get('n_test', '')}) | {shape} | {dc.get('n_hq')} | {up['widths'][0]} | "
        f"{up['crop']} × {up['batch_size']} | {up['max_steps']} / {sg['max_steps']} | "
        f"{up['lr']:g} | {dc.get('normalisation', 'max')} | {protocol(c)} |")
  return "\n".join(lines)


def protocol(config: dict) -> str:
  """How a run's segmentation networks stopped: issue 28's converging rule
  (validation on the HQ slices + held-out slices of each scenario, patience,
  a cap rarely hit), or the fixed budget of the runs before it."""
  sg = config["segment"]
  extra = config.get("seg_val_extra")
  if extra is None:
    return f"before issue 28: HQ validation only, cap {sg['max_steps']} (usually hit)"
  return (f"converging: HQ val + {extra} held out, patience {sg['patience']} × "
          f"{sg['steps_per_epoch']} steps, cap {sg['max_steps']}")


# --------------------------------------------------------------------------
# The payoff on real data (issue 28).

PAYOFF_SCENARIOS = (("hq", "HQ only"), ("hq_lq", "HQ + LQ"), ("hq_upgraded", "HQ + upg."),
                    ("oracle", "Oracle"))
# On nuclei pooled Dice saturates with a few HQ images; the instances carry the payoff.
PAYOFF_METRICS = (("dice", "Dice"), ("f1@0.5", "F1@0.5"), ("dsb_score", "DSB score"))


def payoff_points(e: Entry, root: Path) -> list:
  """[(n_hq value, summary with "sizes")] of a payoff sweep's finished points."""
  pts = []
  for _, v, p in sweep_points(root / e.id):
    reps = load_reps(p)
    if reps:
      pts.append((v, {**summary(reps), "sizes": reps[0].get("sizes", {})}))
  return pts


def metric_of(d: dict, scenario: str, metric: str) -> dict | None:
  """The summarize dict of a scenario's test `metric` ("dice" or an instance
  score of the output path's instances)."""
  if metric == "dice":
    return d["segmentation_dice"].get(scenario)
  return (d.get("segmentation_instances") or {}).get(scenario, {}).get(metric)


def payoff(e: Entry, root: Path, hq_cost: float = HQ_COST) -> tuple[str, list]:
  """A payoff sweep as a table (per HQ size and scenario: Dice, F1@0.5, DSB
  score; HQ + upg. − HQ only paired with its 95% interval) and its points."""
  pts = payoff_points(e, root)
  if not pts:
    return "not run yet", []
  head = ["| n_hq | n | scenario | cost | " + " | ".join(c for _, c in PAYOFF_METRICS)
          + " | oracle − HQ (Dice) |", "|---|---|---|---|" + "---|" * (len(PAYOFF_METRICS) + 1)]
  lines = list(head)
  for v, d in pts:
    n = len(d["annotation_dice"]["lq"]["per_rep"])
    for k, label in PAYOFF_SCENARIOS:
      if k not in d["segmentation_dice"]:
        continue
      cells = [cell(metric_of(d, k, m)) for m, _ in PAYOFF_METRICS]
      extra = oracle_cell(d) if k == "oracle" else ""
      lines.append(f"| {v} | {n} | {label} | {annotation_cost(d, k, hq_cost):g} | "
                   + " | ".join(cells) + f" | {extra} |")
    diffs = [diff_cell(d["paired"].get("hq_upgraded_vs_hq"))]
    ip = (d.get("segmentation_instances_paired") or {}).get("hq_upgraded_vs_hq", {})
    diffs += [diff_cell(ip.get(m)) for m in ("f1@0.5", "dsb_score")]
    lines.append(f"| {v} | {n} | HQ + upg. − HQ | | " + " | ".join(diffs) + " | |")
  return "\n".join(lines), pts
