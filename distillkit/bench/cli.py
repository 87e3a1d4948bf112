"""``distillkit bench``: the command line over the benchmark cases (losses, fused ops, the training step).

- no option: forward+backward of every registered loss on synthetic taps (:mod:`distillkit.bench.losses`);
- ``--op``: the memory-bank InfoNCE implementations over bank sizes (:mod:`distillkit.bench.infonce`);
  ``--op vocab``: the linear-divergence implementations (:mod:`distillkit.bench.vocab`);
- ``--step CONFIG.yaml``: the phases of a real config's training step (:mod:`distillkit.bench.step`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from distillkit.bench.harness import format_rows
from distillkit.bench.losses import BenchShapes, collect_cases, time_case


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
    parser.add_argument(
        "--vocab-shape",
        default="2048,49152,576,576",
        help="with --op vocab: N,V,Ds,Dt (several: separated by ';')",
    )
    parser.add_argument("--divergence", default="forward_kl", help="with --op vocab: the divergence")
    parser.add_argument("--temperature", type=float, default=2.0, help="with --op vocab: the temperature")
    parser.add_argument("--beta", type=float, default=0.5, help="with --op vocab: jsd's beta")
    parser.add_argument(
        "--variants", help="with --op vocab: comma-separated variants (default: all; naive always runs)"
    )
    parser.add_argument("--no-memory", action="store_true", help="with --op vocab: time only")
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

        only = tuple(args.variants.split(",")) if args.variants else ()
        cases = []
        for shape in args.vocab_shape.split(";"):
            n, v, ds, dt = (int(x) for x in shape.split(","))
            cases.append(VocabCase(n, v, ds, dt, args.divergence, args.temperature, args.beta, only))
        return run_vocab_table(cases, repeats=args.repeat, memory=not args.no_memory)
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
