"""A run's output folder, kept apart from the user's inputs.

A user's files are sacred: nothing this package writes may land on, in or
over an input. Every entry point therefore

  1. builds an `InputGuard` from every input it reads (folders and files),
  2. calls `check_out_dir(out_dir, guard)` before creating anything: the
     out_dir must not equal, sit inside or contain an input folder or file
     (resolved, so symlinks count), must not be a file or under one, and must
     be creatable and writable,
  3. holds a `RunLock` on the out_dir while it runs (a second live run on the
     same out_dir is refused; a killed run's lock dies with its process), and
     removes its own stale temporary files (`remove_stale_temps`); the lock
     marks the out_dir as its entry point's (`OWNER_NAME`), and
     `check_out_dir(..., owner=...)` refuses an out_dir holding files of the
     user or of another entry point, so nothing overwrites a file it did not
     write,
  4. passes the guard to every file writer (`io.write_labels`), which checks
     each output path again, file by file, by resolved path and inode.

Problems with inputs, flags or the out_dir raise `InputError`: the CLI
prints its message as one line, without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterable

__all__ = ["InputError", "DiskFull", "disk_full", "check_space", "InputGuard", "check_out_dir", "check_owner", "RunLock",
           "remove_stale_temps", "TEMP_SUFFIX", "temp_path_for", "output_mode",
           "is_primary_process", "OWNER_NAME", "OWNERS", "mark_owner"]

# Temporary files of atomic writes end in this; a rerun deletes the ones a
# killed run left in its own out_dir, and no other file.
TEMP_SUFFIX = ".upgrade_jax.tmp"
LOCK_NAME = ".upgrade_jax.lock"
# Which entry point's outputs an out_dir holds: one line, the entry point's
# name, written by its RunLock.
OWNER_NAME = ".upgrade_jax.owner"
# Entry point -> the names its outputs have (what an out_dir made before the
# owner file existed holds when it is that entry point's: it may go on). A
# sweep's own out_dir also holds its points' folders, <flag>=<value>/.
OWNERS = {
    "upgrade": ("results.json", "rep0", "upgrade"),
    "apply": ("apply.json",),
    "advise": ("advice.json", "curve"),
    "sweep": ("sweep.json",),
}


def is_primary_process() -> bool:
  """Whether this process writes the run's files: always for one process;
  with several JAX processes (upgrade_jax.parallel) only process 0, so they
  never race on one path (every process runs the same program). Asks JAX
  only after jax.distributed.initialize: a single process never starts a
  JAX backend (e.g. takes a GPU) just to write a file."""
  import jax  # here, not at the top: checking paths needs no JAX
  return not jax.distributed.is_initialized() or jax.process_index() == 0


class InputError(ValueError):
  """A problem with the user's inputs, flags or out_dir (not a bug).

  The message names the file, flag or shape and says what to do.
  """


class DiskFull(InputError):
  """A write failed for lack of space (ENOSPC, EDQUOT). Its message names
  the file, the space it needed and what is free; nothing is left under
  the file's final name, and the rerun, with space, resumes."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _out_of_space(error: BaseException) -> bool:
  """An OSError with ENOSPC/EDQUOT, or an error of a library that writes in
  C++ (Orbax through TensorStore raises ValueError('RESOURCE_EXHAUSTED: ...
  No space left on device [os_error_code='28']')) saying the same."""
  if isinstance(error, OSError):
    return error.errno in _NO_SPACE
  text = str(error)
  return any(s in text for s in ("No space left on device", "Disk quota exceeded",
                                 "os_error_code='28'", "os_error_code='122'"))


def disk_full(error: BaseException, path, needed: int | None) -> DiskFull | None:
  """The DiskFull for an error that ran out of space writing `path` (an
  OSError, or a C++ writer's error saying so: `_out_of_space`)
  (needed: its size in bytes where known), or None for any other error."""
  if not _out_of_space(error):
    return None
  path = Path(path)
  try:
    st = os.statvfs(path.parent)
    free = f"{st.f_bavail * st.f_frsize / 1e6:.1f} MB free there"
  except OSError:
    free = "free space unknown"
  need = f"about {needed / 1e6:.1f} MB" if needed else "more space"
  return DiskFull(f"{path}: no space left on the device while writing it (it needs {need}; "
                  f"{free}); nothing was left under its name: free space and rerun the same "
                  "command, which goes on from there")


def check_space(path, needed: int) -> None:
  """Raises DiskFull (one line) when the file system that will hold `path`
  has less than `needed` bytes free for this user: a write that cannot fit
  is refused before it starts. Where the space cannot be read, it passes."""
  path = Path(path)
  parent = next((p for p in (path, *path.parents) if p.exists()), None)
  try:
    st = os.statvfs(parent)
  except (OSError, TypeError):
    return
  free = st.f_bavail * st.f_frsize
  if free < needed:
    raise DiskFull(f"{path}: not enough space on the device to write it (it needs about "
                   f"{needed / 1e6:.1f} MB; {free / 1e6:.1f} MB free there); nothing was "
                   "written: free space and rerun the same command, which goes on from there")


def _resolve(path) -> Path:
  return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _is_within(path: Path, root: Path) -> bool:
  return path == root or root in path.parents


class InputGuard:
  """Every input a run reads: folders (all their files) and single files.

  Args:
    inputs: paths of input folders or files (missing ones are ignored here;
      the readers report them).
  """

  def __init__(self, inputs: Iterable = ()):
    self.roots: list[tuple[Path, Path]] = []   # (as given, resolved)
    self._ids: set[tuple[int, int]] = set()
    for p in inputs:
      if not p:
        continue
      p = Path(p)
      self.roots.append((p, _resolve(p)))
      files = [p] if p.is_file() else (sorted(p.iterdir()) if p.is_dir() else [])
      for f in files:
        try:
          st = f.stat()  # follows links: the file the user's name points at
        except OSError:
          continue
        self._ids.add((st.st_dev, st.st_ino))

  def check_output(self, path) -> None:
    """Raises InputError if writing `path` could change an input."""
    path = Path(path)
    target = _resolve(path.parent) / path.name
    for given, root in self.roots:
      if _is_within(target, root) or target == root:
        raise InputError(f"refusing to write {path}: it is (inside) the input {given}; "
                         "choose an --out_dir outside every input folder")
    for p in (path, target):
      try:
        st = p.stat()
      except OSError:
        continue
      if (st.st_dev, st.st_ino) in self._ids:
        raise InputError(f"refusing to write {path}: it is the same file as an input; "
                         "choose an --out_dir outside every input folder")


def _nearest_existing(path: Path) -> Path:
  p = path
  while not p.exists() and p != p.parent:
    if p.is_symlink():  # a dangling link: creating through it is refused below
      break
    p = p.parent
  return p


def _owner_of(out: Path) -> str | None:
  """The entry point whose outputs `out` holds: its owner file's, else the
  one whose record files it holds (an out_dir of an older version), else None."""
  mark = out / OWNER_NAME
  if mark.is_file():
    return mark.read_text().strip() or None
  for owner, names in OWNERS.items():
    if any((out / n).exists() for n in names):
      return owner
  if any(p.is_dir() and "=" in p.name for p in out.iterdir()):
    return "sweep"
  return None


def _only_temps(path: Path) -> bool:
  """Whether `path` is one of our temporary files, or a folder (not a link)
  holding nothing else: what a killed run leaves, removed by the next."""
  if path.is_symlink():
    return False
  if path.is_dir():
    return all(_only_temps(p) for p in path.iterdir())
  return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def check_owner(out_dir, owner: str) -> None:
  """Refuses an out_dir that holds anything but `owner`'s own outputs: a
  user's files, or another entry point's run (its outputs would be
  overwritten or mixed). A new or empty folder is fine; creates nothing.

  Raises:
    InputError: naming --out_dir, whose files it holds and what to do.
  """
  if owner not in OWNERS:
    raise ValueError(f"check_owner: unknown owner {owner!r}; one of {sorted(OWNERS)}")
  out = Path(out_dir)
  if not out.is_dir():
    return
  ours = (LOCK_NAME, OWNER_NAME)
  present = sorted(p.name for p in out.iterdir() if p.name not in ours and not _only_temps(p))
  if not present:
    return
  found = _owner_of(out)
  if found == owner:
    return
  if found is None:
    raise InputError(f"--out_dir={out} already holds files upgrade_jax did not write "
                     f"({', '.join(present[:3])}{', ...' if len(present) > 3 else ''}); "
                     "they could be overwritten: choose a new or empty --out_dir")
  raise InputError(f"--out_dir={out} holds the outputs of experiments.{found}; this is "
                   f"experiments.{owner}: choose another --out_dir")


def check_out_dir(out_dir, guard: InputGuard, owner: str | None = None) -> None:
  """Checks that `out_dir` can be created and holds no input; creates nothing.
  With `owner` (the entry point: a key of OWNERS) also that it holds only
  that entry point's own outputs (`check_owner`).

  Raises:
    InputError: naming --out_dir and what to do.
  """
  out = Path(out_dir)
  if not str(out_dir).strip():
    raise InputError("--out_dir is empty; give a folder for the run's outputs")
  resolved = _resolve(out)
  for given, root in guard.roots:
    if _is_within(resolved, root):
      raise InputError(f"--out_dir={out} is {'the' if resolved == root else 'inside the'} "
                       f"input {given}; choose an --out_dir outside every input")
    if _is_within(root, resolved):
      raise InputError(f"--out_dir={out} contains the input {given}; outputs could overwrite "
                       "it: choose an --out_dir that holds no input")
  if out.exists() and not out.is_dir():
    raise InputError(f"--out_dir={out} is a file, not a folder; choose a folder path")
  base = _nearest_existing(resolved)
  if not base.exists():
    raise InputError(f"--out_dir={out}: {base} is a broken link; remove it or choose another "
                     "--out_dir")
  if not base.is_dir():
    raise InputError(f"--out_dir={out} lies under the file {base}; choose a folder path")
  # Subfolders an earlier run left (or a user linked) must not lead into an input.
  if out.is_dir():
    for dirpath, dirnames, filenames in os.walk(out):
      for name in dirnames + filenames:
        p = Path(dirpath) / name
        if not p.is_symlink():
          continue
        real = _resolve(p)
        for given, root in guard.roots:
          if _is_within(real, root) or _is_within(root, real):
            raise InputError(f"--out_dir={out} holds {p}, a link to the input {given}; "
                             "remove the link or choose another --out_dir")
  # Writable: access() first, then a probe that leaves nothing behind (root
  # passes access() on folders it still cannot write, e.g. immutable ones).
  if not os.access(base, os.W_OK | os.X_OK):
    raise InputError(f"--out_dir={out}: cannot write in {base} (permission denied); "
                     "choose a writable --out_dir")
  try:
    probe = tempfile.mkdtemp(prefix=".upgrade_jax_probe_", dir=base)
    os.rmdir(probe)
  except OSError as e:
    raise InputError(f"--out_dir={out}: cannot write in {base} ({e.strerror}); "
                     "choose a writable --out_dir") from None
  if owner is not None:
    check_owner(out, owner)


class RunLock:
  """An exclusive lock on a run's out_dir, held while the run lives.

  fcntl locks belong to the process: a killed run releases its lock, so a
  rerun is never blocked by a stale lock file. A run that ends (finished,
  failed or refused) removes the file while it still holds the lock, so a
  refused rerun leaves nothing behind; a process that opened the file just
  before it went re-checks, after locking, that its file is still the one
  at the path (else it locks afresh). With several JAX processes only
  process 0 takes it (the others write no files; a second run's process 0
  is refused, and its other processes fail with it).
  """

  def __init__(self, out_dir, owner: str | None = None):
    self.path = Path(out_dir) / LOCK_NAME
    self.owner = owner   # written to OWNER_NAME once the lock is held
    self._fd = None

  def __enter__(self) -> "RunLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if not is_primary_process():
      return self
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          os.close(fd)
          raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise InputError(f"--out_dir={self.path.parent} is in use by a running upgrade_jax "
                         f"process (pid {holder}); wait for it to finish or choose another "
                         "--out_dir") from None
      try:   # still the file at the path? (its last holder removes it on exit)
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    self._fd = fd
    if self.owner is not None:
      mark_owner(self.path.parent, self.owner)
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()   # while held: see the class docstring
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def mark_owner(out_dir, owner: str) -> None:
  """Marks out_dir (created if needed) as holding `owner`'s outputs, unless
  marked already; process 0 only. Call after check_owner has passed."""
  if not is_primary_process():
    return
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  mark = out / OWNER_NAME
  if not mark.exists():
    mark.write_text(owner + "\n")


def remove_stale_temps(out_dir) -> list[Path]:
  """Deletes the temporary files (`*TEMP_SUFFIX`) a killed run left in out_dir.

  Call only while holding the out_dir's RunLock. Links are not followed.
  With several JAX processes only process 0 (the one holding the lock) does.
  """
  removed = []
  if not is_primary_process():
    return removed
  for dirpath, _, filenames in os.walk(out_dir):
    for name in filenames:
      p = Path(dirpath) / name
      if name.startswith(".") and name.endswith(TEMP_SUFFIX) and not p.is_symlink():
        p.unlink()
        removed.append(p)
  return removed


def temp_path_for(path: Path) -> tuple[int, str]:
  """(fd, name) of a fresh temporary file beside `path` for an atomic write."""
  return tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)


def output_mode() -> int:
  """The mode a new file gets under the process umask (0o666 & ~umask).

  mkstemp creates 0600 files; atomic writers chmod to this, so outputs are
  as readable by the user's group as any file `open` would create.
  """
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask
