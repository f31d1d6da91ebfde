"""The reproduction's durable record: every finished repetition's rep.json,
kept in the repository beside the document it makes.

Why: the run folders (runs/reproduction/, git-ignored, gigabytes of
checkpoints) live on one machine. A machine is not kept between sittings,
and losing them once lost a whole day of finished repetitions. A rep.json is
a few kB of numbers and the run key, so the record keeps them all, and docs/reproduction.md is rendered from the
record alone: a repetition finished on any machine is never computed again.

Layout: the run folders' own, with only the rep.json files, so the renderer
reads a record and a run folder alike:

    <records>/<entry id>/rep<k>/rep.json                  a run's repetition k
    <records>/<entry id>/<flag>=<value>/rep<k>/rep.json   a sweep point's

`seed_run` copies the record back into a run folder where it lacks them,
and the upgrade CLI then treats those repetitions as finished (after checking
that the stored run key is the command's own: a stale record is refused by
the CLI, loudly, like any changed flag).

What is not kept: nothing of the images or labels. A rep.json holds Dice
scores, sizes, timings and the configuration; data digests (hashes of a
dataset's pixels) are dropped from the record, so no file derived from a
real dataset's content is committed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from upgrade_jax.files import write_text

__all__ = ["sync", "seed_run", "rep_files", "RECORD_DROPS"]

# Keys (at any depth) left out of the record: hashes of the data's pixels.
RECORD_DROPS = ("train_digest", "val_digest", "data_digest", "digests")
_REP = re.compile(r"rep(\d+)")


def rep_files(run_dir: Path) -> list[Path]:
  """The finished rep.json files of one entry's folder (a run's rep<k>/ and a
  sweep's <flag>=<value>/rep<k>/), relative to it."""
  run_dir = Path(run_dir)
  found = [p for p in run_dir.glob("rep*/rep.json")] + list(run_dir.glob("*=*/rep*/rep.json"))
  return sorted(p.relative_to(run_dir) for p in found if _REP.fullmatch(p.parent.name))


def _strip(d):
  if isinstance(d, dict):
    return {k: _strip(v) for k, v in d.items() if k not in RECORD_DROPS}
  if isinstance(d, list):
    return [_strip(v) for v in d]
  return d


def sync(entry_ids, runs_root: Path, records: Path) -> list[Path]:
  """Copies every finished repetition of the entries from runs_root into the
  record (atomically; unchanged files are left alone). Returns the files
  written."""
  written = []
  for eid in entry_ids:
    for rel in rep_files(Path(runs_root) / eid):
      src, dst = Path(runs_root) / eid / rel, Path(records) / eid / rel
      text = json.dumps(_strip(json.loads(src.read_text())), indent=1, sort_keys=True) + "\n"
      if dst.exists() and dst.read_text() == text:
        continue
      write_text(dst, text)
      written.append(dst)
  return written


def seed_run(entry_id: str, records: Path, runs_root: Path) -> int:
  """Copies the entry's recorded repetitions into its run folder where it
  lacks them; returns how many. A run folder's own rep.json is never
  overwritten."""
  n = 0
  for rel in rep_files(Path(records) / entry_id):
    dst = Path(runs_root) / entry_id / rel
    if not dst.exists():
      write_text(dst, (Path(records) / entry_id / rel).read_text())
      n += 1
  return n
