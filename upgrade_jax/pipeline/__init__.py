"""Algorithm 1 of the paper, end to end, and the comparison scenarios.

Modules: config (DataConfig, PipelineConfig, run_key), sources, others (the
registries of data sources and of what inclusion draws from), data (one
repetition's sets), scenarios (the registry of scenarios and competing
methods: data, trainer, options, label), stages (one
repetition's steps), run (repetitions, resume, checks), user (user mode).

    1. train the upgrade network u_θ on the HQ set, with P drawn fresh each step;
    2. upgrade the LQ labels (and the test set's LQ labels, to score them);
    3. train one segmentation network per scenario:
         hq           HQ only
         lq           LQ only
         hq_lq        HQ + LQ
         hq_upgraded  HQ + upgraded LQ
         oracle       every slice with its true labels (the ceiling)
       plus the opt-in competing methods and the global-threshold baseline;
    4. score everything on the test set with pooled Dice, over `reps` seeds.

`run` returns a `Results` and leaves per-repetition files in `out_dir`; a
rerun with the same `out_dir` skips finished repetitions and resumes training
runs from their checkpoints, but only when the run's configuration (`run_key`:
data, perturbations, training, seeds) is the one stored with them; otherwise
it raises `ConfigMismatch` naming the differing fields (or, with fresh=True,
discards the old repetition folders and starts again). A finished repetition
asked for more scenarios trains only the missing ones. `run_user` is the same
method on a user's folders of real HQ and LQ annotations.
"""

from upgrade_jax.data.labels import FelzenszwalbConfig
from upgrade_jax.pipeline.config import (USER_HAZE, HQ_COST, LQ_SOURCES, OTHERS_MODES, ConfigMismatch,
                                         DataConfig, PipelineConfig, run_key)
from upgrade_jax.pipeline.data import RepData, check_counts, hq_picks, load_volumes, prepare_rep
from upgrade_jax.pipeline.others import OTHERS, felzenszwalb_volumes, target_area_range
from upgrade_jax.pipeline.run import Results, discard_reps, prepare_run, run, run_rep
from upgrade_jax.pipeline.scenarios import DEFAULT_SCENARIOS, REGISTRY, SCENARIOS, Scenario
from upgrade_jax.pipeline.sources import SOURCES
from upgrade_jax.pipeline.stages import (threshold_baseline, upgrade_labels, upgrader_of,
                                         write_upgraded)
from upgrade_jax.pipeline.user import OPTIMISTIC, UserData, UserInputs, prepare_user, run_user

__all__ = ["USER_HAZE", "FelzenszwalbConfig", "HQ_COST", "LQ_SOURCES", "OTHERS_MODES", "ConfigMismatch",
           "DataConfig", "PipelineConfig", "run_key", "OTHERS", "SOURCES", "RepData",
           "check_counts", "felzenszwalb_volumes", "hq_picks", "load_volumes", "prepare_rep",
           "target_area_range", "Results", "discard_reps", "prepare_run", "run", "run_rep",
           "DEFAULT_SCENARIOS", "REGISTRY", "SCENARIOS", "Scenario", "threshold_baseline",
           "upgrade_labels", "upgrader_of", "write_upgraded", "OPTIMISTIC", "UserData",
           "UserInputs", "prepare_user", "run_user"]
