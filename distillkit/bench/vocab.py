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
from dataclasses import dataclass

import torch

from distillkit.bench.harness import case_peak_memory, compare_variants, markdown_table

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

    def variants(self) -> tuple[str, ...]:
        """Every variant, ``naive`` (the baseline) first."""
        return VARIANTS

    def make_step(self, variant: str) -> Callable[[], None]:
        """One forward + backward of ``variant`` on this case's inputs (the harness's :class:`Case`)."""
        return functools.partial(variant_step(self, variant), make_inputs(self))


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


def peak_extra_memory(case: VocabCase, variant: str, timeout: float = 900.0) -> int:
    """Peak extra resident bytes of one forward + backward of ``variant``, in a fresh process."""
    return case_peak_memory(case, variant, timeout=timeout)


def measure(case: VocabCase, repeats: int = 3, memory: bool = True) -> list[dict]:
    """Times (and optionally measures the memory of) every variant; ratios are against ``naive``."""
    rows, _ = compare_variants(case, repeats, memory)
    for row in rows:
        if memory:
            row["memory_vs_naive"] = row.pop("mem_frac")
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
