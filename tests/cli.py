"""Run the CLI entry points as a user would, without paying Python's and
JAX's start-up for every case.

  cli.run(module, args, cwd=..., env=..., timeout=...) -> CompletedProcess

is `subprocess.run([python, "-m", module, *args], capture_output=True,
text=True)`, with the same exit code, stdout and stderr: each case is a
process of its own, with the caller's cwd, environment and umask, stdin
from /dev/null, and `__main__` run by runpy as `python -m` runs it. Why a
fork server: a fresh interpreter spends ~3-4 s importing jax, flax, optax,
orbax and scikit-image before the CLI reads its first flag, and ~50 cases
only check that a bad input is refused in a fraction of a second.

One server per test process (each xdist worker): a fresh interpreter that
imports those libraries and `upgrade_jax` but starts no JAX backend (XLA
threads do not survive a fork; each child starts its own, so XLA_FLAGS of
the case still apply) and imports no `experiments` module (each child
defines its absl flags anew). A case whose JAX_* variables differ from the
server's (jax reads them at import) runs as a plain subprocess instead.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SERVER_ENV = {"JAX_PLATFORMS": "cpu"}
_server = None   # (Popen, socket path, its JAX_* variables) of this process's server


def _jax_vars(env) -> dict:
  return {k: v for k, v in env.items() if k.startswith("JAX_")}


def _send(sock, obj) -> None:
  data = json.dumps(obj).encode()
  sock.sendall(struct.pack("!I", len(data)) + data)


def _recv(sock):
  head = b""
  while len(head) < 4:
    chunk = sock.recv(4 - len(head))
    if not chunk:
      return None
    head += chunk
  (n,), data = struct.unpack("!I", head), b""
  while len(data) < n:
    chunk = sock.recv(n - len(data))
    if not chunk:
      return None
    data += chunk
  return json.loads(data)


# --------------------------------------------------------------------------
# The server (this file run as a script).

def _child(req) -> None:
  """In the forked child: become the case's process and run its module."""
  import runpy
  os.setpgid(0, 0)   # its own group: a timeout kills it and what it started
  os.environ.clear()
  os.environ.update(req["env"])
  os.chdir(req["cwd"])
  os.umask(req["umask"])
  fds = (os.open(os.devnull, os.O_RDONLY), os.open(req["stdout"], os.O_WRONLY),
         os.open(req["stderr"], os.O_WRONLY))
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
    os.close(fd)
  sys.stdin = open(0, closefd=False)
  sys.stdout = open(1, "w", buffering=1, closefd=False)
  sys.stderr = open(2, "w", buffering=1, closefd=False)
  sys.argv = [req["module"], *req["args"]]
  sys.path[0] = req["cwd"]   # `python -m` puts the cwd first
  code = 0
  try:
    if req.get("preamble"):
      exec(compile(req["preamble"], "<preamble>", "exec"), {"__name__": "__preamble__"})
    runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if e.code is not None and not isinstance(e.code, int):
      print(e.code, file=sys.stderr)
  except BaseException:   # what the interpreter prints for an uncaught exception
    import traceback
    traceback.print_exc()
    code = 1
  try:
    atexit._run_exitfuncs()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(path: str) -> None:
  # What every CLI imports: loaded once here, shared copy-on-write.
  import absl.app  # noqa: F401
  import flax  # noqa: F401
  import jax
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot  # noqa: F401
  import optax  # noqa: F401
  import orbax.checkpoint  # noqa: F401
  import skimage.measure  # noqa: F401
  import skimage.segmentation  # noqa: F401
  import tifffile  # noqa: F401
  import upgrade_jax  # noqa: F401
  import upgrade_jax.pipeline  # noqa: F401
  from jax._src import xla_bridge
  assert not xla_bridge.backends_are_initialized(), "an import started a JAX backend"
  assert not any(m.startswith("experiments") for m in sys.modules), "experiments imported"
  del jax
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(path)
  listener.listen(4)
  print("ready", flush=True)
  while True:
    conn, _ = listener.accept()
    req = _recv(conn)
    if req is None:
      conn.close()
      continue
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      listener.close()
      conn.close()
      _child(req)
    _send(conn, {"pid": pid})
    _, status = os.waitpid(pid, 0)
    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
    conn.close()


# --------------------------------------------------------------------------
# The client.

def _start() -> tuple:
  global _server
  if _server is not None and _server[0].poll() is None:
    return _server
  path = os.path.join(tempfile.mkdtemp(prefix="upgrade_jax_cli_"), "s")
  env = _server_env()
  proc = subprocess.Popen([sys.executable, __file__, path], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  if line.strip() != "ready":
    proc.kill()
    raise RuntimeError(f"the CLI fork server did not start: {line!r}")
  atexit.register(proc.kill)
  _server = (proc, path, _jax_vars(env))
  return _server


def _server_env() -> dict:
  return {**os.environ, **_SERVER_ENV, "PYTHONPATH": str(ROOT)}


def run(module: str, args, *, cwd=ROOT, env=None, timeout: float = 600,
        check: bool = False, preamble: str | None = None) -> subprocess.CompletedProcess:
  """`python -m module *args` in `cwd` with `env` (default os.environ plus
  JAX_PLATFORMS=cpu), its output captured as text; raises
  subprocess.TimeoutExpired after `timeout` s (the case's processes killed),
  and, with `check`, AssertionError on a non-zero exit. `preamble`: Python
  the case's process runs before the module (e.g. a SIGKILL at a chosen
  call)."""
  env = {**os.environ, **_SERVER_ENV} if env is None else dict(env)
  env.setdefault("PYTHONPATH", str(ROOT))
  args = [str(a) for a in args]
  cmd = [sys.executable, "-m", module, *args]
  if preamble:
    cmd = [sys.executable, "-c", f"{preamble}\nimport runpy, sys\n"
           f"sys.argv = [{module!r}, *sys.argv[1:]]\n"
           f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)", *args]
  # The running server's variables (os.environ may have changed since it started).
  server_vars = _server[2] if _server is not None else _jax_vars(_server_env())
  if _jax_vars(env) != server_vars:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  else:
    proc = _run_forked(module, args, cmd, cwd, env, timeout, preamble)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
  return proc


def _run_forked(module, args, cmd, cwd, env, timeout, preamble=None):
  path = _start()[1]
  umask = os.umask(0)
  os.umask(umask)
  with tempfile.TemporaryDirectory(prefix="upgrade_jax_cli_out_") as out:
    files = [os.path.join(out, n) for n in ("stdout", "stderr")]
    for f in files:
      Path(f).touch()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    try:
      _send(sock, {"module": module, "args": args, "cwd": str(cwd), "env": env,
                   "umask": umask, "stdout": files[0], "stderr": files[1],
                   "preamble": preamble})
      pid = _recv(sock)["pid"]
      sock.settimeout(timeout)
      try:
        reply = _recv(sock)
      except socket.timeout:
        try:
          os.killpg(pid, 9)
        except ProcessLookupError:
          pass
        _recv_quietly(sock)
        raise subprocess.TimeoutExpired(cmd, timeout) from None
    finally:
      sock.close()
    if reply is None:
      raise RuntimeError("the CLI fork server died during a case")
    stdout, stderr = (Path(f).read_text(errors="replace") for f in files)
  return subprocess.CompletedProcess(cmd, reply["returncode"], stdout, stderr)


def _recv_quietly(sock) -> None:
  sock.settimeout(30)
  try:
    _recv(sock)
  except OSError:
    pass


if __name__ == "__main__":
  sys.path[0] = str(ROOT)   # not tests/: a case sees what `python -m` sees
  _serve(sys.argv[1])
