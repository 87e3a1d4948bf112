"""``distillkit bench``: forward+backward timing of any registered loss on synthetic taps.

Every registered loss gets a default case (its default parameters); a plugin can add cases of its own through
the ``distillkit_register_bench_cases`` hook::

    @hookimpl
    def distillkit_register_bench_cases(register):
        register(BenchCase("codir-queue-64k", "codir", {"bank": {"kind": "queue", "size": 65536}}))

``--op`` instead compares the memory-bank InfoNCE implementations (naive, chunked reference, compiled) over a
range of bank sizes (see :mod:`distillkit.bench.infonce`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from distillkit.bench.harness import Row, format_rows, time_steps
from distillkit.hookspecs import BenchCase
from distillkit.objective.terms import LossTerm, ModelDims, TapRequest, Taps

__all__ = ["BenchCase", "BenchShapes", "collect_cases", "make_step", "time_case"]


@dataclass(frozen=True)
class BenchShapes:
    """Synthetic tap shapes.

    Attributes:
        batch: ``B``.
        seq: Tokens per example ``T``.
        student_hidden: ``H_s``.
        teacher_hidden: ``H_t``.
        student_layers: Student depth.
        teacher_layers: Teacher depth.
        classes: Logit width ``C``.
    """

    batch: int = 32
    seq: int = 128
    student_hidden: int = 384
    teacher_hidden: int = 768
    student_layers: int = 6
    teacher_layers: int = 12
    classes: int = 2

    def dims(self) -> ModelDims:
        """Returns the model sizes these shapes imply."""
        heads = synthetic_heads(self.student_hidden, self.teacher_hidden)
        return ModelDims(
            self.student_layers, self.teacher_layers, self.student_hidden, self.teacher_hidden, heads, heads
        )


def synthetic_heads(student_hidden: int, teacher_hidden: int) -> int:
    """Attention heads of both synthetic models: the largest of 12, 8, 6, 4, 2, 1 dividing both widths."""
    return next(h for h in (12, 8, 6, 4, 2, 1) if student_hidden % h == 0 and teacher_hidden % h == 0)


def synthetic_taps(
    shapes: BenchShapes,
    device: str,
    dtype: torch.dtype,
    requests: tuple[TapRequest, TapRequest] | None = None,
) -> tuple[Taps, Taps, list[torch.Tensor]]:
    """Builds random student/teacher taps.

    Hidden states, logits, mask, labels and ids always; attention probabilities ``[B, heads, T, T]``
    (softmax over real keys, heads from :func:`synthetic_heads`) and module outputs ``[B, T, hidden]`` (one
    per requested path, as wide as the model) only when ``requests`` (the term's student and teacher
    requests) asks for them.

    Returns:
        student taps (leaf tensors requiring grad), teacher taps, and the student leaves.
    """
    generator = torch.Generator().manual_seed(0)

    def states(layers: int, hidden: int, grad: bool) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.randn(shapes.batch, shapes.seq, hidden, generator=generator)
            .to(device, dtype)
            .requires_grad_(grad)
            for _ in range(layers + 1)
        )

    mask = torch.ones(shapes.batch, shapes.seq, dtype=torch.long, device=device)
    mask[: shapes.batch // 2, shapes.seq // 2 :] = 0
    heads = synthetic_heads(shapes.student_hidden, shapes.teacher_hidden)

    def attentions(request: TapRequest | None, layers: int, grad: bool) -> tuple[torch.Tensor, ...]:
        if request is None or not request.attentions:
            return ()
        maps = []
        for _ in range(layers):
            scores = torch.randn(shapes.batch, heads, shapes.seq, shapes.seq, generator=generator).to(device)
            scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
            maps.append(torch.softmax(scores, dim=-1).to(dtype).requires_grad_(grad))
        return tuple(maps)

    def modules(request: TapRequest | None, hidden: int, grad: bool) -> dict[str, torch.Tensor]:
        paths = () if request is None else request.modules
        return {
            path: torch.randn(shapes.batch, shapes.seq, hidden, generator=generator)
            .to(device, dtype)
            .requires_grad_(grad)
            for path in paths
        }

    reads_student, reads_teacher = requests or (None, None)
    labels = torch.randint(0, shapes.classes, (shapes.batch,), generator=generator).to(device)
    ids = torch.arange(shapes.batch, device=device)
    student_logits = torch.randn(shapes.batch, shapes.classes, generator=generator).to(device, dtype)
    student_logits.requires_grad_(True)
    student_states = states(shapes.student_layers, shapes.student_hidden, True)
    student_maps = attentions(reads_student, shapes.student_layers, True)
    student_modules = modules(reads_student, shapes.student_hidden, True)
    student = Taps(
        student_states, student_logits, mask, labels, ids, attentions=student_maps, modules=student_modules
    )
    teacher_logits = torch.randn(shapes.batch, shapes.classes, generator=generator).to(device, dtype)
    teacher = Taps(
        states(shapes.teacher_layers, shapes.teacher_hidden, False),
        teacher_logits,
        mask,
        labels,
        ids,
        attentions=attentions(reads_teacher, shapes.teacher_layers, False),
        modules=modules(reads_teacher, shapes.teacher_hidden, False),
    )
    return student, teacher, [*student_states, student_logits, *student_maps, *student_modules.values()]


def collect_cases(losses: list[str] | None = None) -> list[BenchCase]:
    """Returns a default case per registered loss plus every plugin-contributed case.

    Args:
        losses: Keep only cases of these losses (None: all).

    Raises:
        UnknownLossError: For a name in ``losses`` that no plugin registers.
    """
    from distillkit.plugin_manager import load_plugins
    from distillkit.registry import get_loss, loss_registry

    for name in losses or ():
        get_loss(name)  # an unknown name is an error, never an empty table
    cases = [BenchCase(name, name) for name in sorted(loss_registry())]
    load_plugins().hook.distillkit_register_bench_cases(register=cases.append)
    if losses is not None:
        cases = [case for case in cases if case.loss in losses]
    return cases


def make_step(
    case: BenchCase, shapes: BenchShapes, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Callable[[], None]:
    """Builds the case's term and synthetic taps and returns one forward+backward step.

    ``distillkit bench`` and the pytest-benchmark suite time the same closure.

    Args:
        case: The case.
        shapes: Base shapes (``case.shapes`` overrides them).
        device: Where to run.
        dtype: Dtype of the synthetic hidden states and logits.

    Returns:
        A function running forward, backward and ``after_step`` once.
    """
    from distillkit.objective.objective import build_term

    shapes = replace(shapes, **case.shapes)
    term: LossTerm = build_term(case.loss, shapes.dims(), **case.params).to(device)
    student, teacher, leaves = synthetic_taps(shapes, device, dtype, term.tap_requests())
    term.prepare_benchmark()  # e.g. a full memory bank, not the first steps of an empty one

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        term.zero_grad(set_to_none=True)
        loss = term(student, teacher)
        loss.backward()
        term.after_step()

    return step


def time_case(
    case: BenchCase,
    shapes: BenchShapes,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeat: int = 5,
    warmup: int = 1,
) -> Row:
    """Times forward+backward of one case (:func:`distillkit.bench.harness.time_steps`).

    Returns:
        A table row: case, loss, median and min milliseconds, and peak CUDA memory when on a GPU.
    """
    step = make_step(case, shapes, device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    for _ in range(warmup):
        step()
    if sync is not None:
        sync()
        torch.cuda.reset_peak_memory_stats()
    timing = time_steps({case.name: step}, repeat, warmup=0, sync=sync)[case.name]
    row: Row = {
        "case": case.name,
        "loss": case.loss,
        "median_ms": timing.median * 1e3,
        "min_ms": timing.min * 1e3,
    }
    if sync is not None:
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``distillkit bench`` options to ``parser``."""
    defaults = BenchShapes()
    parser.add_argument("--losses", help="comma-separated loss names (default: every registered loss)")
    for name in ("batch", "seq", "student_hidden", "teacher_hidden", "student_layers", "teacher_layers"):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(defaults, name),
            help="synthetic tap size",
        )
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run"
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="synthetic tap dtype"
    )
    parser.add_argument(
        "--op",
        nargs="?",
        const="infonce",
        choices=["infonce", "vocab"],
        help="compare op implementations: InfoNCE vs bank size (default), or vocab: linear divergence",
    )
    parser.add_argument("--vocab-shape", default="2048,49152,576,576", help="with --op vocab: N,V,Ds,Dt")
    parser.add_argument("--divergence", default="forward_kl", help="with --op vocab: the divergence")
    parser.add_argument("--op-k", default="4096,16384,65536", help="bank sizes for --op")
    parser.add_argument("--op-b", type=int, default=256, help="queries for --op")
    parser.add_argument("--op-d", type=int, default=128, help="vector size for --op")
    parser.add_argument("--plot", help="with --op: write a PNG of time and memory vs K here")
    parser.add_argument(
        "--step",
        metavar="CONFIG.yaml",
        help="time the phases of one training step of a distill config (teacher, student, objective, ...)",
    )
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="with --step: override a config field"
    )
    parser.add_argument(
        "--compare-logits",
        action="store_true",
        help="with --step: time and measure the step with materialised logits and with the output layers "
        "(train.fused_logits never vs always), each in a fresh process",
    )


def run_op_table(
    batch: int,
    dim: int,
    bank_sizes: list[int],
    dtype: torch.dtype = torch.float32,
    repeat: int = 5,
    plot: str | None = None,
) -> int:
    """Prints fwd+bwd time and peak extra memory vs bank size for naive, reference and compiled InfoNCE.

    Args:
        batch: Queries ``B``.
        dim: Vector size ``D``.
        bank_sizes: The ``K`` values.
        dtype: Input dtype.
        repeat: Timed runs per variant (median shown).
        plot: Write a PNG of time and memory vs ``K`` here (needs matplotlib).

    Returns:
        The exit status.
    """
    from distillkit.bench.infonce import Case, format_table, measure

    dtype_name = str(dtype).removeprefix("torch.")
    cases = [
        Case(f"B{batch} D{dim} K{k}", batch=batch, dim=dim, negatives=k, dtype=dtype_name) for k in bank_sizes
    ]
    rows = []
    for case in cases:
        rows += measure([case], repeats=repeat)
        print(f"  {case.name}: done", file=sys.stderr, flush=True)
    print(f"\nmembank InfoNCE forward+backward, CPU, {dtype_name}, {torch.get_num_threads()} threads\n")
    print(format_table(rows))
    if plot:
        _plot_op_rows(rows, bank_sizes, plot)
        print(f"\nplot written to {plot}")
    return 0


def _plot_op_rows(rows: list[dict[str, Any]], bank_sizes: list[int], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from exc
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(row["variant"] for row in rows):
        chosen = [row for row in rows if row["variant"] == variant]
        time_axis.plot(bank_sizes, [row["ms"] for row in chosen], marker="o", label=variant)
        memory_axis.plot(bank_sizes, [row["peak_mib"] for row in chosen], marker="o", label=variant)
    for axis, label in ((time_axis, "fwd+bwd ms"), (memory_axis, "peak extra MiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("bank size K")
        axis.set_ylabel(label)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run_bench_cli(args: argparse.Namespace) -> int:
    """Runs ``distillkit bench`` and prints a markdown table; returns the exit status."""
    dtype = getattr(torch, args.dtype)
    if args.step:
        from distillkit.bench.step import (
            compare_logit_paths,
            format_logit_paths,
            format_step_table,
            time_training_step,
        )
        from distillkit.config import load_config

        config = load_config(args.step, args.set or ())
        if args.compare_logits:
            print(format_logit_paths(compare_logit_paths(config, repeats=args.repeat), args.step))
            return 0
        print(format_step_table(time_training_step(config, repeats=args.repeat), args.step))
        return 0
    if args.op == "vocab":
        from distillkit.bench.vocab import VocabCase, run_vocab_table

        n, v, ds, dt = (int(x) for x in args.vocab_shape.split(","))
        case = VocabCase(n, v, ds, dt, divergence=args.divergence)
        return run_vocab_table(case, repeats=args.repeat)
    if args.op:
        if args.device != "cpu":
            raise SystemExit("--op measures CPU time and memory; on a GPU use benchmarks/cuda_bench.py")
        bank_sizes = [int(k) for k in args.op_k.split(",")]
        return run_op_table(args.op_b, args.op_d, bank_sizes, dtype=dtype, repeat=args.repeat, plot=args.plot)
    shapes = BenchShapes(
        batch=args.batch,
        seq=args.seq,
        student_hidden=args.student_hidden,
        teacher_hidden=args.teacher_hidden,
        student_layers=args.student_layers,
        teacher_layers=args.teacher_layers,
    )
    wanted = args.losses.split(",") if args.losses else None
    rows = []
    for case in collect_cases(wanted):
        try:
            rows.append(time_case(case, shapes, args.device, dtype, repeat=args.repeat))
        except Exception as exc:  # one broken case must not hide the others
            rows.append(
                {
                    "case": case.name,
                    "loss": case.loss,
                    "median_ms": float("nan"),
                    "min_ms": float("nan"),
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
        print(f"  {case.name}: {rows[-1]['median_ms']:.1f} ms", file=sys.stderr, flush=True)
    print(f"\nforward+backward on synthetic taps, {shapes}, device={args.device}, dtype={args.dtype}\n")
    print(format_rows(rows))
    return 0
