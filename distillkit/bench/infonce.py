"""Measurements of the memory-bank InfoNCE op: time, peak extra memory, and the machine's sgemm rate.

Used by ``distillkit bench --op`` and by ``benchmarks/`` (``benchmarks/cpu_bench.py`` prints the table in
``benchmarks/RESULTS.md``; the pytest-benchmark suite times the same steps).

Variants (all run forward + backward of ``loss.sum()`` with gradients to query and positive):

- ``naive``: :func:`~distillkit.ops.naive_membank_infonce`, full ``[B, K+1]`` logits and autograd.
- ``reference``: :func:`~distillkit.ops.reference_membank_infonce`, pure PyTorch chunked over the bank.
- ``compiled``: :func:`~distillkit.ops.membank_infonce`, the fused kernel.
- ``gather_bmm``: the usual CRD code for ``negative_index``: gather ``[B, K+1, D]`` keys, then ``bmm``
  (the naive form's indexed path).

Time: the median wall time of ``repeats`` runs after a warm-up; variants are interleaved round by round so
that a noisy neighbour slows all of them alike and the ratios stay meaningful. The machine's sgemm rate is
timed in the same rounds, two ways: ``torch.mm`` in float32 at the naive form's shape ``[B, D] @ [D, K]`` on
all threads (wall clock), and ``[B, D] @ [D, 2048]`` on one thread per CPU-second. The second is compared
with the variants' flops per CPU-second (``time.process_time``, all threads): on a shared machine, where
neighbours take cores away and multi-threaded BLAS calls stall at their barriers, that efficiency stays
stable while wall-clock rates do not.

Peak extra memory (CPU): each (case, variant) runs in a fresh Python process
(:func:`distillkit.bench.harness.case_peak_memory`) that builds the inputs, runs the variant once (so one-off
allocations such as thread pools and BLAS buffers are not counted) and reports the peak resident memory the
next forward + backward adds on top of its inputs. Inputs live on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from distillkit.bench.harness import case_peak_memory, compare_variants, markdown_table
from distillkit.ops import membank_infonce, naive_membank_infonce, reference_membank_infonce

VARIANTS: tuple[str, ...] = ("naive", "reference", "compiled", "gather_bmm")
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class Case:
    """One benchmark problem.

    Attributes:
        name: Short label for tables.
        batch: B, queries per layer.
        dim: D, feature size.
        negatives: K, bank rows (dense) or negatives per query (with ``rows``).
        rows: N, bank rows for the ``negative_index`` form; None for the dense form.
        layers: L, leading dim batched in one call (the bank is shared, ``[K, D]``).
        dtype: Input dtype name.
        temperature: τ.
        labels: Pass ``query_labels`` ``[B]`` and ``bank_labels`` ``[K or N]`` (negatives of the query's
            class are left out).
    """

    name: str
    batch: int
    dim: int
    negatives: int
    rows: int | None = None
    layers: int = 1
    dtype: str = "float32"
    temperature: float = 0.07
    labels: bool = False

    @property
    def indexed(self) -> bool:
        """Whether the case uses per-query ``negative_index``."""
        return self.rows is not None

    @property
    def flops(self) -> int:
        """Forward + backward flops of the fused op: 2 GEMM-equivalents of 2·L·B·K·D each."""
        return 4 * self.layers * self.batch * self.negatives * self.dim

    def variants(self) -> tuple[str, ...]:
        """The variants that make sense for this case (baseline first)."""
        return ("gather_bmm", "reference", "compiled") if self.indexed else ("naive", "reference", "compiled")

    def make_step(self, variant: str) -> Callable[[], None]:
        """One forward + backward of ``variant`` on this case's inputs (the harness's :class:`Case`)."""
        return functools.partial(variant_step(variant), make_inputs(self))


def make_inputs(case: Case, seed: int = 0, classes: int = 1000) -> dict[str, torch.Tensor | float]:
    """Synthetic inputs for ``case``: unit-norm query/positive/bank rows.

    Returns:
        Keyword arguments for the variants: ``query``/``positive`` ``[L, B, D]`` (leaf tensors requiring
        grad; the leading dim is dropped when L == 1), ``bank`` ``[K or N, D]``, ``temperature`` and, for
        indexed cases, ``negative_index`` ``[L, B, K]``.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = _DTYPES[case.dtype]
    lead = (case.layers,) if case.layers > 1 else ()
    shape = (*lead, case.batch, case.dim)

    def unit(*size: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(*size, generator=g), dim=-1).to(dtype)

    inputs: dict[str, torch.Tensor | float] = {
        "query": unit(*shape).requires_grad_(),
        "positive": unit(*shape).requires_grad_(),
        "bank": unit(case.rows if case.indexed else case.negatives, case.dim),
        "temperature": case.temperature,
    }
    if case.labels:
        inputs["query_labels"] = torch.randint(0, classes, (case.batch,), generator=g)
        inputs["bank_labels"] = torch.randint(0, classes, (inputs["bank"].shape[0],), generator=g)
    if case.indexed:
        inputs["negative_index"] = torch.randint(
            0, case.rows, (*lead, case.batch, case.negatives), generator=g
        )
    return inputs


def variant_step(variant: str) -> Callable[[dict], None]:
    """Returns a function running one forward + backward of ``variant`` on ``make_inputs`` output."""
    fn = {
        "naive": naive_membank_infonce,
        "gather_bmm": naive_membank_infonce,
        "reference": reference_membank_infonce,
        "compiled": membank_infonce,
    }[variant]

    def step(inputs: dict) -> None:
        kw = {k: v for k, v in inputs.items() if k in ("query_labels", "bank_labels", "negative_index")}
        loss = fn(inputs["query"], inputs["positive"], inputs["bank"], inputs["temperature"], **kw)
        loss.sum().backward()
        inputs["query"].grad = None
        inputs["positive"].grad = None

    return step


def peak_extra_memory(case: Case, variant: str, timeout: float = 600.0) -> int:
    """Peak extra resident memory (bytes) of one forward + backward, in a fresh process (same threads)."""
    return case_peak_memory(case, variant, timeout=timeout)


def sgemm_probe(
    m: int, k: int, n: int, calls: int = 1, threads: int | None = None
) -> tuple[Callable[[], None], int]:
    """A float32 ``torch.mm`` of ``[m, k] @ [k, n]`` (the bank's ``[n, k]`` layout used transposed).

    Args:
        m: Rows of the left factor.
        k: Inner size.
        n: Columns of the product.
        calls: Products per run.
        threads: Threads to run them on (all of torch's when None).

    Returns:
        ``(run, flops)``: ``run`` performs ``calls`` products, ``flops`` is their flop count.
    """
    a = torch.randn(m, k)
    b = torch.randn(n, k).t()

    def run() -> None:
        saved = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            for _ in range(calls):
                torch.mm(a, b)
        finally:
            torch.set_num_threads(saved)

    return run, 2 * m * k * n * calls


def sgemm_probes(case: Case) -> dict[str, tuple[Callable[[], None], int]]:
    """This machine's sgemm references for ``case``.

    Returns:
        ``"same_shape"``: ``torch.mm`` of ``[L·B, D] @ [D, K]`` on all threads, the GEMM the naive form
        runs (its wall-clock rate is "the machine's sgemm rate at this shape");
        ``"one_core"``: repeated ``[L·B, D] @ [D, 2048]`` on one thread, a cache-friendly shape at the
        BLAS peak of one core (compared per CPU-second, it does not depend on how busy the machine is).
    """
    m = case.batch * case.layers
    return {
        "same_shape": sgemm_probe(m, case.dim, case.negatives),
        "one_core": sgemm_probe(m, case.dim, 2048, calls=max(1, case.negatives // 8192), threads=1),
    }


def measure(cases: Iterable[Case], repeats: int = 5, memory: bool = True) -> list[dict]:
    """Measures every case and variant.

    Returns:
        One dict per (case, variant): ``case``, ``variant``, ``ms`` / ``cpu_ms`` (median wall / CPU time
        of fwd+bwd), ``speedup`` (wall, over the case's baseline: the first variant), ``gflops`` (fused-op
        flop count per wall second), ``sgemm_gflops`` and ``sgemm_frac`` (the all-thread same-shape
        ``torch.mm`` rate and gflops over it), ``core_gflops`` (flops per CPU second), ``sgemm_core_gflops``
        and ``core_frac`` (the one-core ``torch.mm`` rate per CPU second and core_gflops over it),
        ``peak_mib`` and ``mem_frac`` (over the baseline's). The sgemm fields are None for indexed or
        non-float32 cases, the memory fields when ``memory`` is False.
    """
    rows = []
    for case in cases:
        probes = sgemm_probes(case) if case.dtype == "float32" and not case.indexed else {}
        runs = {name: run for name, (run, _) in probes.items()}
        measured, times = compare_variants(case, repeats, memory, runs)
        sgemm = probes["same_shape"][1] / times["same_shape"].median / 1e9 if probes else None
        core = probes["one_core"][1] / times["one_core"].median_cpu / 1e9 if probes else None
        for row in measured:
            gflops = case.flops / (row["ms"] / 1e3) / 1e9
            core_gflops = case.flops / (row["cpu_ms"] / 1e3) / 1e9
            rows.append(
                {
                    **row,
                    "gflops": gflops,
                    "sgemm_gflops": sgemm,
                    "sgemm_frac": gflops / sgemm if sgemm else None,
                    "core_gflops": core_gflops,
                    "sgemm_core_gflops": core,
                    "core_frac": core_gflops / core if core else None,
                    "peak_mib": row.get("peak_mib"),
                    "mem_frac": row.get("mem_frac"),
                }
            )
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Renders :func:`measure` rows as a Markdown table."""

    def fmt(value: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
        return "-" if value is None else format(value * scale, spec) + unit

    header = (
        "case", "variant", "fwd+bwd ms", "speedup", "GFLOP/s", "of sgemm, same shape", "GFLOP per CPU-s",
        "of 1-core sgemm", "peak extra MiB", "memory vs baseline",
    )  # fmt: skip
    cells = [
        (
            r["case"],
            r["variant"],
            f"{r['ms']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['gflops']:.1f}",
            fmt(r["sgemm_frac"], ".0f", 100, "%"),
            f"{r['core_gflops']:.1f}",
            fmt(r["core_frac"], ".0f", 100, "%"),
            fmt(r["peak_mib"], ".1f"),
            fmt(r["mem_frac"], ".2f", 100, "%"),
        )
        for r in rows
    ]
    return markdown_table(header, cells, right=range(2, len(header)))
