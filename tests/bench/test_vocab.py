"""``distillkit bench --op vocab``: every variant computes the same loss; the table and the GEMM probe."""

from __future__ import annotations

import pytest
import torch

from distillkit.bench import vocab
from distillkit.bench.harness import time_steps
from distillkit.bench.vocab import VocabCase, format_table, gemm_flops, gemm_probe, make_inputs, measure
from distillkit.ops import fused_linear_divergence
from distillkit.ops.linear_divergence.chunked import naive_linear_divergence


def test_variants_compute_the_same_loss():
    case = VocabCase(tokens=6, vocab=40, student_hidden=5, teacher_hidden=7, divergence="tvd")
    inputs = make_inputs(case)
    naive = naive_linear_divergence(
        inputs["hs"], inputs["ws"], inputs["ht"], inputs["wt"], divergence_name="tvd", temperature=2.0
    )
    fused = fused_linear_divergence(
        inputs["hs"], inputs["ws"], inputs["ht"], inputs["wt"], divergence="tvd", temperature=2.0
    )
    torch.testing.assert_close(fused, naive)
    times = time_steps({v: case.make_step(v) for v in ("naive", "chunked", "fused")}, repeats=1)
    assert set(times) == {"naive", "chunked", "fused"} and all(t.median > 0 for t in times.values())


def test_trl_is_offered_only_when_installed_and_for_its_divergences(monkeypatch):
    monkeypatch.setattr(vocab, "trl_installed", lambda: False)
    assert "trl" not in VocabCase(divergence="jsd").variants()
    monkeypatch.setattr(vocab, "trl_installed", lambda: True)
    assert "trl" in VocabCase(divergence="jsd").variants()
    assert "trl" in VocabCase(divergence="reverse_kl").variants()
    assert "trl" not in VocabCase(divergence="tvd").variants()
    assert VocabCase(only=("fused",)).variants() == ("naive", "fused")
    with pytest.raises(ValueError, match="unknown variants \\['fast'\\]"):
        VocabCase(only=("fast",)).variants()


@pytest.mark.parametrize(("kind", "beta"), [("jsd", 0.3), ("forward_kl", 0.5), ("reverse_kl", 0.5)])
def test_the_trl_variant_is_trls_loss_of_the_same_divergence(kind, beta):
    """TRL's generalised JSD (β = 0: forward KL, β = 1: reverse KL) is the op's loss over T²."""
    pytest.importorskip("trl")
    case = VocabCase(tokens=9, vocab=31, student_hidden=6, teacher_hidden=5, divergence=kind, beta=beta)
    inputs = make_inputs(case)
    ours = fused_linear_divergence(
        inputs["hs"], inputs["ws"], inputs["ht"], inputs["wt"], divergence=kind, temperature=2.0, beta=beta
    )
    theirs = vocab._trl_loss(case)(inputs["hs"], inputs["ws"], inputs["ht"], inputs["wt"])
    torch.testing.assert_close(theirs * 2.0**2, ours, rtol=1e-5, atol=1e-6)


def test_gemm_probe_computes_the_four_products_and_the_table_shows_their_share():
    case = VocabCase(tokens=4, vocab=16, student_hidden=3, teacher_hidden=2, only=("fused",))
    assert gemm_flops(case) == 2 * 4 * 16 * (3 * 3 + 2)
    gemm_probe(case)()  # runs
    rows, probe = measure(case, repeats=1, memory=False)
    assert [r["variant"] for r in rows] == ["naive", "fused"] and probe["gemm_ms"] > 0
    assert all(r["gemm_share"] > 0 for r in rows) and rows[1]["fused_speedup"] == 1.0
    table = format_table(
        [{"case": case.name, "variant": "fused", "ms": 1.0, "speedup": 2.0, "gemm_share": 0.8}]
    )
    assert "| N4 V16 Ds3 Dt2 forward_kl | fused | 1 | 2.00x | - | 80% | - | - | - |" in table
