"""The command-line framework every entry point shares: the process flags
(compilation cache, several processes, --debug), timestamped progress lines,
and the one-line error contract (a bad input: one line on stderr, exit 2, no
traceback unless --debug).

Importing it first also tunes malloc before JAX is imported (upgrade_jax.runtime).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import flags, logging

from upgrade_jax.runtime import tune_malloc

tune_malloc()  # before jax is imported: see upgrade_jax/runtime.py

F = flags.FLAGS

flags.DEFINE_string(
    "compilation_cache", str(Path.home() / ".cache" / "upgrade_jax" / "xla"),
    "Persistent XLA compilation cache directory ('' = off): reruns, resumes "
    "and sweep points skip most compilation.")
flags.DEFINE_bool("distributed", False, "Run as one of several processes (multi-host, or several "
                  "processes on one machine): calls jax.distributed.initialize(), with the "
                  "three flags below or, without them, JAX's cluster auto-detection "
                  "(SLURM, Cloud TPU, JAX_COORDINATOR_ADDRESS/...). Process 0 writes the files.")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0's "
                    "coordinator, e.g. 127.0.0.1:12345 (default: auto-detected).")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes (default: "
                     "auto-detected).", lower_bound=1)
flags.DEFINE_integer("process_id", None, "--distributed: this process's index in "
                     "[0, num_processes) (default: auto-detected).", lower_bound=0)
flags.DEFINE_bool(
    "debug", False, "Show the Python traceback of input errors too "
    "(they are one line on stderr otherwise).")



def log_line(msg: str) -> None:
  """A timestamped progress line on stdout (the CLI's `log`)."""
  print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def setup_runtime() -> None:
  """Process-wide settings from flags: log level, compilation cache, hosts."""
  if not F["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    # tifffile warns about a corrupt file before raising; the one-line error
    # that follows names the file, so the warning would only be a second line.
    import logging as py_logging
    py_logging.getLogger("tifffile").setLevel(py_logging.ERROR)
  one_line_errors(check_distributed_flags, checking=True)
  import jax
  if F.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", F.compilation_cache)
    # Every program, not only those that took 1 s (JAX's default): a run's
    # dozens of small programs (validation, prediction, P, the gathers)
    # compile in 0.1-0.8 s each, a third of a tiny warm run (user CPU 27 s ->
    # 17 s, BUILD_NOTES).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from upgrade_jax import parallel
  parallel.maybe_initialize_distributed(F.distributed, coordinator_address=F.coordinator_address,
                                        num_processes=F.num_processes,
                                        process_id=F.process_id)


def check_distributed_flags() -> None:
  """Refuses process flags that would be ignored or cannot work (one line),
  before JAX starts or anything is written."""
  from upgrade_jax.rundir import InputError

  given = [f"--{n}" for n in ("coordinator_address", "num_processes", "process_id")
           if getattr(F, n) is not None]
  if given and not F.distributed:
    raise InputError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only "
                     "with --distributed; add it")
  if (F.num_processes is None) != (F.process_id is None):
    raise InputError("--num_processes and --process_id go together: give both (or neither, "
                     "for JAX's cluster auto-detection)")
  if F.process_id is not None and F.process_id >= F.num_processes:
    raise InputError(f"--process_id={F.process_id} must be below "
                     f"--num_processes={F.num_processes} (ids count from 0)")
  address = F.coordinator_address
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise InputError(f"--coordinator_address={address} must be host:port, e.g. "
                       "127.0.0.1:12345")


def one_line_errors(fn, *args, checking: bool = False):
  """Calls fn(*args); an input error becomes one line on stderr and exit 2.

  Input errors are InputError at any time (e.g. an out_dir in use) and, when
  `checking` (fn only reads and validates, before anything is written), any
  ValueError or OSError. Later ones are bugs and keep their traceback, as
  does everything with --debug.
  """
  from upgrade_jax.rundir import InputError

  try:
    return fn(*args)
  except (InputError, ValueError, OSError) as e:
    if F.debug:
      raise
    if not isinstance(e, InputError) and not checking:
      raise  # after the checks, anything else is a bug: keep its traceback
    msg = " ".join(str(e).split()) or type(e).__name__
    sys.stderr.write(f"error: {msg}\n")
    sys.exit(2)


def refuse_arguments(argv, hint: str = "") -> None:
  """Refuses what absl leaves in argv[1:] (words without --): every option
  of an entry point is a --flag, so a stray word is a typo, not an input.
  One line on stderr (with `hint`, e.g. the flag it may have meant), exit 2."""
  if len(argv) > 1:
    sys.stderr.write(f"error: unexpected arguments {argv[1:]}{hint}; every option is a "
                     "--flag\n")
    sys.exit(2)


def parse_flags_one_line(argv):
  """absl's flag parsing, with a bad flag reported as one line (exit 2)."""
  try:
    return F(argv)
  except flags.Error as e:
    msg = " ".join(str(e).split())
    sys.stderr.write(f"error: {msg}\n")
    sys.exit(2)
