r"""Makes docs/napari_upgrade.png: the napari plugin on its sample data, offscreen.

    python docs/make_napari_screenshot.py [--steps=200] [--width=8] \
        [--model=DIR] [--out=docs/napari_upgrade.png]

Opens a viewer on a virtual display (upgrade_jax/napari/_headless.py: an
Xvfb when no display is set, Qt's "xcb" platform on it: under Qt's
"offscreen" platform napari's canvas renders black) with the sample data,
trains a small upgrader on the sample's HQ labels with the "Train upgrader"
widget (200 steps at width 8: about a minute or two on 2 CPU cores; --model
skips this and uses a saved one), runs the "Upgrade labels" widget on the
sample's LQ labels, shows the most doubtful slice of its review queue and
saves viewer.screenshot(canvas_only=False), as a palette PNG (small).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wait(app, widget, timeout: float) -> None:
  """Runs Qt's event loop until the widget's worker is done."""
  end = time.monotonic() + timeout
  while widget.busy:
    if time.monotonic() > end:
      raise TimeoutError(f"{type(widget).__name__} still busy after {timeout:.0f} s")
    app.processEvents()
    time.sleep(0.02)
  for _ in range(20):   # the finished/returned slots, then a repaint
    app.processEvents()
    time.sleep(0.01)


def make_screenshot(out: Path, *, steps: int = 200, width: int = 8, model=None,
                    size=(1500, 900), log=print) -> Path:
  """Writes the screenshot to `out` (a palette PNG) and returns it."""
  from upgrade_jax.napari._headless import virtual_display

  with virtual_display(size=(size[0] + 100, size[1] + 100), platform="xcb"), \
      tempfile.TemporaryDirectory(prefix="upgrade_jax_shot_") as tmp:
    import napari
    from PIL import Image as PILImage
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="upgrade_jax")
    app = QApplication.instance()
    viewer.window._qt_window.resize(*size)
    image, lq, truth = viewer.open_sample("upgrade_jax", "synthetic")
    if model is None:
      dock, train = viewer.window.add_plugin_dock_widget("upgrade_jax", "Train upgrader")
      train.pair_image.value, train.pair_labels.value = image, truth
      train.add_pair.native.click()
      train.max_steps.value, train.net_width.value = steps, width
      train.folder.value = model = Path(tmp) / "model"
      t0 = time.perf_counter()
      train.train.native.click()
      _wait(app, train, timeout=3600)
      if train.result is None:
        raise RuntimeError(f"training failed: {train.status.value}")
      log(f"trained {steps} steps at width {width} in {time.perf_counter() - t0:.0f} s: "
          f"{train.status.value}")
      viewer.window.remove_dock_widget(dock)
    dock, upgrade = viewer.window.add_plugin_dock_widget("upgrade_jax", "Upgrade labels")
    from qtpy.QtCore import Qt
    viewer.window._qt_window.resizeDocks([dock], [520], Qt.Horizontal)
    upgrade.image.value, upgrade.lq_labels.value, upgrade.model.value = image, lq, model
    upgrade.run.native.click()
    _wait(app, upgrade, timeout=600)
    if upgrade.result is None:
      raise RuntimeError(f"upgrade failed: {upgrade.status.value}")
    upgraded = viewer.layers[f"{lq.name} upgraded"]
    lq.contour, upgraded.opacity = 2, 0.5   # LQ as outlines over the filled upgrade
    upgrade.queue.native.cellClicked.emit(0, 0)   # the most doubtful slice
    upgrade.queue.native.selectRow(0)
    viewer.reset_view()   # the whole slice in the canvas as the window is now sized
    _wait(app, upgrade, timeout=10)
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
      toast.close()   # the status line says the same; a toast would hide the canvas
    _wait(app, upgrade, timeout=10)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    viewer.close()
    # A palette of 256 colours: the picture is UI and greys, ~4x smaller than RGBA.
    PILImage.fromarray(shot[..., :3]).quantize(256).save(out, optimize=True)
  log(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB, {shot.shape[1]}x{shot.shape[0]})")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=200, help="training steps")
  parser.add_argument("--width", type=int, default=8, help="UNet width")
  parser.add_argument("--model", type=Path, default=None,
                      help="a saved model folder to use instead of training one")
  parser.add_argument("--out", type=Path, default=ROOT / "docs" / "napari_upgrade.png")
  args = parser.parse_args(argv)
  make_screenshot(args.out, steps=args.steps, width=args.width, model=args.model)
  return 0


if __name__ == "__main__":
  sys.exit(main())
