"""pytest-benchmark cases for membank_infonce (forward + backward), comparable across commits.

Run with ``pytest benchmarks/ --benchmark-only`` (not part of the test suite: ``testpaths = tests``).
Compare commits with ``--benchmark-autosave`` and ``pytest-benchmark compare``.
"""

from __future__ import annotations

import pytest
from cpu_bench import TARGET_CASES  # benchmarks/ is on sys.path while pytest collects its files

from distillkit.bench.infonce import make_inputs, variant_step


def _params():
    for case in TARGET_CASES:
        for variant in case.variants():
            yield pytest.param(case, variant, id=f"{case.name.replace(' ', '-')}-{variant}")


@pytest.mark.parametrize(("case", "variant"), list(_params()))
def test_fwd_bwd(benchmark, case, variant):
    inputs = make_inputs(case)
    step = variant_step(variant)
    step(inputs)  # warm-up
    benchmark.extra_info.update({"flops": case.flops, "batch": case.batch, "dim": case.dim})
    benchmark.pedantic(step, args=(inputs,), rounds=3, iterations=1)
