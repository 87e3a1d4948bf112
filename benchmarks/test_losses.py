"""pytest-benchmark cases for every registered loss (the cases ``distillkit bench`` runs), fwd+bwd.

Run with ``pytest benchmarks/ --benchmark-only``; compare commits with ``--benchmark-autosave`` and
``pytest-benchmark compare``. Plugin-contributed cases (``distillkit_register_bench_cases``) are included.
"""

from __future__ import annotations

import pytest

from distillkit.bench.losses import BenchShapes, collect_cases, make_step

SHAPES = BenchShapes(
    batch=32, seq=128, student_hidden=384, teacher_hidden=768, student_layers=6, teacher_layers=12
)


@pytest.mark.parametrize("case", collect_cases(), ids=lambda case: case.name)
def test_loss_fwd_bwd(benchmark, case):
    step = make_step(case, SHAPES)
    step()  # warm-up
    benchmark.extra_info.update({"loss": case.loss, "params": case.params})
    benchmark.pedantic(step, rounds=3, iterations=1)
