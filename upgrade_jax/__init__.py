"""upgrade_jax: upgrade low-quality cell-segmentation annotations (Vadineanu et al., 2024).

Modules:
  perturb       P, the label perturbation function (pure, jittable, vmappable)
  losses        soft Dice loss
  metrics       Dice counts, pooled Dice, summary statistics, Wilcoxon tests
  models.unet   the Flax UNet used for both u_theta and the segmentation network
  data          synthetic virtual microscope, TIFF I/O, the paper's slice sampling
  train         the shared training engine
  pipeline      Algorithm 1 and the scenarios
  instances     instance labels from an upgrade; StarDist-style matching (AP/F1 at IoU)
  export        the saved upgrader (model/: model.json + variables.npz), applied per image
"""

__version__ = "0.1.0"
