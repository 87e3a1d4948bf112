"""Smoke tests of benchmarks/cuda_bench.py on the CPU (tiny shapes; the numbers mean nothing here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cuda_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cuda_bench"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("cuda_bench", None)


def _rows(text: str) -> list[list[str]]:
    """Data rows of the results table (the one with a variant column)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 16 and cells[4] in ("compiled", "naive", "naive_compiled"):
            rows.append(cells)
    return rows


def test_quick_cpu_table_has_every_case_and_variant(bench, capsys):
    text = bench.main(["--device", "cpu", "--quick"])
    assert capsys.readouterr().out == text
    assert "command: `python benchmarks/cuda_bench.py --device cpu --quick`" in text
    assert "datasheet H100 SXM: 989 TFLOP/s" in text and "datasheet H200: 989 TFLOP/s" in text
    assert "measured peaks:" in text
    rows = _rows(text)
    cases = [c.name for c in bench.default_cases(quick=True)]
    expected = [(c, v) for c in cases for v in bench.VARIANTS]
    assert [(r[0], r[4]) for r in rows] == expected
    for r in rows:
        assert r[5] not in ("-", "OOM"), r  # every variant ran
        float(r[5])
        assert r[6] == "-"  # kernel time: CUDA only
        assert float(r[10]) > 0  # floor ms
        assert float(r[14]) < 2e-2  # rel err of the loss vs float32 naive
        if r[4] == "compiled":
            assert r[15].count("PASS") + r[15].count("MISS") == 3, r  # no memory check on the CPU
        else:
            assert r[15] == "-"
        if r[4] == "naive":
            assert r[8] == "1.00"


def test_filters_and_out_file(bench, tmp_path, capsys):
    out = tmp_path / "report.md"
    args = ["--device", "cpu", "--quick", "--cases", "d16-k64,d16-k32-index", "--variants", "compiled,naive"]
    text = bench.main([*args, "--runs", "2", "--out", str(out)])
    capsys.readouterr()
    assert out.read_text() == text
    assert [(r[0], r[4]) for r in _rows(text)] == [
        ("d16-k64", "compiled"),
        ("d16-k64", "naive"),
        ("d16-k32-index", "compiled"),
        ("d16-k32-index", "naive"),
    ]
    for r in _rows(text):
        assert r[9] == "-"  # no naive_compiled to compare with
        if r[4] == "compiled":
            assert ">naive_compiled n/a" in r[15]


def test_unknown_case_and_variant_are_rejected(bench):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--quick", "--cases", "nope"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--quick", "--variants", "fast"])


def test_floors_and_memory_checks(bench):
    case = bench.Case("x", batch=256, dim=768, negatives=65536)
    assert bench.case_flops(case, 1) == 4.0 * 256 * 65536 * 768
    assert bench.case_bytes(case, 1) >= 65536 * 768 * 2  # the bank at least once
    indexed = bench.Case("i", batch=64, dim=128, negatives=16384, rows=50000)
    assert bench.case_bytes(indexed, 1) >= 50000 * 128 * 2 + 64 * 16384 * 8

    peaks = bench.Peaks(flops=800e12, bytes_per_s=3e12)
    small, large = (
        bench.Case("a", batch=256, dim=128, negatives=65536),
        bench.Case("b", batch=256, dim=128, negatives=1 << 20),
    )
    results = [
        bench.Result(small, "compiled", ms=1.0, extra_bytes=40 << 20),
        bench.Result(small, "naive", ms=4.0, extra_bytes=200 << 20),
        bench.Result(small, "naive_compiled", ms=2.0, extra_bytes=100 << 20),
        bench.Result(large, "compiled", ms=10.0, extra_bytes=41 << 20),
        bench.Result(large, "naive", status="OOM"),
        bench.Result(large, "naive_compiled", ms=20.0, extra_bytes=1600 << 20),
    ]
    table, notes = bench.build_table(results, peaks, layers=1)
    rows = _rows("\n".join(table))
    assert len(rows) == 6
    assert rows[0][8] == "4.00" and rows[0][9] == "2.00"
    assert "mem PASS" in rows[0][15] and "≥3x naive PASS" in rows[0][15]
    assert rows[4][5] == "OOM"
    assert "≥3x naive PASS (baseline OOM)" in rows[3][15]
    assert ">naive_compiled PASS" in rows[3][15]
    compiled_note = next(n for n in notes if n.startswith("- compiled"))
    assert compiled_note.endswith("PASS")
    assert any(n.startswith("- naive_compiled") and "x16" in n for n in notes)
