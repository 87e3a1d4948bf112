"""``distillkit study STUDY.yaml``: objective variants x seeds on one base config, compared to a baseline.

A study file::

    base: main.yaml               # a distill config, relative to the study file
    overrides: [train.steps=60]   # --set style overrides applied to the base for every run
    variants:                     # name -> objective (a list of terms, as in a distill config)
      none: [{loss: ce}]
      kd: [{loss: kd, temperature: 2.0}]
      kd-long:                    # or an objective with overrides of the base for this variant only
        objective: [{loss: kd, temperature: 2.0}]
        overrides: [train.lr=1e-4]
    baseline: kd                  # every other variant is compared with it, seed by seed (default: the first)
    baselines: {kd+x: kd+y}       # a variant compared with another variant than the baseline
    seeds: 5                      # or a list: [0, 1, 2]
    folds: 5                      # cross-evaluation: seed s is scored on fold s mod 5 of the data
    metric: accuracy              # or a list; default: the task's headline metric
    threads_per_run: 1            # CPU threads per run (fixed, so --jobs does not change results)
    output_dir: runs/study

Each run goes to ``<output_dir>/<variant>/seed-<n>`` and keeps its per-example predictions
(``predictions.json``); runs of one seed share the student's initialisation, the data order and the evaluation
examples, so each variant is compared with its baseline by a paired two-level bootstrap over seeds and
examples, and by the paired t interval over seeds, with Holm-adjusted p-values and the smallest difference
the design detects (:mod:`distillkit.study.compare`). The teacher is run once: its outputs are cached in
``<output_dir>/teacher-cache`` (what the union of the variants' objectives reads of it; one cache per fold,
kept while the fold runs) and every run reads them from there (``--no-teacher-cache``: each run runs the
teacher itself). A run with a ``summary.json`` is finished and
skipped; one with checkpoints is resumed; one whose config changed since it ran is moved aside and run again.
``--jobs N`` runs N at a time in separate processes. The results are written to ``results.md``,
``results.csv``, ``results.json``, ``results.png`` and ``results-examples.csv.gz`` in ``output_dir`` and
printed; :func:`regenerate` recomputes them from those files alone.
"""

from distillkit.study.bootstrap import BootstrapDifference, two_level_bootstrap
from distillkit.study.report import regenerate
from distillkit.study.runner import fill_teacher_cache, run_study
from distillkit.study.spec import StudyConfig, VariantConfig, load_study
from distillkit.study.stats import PairedDifference, detectable_difference, holm, paired_difference

__all__ = [
    "BootstrapDifference",
    "PairedDifference",
    "StudyConfig",
    "detectable_difference",
    "VariantConfig",
    "fill_teacher_cache",
    "holm",
    "load_study",
    "paired_difference",
    "regenerate",
    "run_study",
    "two_level_bootstrap",
]
