"""A headless Qt that napari can draw in: for the tests and the docs' screenshot.

napari's canvas needs an OpenGL context. Qt's offscreen platform
(QT_QPA_PLATFORM=offscreen: no window appears) gets one only through GLX on
an X display, so where there is none `virtual_display` starts Xvfb (Debian:
apt-get install xvfb) and points DISPLAY at it; Mesa's software renderer
(libgl1-mesa-dri, llvmpipe) draws. Call it before the first QApplication
exists: Qt reads both variables when it loads its platform.

Offscreen is enough for the tests (layers, widgets, workers), but there
napari's canvas renders black (measured 2026-12-07: PyQt5 5.15, napari
0.9.2, Mesa 22.3; plain vispy draws). A picture of the canvas needs the
"xcb" platform on the Xvfb display, which loads libxcb-icccm4,
libxcb-keysyms1, libxcb-xinerama0, libxcb-cursor0 and libxkbcommon-x11-0.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

__all__ = ["virtual_display", "has_display"]


def has_display() -> bool:
  """Whether an X display is set or Xvfb can make one."""
  return bool(os.environ.get("DISPLAY")) or shutil.which("Xvfb") is not None


def _qt_app_alive() -> bool:
  widgets = sys.modules.get("qtpy.QtWidgets") or sys.modules.get("PyQt5.QtWidgets")
  return widgets is not None and widgets.QApplication.instance() is not None


@contextlib.contextmanager
def virtual_display(size=(1600, 1000), platform: str = "offscreen"):
  """Sets QT_QPA_PLATFORM=`platform` and, without DISPLAY, runs an Xvfb for the
  duration. Yields the DISPLAY used (None when neither a display nor Xvfb is
  there: napari then cannot draw).

  Xvfb runs under a small bash (dash redirects no fd above 9) that stops it
  when this process closes a pipe: at the end of the block, or, while a
  QApplication still holds the X connection, at this process's exit (Xlib
  ends a process whose X server goes away first: "XIO: fatal IO error").
  Only that Xvfb is stopped.
  """
  os.environ["QT_QPA_PLATFORM"] = platform
  if os.environ.get("DISPLAY") or shutil.which("Xvfb") is None:
    yield os.environ.get("DISPLAY")
    return
  alive_r, alive_w = os.pipe()     # EOF on alive_r: stop Xvfb
  number_r, number_w = os.pipe()   # -displayfd: Xvfb writes its free display number when ready
  script = (f"Xvfb -displayfd {number_w} -screen 0 {size[0]}x{size[1]}x24 -nolisten tcp "
            f">/dev/null 2>&1 & x=$!; read _ <&{alive_r}; kill $x; wait $x")
  proc = subprocess.Popen(["bash", "-c", script], pass_fds=(alive_r, number_w),
                          stdin=subprocess.DEVNULL)
  os.close(alive_r)
  os.close(number_w)
  with os.fdopen(number_r) as f:
    number = f.readline().strip()
  if not number:
    os.close(alive_w)
    proc.wait()
    raise RuntimeError("Xvfb exited before it opened a display")
  os.environ["DISPLAY"] = f":{number}"
  try:
    yield os.environ["DISPLAY"]
  finally:
    if not _qt_app_alive():   # else alive_w stays open until the process exits
      del os.environ["DISPLAY"]
      os.close(alive_w)
      proc.wait(timeout=30)
