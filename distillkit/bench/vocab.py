"""``distillkit bench --op vocab``: token-level KD over a large vocabulary, several ways, on the CPU.

Variants (forward + backward of the scalar loss, gradients to the student's hidden states and weight):

- ``naive`` — full ``[N, V]`` logits of both models, ``log_softmax`` and autograd
  (:func:`distillkit.ops.linear_divergence.naive_linear_divergence`);
- ``chunked`` — the device-agnostic chunked path of the fused op, eager;
- ``chunked_compiled`` — the same under ``torch.compile``;
- ``trl`` — TRL's GKD loss as its trainer runs it: the two ``lm_head`` matmuls, then
  ``GKDTrainer.generalized_jsd_loss`` (β = 0 is forward KL, β = 1 reverse KL); only when TRL is installed
  (``pip install --no-deps trl``) and for those divergences;
- ``fused`` — :func:`distillkit.ops.fused_linear_divergence` on the compiled CPU kernel.

A probe is timed in the same rounds: ``four GEMMs``, the four ``N·V·D`` matrix products the loss needs
(both models' logits, the gradients for the hidden states and the weight) as plain ``torch.mm`` calls into
preallocated outputs, on the same threads: the time the machine's sgemm rate sets. Each variant's "GEMM
share" is the probe's time over its own (1 = nothing but the four GEMMs).

Times are medians over rounds that interleave the variants, so a busy machine slows them alike; peak extra
memory is the growth of the peak resident set during one step, in a fresh process, after the inputs are
built and one warm-up step has run (gradients reset to None, as after ``zero_grad()``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from distillkit.bench.harness import case_peak_memory, compare_variants, markdown_table

VARIANTS = ("naive", "chunked", "chunked_compiled", "trl", "fused")
CHUNK_ROWS = 256
"""Rows per chunk of the chunked variants (8 chunks at N = 2048)."""
TRL_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}
"""The β of TRL's generalised JSD that gives each KL (``jsd`` uses the case's β)."""
GEMM_PROBE = "four GEMMs"


def trl_installed() -> bool:
    """Whether TRL (the peer, never a dependency) can be imported."""
    return importlib.util.find_spec("trl") is not None


@dataclass(frozen=True)
class VocabCase:
    """A problem (``N`` tokens, vocabulary ``V``, hidden sizes ``Ds``, ``Dt``) and the variants to run."""

    tokens: int = 2048
    vocab: int = 49152
    student_hidden: int = 576
    teacher_hidden: int = 576
    divergence: str = "forward_kl"
    temperature: float = 2.0
    beta: float = 0.5
    only: tuple[str, ...] = ()
    """The variants to run (all that apply when empty); ``naive`` is always the baseline."""

    @property
    def name(self) -> str:
        """A short label for tables."""
        sizes = f"N{self.tokens} V{self.vocab} Ds{self.student_hidden} Dt{self.teacher_hidden}"
        return f"{sizes} {self.divergence}"

    def variants(self) -> tuple[str, ...]:
        """The variants that apply, ``naive`` (the baseline) first."""
        trl = trl_installed() and (self.divergence in TRL_BETA or self.divergence == "jsd")
        chosen = [v for v in VARIANTS if v != "trl" or trl]
        if self.only:
            unknown = sorted(set(self.only) - set(VARIANTS))
            if unknown:
                raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
            chosen = [v for v in chosen if v in self.only or v == "naive"]
        return tuple(chosen)

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


def _trl_loss(case: VocabCase) -> Callable[..., torch.Tensor]:
    """TRL's GKD loss on the two ``lm_head`` products, as ``GKDTrainer.compute_loss`` runs it."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    beta = TRL_BETA.get(case.divergence, case.beta)

    def loss(hs, ws, ht, wt):
        student = (hs @ ws.T).unsqueeze(0)  # [1, N, V]: the trainer's logits of one sequence
        with torch.no_grad():
            teacher = (ht @ wt.T).unsqueeze(0)
        labels = torch.zeros(student.shape[:2], dtype=torch.long)  # every position counted
        return GKDTrainer.generalized_jsd_loss(
            student, teacher, labels, beta=beta, temperature=case.temperature
        )

    return loss


def variant_step(case: VocabCase, variant: str) -> Callable[[dict[str, torch.Tensor]], None]:
    """Returns ``step(inputs)``: one forward + backward of ``variant``, gradients reset afterwards."""
    from distillkit.ops import fused_linear_divergence
    from distillkit.ops.linear_divergence.chunked import chunked_linear_divergence, naive_linear_divergence

    kind, temperature, beta = case.divergence, case.temperature, case.beta

    def chunked(hs, ws, ht, wt):
        weights = torch.full((hs.shape[0],), 1.0 / hs.shape[0])
        return chunked_linear_divergence(
            hs, ws, ht, wt, weights, None, None, kind, temperature, beta, 0.1, CHUNK_ROWS
        )

    if variant == "naive":
        loss_fn = functools.partial(
            naive_linear_divergence, divergence_name=kind, temperature=temperature, beta=beta
        )
    elif variant == "chunked":
        loss_fn = chunked
    elif variant == "chunked_compiled":
        loss_fn = torch.compile(chunked)
    elif variant == "trl":
        loss_fn = _trl_loss(case)
    elif variant == "fused":
        loss_fn = functools.partial(
            fused_linear_divergence, divergence=kind, temperature=temperature, beta=beta
        )
    else:
        raise ValueError(f"unknown variant '{variant}'; choose from {', '.join(VARIANTS)}")

    def step(inputs: dict[str, torch.Tensor]) -> None:
        loss_fn(inputs["hs"], inputs["ws"], inputs["ht"], inputs["wt"]).backward()
        inputs["hs"].grad = None
        inputs["ws"].grad = None

    return step


def gemm_flops(case: VocabCase) -> float:
    """Floating-point operations of the four GEMMs: ``2·N·V·(Ds + Dt) + 2 · 2·N·V·Ds``."""
    n, v = case.tokens, case.vocab
    return 2.0 * n * v * (3 * case.student_hidden + case.teacher_hidden)


def gemm_probe(case: VocabCase) -> Callable[[], None]:
    """The four GEMMs of the loss as plain ``torch.mm`` calls into preallocated outputs (see the module)."""
    inputs = {k: v.detach() for k, v in make_inputs(case).items()}
    hs, ws, ht, wt = inputs["hs"], inputs["ws"], inputs["ht"], inputs["wt"]
    logits_s = torch.empty(case.tokens, case.vocab)
    logits_t = torch.empty(case.tokens, case.vocab)
    grad_h, grad_w = torch.empty_like(hs), torch.empty_like(ws)

    def step() -> None:
        torch.mm(hs, ws.T, out=logits_s)
        torch.mm(ht, wt.T, out=logits_t)
        torch.mm(logits_s, ws, out=grad_h)  # the logit gradient stands in for G
        torch.mm(logits_s.T, hs, out=grad_w)

    return step


def peak_extra_memory(case: VocabCase, variant: str, timeout: float = 900.0) -> int:
    """Peak extra resident bytes of one forward + backward of ``variant``, in a fresh process."""
    return case_peak_memory(case, variant, timeout=timeout)


def measure(case: VocabCase, repeats: int = 3, memory: bool = True) -> tuple[list[dict], dict[str, float]]:
    """Times every variant and the GEMM probe in the same rounds (and measures memory); see the module.

    Returns:
        One row per variant (``ms``, ``speedup`` over ``naive``, ``gemm_share``, ``fused_speedup``: how many
        times faster ``fused`` is; with ``memory`` also ``peak_mib``, ``memory_vs_naive`` and
        ``fused_memory``: ``fused``'s peak over the variant's), and ``{"gemm_ms", "gemm_gflops"}`` of the
        probe.
    """
    rows, timings = compare_variants(case, repeats, memory, probes={GEMM_PROBE: gemm_probe(case)})
    gemm = timings[GEMM_PROBE].median
    fused = next((r for r in rows if r["variant"] == "fused"), None)
    for row in rows:
        row["gemm_share"] = gemm / (row["ms"] / 1e3)
        if fused is not None:
            row["fused_speedup"] = row["ms"] / fused["ms"]
        if memory:
            row["memory_vs_naive"] = row.pop("mem_frac")
            if fused is not None:
                row["fused_memory"] = fused["peak_mib"] / max(row["peak_mib"], 1e-9)
    return rows, {"gemm_ms": gemm * 1e3, "gemm_gflops": gemm_flops(case) / gemm / 1e9}


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`measure` rows."""
    header = (
        "case",
        "variant",
        "fwd+bwd ms",
        "speedup vs naive",
        "fused is x faster",
        "GEMM share",
        "peak extra MiB",
        "memory vs naive",
        "fused's memory / its",
    )
    cells = [
        (
            r["case"],
            r["variant"],
            f"{r['ms']:.0f}" if r["ms"] >= 10 else f"{r['ms']:.2g}",
            f"{r['speedup']:.2f}x",
            f"{r['fused_speedup']:.2f}x" if "fused_speedup" in r else "-",
            f"{100 * r['gemm_share']:.0f}%" if "gemm_share" in r else "-",
            f"{r['peak_mib']:.1f}" if "peak_mib" in r else "-",
            f"{100 * r['memory_vs_naive']:.2f}%" if "memory_vs_naive" in r else "-",
            f"{100 * r['fused_memory']:.1f}%" if "fused_memory" in r else "-",
        )
        for r in rows
    ]
    return markdown_table(header, cells, right=range(2, len(header)))


def run_vocab_table(cases: Sequence[VocabCase], repeats: int = 3, memory: bool = True) -> int:
    """Prints the table for ``distillkit bench --op vocab``; returns the exit status."""
    rows, probes = [], []
    for case in cases:
        case_rows, probe = measure(case, repeats=repeats, memory=memory)
        rows += case_rows
        probes.append((case, probe))
    threads = torch.get_num_threads()
    print(f"\nlinear divergence forward+backward, CPU, float32, {threads} threads, median of {repeats}\n")
    print(format_table(rows))
    for case, probe in probes:
        print(
            f"\n{case.name}: {GEMM_PROBE} ({gemm_flops(case) / 1e9:.1f} GFLOP, torch.mm, {threads} threads) "
            f"{probe['gemm_ms']:.0f} ms = {probe['gemm_gflops']:.1f} GFLOP/s"
        )
    return 0
