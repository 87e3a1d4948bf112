"""The shared benchmark harness: interleaved timing, peak memory in a fresh process, markdown tables."""

from __future__ import annotations

import math
import os
import time

import torch

from distillkit.bench.harness import (
    cpu_profile,
    format_rows,
    markdown_table,
    peak_extra_memory,
    peak_rss_growth,
    time_steps,
)

MIB = 2**20


def test_time_steps_warms_up_interleaves_and_syncs():
    calls: list[str] = []
    syncs: list[int] = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = time_steps(steps, repeats=3, warmup=2, sync=lambda: syncs.append(len(calls)))
    assert calls == ["a", "b"] * 5  # two warm-up rounds, then three timed rounds, a and b alternating
    assert syncs == [4, 5, 6, 7, 8, 9, 10]  # once after the warm-up, then after every timed call
    assert list(timings) == ["a", "b"]
    for timing in timings.values():
        assert len(timing.wall) == len(timing.cpu) == 3
        assert timing.min <= timing.median and all(math.isfinite(t) and t >= 0 for t in timing.wall)


def test_time_steps_median_is_the_middle_run():
    durations = iter([0.0, 0.03, 0.0, 0.01])  # warm-up, then three timed runs

    def step() -> None:
        time.sleep(next(durations))

    timing = time_steps({"s": step}, repeats=3, warmup=1)["s"]
    assert 0.0 <= timing.min < 0.01 <= timing.median < 0.03


def _allocate_64_mib() -> None:
    block = torch.ones(64 * MIB // 4)  # touched pages: resident
    assert float(block[-1]) == 1.0


def test_peak_rss_growth_sees_a_temporary_allocation():
    _allocate_64_mib()  # warm the allocator and the thread pool
    grown = peak_rss_growth(_allocate_64_mib)
    assert 56 * MIB < grown < 128 * MIB
    assert peak_rss_growth(lambda: None) < 8 * MIB


def allocating_step(mib: int):
    """A ``setup`` for peak_extra_memory: a step allocating ``mib`` MiB."""
    torch.ones(1024)  # warm-up

    def step() -> None:
        block = torch.ones(mib * MIB // 4)
        assert float(block[-1]) == 1.0

    return step


def test_peak_extra_memory_runs_the_setup_in_a_fresh_process():
    big = peak_extra_memory("tests.bench.test_harness:allocating_step", 96)
    small = peak_extra_memory("tests.bench.test_harness:allocating_step", 1)
    assert 88 * MIB < big < 160 * MIB
    assert small < 16 * MIB


def test_markdown_table_aligns_the_chosen_columns():
    table = markdown_table(("name", "ms", "share"), [("a", "1.0", "50%"), ("b", 2, None)], right=(1, 2))
    assert table.splitlines() == [
        "| name | ms | share |",
        "|---|---:|---:|",
        "| a | 1.0 | 50% |",
        "| b | 2 | None |",
    ]


def test_format_rows_takes_the_union_of_keys_and_rounds_floats():
    rows = [{"case": "x", "ms": 12.345}, {"case": "y", "ms": 0.012345, "error": "E"}]
    assert format_rows(rows).splitlines() == [
        "| case | ms | error |",
        "|---|---|---|",
        "| x | 12.3 |  |",
        "| y | 0.0123 | E |",
    ]
    assert format_rows([]) == "(no rows)"


def test_cpu_profile_drops_only_the_profiler_libraries_start_stop_lines(capfd):
    with cpu_profile() as profile:
        torch.ones(8).add_(1)
        os.write(2, b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a warning of the code under test\n")
    err = capfd.readouterr().err
    assert "a warning of the code under test" in err
    assert "profiler_start" not in err and "profiler_stop" not in err
    assert any("add_" in event.key for event in profile.key_averages())


def test_every_kind_of_case_follows_the_protocol(tmp_path):
    from dataclasses import dataclass

    from distillkit.bench.harness import Case, compare_variants
    from distillkit.bench.infonce import Case as InfonceCase
    from distillkit.bench.losses import BenchCase, BenchShapes, LossCase
    from distillkit.bench.vocab import VocabCase

    shapes = BenchShapes(
        batch=2, seq=4, student_hidden=8, teacher_hidden=8, student_layers=1, teacher_layers=2
    )
    cases = [
        InfonceCase("tiny", batch=3, dim=8, negatives=16),
        VocabCase(tokens=8, vocab=32, student_hidden=8, teacher_hidden=8),
        LossCase.of(BenchCase("l2", "l2"), shapes),
    ]
    for case in cases:
        assert isinstance(case, Case)

    @dataclass(frozen=True)
    class Sleepy:
        name: str = "sleepy"

        def variants(self):
            return ("slow", "fast")

        def make_step(self, variant):
            import time

            return lambda: time.sleep(0.02 if variant == "slow" else 0.005)

    rows, timings = compare_variants(Sleepy(), repeats=3, memory=False, probes={"probe": lambda: None})
    assert [row["variant"] for row in rows] == ["slow", "fast"] and "probe" in timings
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 1.5
    loss_rows, _ = compare_variants(cases[2], repeats=1, memory=True)
    assert loss_rows[0]["peak_mib"] >= 0 and loss_rows[0]["mem_frac"] in (0.0, 1.0)  # its own baseline
