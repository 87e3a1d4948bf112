"""``distillkit bench --op vocab``: token-level KD over a large vocabulary, four ways, on the CPU.

Variants (forward + backward of the scalar loss, gradients to the student's hidden states and weight):

- ``naive`` — full ``[N, V]`` logits of both models, ``log_softmax`` and autograd
  (:func:`distillkit.ops.linear_divergence_chunked.naive_linear_divergence`);
- ``chunked`` — the device-agnostic chunked path of the fused op, eager;
- ``chunked_compiled`` — the same under ``torch.compile``;
- ``fused`` — :func:`distillkit.ops.fused_linear_divergence` on the compiled CPU kernel.

Times are medians over rounds that interleave the variants, so a busy machine slows them alike; peak extra
memory is the growth of the peak resident set during one step, in a fresh process, after the inputs are
built and one warm-up step has run (gradients reset to None, as after ``zero_grad()``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from distillkit.bench import harness as benchmarking
from distillkit.bench.harness import markdown_table, time_steps

VARIANTS = ("naive", "chunked", "chunked_compiled", "fused")
CHUNK_ROWS = 256
"""Rows per chunk of the chunked variants (8 chunks at N = 2048)."""


@dataclass(frozen=True)
class VocabCase:
    """One problem: ``N`` tokens, vocabulary ``V``, hidden sizes ``Ds`` and ``Dt``."""

    tokens: int = 2048
    vocab: int = 49152
    student_hidden: int = 576
    teacher_hidden: int = 576
    divergence: str = "forward_kl"
    temperature: float = 2.0

    @property
    def name(self) -> str:
        """A short label for tables."""
        sizes = f"N{self.tokens} V{self.vocab} Ds{self.student_hidden} Dt{self.teacher_hidden}"
        return f"{sizes} {self.divergence}"


def make_inputs(case: VocabCase, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float32 hidden states and output weights (student's with gradients) giving logits of a few units."""
    g = torch.Generator().manual_seed(seed)
    ds, dt = case.student_hidden, case.teacher_hidden
    return {
        "hs": torch.randn(case.tokens, ds, generator=g).requires_grad_(),
        "ws": (torch.randn(case.vocab, ds, generator=g) / ds**0.5).requires_grad_(),
        "ht": torch.randn(case.tokens, dt, generator=g),
        "wt": torch.randn(case.vocab, dt, generator=g) / dt**0.5,
    }


def variant_step(case: VocabCase, variant: str) -> Callable[[dict[str, torch.Tensor]], None]:
    """Returns ``step(inputs)``: one forward + backward of ``variant``, gradients reset afterwards."""
    from distillkit.ops import fused_linear_divergence
    from distillkit.ops.linear_divergence.chunked import chunked_linear_divergence, naive_linear_divergence

    kind, temperature = case.divergence, case.temperature

    def chunked(hs, ws, ht, wt):
        weights = torch.full((hs.shape[0],), 1.0 / hs.shape[0])
        return chunked_linear_divergence(
            hs, ws, ht, wt, weights, None, None, kind, temperature, 0.5, 0.1, CHUNK_ROWS
        )

    if variant == "naive":
        loss_fn = functools.partial(naive_linear_divergence, divergence_name=kind, temperature=temperature)
    elif variant == "chunked":
        loss_fn = chunked
    elif variant == "chunked_compiled":
        loss_fn = torch.compile(chunked)
    elif variant == "fused":
        loss_fn = functools.partial(fused_linear_divergence, divergence=kind, temperature=temperature)
    else:
        raise ValueError(f"unknown variant '{variant}'; choose from {', '.join(VARIANTS)}")

    def step(inputs: dict[str, torch.Tensor]) -> None:
        loss_fn(inputs["hs"], inputs["ws"], inputs["ht"], inputs["wt"]).backward()
        inputs["hs"].grad = None
        inputs["ws"].grad = None

    return step


def time_variants(case: VocabCase, variants: Sequence[str], repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of forward + backward per variant, variants interleaved round by round."""
    inputs = make_inputs(case)
    steps = {v: functools.partial(variant_step(case, v), inputs) for v in variants}
    return {name: timing.median for name, timing in time_steps(steps, repeats).items()}


def memory_step(fields: dict, variant: str) -> Callable[[], None]:
    """What :func:`peak_extra_memory` measures: ``variant`` on VocabCase(**fields), after one warm-up step."""
    case = VocabCase(**fields)
    step = functools.partial(variant_step(case, variant), make_inputs(case))
    step()
    return step


def peak_extra_memory(case: VocabCase, variant: str, timeout: float = 900.0) -> int:
    """Peak extra resident bytes of one forward + backward of ``variant``, in a fresh process."""
    return benchmarking.peak_extra_memory(
        "distillkit.bench.vocab:memory_step", asdict(case), variant, timeout=timeout
    )


def measure(case: VocabCase, repeats: int = 3, memory: bool = True) -> list[dict]:
    """Times (and optionally measures the memory of) every variant; ratios are against ``naive``."""
    times = time_variants(case, VARIANTS, repeats=repeats)
    peaks = {v: peak_extra_memory(case, v) for v in VARIANTS} if memory else {}
    rows = []
    for variant in VARIANTS:
        row = {
            "case": case.name,
            "variant": variant,
            "ms": 1e3 * times[variant],
            "speedup": times["naive"] / times[variant],
        }
        if memory:
            row["peak_mib"] = peaks[variant] / 2**20
            row["memory_vs_naive"] = peaks[variant] / max(peaks["naive"], 1)
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`measure` rows."""
    header = ("case", "variant", "fwd+bwd ms", "speedup vs naive", "peak extra MiB", "memory vs naive")
    cells = [
        (
            r["case"],
            r["variant"],
            f"{r['ms']:.0f}",
            f"{r['speedup']:.2f}x",
            f"{r['peak_mib']:.1f}" if "peak_mib" in r else "-",
            f"{100 * r['memory_vs_naive']:.2f}%" if "memory_vs_naive" in r else "-",
        )
        for r in rows
    ]
    return markdown_table(header, cells, right=range(2, len(header)))


def run_vocab_table(case: VocabCase, repeats: int = 3, memory: bool = True) -> int:
    """Prints the table for ``distillkit bench --op vocab``; returns the exit status."""
    rows = measure(case, repeats=repeats, memory=memory)
    print(f"\nlinear divergence forward+backward, CPU, float32, {torch.get_num_threads()} threads\n")
    print(format_table(rows))
    return 0
