"""The measuring harness every distillkit benchmark shares: the case protocol, timing, peak memory, tables.

- :class:`Case` is what a benchmark measures: a named problem with named variants (the baseline first), each
  built into a zero-argument step. Loss cases (:mod:`~distillkit.bench.losses`), the fused ops' cases
  (:mod:`~distillkit.bench.infonce`, :mod:`~distillkit.bench.vocab`) and the training step
  (:mod:`~distillkit.bench.step`) are cases; :func:`compare_variants` measures any of them the same way.
- :func:`time_steps` times named zero-argument steps after warm-up, interleaving them round by round (a busy
  machine then slows every step alike) and keeps wall and CPU seconds of each run (:class:`Timing`).
- :func:`peak_extra_memory` runs one step in a fresh Python process and returns the peak resident memory it
  added (:func:`peak_rss_growth`): the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), the
  resident set read (``VmRSS``), the step run and the peak read (``VmHWM``); where the mark cannot be reset,
  ``ru_maxrss`` growth is used (it may hide a pass smaller than an earlier peak). Large tensors are
  ``mmap``-allocated and given back on free, so resident memory follows what is live: coarse (pages), but
  exact enough to compare hundreds of MiB with a few.
- :func:`cpu_profile` is ``torch.profiler.profile`` on the CPU without the profiler library's own
  start/stop lines on stderr.
- :func:`markdown_table` renders cells; :func:`format_rows` renders rows, the one row shape of the
  benchmarks (a dict per measurement, column name to value).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

Row = dict[str, Any]
"""One measurement: column name to value (the row shape :func:`format_rows` renders)."""

__all__ = [
    "Case",
    "Row",
    "compare_variants",
    "Timing",
    "cpu_profile",
    "format_rows",
    "markdown_table",
    "peak_extra_memory",
    "peak_rss_growth",
    "time_steps",
]


@runtime_checkable
class Case(Protocol):
    """A benchmark problem: named variants of the same work, the first one the baseline.

    A case is a dataclass (so a fresh process can rebuild it from its fields to measure memory).
    """

    name: str

    def variants(self) -> tuple[str, ...]:
        """The variant names, the baseline first."""
        ...

    def make_step(self, variant: str) -> Callable[[], object]:
        """Builds the inputs and returns a zero-argument step running ``variant`` once (e.g. fwd + bwd)."""
        ...


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed run of one step.

    Attributes:
        wall: Wall-clock seconds per run.
        cpu: CPU seconds of the whole process (all threads) per run.
    """

    wall: tuple[float, ...]
    cpu: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median wall seconds."""
        return statistics.median(self.wall)

    @property
    def min(self) -> float:
        """Fastest run, wall seconds."""
        return min(self.wall)

    @property
    def median_cpu(self) -> float:
        """Median CPU seconds."""
        return statistics.median(self.cpu)


def time_steps(
    steps: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Times each step ``repeats`` times after ``warmup`` untimed calls, interleaving the steps by round.

    Args:
        steps: Name to a zero-argument callable running the work once.
        repeats: Timed rounds (at least one).
        warmup: Untimed rounds first.
        sync: Called after the warm-up and inside each timed run, after the step (e.g.
            ``torch.cuda.synchronize`` so that asynchronous device work is counted).

    Returns:
        Name to its :class:`Timing`, in the order of ``steps``.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    if sync is not None:
        sync()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(max(1, repeats)):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if sync is not None:
                sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: Timing(tuple(wall[name]), tuple(cpu[name])) for name in steps}


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_growth(step: Callable[[], object]) -> int:
    """Bytes by which one call of ``step`` lifts the peak resident memory above the resident set."""
    if _reset_peak_rss():  # Linux: peak since the reset minus what is resident now
        before = _status_kib("VmRSS")
        step()
        return (_status_kib("VmHWM") - before) * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak so far: may hide small passes
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


_CHILD = (
    "import importlib, json, sys, torch\n"
    "from distillkit.bench.harness import peak_rss_growth\n"
    "torch.set_num_threads(int(sys.argv[1]))\n"
    "module, name = sys.argv[2].split(':')\n"
    "step = getattr(importlib.import_module(module), name)(*json.loads(sys.argv[3]))\n"
    "print(peak_rss_growth(step))\n"
)


def peak_extra_memory(setup: str, *args: Any, timeout: float = 600.0) -> int:
    """Peak extra resident bytes of one step, measured in a fresh Python process with this one's threads.

    Args:
        setup: ``"package.module:function"``; called as ``function(*args)`` in the fresh process, it builds
            the inputs, warms the work up (so one-off allocations such as thread pools are not counted) and
            returns the zero-argument step to measure.
        *args: JSON-serialisable arguments for ``setup``.
        timeout: Seconds before the process is given up.

    Returns:
        What :func:`peak_rss_growth` reports for the step.
    """
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(torch.get_num_threads()), setup, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


_PROFILER_CHATTER = re.compile(r"\w+\.cpp:\d+\] profiler_(start|stop)\s*$")
"""A line the profiler library (kineto) writes to the process's stderr at every start and stop."""


@contextmanager
def cpu_profile() -> Iterator[torch.profiler.profile]:
    """``torch.profiler.profile`` of CPU activity, minus the profiler library's start/stop lines.

    The library writes them straight to file descriptor 2, once per profiled region: a benchmark that profiles
    every step would print two lines per step. While profiling, stderr goes to a temporary file; afterwards
    every line of it but those is written to stderr, so nothing else is lost.

    Yields:
        The running profiler (read ``key_averages()`` after the block).

    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                yield profile
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not _PROFILER_CHATTER.search(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = ()) -> str:
    """A markdown table.

    Args:
        header: Column titles.
        rows: Cells per row (rendered with ``str``).
        right: Indices of the columns to align right.

    Returns:
        The table, one line per row, without a trailing newline.
    """
    right = set(right)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "".join("---:|" if i in right else "---|" for i in range(len(header))),
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_rows(rows: Sequence[Row]) -> str:
    """Renders rows as a markdown table.

    The columns are the union of the rows' keys; floats get 3 significant digits (one decimal from 10 up),
    a missing value an empty cell.
    """
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
        return str(value)

    return markdown_table(keys, [[cell(row.get(key, "")) for key in keys] for row in rows])


def case_memory_step(case_type: str, fields: dict[str, Any], variant: str) -> Callable[[], object]:
    """What :func:`case_peak_memory` measures in a fresh process: a variant of the case, after a warm-up.

    Args:
        case_type: ``"package.module:ClassName"`` of the case.
        fields: The case's dataclass fields.
        variant: The variant.

    """
    module, name = case_type.split(":")
    case = getattr(importlib.import_module(module), name)(**fields)
    step = case.make_step(variant)
    step()
    return step


def case_peak_memory(case: Case, variant: str, timeout: float = 900.0) -> int:
    """Peak extra resident bytes of one step of ``variant``, in a fresh process (see peak_extra_memory)."""
    case_type = f"{type(case).__module__}:{type(case).__qualname__}"
    return peak_extra_memory(
        "distillkit.bench.harness:case_memory_step",
        case_type,
        dataclasses.asdict(case),
        variant,
        timeout=timeout,
    )


def compare_variants(
    case: Case,
    repeats: int = 5,
    memory: bool = True,
    probes: Mapping[str, Callable[[], object]] | None = None,
) -> tuple[list[Row], dict[str, Timing]]:
    """Times every variant of ``case`` (interleaved by round) and measures its peak memory.

    Args:
        case: The problem.
        repeats: Timed rounds.
        memory: Also measure each variant's peak extra memory in a fresh process.
        probes: Extra named steps timed in the same rounds (e.g. a reference GEMM); not in the rows.

    Returns:
        One row per variant (``case``, ``variant``, ``ms``, ``cpu_ms``, ``speedup`` over the baseline; with
        ``memory`` also ``peak_mib`` and ``mem_frac`` of the baseline's), and the timings of variants and
        probes.

    """
    variants = case.variants()
    steps: dict[str, Callable[[], object]] = {v: case.make_step(v) for v in variants}
    steps.update(probes or {})
    timings = time_steps(steps, repeats)
    peaks = {v: case_peak_memory(case, v) for v in variants} if memory else {}
    base = variants[0]
    rows = []
    for v in variants:
        row: Row = {
            "case": case.name,
            "variant": v,
            "ms": timings[v].median * 1e3,
            "cpu_ms": timings[v].median_cpu * 1e3,
            "speedup": timings[base].median / timings[v].median,
        }
        if memory:
            row["peak_mib"] = peaks[v] / 2**20
            row["mem_frac"] = peaks[v] / max(peaks[base], 1)
        rows.append(row)
    return rows, timings
