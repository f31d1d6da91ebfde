"""Several JAX processes on one machine: 2 processes x 2 CPU devices train what
1 process x 4 devices trains, write each file once, and resume after a kill
(the killed run, resumed, is the one compared with the 1-process run).

Each run is the CLI (experiments.upgrade) in subprocesses on localhost: the
device count is fixed when JAX starts (XLA_FLAGS), and a process joins the
others through jax.distributed (a coordinator on a free port, gloo
collectives on CPU).
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]

# The tiny pipeline run of test_pipeline.py, upgrade network only: 3 epochs of
# 2 steps (patience high enough that none stops early), global batch 4.
TINY = ["--n_volumes=5", "--volume_shape=6,96,96", "--n_test=1", "--n_hq=4", "--max_test=4",
        "--n_lq=6", "--width=4", "--crop=32", "--batch_size=4", "--max_steps=6",
        "--steps_per_epoch=2", "--log_every=2", "--checkpoint_every=2", "--patience=5",
        "--scenarios=",
        "--threshold_baseline=false"]

# One persistent XLA cache for the runs of this module (not ~/.cache).
CACHE = tempfile.mkdtemp(prefix="upgrade_jax_xla_mp_")


def _free_port() -> int:
  """A free port below Linux's ephemeral range (32768-60999), so no socket
  the system hands out meanwhile (e.g. gloo's, or another test's) takes it
  before the coordinator binds it."""
  rng = random.Random()
  for _ in range(100):
    port = rng.randrange(20000, 32000)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return port
  raise RuntimeError("no free port in 20000-32000")


def launch(out_dir: Path, processes: int, devices: int, extra=()) -> list[subprocess.Popen]:
  """Starts `processes` CLI processes with `devices` CPU devices each."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"}
  args = [sys.executable, "-m", "experiments.upgrade", f"--compilation_cache={CACHE}",
          *TINY, f"--out_dir={out_dir}", *extra]
  if processes > 1:
    port = _free_port()
    args += ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
             f"--num_processes={processes}"]
  return [subprocess.Popen(args + ([f"--process_id={i}"] if processes > 1 else []),
                           cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
          for i in range(processes)]


def finish(procs, timeout=240) -> list[str]:
  """Waits for every process; returns their stdouts (asserts exit 0)."""
  outs = []
  for i, p in enumerate(procs):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{err[-3000:]}"
    outs.append(out)
  return outs


def model_vars(out_dir: Path) -> dict:
  with np.load(out_dir / "model" / "variables.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """out_dirs: "one" (1 x 4 devices) and "two" (2 x 2 devices, killed after its
  first epoch's checkpoint, then rerun to the end). The 2-process run both
  checks the trajectory and the resume: five processes instead of seven."""
  tmp = tmp_path_factory.mktemp("multiprocess")
  dirs = {k: tmp / k for k in ("one", "two")}
  one = launch(dirs["one"], 1, 4)
  # Kill both processes (SIGKILL) as soon as process 0 reports epoch 1: its
  # checkpoint (step 2) is committed, training goes on towards step 6.
  killed = launch(dirs["two"], 2, 2)
  seen = []
  for line in killed[0].stdout:
    seen.append(line)
    if " epoch 1 " in line:
      break
  for p in killed:
    p.send_signal(signal.SIGKILL)
  rest = [p.communicate(timeout=60) for p in killed]
  assert " epoch 1 " in seen[-1], f"no epoch 1 before the kill:\n{''.join(seen)}\n{rest}"
  assert not (dirs["two"] / "results.json").exists()
  logs = {"one": finish(one), "two": finish(launch(dirs["two"], 2, 2))}
  return dirs, logs


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(runs):
  dirs, logs = runs
  a, b = model_vars(dirs["one"]), model_vars(dirs["two"])
  assert a.keys() == b.keys() and len(a) > 40
  # The tolerances of test_parallel.py's 8-vs-1-device test: the same global
  # batch and keys; only the order of float reductions differs.
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=6e-3, err_msg=k)
  assert np.mean([np.mean(np.abs(a[k] - b[k])) for k in a]) < 1e-4
  r1 = json.loads((dirs["one"] / "results.json").read_text())
  r2 = json.loads((dirs["two"] / "results.json").read_text())
  for k in ("lq", "upgraded"):
    assert r2["annotation_dice"][k]["mean"] == pytest.approx(
        r1["annotation_dice"][k]["mean"], abs=2e-3)
  # Both processes ran the whole program; process 0 alone wrote the files.
  assert all("annotation Dice on the test set" in out for out in logs["two"])
  assert sorted(p.name for p in (dirs["two"] / "upgraded").iterdir()) == sorted(
      p.name for p in (dirs["one"] / "upgraded").iterdir())
  assert not list(dirs["two"].rglob("*.upgrade_jax.tmp"))


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_from_its_checkpoint(runs):
  dirs, logs = runs
  for out in logs["two"]:
    step = re.search(r"resuming from step (\d+)", out)
    assert step and int(step.group(1)) >= 2, out   # from a checkpoint, not from scratch
  assert not list(dirs["two"].rglob("*.upgrade_jax.tmp"))
