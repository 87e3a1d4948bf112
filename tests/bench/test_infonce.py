"""The benchmark helpers measure what they claim, on tiny cases."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from distillkit.bench.infonce import Case, format_table, make_inputs, measure, peak_extra_memory, variant_step
from distillkit.ops import membank_infonce, naive_membank_infonce


def test_make_inputs_shapes():
    case = Case("t", batch=3, dim=5, negatives=7, rows=11, layers=2, dtype="bfloat16")
    inputs = make_inputs(case)
    assert inputs["query"].shape == (2, 3, 5) and inputs["query"].dtype == torch.bfloat16
    assert inputs["bank"].shape == (11, 5)
    assert inputs["negative_index"].shape == (2, 3, 7)
    assert int(inputs["negative_index"].max()) < 11
    assert case.flops == 4 * 2 * 3 * 7 * 5


def test_variant_step_runs_backward_and_clears_grads():
    inputs = make_inputs(Case("t", batch=2, dim=4, negatives=9))
    variant_step("compiled")(inputs)
    assert inputs["query"].grad is None


def test_measure_rows_and_table():
    rows = measure([Case("tiny", batch=2, dim=8, negatives=64)], repeats=1, memory=False)
    assert [r["variant"] for r in rows] == ["naive", "reference", "compiled"]
    assert rows[0]["speedup"] == 1.0
    assert all(r["ms"] > 0 and r["sgemm_gflops"] > 0 for r in rows)
    table = format_table(rows)
    assert table.count("\n") == 4 and "| tiny | compiled |" in table


def test_peak_memory_sees_the_naive_logits():
    # naive materialises [B, K+1] logits (and more) in float32: at least 8 MiB here; the fused op does not.
    case = Case("mem", batch=64, dim=16, negatives=32768)
    naive = peak_extra_memory(case, "naive")
    fused = peak_extra_memory(case, "compiled")
    assert naive > 8 * 2**20
    assert fused < naive / 4


def test_labels_case_passes_labels_to_every_variant():
    case = Case("labels", batch=5, dim=6, negatives=40, labels=True)
    inputs = make_inputs(case, classes=3)
    assert inputs["query_labels"].shape == (5,) and inputs["bank_labels"].shape == (40,)
    assert int(inputs["bank_labels"].max()) < 3
    for variant in case.variants():
        variant_step(variant)(inputs)  # forward + backward with the labels
    args = (inputs["query"], inputs["positive"], inputs["bank"], inputs["temperature"])
    labels = {"query_labels": inputs["query_labels"], "bank_labels": inputs["bank_labels"]}
    with_labels = naive_membank_infonce(*args, **labels)
    assert not torch.allclose(with_labels, naive_membank_infonce(*args))  # same-class negatives left out
    torch.testing.assert_close(membank_infonce(*args, **labels), with_labels)


def test_cpu_bench_script_filters_the_target_cases(monkeypatch, capsys):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_bench.py"
    spec = importlib.util.spec_from_file_location("cpu_bench", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert {case.name for case in module.TARGET_CASES} >= {"dense B256 D128 K64k", "index B64 D128 K16k N50k"}
    tiny = (
        Case("dense tiny", batch=2, dim=4, negatives=32),
        Case("index tiny", batch=2, dim=4, negatives=8, rows=20),
    )
    monkeypatch.setattr(module, "TARGET_CASES", tiny)
    assert module.main(["--repeats", "1", "--no-memory", "--case", "index"]) == 0
    out = capsys.readouterr().out
    assert "| index tiny | gather_bmm |" in out and "| index tiny | compiled |" in out
    assert "dense tiny" not in out
