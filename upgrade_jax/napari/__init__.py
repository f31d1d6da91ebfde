"""The napari plugin of upgrade_jax (npe2; manifest napari.yaml).

  sample.py     sample data: the virtual microscope's image, its LQ labels (P
                of the library's LQ maker) and HQ labels (the truth)
  upgrading.py  a layer pair through a saved upgrader, as experiments.apply
                upgrades a file pair (no Qt)
  training.py   HQ layer pairs -> a saved upgrader, user mode's training path
                (no Qt)
  widgets.py    the two dock widgets, "Upgrade labels" and "Train upgrader":
                work in napari's thread_worker, errors as one-line notifications
  _headless.py  an offscreen Qt with OpenGL for the tests and the docs' screenshot

napari, Qt and magicgui are imported by widgets.py and _headless.py only, so
`import upgrade_jax` never needs them (pip install -e '.[napari]' brings them).
"""
