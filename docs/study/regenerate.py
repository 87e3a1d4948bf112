"""Regenerates the committed studies' reports and figures from the committed files in this folder.

    python docs/study/regenerate.py                   # every <prefix>.* below (and curves.png)
    python docs/study/regenerate.py --curves runs/curves   # first: curves.csv from the dev-curve runs

For each study prefix (``results``, ``embed-results``, ``cross-tokenizer-results``) it reads
``<prefix>.csv`` (every seed's value), ``<prefix>.json`` (baselines, metrics, teacher, notes) and
``<prefix>-examples.csv.gz`` (every run's per-example predictions, where the study kept them), recomputes
every statistic and rewrites ``<prefix>.md``, ``.csv``, ``.json`` and ``.png``. ``curves.png`` is drawn
from ``curves.csv``, which ``--curves DIR`` writes from the held-out evaluations of the runs ``DIR/teacher``
and ``DIR/kd`` (``make study-curves``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distillkit.study import regenerate
from distillkit.study.plots import curves_from_runs, plot_curves

HERE = Path(__file__).resolve().parent
CURVES = {
    "6-layer teacher on labels (its 600-step fine-tuning schedule)": "teacher",
    "3-layer student, kd (the study's 300-step schedule)": "kd",
}


def main() -> None:
    """Regenerates every committed study report, and the curves when their CSV exists."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=Path, help="write curves.csv from the runs DIR/teacher and DIR/kd")
    args = parser.parse_args()
    if args.curves is not None:
        curves_from_runs({label: args.curves / name for label, name in CURVES.items()}, HERE / "curves.csv")
    for prefix in ("results", "embed-results", "cross-tokenizer-results"):
        if (HERE / f"{prefix}.csv").is_file():
            print("\n".join([f"== {prefix}", *regenerate(HERE / prefix), ""]))
    if (HERE / "curves.csv").is_file():
        marks = {"study student: 300": 300, "teacher: 600": 600}
        plot_curves(HERE / "curves.csv", "accuracy", HERE / "curves.png", marks)


if __name__ == "__main__":
    main()
