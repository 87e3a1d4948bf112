"""Forward+backward benchmark of the fused memory-bank InfoNCE op against the naive baselines.

Measures, on one device, ``distillkit.ops.membank_infonce`` (``compiled``: the CUDA kernel on a GPU),
``naive_membank_infonce`` run eagerly (``naive``) and through ``torch.compile`` (``naive_compiled``), and
reports each against two floors:

* FLOP floor: ``4·L·B·K·D`` (``Q Kᵀ`` and ``P V`` in the forward; the backward is elementwise in
  ``O(B·D)``) over the peak bf16 matrix rate, measured here with a large ``torch.mm``.
* Byte floor: every input read once (the bank dominates; with ``negative_index`` the distinct bank rows
  it can touch, plus the index) and every output written once, over the bandwidth measured here with a
  large device-to-device copy (bytes read plus bytes written).

The floor is the larger of the two. "kernel ms" is the summed device time of the kernels (profiler); its
gap to the event time is host overhead. Timing uses CUDA events after warm-up and the median of many runs,
with the L2 cache flushed before every run. "Extra" memory is the peak allocated during one forward+
backward minus what was allocated before it (the inputs), to check that no ``B×K`` buffer is made.

Typical use on a GPU machine (the CUDA extension built in place first)::

    python3 setup.py build_ext --inplace
    python3 benchmarks/cuda_bench.py --out cuda_bench.md

``--cases`` and ``--variants`` select a subset (e.g. ``--variants compiled`` skips the slow baselines).
Note that ``negative_index`` cases include the op's bounds check of the index (one host sync per call) in
every variant's time.

``--device cpu --quick`` runs tiny shapes on the CPU (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

try:
    import distillkit  # noqa: F401
except ImportError:  # run from a checkout that is not installed: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillkit.bench.harness import markdown_table, time_steps  # noqa: E402
from distillkit.bench.infonce import Case  # noqa: E402
from distillkit.ops import membank_infonce, naive_membank_infonce  # noqa: E402
from distillkit.ops.infonce.op import kernel_available  # noqa: E402

# Datasheet peaks (dense bf16 tensor-core FLOP/s, HBM bytes/s), for reference next to the measured ones.
DATASHEET: dict[str, tuple[float, float]] = {
    "H100 SXM": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
}
VARIANTS = ("compiled", "naive", "naive_compiled")
MIB = float(1 << 20)
# Targets for the ``compiled`` rows.
TARGET_VS_NAIVE = 3.0
TARGET_VS_FLOOR = 1.5


@dataclasses.dataclass
class Result:
    """One measured (case, variant) pair.

    Attributes:
        case: The shape.
        variant: One of :data:`VARIANTS`.
        ms: Median forward+backward time in milliseconds, or None when it did not run.
        kernel_ms: Device time of the kernels of one forward+backward (profiler, CUDA only), or None; the
            gap to ``ms`` is host overhead (Python, dispatch, launches, syncs).
        extra_bytes: Peak memory above the inputs during one forward+backward, or None.
        rel_err: ``‖loss − ref‖ / ‖ref‖`` against the naive loss on float32 inputs, or None.
        status: ``"ok"``, ``"OOM"`` or a short error.
    """

    case: Case
    variant: str
    ms: float | None = None
    kernel_ms: float | None = None
    extra_bytes: int | None = None
    rel_err: float | None = None
    status: str = "ok"


@dataclasses.dataclass(frozen=True)
class Peaks:
    """Measured and datasheet rates.

    Attributes:
        flops: Measured bf16 matrix-product rate, FLOP/s.
        bytes_per_s: Measured device-to-device copy bandwidth (read + write), bytes/s.
    """

    flops: float
    bytes_per_s: float


def default_cases(quick: bool) -> list[Case]:
    """Returns the benchmark shapes (the op benchmarks' :class:`distillkit.bench.infonce.Case`).

    This script runs every case in bf16 with a per-layer bank and ``--layers`` leading dim; the cases'
    ``dtype`` and ``layers`` (the CPU table's settings) are left at their defaults and not read here.

    Args:
        quick: Tiny shapes for a CPU smoke run instead of the GPU shapes.

    Returns:
        The cases, in table order.
    """
    if quick:
        return [
            Case("d16-k64", batch=8, dim=16, negatives=64),
            Case("d16-k256", batch=8, dim=16, negatives=256),
            Case("d16-k64-labels", batch=8, dim=16, negatives=64, labels=True),
            Case("d16-k32-index", batch=4, dim=16, negatives=32, rows=100),
            Case("d16-k32-index-labels", batch=4, dim=16, negatives=32, labels=True, rows=100),
        ]
    return [
        Case("d768-k64k", batch=256, dim=768, negatives=65536),
        Case("d768-k1m", batch=256, dim=768, negatives=1 << 20),
        Case("d128-k64k", batch=256, dim=128, negatives=65536),
        Case("d128-k1m", batch=256, dim=128, negatives=1 << 20),
        Case("d768-k64k-labels", batch=256, dim=768, negatives=65536, labels=True),
        Case("d128-k64k-labels", batch=256, dim=128, negatives=65536, labels=True),
        Case("d128-k16k-index", batch=64, dim=128, negatives=16384, rows=50000),
        Case("d128-k16k-index-labels", batch=64, dim=128, negatives=16384, labels=True, rows=50000),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    runs: int,
    flush: torch.Tensor | None = None,
) -> float:
    """Median wall time of ``fn`` in milliseconds.

    On CUDA each run sits between two events; ``flush`` (if given) is zeroed before each run, outside the
    events, so every run starts with a cold L2 cache. On the CPU the harness's host clock is used
    (:func:`distillkit.bench.harness.time_steps`).

    Args:
        fn: The work to time.
        device: Where it runs.
        warmup: Untimed runs first.
        runs: Timed runs.
        flush: A buffer larger than the L2 cache, or None.

    Returns:
        The median time in milliseconds.
    """
    if device.type != "cuda":
        return time_steps({"fn": fn}, runs, warmup=warmup)["fn"].median * 1e3
    for _ in range(warmup):
        fn()
    _sync(device)
    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)
    ]
    for start, end in pairs:
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


def _time_mm(n: int, device: torch.device, warmup: int, runs: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    return time_ms(lambda: torch.mm(a, b, out=out), device, warmup, runs)


def _time_copy(numel: int, device: torch.device, warmup: int, runs: int) -> float:
    src = torch.randint(-100, 100, (numel,), device=device, dtype=torch.int8)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, warmup, runs)


def measure_peaks(device: torch.device, quick: bool, warmup: int, runs: int) -> Peaks:
    """Measures the bf16 matrix-product rate and the copy bandwidth on ``device``.

    Args:
        device: The device.
        quick: Small sizes (CPU smoke runs).
        warmup: Untimed runs.
        runs: Timed runs (median).

    Returns:
        The measured rates.
    """
    n = 256 if quick else 8192
    numel = (16 << 20) if quick else (1 << 30)  # int8 elements: 1 GiB on a GPU
    mm_ms = _time_mm(n, device, warmup, runs)
    copy_ms = _time_copy(numel, device, warmup, runs)
    return Peaks(flops=2.0 * n**3 / (mm_ms * 1e-3), bytes_per_s=2.0 * numel / (copy_ms * 1e-3))


def make_inputs(case: Case, layers: int, device: torch.device, classes: int, seed: int) -> dict[str, object]:
    """Random bf16 inputs for one case (unit-norm rows, as in contrastive distillation).

    Args:
        case: The shape.
        layers: Leading dimension ``L``.
        device: Where to allocate.
        classes: Number of label classes when the case has labels.
        seed: Generator seed.

    Returns:
        Keyword arguments ``query, positive, bank, temperature`` and the optional label / index tensors.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    dt = torch.bfloat16

    def unit(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, device=device, dtype=torch.float32, generator=gen)
        return torch.nn.functional.normalize(x, dim=-1).to(dt)

    rows = case.rows if case.indexed else case.negatives
    query = unit(layers, case.batch, case.dim).requires_grad_(True)
    positive = unit(layers, case.batch, case.dim).requires_grad_(True)
    inputs: dict[str, object] = {
        "query": query,
        "positive": positive,
        "bank": unit(layers, rows, case.dim),
        "temperature": case.temperature,
    }
    if case.labels:
        inputs["query_labels"] = torch.randint(0, classes, (case.batch,), device=device, generator=gen)
        inputs["bank_labels"] = torch.randint(0, classes, (rows,), device=device, generator=gen)
    if case.indexed:
        inputs["negative_index"] = torch.randint(
            0, case.rows, (layers, case.batch, case.negatives), device=device, generator=gen
        )
    return inputs


def input_bytes(inputs: dict[str, object]) -> int:
    """Total bytes of the tensor inputs."""
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def case_flops(case: Case, layers: int) -> float:
    """Useful forward+backward FLOPs of the fused op: ``4·L·B·K·D``."""
    return 4.0 * layers * case.batch * case.negatives * case.dim


def case_bytes(case: Case, layers: int) -> float:
    """Fewest device-memory bytes one forward+backward must move (bf16 data, int64 labels/index).

    The bank once (with ``negative_index``: at most ``min(N, B·K)`` distinct rows per layer, plus the
    index), labels once, query and positive read, their gradients and the loss written.
    """
    elem = 2
    if case.indexed:
        bank_rows = min(case.rows, case.batch * case.negatives)
        index = layers * case.batch * case.negatives * 8
        label_rows = case.rows
    else:
        bank_rows, index, label_rows = case.negatives, 0, case.negatives
    bank = layers * bank_rows * case.dim * elem
    labels = (label_rows + case.batch) * 8 if case.labels else 0
    vectors = 4 * layers * case.batch * case.dim * elem + layers * case.batch * 4
    return float(bank + index + labels + vectors)


def memory_budget(case: Case, layers: int) -> float:
    """Extra bytes the fused op may use without any ``B×K`` buffer.

    The CUDA kernel's split-K workspace is capped at 256 MiB; the rest is ``O(L·B·D)`` (gradients, the
    saved softmax-weighted sums, losses). Anything above this bound grows with ``K``.
    """
    return 256 * MIB + 64.0 * layers * case.batch * (case.dim + 2) * 4


def kernel_time_ms(fn: Callable[[], object], runs: int) -> float | None:
    """Mean summed CUDA kernel time of ``fn`` over ``runs`` calls, from the profiler; None if unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                fn()
            torch.cuda.synchronize()
        total_us = sum(
            e.time_range.elapsed_us()
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        )
    except Exception as exc:  # a diagnostic only: never fail the benchmark on it
        print(f"cuda_bench: profiler unavailable ({exc})", file=sys.stderr)
        return None
    return total_us / 1e3 / runs if total_us > 0 else None


def _variant_fn(variant: str, backend: str) -> Callable[..., torch.Tensor]:
    if variant == "compiled":
        return membank_infonce
    if variant == "naive":
        return naive_membank_infonce
    torch._dynamo.reset()
    return torch.compile(naive_membank_infonce, backend=backend, dynamic=False)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_loss(inputs: dict[str, object]) -> torch.Tensor | None:
    """The naive loss on float32 copies of the inputs, or None when it does not fit."""
    up = {
        k: (v.detach().float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    try:
        with torch.no_grad():
            return naive_membank_infonce(**up)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        return None
    finally:
        del up


def run_variant(
    variant: str,
    case: Case,
    inputs: dict[str, object],
    ref: torch.Tensor | None,
    device: torch.device,
    args: argparse.Namespace,
    flush: torch.Tensor | None,
) -> Result:
    """Times one variant on one case and measures its extra memory and error.

    Args:
        variant: One of :data:`VARIANTS`.
        case: The shape.
        inputs: From :func:`make_inputs`.
        ref: Float32 reference loss, or None.
        device: Where it runs.
        args: Parsed command line (warm-up, runs, compile backend).
        flush: L2 flush buffer, or None.

    Returns:
        The measurement; ``status`` is ``"OOM"`` when the device ran out of memory.
    """
    result = Result(case, variant)
    fn = _variant_fn(variant, args.compile_backend)
    query, positive = inputs["query"], inputs["positive"]
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    grad_out = torch.rand(args.layers, case.batch, device=device, generator=gen) + 0.5

    def step() -> torch.Tensor:
        loss = fn(**inputs)
        torch.autograd.grad(loss, (query, positive), grad_out)
        return loss

    try:
        loss = step()  # first call: compilation, handles
        _sync(device)
        if ref is not None:
            diff = (loss.detach().float() - ref).norm()
            result.rel_err = float(diff / ref.norm().clamp_min(1e-30))
        del loss
        if device.type == "cuda":
            _sync(device)
            _free(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            _sync(device)
            result.extra_bytes = torch.cuda.max_memory_allocated(device) - before
        result.ms = time_ms(step, device, args.warmup, args.runs, flush)
        if device.type == "cuda":
            result.kernel_ms = kernel_time_ms(step, min(args.runs, 10))
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        result.status = "OOM"
    finally:
        _free(device)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _against(baseline: Result | None, speedup: float | None, ok: Callable[[float], bool]) -> str:
    """Verdict of a speed-up target: n/a when the baseline was not run, PASS when it ran out of memory."""
    if baseline is None:
        return "n/a"
    if baseline.status == "OOM":
        return "PASS (baseline OOM)"
    if speedup is None:
        return "n/a"
    return _verdict(ok(speedup))


def build_table(results: list[Result], peaks: Peaks, layers: int) -> tuple[list[str], list[str]]:
    """Renders the results as markdown table lines plus per-row target checks.

    Args:
        results: All measurements, grouped by case in :data:`VARIANTS` order.
        peaks: Measured rates for the floors.
        layers: Leading dimension ``L``.

    Returns:
        ``(table_lines, notes)``: the markdown table and the lines on memory growth with ``K``.
    """
    header = (
        "case", "B", "K", "D", "variant", "median ms", "kernel ms", "TFLOP/s", "x vs naive",
        "x vs naive_compiled", "floor ms", "ratio to floor", "extra MiB", "B·K·4 MiB", "rel err", "targets",
    )  # fmt: skip
    cells: list[tuple[object, ...]] = []
    by_case: dict[str, dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case.name, {})[r.variant] = r
    for name, variants in by_case.items():
        case = next(iter(variants.values())).case
        flops = case_flops(case, layers)
        floor_ms = max(flops / peaks.flops, case_bytes(case, layers) / peaks.bytes_per_s) * 1e3
        naive_ms = variants["naive"].ms if "naive" in variants else None
        ncomp_ms = variants["naive_compiled"].ms if "naive_compiled" in variants else None
        bk_mib = layers * case.batch * case.negatives * 4 / MIB
        for variant in VARIANTS:
            r = variants.get(variant)
            if r is None:
                continue
            ok = r.ms is not None
            ms = r.ms if ok else None
            tflops = flops / (ms * 1e-3) / 1e12 if ms else None
            x_naive = naive_ms / ms if ms and naive_ms else None
            x_ncomp = ncomp_ms / ms if ms and ncomp_ms else None
            ratio = ms / floor_ms if ms else None
            extra = r.extra_bytes / MIB if r.extra_bytes is not None else None
            targets = "-"
            if variant == "compiled" and ok:
                checks = [
                    f"≥{TARGET_VS_NAIVE:g}x naive "
                    + _against(variants.get("naive"), x_naive, lambda x: x >= TARGET_VS_NAIVE),
                    ">naive_compiled " + _against(variants.get("naive_compiled"), x_ncomp, lambda x: x > 1.0),
                    f"≤{TARGET_VS_FLOOR:g}x floor {_verdict(ratio is not None and ratio <= TARGET_VS_FLOOR)}",
                ]
                if r.extra_bytes is not None:
                    checks.append(f"mem {_verdict(r.extra_bytes <= memory_budget(case, layers))}")
                targets = ", ".join(checks)
            cells.append(
                (
                    name,
                    case.batch,
                    case.negatives,
                    case.dim,
                    variant,
                    _fmt(ms, ".3f") if ok else r.status,
                    _fmt(r.kernel_ms, ".3f"),
                    _fmt(tflops, ".3g"),
                    _fmt(x_naive, ".2f"),
                    _fmt(x_ncomp, ".2f"),
                    f"{floor_ms:.4f}",
                    _fmt(ratio, ".2f"),
                    _fmt(extra, ".1f"),
                    f"{bk_mib:.1f}",
                    _fmt(r.rel_err, ".1e"),
                    targets,
                )
            )
    lines = markdown_table(header, cells).splitlines()
    return lines, memory_growth_notes(results)


def memory_growth_notes(results: list[Result]) -> list[str]:
    """Extra memory between the smallest and largest ``K`` of each (B, D, labels, index) group.

    A fused op's extra memory stays flat as ``K`` grows; a ``B×K`` buffer grows with it.
    """
    groups: dict[tuple[object, ...], list[Result]] = {}
    for r in results:
        if r.extra_bytes is not None:
            key = (r.variant, r.case.batch, r.case.dim, r.case.labels, r.case.rows)
            groups.setdefault(key, []).append(r)
    notes = []
    for (variant, batch, dim, labels, rows), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.case.negatives)
        lo, hi = rs[0], rs[-1]
        if hi.case.negatives == lo.case.negatives or lo.extra_bytes is None or hi.extra_bytes is None:
            continue
        k_growth = hi.case.negatives / lo.case.negatives
        growth = hi.extra_bytes / max(lo.extra_bytes, 1)
        verdict = f" {_verdict(growth < 2.0)}" if variant == "compiled" else ""
        notes.append(
            f"- {variant} B={batch} D={dim} labels={labels} N={rows or '-'}: extra memory x{growth:.2f} "
            f"from K={lo.case.negatives} to K={hi.case.negatives} (K x{k_growth:g}){verdict}"
        )
    return notes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--layers", type=int, default=1, help="leading dimension L (default 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs (default 5; 1 with --quick)")
    p.add_argument(
        "--runs", type=int, default=None, help="timed runs, median reported (default 30; 3 with --quick)"
    )
    p.add_argument("--cases", default="", help="comma-separated case names to run (default: all)")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS)
    )
    p.add_argument("--classes", type=int, default=1000, help="label classes for the labels cases")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend for naive_compiled (default inductor; aot_eager for --quick on the CPU)",
    )
    p.add_argument("--allow-fallback", action="store_true", help="run even when the CUDA kernel is not built")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 5
    if args.runs is None:
        args.runs = 3 if args.quick else 30
    if args.warmup < 0 or args.runs < 1 or args.layers < 1:
        p.error("--warmup must be >= 0, --runs and --layers >= 1")
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.quick and args.device == "cpu" else "inductor"
    unknown = set(filter(None, args.variants.split(","))) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the benchmark and prints the report.

    Args:
        argv: Command-line arguments (without the program name); ``sys.argv[1:]`` when None.

    Returns:
        The report (markdown), as printed to stdout.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cuda_bench: no CUDA device; use --device cpu --quick for a smoke run")
    kernel = kernel_available(device.type)
    if device.type == "cuda" and not kernel and not args.allow_fallback:
        raise SystemExit(
            "cuda_bench: distillkit's CUDA kernel is not built (compiled would time the pure-PyTorch "
            "reference); run `python setup.py build_ext --inplace` first, or pass --allow-fallback"
        )
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    cases = default_cases(args.quick)
    if args.cases:
        wanted = set(args.cases.split(","))
        unknown = wanted - {c.name for c in cases}
        if unknown:
            raise SystemExit(f"cuda_bench: unknown cases {sorted(unknown)}; have {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]

    report: list[str] = ["# membank_infonce forward+backward benchmark", ""]
    report.append(f"command: `{shlex.join(['python', 'benchmarks/cuda_bench.py', *argv])}`")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} ({props.multi_processor_count} SMs, {props.L2_cache_size / MIB:.0f} MiB L2)"
    else:
        name = "cpu"
    report.append(f"device: {name}; torch {torch.__version__}; CUDA {torch.version.cuda}")
    report.append(
        f"compiled kernel for {device.type}: {'yes' if kernel else 'NO (pure-PyTorch reference fallback)'}"
    )
    print(f"cuda_bench: measuring peak rates on {name}", file=sys.stderr)
    peaks = measure_peaks(device, args.quick, args.warmup, args.runs)
    report.append(
        f"measured peaks: bf16 mm {peaks.flops / 1e12:.4g} TFLOP/s, "
        f"device copy {peaks.bytes_per_s / 1e12:.4g} TB/s (read + write); floors use these"
    )
    for sheet, (f, b) in DATASHEET.items():
        report.append(f"datasheet {sheet}: {f / 1e12:.0f} TFLOP/s dense bf16, {b / 1e12:.2f} TB/s")
    taus = ", ".join(dict.fromkeys(f"{case.temperature:g}" for case in cases))
    report.append(
        f"dtype bf16, L={args.layers}, τ={taus}, warm-up {args.warmup}, median of {args.runs} runs, "
        f"naive_compiled backend {args.compile_backend}, L2 flushed before each timed run on CUDA"
    )
    report.append("")
    floors = []
    for case in cases:
        fl, by = case_flops(case, args.layers), case_bytes(case, args.layers)
        f_ms, b_ms = fl / peaks.flops * 1e3, by / peaks.bytes_per_s * 1e3
        bound = "compute" if f_ms >= b_ms else "memory"
        floors.append(
            (
                case.name,
                f"{fl:.3g}",
                f"{by:.3g}",
                f"{f_ms:.4f}",
                f"{b_ms:.4f}",
                f"{max(f_ms, b_ms):.4f}",
                bound,
            )
        )
    header = ("case", "flops", "bytes", "FLOP floor ms", "byte floor ms", "floor ms", "bound")
    report += markdown_table(header, floors).splitlines()
    report.append("")

    flush = None
    if device.type == "cuda":
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        flush = torch.empty(max(256 << 20, 4 * l2), dtype=torch.int8, device=device)

    results: list[Result] = []
    for i, case in enumerate(cases):
        inputs = make_inputs(case, args.layers, device, args.classes, args.seed + i)
        ref = reference_loss(inputs)
        for variant in variants:
            print(f"cuda_bench: {case.name} {variant}", file=sys.stderr)
            results.append(run_variant(variant, case, inputs, ref, device, args, flush))
        del inputs, ref
        _free(device)

    table, notes = build_table(results, peaks, args.layers)
    report += table
    report.append("")
    report.append(
        f"targets (compiled rows): ≥{TARGET_VS_NAIVE:g}x faster than naive, faster than naive_compiled, "
        f"≤{TARGET_VS_FLOOR:g}x the floor, extra memory within the K-independent budget "
        "(256 MiB split-K workspace cap + 64·L·B·(D+2)·4 bytes)"
    )
    report.append("extra memory as K grows (flat for a fused op; PASS when under x2):")
    report += notes or ["- (needs two K at the same B, D)"]
    text = "\n".join(report) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
