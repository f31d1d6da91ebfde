"""Algorithm 1 over repetitions: check, then run each repetition's stages.

  prepare_run   loads and checks everything (inputs, counts, out_dir, earlier
                repetitions' configs) and creates nothing
  run           every repetition, resumable, under the out_dir's lock
  run_rep       one repetition: the stages of stages.py in order
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from upgrade_jax import metrics, parallel, rundir
from upgrade_jax import files
from upgrade_jax.pipeline import stages
from upgrade_jax.pipeline.config import PipelineConfig, check_rep, run_key
from upgrade_jax.pipeline.data import check_counts, data_inputs, hq_picks, load_volumes
from upgrade_jax.pipeline.others import felzenszwalb_volumes
from upgrade_jax.pipeline.scenarios import CEILING, FLOOR, LABELS, METHOD, SCENARIOS

__all__ = ["run_rep", "Results", "discard_reps", "check_finished_reps", "prepare_run", "run"]


def run_rep(cfg: PipelineConfig, volumes, rep: int, out_dir: Path, *,
            log: Callable[[str], None] = print,
            guard: rundir.InputGuard | None = None) -> dict:
  """Runs repetition `rep`; returns (and saves) its numbers.

  A finished repetition (rep_dir/rep.json) of the same `run_key` is loaded,
  not rerun; if it lacks some of cfg.scenarios (or the threshold), only those
  are computed (the upgrade network's finished checkpoint is reused). A
  rep.json of another run_key raises ConfigMismatch.
  """
  rep_dir = out_dir / f"rep{rep}"
  done = rep_dir / "rep.json"
  key = run_key(cfg)
  previous = None
  if done.exists():
    previous = json.loads(done.read_text())
    check_rep(previous, key, done)
    missing = [s for s in cfg.scenarios if s not in previous["segmentation_dice"]]
    if (cfg.threshold_baseline and cfg.scenarios
        and "threshold" not in previous["segmentation_dice"]):
      missing.append("threshold")
    if not missing:
      log(f"[rep {rep}] already finished: {done}")
      return _select(previous, cfg)
    log(f"[rep {rep}] finished before; adding {', '.join(missing)}")
  result = {"rep": rep, "seed": cfg.seed + rep, "config": key,
            "segmentation_dice": dict(previous["segmentation_dice"]) if previous else {}}
  for k in ("threshold", "segmentation_instances", "segmentation_components",
            "segmentation_training", "methods"):
    if previous and k in previous:   # kept: only the missing scenarios are trained
      result[k] = previous[k]
  run = stages.RepRun(rep, rep_dir, Path(out_dir), cfg.seed + rep, key, log, result,
                      dict(previous.get("timings", {})) if previous else {}, guard)
  data = stages.prepare_data(cfg, volumes, run)
  fit = stages.train_upgrader(cfg, data, run)
  upgraded = stages.upgrade_lq_sets(cfg, data, fit, run)
  stages.train_scenarios(cfg, data, upgraded, run)
  stages.score_threshold(cfg, volumes, data, run)
  result["timings"] = run.timings
  files.write_json(done, result)
  return _select(result, cfg)


def _select(result: dict, cfg: PipelineConfig) -> dict:
  """The rep's numbers restricted to what `cfg` asks for (a rep extended
  with more scenarios by another command keeps them in rep.json)."""
  wanted = set(cfg.scenarios) | ({"threshold"} if cfg.threshold_baseline and cfg.scenarios
                                 else set())
  pick = lambda d: {k: v for k, v in d.items() if k in wanted}  # noqa: E731
  out = {**result, "segmentation_dice": pick(result["segmentation_dice"])}
  for k in ("segmentation_instances", "segmentation_components", "segmentation_training"):
    if k in result:
      out[k] = pick(result[k])
  return out


# Below this (Dice) the oracle's lead over HQ only is treated as no gap: a
# ratio over a smaller denominator only amplifies the repetitions' noise.
MIN_ORACLE_GAP = 0.01


@dataclasses.dataclass
class Results:
  """Per-repetition numbers and their summaries (see `summary`)."""
  config: PipelineConfig
  reps: list
  timings: dict

  def summary(self) -> dict:
    """Means, stds (ddof=1) and per-rep values; for every comparison of
    hq_upgraded (and upgraded vs LQ annotations) the Wilcoxon p and the
    paired difference (mean, t interval, wins/losses/ties); the effective
    LQ perturbation rates over the repetitions; and, when hq and oracle were
    trained, the fraction of the hq -> oracle gap each other scenario
    recovers (metrics.gap_recovered)."""
    ann = {k: metrics.summarize([r["annotation_dice"][k] for r in self.reps])
           for k in ("lq", "upgraded")}
    names = [s for s in (*SCENARIOS, "threshold") if all(
        s in r["segmentation_dice"] for r in self.reps)]
    seg = {s: metrics.summarize([r["segmentation_dice"][s] for r in self.reps]) for s in names}
    pairs = {}
    if METHOD in seg:
      for s in names:
        if s != METHOD:
          pairs[f"{METHOD}_vs_{s}"] = (seg[METHOD]["per_rep"], seg[s]["per_rep"])
    pairs["upgraded_vs_lq_annotations"] = (ann["upgraded"]["per_rep"], ann["lq"]["per_rep"])
    wil = {k: metrics.wilcoxon(a, b) for k, (a, b) in pairs.items()}
    paired = {k: metrics.paired_difference(a, b) for k, (a, b) in pairs.items()}
    rates = {}
    for k in ("omission", "inclusion"):
      vals = [(r.get("effective_rates") or {}).get(k) for r in self.reps]
      if vals and all(v is not None for v in vals):
        rates[k] = metrics.summarize(vals)
    gap, oracle = {}, None
    if FLOOR in seg and CEILING in seg:  # how much of hq -> oracle each scenario recovers
      gap = {s: metrics.gap_recovered(seg[s]["per_rep"], seg[FLOOR]["per_rep"],
                                      seg[CEILING]["per_rep"], min_gap=MIN_ORACLE_GAP)
             for s in names if s not in (FLOOR, CEILING)}
      oracle = metrics.oracle_check(seg[CEILING]["per_rep"], seg[FLOOR]["per_rep"])
    for p in paired.values():
      p["resolves"] = metrics.resolves(p)
    inst, inst_paired = self.instance_summary(names)
    comp, comp_paired = self.instance_summary(names, "segmentation_components")
    out = {"annotation_dice": ann, "segmentation_dice": seg, "wilcoxon": wil,
           "paired": paired, "effective_rates": rates, "oracle_gap_recovered": gap,
           "oracle_check": oracle, "segmentation_training": self.training_summary(names),
           "labels": {s: LABELS[s] for s in names if s in LABELS}}
    if inst:
      out["segmentation_instances"] = inst
      out["segmentation_instances_paired"] = inst_paired
    if comp:
      out["segmentation_components"] = comp
      out["segmentation_components_paired"] = comp_paired
    return out

  # The instance scores summarised and compared (the DSB2018 primary ones).
  INSTANCE_KEYS = ("f1@0.5", "f1@0.75", "accuracy@0.5", "panoptic_quality@0.5", "dsb_score",
                   "precision@0.5", "recall@0.5")

  def instance_summary(self, names, kind: str = "segmentation_instances") -> tuple[dict, dict]:
    """({scenario: {metric: summarize}}, {"hq_upgraded_vs_<s>": {metric:
    paired_difference}}) of the test predictions' instance scores (`kind`:
    "segmentation_instances", the output path's instances, or
    "segmentation_components"), over the scenarios every repetition scored."""
    names = [s for s in names if all(s in r.get(kind, {}) for r in self.reps)]
    per = {s: {m: [r[kind][s][m] for r in self.reps]
               for m in self.INSTANCE_KEYS} for s in names}
    inst = {s: {m: metrics.summarize(v) for m, v in ms.items()} for s, ms in per.items()}
    paired = {}
    if METHOD in per:
      for s in names:
        if s != METHOD:
          paired[f"{METHOD}_vs_{s}"] = {
              m: {**metrics.paired_difference(per[METHOD][m], per[s][m]),
                  "wilcoxon_p": metrics.wilcoxon(per[METHOD][m], per[s][m])}
              for m in ("f1@0.5", "dsb_score")}
    return inst, paired

  def training_summary(self, names) -> dict:
    """{scenario: {"steps", "best_step" (per rep), "stop_reasons", "hit_cap"
    (repetitions that ended at max_steps)}} of the segmentation networks."""
    out = {}
    for s in names:
      runs = [r.get("segmentation_training", {}).get(s) for r in self.reps]
      if any(t is None for t in runs):
        continue
      out[s] = {"steps": [t["steps"] for t in runs], "best_step": [t["best_step"] for t in runs],
                "stop_reasons": [t["stop_reason"] for t in runs],
                "hit_cap": sum(bool(t["hit_cap"]) for t in runs),
                "val_slices": [t["val_slices"] for t in runs]}
    return out


def discard_reps(out_dir, protect=()) -> list[Path]:
  """Deletes this pipeline's own repetition folders (`rep<r>/`) and upgraded
  label TIFFs (`upgraded/*.tif`) in `out_dir`; nothing else. Refuses when a
  path in `protect` (the run's inputs) lies inside one of them."""
  out_dir = Path(out_dir)
  reps = [p for p in out_dir.glob("rep*") if p.is_dir() and re.fullmatch(r"rep\d+", p.name)]
  for p in reps + [out_dir / "upgraded"]:
    for q in protect:
      q = Path(q).resolve()
      if q == p.resolve() or p.resolve() in q.parents:
        raise ValueError(f"refusing to discard {p}: it holds the input {q}")
  for p in reps:
    shutil.rmtree(p)
  tifs = sorted((out_dir / "upgraded").glob("*.tif"))
  for p in tifs:
    p.unlink()
  return reps + tifs


def check_finished_reps(cfg: PipelineConfig, out_dir) -> None:
  """Raises ConfigMismatch when a finished repetition in `out_dir` was made
  with another `run_key` (checked before anything is written)."""
  key = run_key(cfg)
  for r in range(cfg.reps):
    done = Path(out_dir) / f"rep{r}" / "rep.json"
    if done.is_file():
      check_rep(json.loads(done.read_text()), key, done)


def prepare_run(cfg: PipelineConfig, out_dir, *, log: Callable[[str], None] = print,
                fresh: bool = False, owner: str = "upgrade"):
  """Loads and checks everything a run needs; creates nothing.

  Returns:
    (volumes, guard): the (train, test) volumes (with Felzenszwalb `others`
    when configured) and the InputGuard of the run's inputs.

  Raises:
    InputError / ValueError / OSError naming the input, setting or out_dir;
    ConfigMismatch (an InputError) when out_dir holds finished repetitions of
    another config and not `fresh`.
  """
  guard = data_inputs(cfg.data)
  rundir.check_out_dir(out_dir, guard, owner=owner)
  if not fresh:
    check_finished_reps(cfg, out_dir)
  volumes = load_volumes(cfg.data)
  check_counts(cfg, volumes)
  if cfg.data.others == "felzenszwalb":
    volumes = felzenszwalb_volumes(volumes, cfg.data.felzenszwalb,
                                   hq_picks(cfg.data, volumes[0]), log)
  return volumes, guard


def run(cfg: PipelineConfig, out_dir, *, log: Callable[[str], None] = print,
        prepared=None, fresh: bool = False) -> Results:
  """Algorithm 1 and the scenarios, `cfg.reps` times; resumable in `out_dir`.

  `prepared` is `prepare_run`'s result (made here when None): everything is
  loaded and checked before `out_dir` is created. A repetition finished or
  checkpointed with another `run_key` raises ConfigMismatch, unless `fresh`:
  then this run's own rep folders and upgraded TIFFs in out_dir are discarded
  first (never the inputs).
  """
  out_dir = Path(out_dir)
  t0 = time.perf_counter()
  volumes, guard = prepared if prepared is not None else prepare_run(
      cfg, out_dir, log=log, fresh=fresh)
  load_s = time.perf_counter() - t0
  log(f"data: {cfg.data.source} ({len(volumes[0])} training / {len(volumes[1])} test "
      f"volumes), loaded in {load_s:.1f}s")
  with rundir.RunLock(out_dir, owner="upgrade"):
    rundir.remove_stale_temps(out_dir)
    if fresh and rundir.is_primary_process():  # several processes: process 0 deletes
      gone = discard_reps(out_dir, protect=[cfg.data.data_dir] if cfg.data.data_dir else [])
      if gone:
        log(f"fresh start: discarded {len(gone)} old repetition folders / upgraded files "
            f"in {out_dir}")
    # Several processes: none reads out_dir (rep.json, checkpoints) before
    # process 0 has cleaned it up.
    parallel.barrier("upgrade_jax:run_start")
    reps = [run_rep(cfg, volumes, r, out_dir, log=log, guard=guard)
            for r in range(cfg.reps)]
  return Results(cfg, reps, {"load_s": load_s, "total_s": time.perf_counter() - t0})
