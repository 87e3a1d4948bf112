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
    seeds: 5                      # or a list: [0, 1, 2]
    metric: accuracy              # or a list; default: the task's headline metric
    threads_per_run: 1            # CPU threads per run (fixed, so --jobs does not change results)
    output_dir: runs/study

Each run goes to ``<output_dir>/<variant>/seed-<n>``; runs of one seed share the student's initialisation and
the data order, so each variant is compared with the baseline by the per-seed difference (mean and a 95%
paired t interval). The teacher is run once: its outputs are cached in ``<output_dir>/teacher-cache`` (what
the union of the variants' objectives reads of it) and every run reads them from there
(``--no-teacher-cache``: each run runs the teacher itself). A run with a ``summary.json`` is finished and
skipped; one with checkpoints is resumed; one whose config changed since it ran is moved aside and run again.
``--jobs N`` runs N at a time in separate processes. The results are written to ``results.md``,
``results.csv``, ``results.json`` and ``results.png`` in ``output_dir`` and printed.
"""

from distillkit.study.runner import fill_teacher_cache, run_study
from distillkit.study.spec import StudyConfig, VariantConfig, load_study
from distillkit.study.stats import PairedDifference, paired_difference

__all__ = [
    "PairedDifference",
    "StudyConfig",
    "VariantConfig",
    "fill_teacher_cache",
    "load_study",
    "paired_difference",
    "run_study",
]
