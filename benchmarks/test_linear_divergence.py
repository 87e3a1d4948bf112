"""pytest-benchmark cases for fused_linear_divergence (forward + backward) and its baselines.

Run with ``pytest benchmarks/test_linear_divergence.py --benchmark-only``; ``distillkit bench --op vocab``
prints the same comparison with peak memory. The target shape (N 2048, V 49152, D 576) takes seconds per
round; ``DISTILLKIT_VOCAB_SHAPE=N,V,Ds,Dt`` picks another.
"""

from __future__ import annotations

import os

import pytest

from distillkit.bench.vocab import VARIANTS, VocabCase, make_inputs, variant_step

SHAPE = [int(x) for x in os.environ.get("DISTILLKIT_VOCAB_SHAPE", "2048,49152,576,576").split(",")]
CASE = VocabCase(*SHAPE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fwd_bwd(benchmark, variant):
    inputs = make_inputs(CASE)
    step = variant_step(CASE, variant)
    step(inputs)  # warm-up (and compilation)
    benchmark.extra_info.update({"tokens": CASE.tokens, "vocab": CASE.vocab, "divergence": CASE.divergence})
    benchmark.pedantic(step, args=(inputs,), rounds=3, iterations=1)
