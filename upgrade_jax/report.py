"""results.json, results.csv, the printed Table 3.1 and the figures.

Everything here reads a `pipeline.Results` (or its saved JSON) and writes
files atomically; nothing reaches back into training.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from upgrade_jax import rundir
from upgrade_jax.files import json_safe, write_text

PACKAGES = ("upgrade_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "scipy", "scikit-image", "tifffile", "absl-py", "matplotlib")

# The row names of the annotation rows and the threshold baseline; a
# scenario's comes with the results ("labels", from pipeline.scenarios).
LABELS = {"lq": "LQ", "upgraded": "Upgraded", "threshold": "Threshold"}


def row_label(d: dict, key: str) -> str:
  """The row name of `key` in results `d` (the key itself if it has none)."""
  return (d.get("labels") or {}).get(key) or LABELS.get(key, key)


def versions() -> dict:
  out = {"python": platform.python_version(), "machine": platform.machine()}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  try:
    import jax
    out["backend"] = jax.default_backend()
    out["devices"] = jax.device_count()
  except Exception:  # pragma: no cover - report what we can
    pass
  return out


def instance_summary(reps: list) -> dict:
  """{"lq"|"upgraded": {"f1@0.5": {mean, std, per_rep}, ...}} of
  the reps' "annotation_instances" (test-set instance matching), or {}."""
  from upgrade_jax.metrics import summarize

  reps = [r for r in reps if "annotation_instances" in r]
  if not reps:
    return {}
  first = reps[0]["annotation_instances"]
  return {k: {m: summarize([r["annotation_instances"][k][m] for r in reps]) for m in first[k]}
          for k in first}


def flood_summary(reps: list) -> dict:
  """{"test"|"lq_train_set": number of upgraded labels flooded against the
  truth, summed over the reps} (review.truth_floods), or {}."""
  reps = [r["flooded_vs_truth"] for r in reps if "flooded_vs_truth" in r]
  return {k: sum(len(r.get(k, [])) for r in reps) for k in ("test", "lq_train_set")} if reps else {}


def results_dict(results, extra: dict | None = None) -> dict:
  """The content of results.json: summaries, per-rep numbers, config, versions."""
  summary = results.summary()
  inst = instance_summary(results.reps)
  if inst:
    summary["annotation_instances"] = inst
  floods = flood_summary(results.reps)
  if floods:
    summary["flooded_vs_truth"] = floods
  timings = dict(results.timings)
  timings["per_rep"] = [r.get("timings", {}) for r in results.reps]
  return {**summary, "reps": results.reps, "config": json_safe(results.config),
          "versions": versions(), "timings": timings, **(extra or {})}


def write_results(out_dir, results, extra: dict | None = None) -> dict:
  """Writes results.json and results.csv; returns the JSON dict."""
  out_dir = Path(out_dir)
  d = results_dict(results, extra)
  write_text(out_dir / "results.json", json.dumps(d, indent=2, default=json_safe))
  buf = _io.StringIO()
  w = csv.writer(buf)
  w.writerow(["kind", "name", "rep", "dice"])
  for r in results.reps:
    for k in ("lq", "upgraded"):
      w.writerow(["annotation", k, r["rep"], f"{r['annotation_dice'][k]:.6f}"])
    for k, v in r["segmentation_dice"].items():
      w.writerow(["segmentation", k, r["rep"], f"{v:.6f}"])
  for r in results.reps:  # instance scores as rows of kind "instances"
    for k, scores in r.get("annotation_instances", {}).items():
      for m, v in scores.items():
        w.writerow(["instances", f"{k}:{m}", r["rep"], f"{v:.6f}"])
    for kind in ("segmentation_instances", "segmentation_components"):
      for k, scores in r.get(kind, {}).items():
        for m, v in scores.items():
          w.writerow([kind, f"{k}:{m}", r["rep"], f"{v:.6f}"])
  for kind in ("annotation_dice", "segmentation_dice"):
    for k, s in d[kind].items():
      w.writerow([kind.split("_")[0], k, "mean", f"{s['mean']:.6f}"])
      w.writerow([kind.split("_")[0], k, "std", "" if s["std"] is None else f"{s['std']:.6f}"])
  write_text(out_dir / "results.csv", buf.getvalue())
  return d


def format_table(d: dict, paper: dict | None = None) -> str:
  """A Table 3.1-style text table: pooled test Dice, mean ± std (ddof=1) over
  reps; the effective LQ perturbation rates; the paired comparisons (mean
  difference with its t interval, wins/losses/ties, Wilcoxon p, and a note
  when n is too small for p to be small)."""
  n = len(d["reps"])
  lines = [f"Pooled test Dice, mean ± std over {n} repetition(s)", ""]
  head = f"{'':14}{'':16}{'Dice':>16}"
  if paper:
    head += f"{'paper':>10}"
  lines.append(head)

  def row(group, key, s):
    std = "  n/a " if s["std"] is None else f"{s['std']:.4f}"
    text = f"{group:14}{row_label(d, key):16}{s['mean']:>9.4f} ± {std}"
    if paper and key in paper:
      text += f"{paper[key]:>10.2f}"
    return text

  for i, (k, s) in enumerate(d["annotation_dice"].items()):
    lines.append(row("Annotations" if i == 0 else "", k, s))
  seg_inst = d.get("segmentation_instances") or {}
  training = d.get("segmentation_training") or {}
  for i, (k, s) in enumerate(d["segmentation_dice"].items()):
    text = row("Segmentation" if i == 0 else "", k, s)
    if k in seg_inst:   # the instances of the network's test predictions
      f1, dsb = seg_inst[k]["f1@0.5"], seg_inst[k]["dsb_score"]
      text += f"   F1@0.5 {f1['mean']:.4f}   DSB {dsb['mean']:.4f}"
      comp = (d.get("segmentation_components") or {}).get(k)
      if comp:
        text += f"   (components F1@0.5 {comp['f1@0.5']['mean']:.4f})"
    if k in training:
      t = training[k]
      text += f"   steps {'/'.join(str(x) for x in t['steps'])}"
      if t["hit_cap"]:
        text += f" (cap hit {t['hit_cap']}x)"
    lines.append(text)
  oracle = d.get("oracle_check")
  if oracle and oracle.get("mean_diff") is not None:
    ci = ("" if oracle["ci_low"] is None
          else f" [{oracle['ci_low']:+.4f}, {oracle['ci_high']:+.4f}]")
    verdict = ("UNCONVERGED: the oracle is below HQ only by more than the noise; draw no "
               "verdict from this run" if oracle["unconverged"] else "ok")
    lines.append("")
    lines.append(f"Oracle - HQ only: {oracle['mean_diff']:+.4f}{ci}, noise ±{oracle['noise']:.3f}: "
                 f"{verdict}")
  inst = d.get("annotation_instances") or {}
  if inst:  # instance matching of the test set's annotations (StarDist semantics)
    lines.append("")
    cols = [c for c in ("f1@0.5", "f1@0.75", "dsb_score", "panoptic_quality@0.5")
            if all(c in s for s in inst.values())]
    names = {"dsb_score": "DSB score", "panoptic_quality@0.5": "PQ@0.5"}
    lines.append(f"{'Instances':14}{'':16}" + "".join(f"{names.get(c, c):>18}" for c in cols))
    for k, s in inst.items():
      lines.append(f"{'':14}{row_label(d, k):16}" + "".join(
          f"{s[c]['mean']:>10.4f} ± {s[c]['std']:.3f}" if s[c]["std"] is not None
          else f"{s[c]['mean']:>18.4f}" for c in cols))
  floods = d.get("flooded_vs_truth")
  if floods:
    lines.append(f"{'':14}Flooded against the truth: {floods['test']} test, "
                 f"{floods['lq_train_set']} LQ training labels (foreground > 0.5 where the "
                 f"truth's < 0.3)")
  gap = d.get("oracle_gap_recovered") or {}
  if gap:
    lines.append("")
    size = next(iter(gap.values())).get("gap")
    lines.append(f"HQ only -> oracle gap: {size:+.4f} Dice. Fraction of it recovered "
                 "(of the means; per rep; n/a where the gap is < 0.01):")
    pct = lambda v: "  n/a" if v is None else f"{v:+.0%}"  # noqa: E731
    for k, v in gap.items():
      lines.append(f"  {row_label(d, k):16}{pct(v['of_means']):>6}   "
                   + " ".join(pct(x) for x in v["per_rep"]))
  rates = d.get("effective_rates") or {}
  if rates:
    lines.append("")
    lines.append("Effective LQ perturbation rates (removed / target cells, included / "
                 "other objects; LQ set + test LQ set):")
    for k, s in rates.items():
      std = "" if s["std"] is None else f" ± {s['std']:.3f}"
      lines.append(f"  {k:14}{s['mean']:.3f}{std}")
  paired = d.get("paired") or {}
  if n < 2:
    lines.append("")
    lines.append("(paired comparisons need at least 2 repetitions: use --reps)")
  elif paired:
    lines.append("")
    lines.append(f"Paired over {n} repetitions: mean difference [95% t interval], "
                 "wins/losses/ties, Wilcoxon p (two-sided):")
    for k, v in paired.items():
      p = d.get("wilcoxon", {}).get(k)
      p_text = "n/a" if p is None else f"{p:.4g}"
      res = "" if v.get("resolves", True) else "  (interval wider than ±0.03)"
      lines.append(f"  {k:32} {v['mean_diff']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]"
                   f"  {v['wins']}/{v['losses']}/{v['ties']}  p = {p_text}{res}")
    for k, ms in (d.get("segmentation_instances_paired") or {}).items():
      for m, v in ms.items():
        p_text = "n/a" if v.get("wilcoxon_p") is None else f"{v['wilcoxon_p']:.4g}"
        lines.append(f"  {k + ' ' + m:32} {v['mean_diff']:+.4f} [{v['ci_low']:+.4f}, "
                     f"{v['ci_high']:+.4f}]  {v['wins']}/{v['losses']}/{v['ties']}  "
                     f"p = {p_text}")
    floor = next(iter(paired.values()))["min_possible_p"]
    if floor >= 0.05:
      lines.append(f"  (with {n} pairs the smallest possible Wilcoxon p is {floor:.4g}: "
                   "p cannot be < 0.05; read the interval and the signs)")
  return "\n".join(lines)


# --------------------------------------------------------------------------
# Figures.

def save_figure(fig, path: Path) -> None:
  """Writes a figure as PNG atomically (process 0 only); the caller closes it."""
  if not rundir.is_primary_process():  # several JAX processes: process 0 writes
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + ".tmp.png")
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  os.replace(tmp, path)


def plot_overlays(samples: dict, path) -> None:
  """Figure 3.7-style: image / GT / LQ / upgraded for a few test slices.

  Masks are drawn as contours over the image; the LQ and upgraded panels show
  their pooled Dice against GT for that slice.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from upgrade_jax.metrics import pooled_dice_np

  k = len(samples["image"])
  cols = [("Image", None, None), ("Ground truth", "gt", "lime"),
          ("Low quality", "lq", "red"), ("Upgraded", "upgraded", "cyan")]
  fig, axes = plt.subplots(k, 4, figsize=(12, 3.1 * k), squeeze=False)
  for i in range(k):
    img = samples["image"][i]
    lo, hi = np.percentile(img, [1, 99.8])
    for j, (title, key, color) in enumerate(cols):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
      if key is not None:
        ax.contour(samples[key][i].astype(float), levels=[0.5], colors=color, linewidths=0.8)
        if key != "gt":
          title = f"{title} (Dice {pooled_dice_np(samples[key][i], samples['gt'][i]):.2f})"
      ax.set_title(title if i == 0 or key in ("lq", "upgraded") else "", fontsize=9)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[i, 0].set_ylabel(str(samples["names"][i]), fontsize=8)
  fig.tight_layout()
  save_figure(fig, Path(path))
  plt.close(fig)


def plot_scenarios(d: dict, path, paper: dict | None = None) -> None:
  """Bar chart: annotation Dice (LQ, upgraded) and segmentation Dice per
  scenario, mean ± std over repetitions, each repetition as a dot."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = [("annotation_dice", "Annotations (test set)"),
            ("segmentation_dice", "Segmentation (test set)")]
  widths = [max(1, len(d[g])) for g, _ in groups]
  fig, axes = plt.subplots(1, 2, figsize=(3 + 1.3 * sum(widths), 4),
                           gridspec_kw={"width_ratios": widths}, squeeze=False)
  for ax, (g, title) in zip(axes[0], groups):
    keys = list(d[g])
    means = [d[g][k]["mean"] for k in keys]
    stds = [d[g][k]["std"] or 0.0 for k in keys]
    colors = ["#c44e52" if k in ("lq",) else "#4c72b0" if "upgraded" in k else "#8c8c8c"
              for k in keys]
    x = np.arange(len(keys))
    ax.bar(x, means, yerr=stds, color=colors, capsize=4, alpha=0.85)
    for xi, k in zip(x, keys):
      pts = d[g][k]["per_rep"]
      ax.scatter(np.full(len(pts), xi), pts, color="k", s=10, zorder=3)
      ax.text(xi, d[g][k]["mean"] + 0.02, f"{d[g][k]['mean']:.3f}", ha="center", fontsize=8)
      if paper and k in paper:
        ax.plot([xi - 0.4, xi + 0.4], [paper[k]] * 2, "k--", lw=1)
    ax.set_xticks(x)
    ax.set_xticklabels([row_label(d, k) for k in keys], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pooled Dice")
    ax.set_title(title)
  if paper:
    axes[0, -1].plot([], [], "k--", lw=1, label="paper")
    axes[0, -1].legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  save_figure(fig, Path(path))
  plt.close(fig)


def plot_user_sweep(points: list, path, *, xlabel: str) -> None:
  """A user-mode sweep: the best validation Dice of u_θ (and of the
  segmentation network, where trained) on the HQ validation pairs against
  the swept value. No test set: these are the only numbers a point has.

  Args:
    points: [(x, results_json_dict), ...] sorted by x.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  xs = [p[0] for p in points]
  for key, label, color in (("upgrade_best_val_dice", "u_θ (P(HQ) inputs)", "#4c72b0"),
                            ("segmentation_best_val_dice", "segmentation, HQ + upgraded",
                             "#55a868")):
    vals = [p[1].get(key) for p in points]
    if any(v is None for v in vals):
      continue
    ax.plot(xs, vals, "-", marker="o", color=color, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("best validation Dice (HQ validation pairs)")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def plot_sweep(points: list, path, *, xlabel: str) -> None:
  """Figure 3.4-style: Dice against a swept value, one line per quantity.

  Args:
    points: [(x, results_json_dict), ...] sorted by x.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  xs = [p[0] for p in points]
  series = [("annotation_dice", "lq", "LQ annotations", "#c44e52", "--"),
            ("annotation_dice", "upgraded", "Upgraded annotations", "#4c72b0", "--")]
  first = points[0][1] if points else {}
  palette = ("#8c8c8c", "#dd8452", "#937860", "#55a868", "#222222", "#8172b3", "#da8bc3",
             "#64b5cd")
  series += [("segmentation_dice", k, f"Seg.: {row_label(first, k)}", palette[i % len(palette)],
              "-") for i, k in enumerate(first.get("segmentation_dice", {}))
             if k != "threshold"]
  for group, key, label, color, style in series:
    vals = [p[1].get(group, {}).get(key) for p in points]
    if any(v is None for v in vals):
      continue
    m = np.array([v["mean"] for v in vals])
    s = np.array([v["std"] or 0.0 for v in vals])
    ax.plot(xs, m, style, marker="o", color=color, label=label)
    ax.fill_between(xs, m - s, m + s, color=color, alpha=0.15)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("pooled test Dice")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  save_figure(fig, Path(path))
  plt.close(fig)


def write_figures(out_dir, d: dict, paper: dict | None = None) -> list[Path]:
  """scenarios.png, and overlays.png from rep0's saved samples."""
  out_dir = Path(out_dir)
  paths = [out_dir / "scenarios.png"]
  plot_scenarios(d, paths[0], paper)
  samples = out_dir / "rep0" / "samples.npz"
  if samples.exists():
    with np.load(samples) as z:
      plot_overlays({k: z[k] for k in z.files}, out_dir / "overlays.png")
    paths.append(out_dir / "overlays.png")
  return paths
