"""The reproduction's figures (Figures 3.4 and 3.6, the payoff cost curves)
from the summaries render.py reads; PNGs only, nothing trains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.reproduction.render import PAYOFF_METRICS, annotation_cost, metric_of
from upgrade_jax.pipeline.config import HQ_COST
from upgrade_jax.report import save_figure

__all__ = ["plot_figure_3_4", "plot_figure_3_6", "plot_cost_curve"]


def plot_figure_3_4(pts, path: Path) -> None:
  """Upgraded-annotation Dice against the number of HQ slices, with the
  a + b·log(n) trend the paper draws and the LQ level."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  x = np.array([float(v) for v, _ in pts])
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for key, label, color in (("upgraded", "upgraded", "#4c72b0"), ("lq", "LQ", "#c44e52")):
    per = [d["annotation_dice"][key]["per_rep"] for _, d in pts]
    m = np.array([np.mean(p) for p in per])
    for xi, p in zip(x, per):
      ax.scatter([xi] * len(p), p, color=color, s=12, alpha=0.6)
    ax.plot(x, m, "o-" if key == "upgraded" else "--", color=color, label=label)
  if len(x) >= 2:
    m = np.array([d["annotation_dice"]["upgraded"]["mean"] for _, d in pts])
    b, a = np.polyfit(np.log(x), m, 1)
    xs = np.linspace(x.min(), x.max(), 50)
    ax.plot(xs, a + b * np.log(xs), ":", color="k", label=f"{a:.3f} + {b:.3f}·ln n")
  ax.set_xscale("log")
  ax.set_xticks(x, [f"{int(v)}" for v in x])
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("HQ slices")
  ax.set_ylabel("annotation Dice (test set)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def plot_figure_3_6(pts, path: Path, hq_cost: float = HQ_COST) -> None:
  """Segmentation Dice against annotation cost in LQ-label units: each
  scenario of each point is a point of its own curve."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  curves = {"hq": ("HQ only (100% HQ)", "#8c8c8c"), "lq": ("LQ only (0% HQ)", "#dd8452"),
            "hq_upgraded": ("HQ + upgraded (10% HQ)", "#55a868")}
  for key, (label, color) in curves.items():
    xs, ys = [], []
    for _, d in pts:
      if key not in d["segmentation_dice"]:
        continue
      xs.append(annotation_cost(d, key, hq_cost))
      ys.append(d["segmentation_dice"][key]["mean"])
    if xs:
      order = np.argsort(xs)
      ax.plot(np.array(xs)[order], np.array(ys)[order], "o-", color=color, label=label)
  ax.set_xscale("log")
  ax.set_xlabel(f"annotation cost (LQ labels; an HQ label costs {hq_cost:g})")
  ax.set_ylabel("segmentation Dice (test set)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def _save(fig, path: Path) -> None:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def plot_cost_curve(pts, path: Path, title: str, hq_cost: float = 5.0) -> None:
  """Test score against annotation cost (HQ images × hq_cost + LQ images) for
  HQ only and HQ + upgraded, one panel per metric: what a lab decides from."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(PAYOFF_METRICS), figsize=(4.2 * len(PAYOFF_METRICS), 3.6))
  curves = {"hq": ("HQ only", "#8c8c8c"), "hq_upgraded": ("HQ + upgraded", "#55a868")}
  for ax, (metric, mlabel) in zip(axes, PAYOFF_METRICS):
    for key, (label, color) in curves.items():
      xs, ys, errs = [], [], []
      for _, d in pts:
        s = metric_of(d, key, metric)
        if s is None:
          continue
        xs.append(annotation_cost(d, key, hq_cost))
        ys.append(s["mean"])
        errs.append(s["std"] or 0.0)
      if xs:
        order = np.argsort(xs)
        ax.errorbar(np.array(xs)[order], np.array(ys)[order], yerr=np.array(errs)[order],
                    fmt="o-", color=color, label=label, capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel(f"annotation cost (LQ labels; HQ = {hq_cost:g})")
    ax.set_ylabel(f"test {mlabel}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  _save(fig, path)
