"""The sparse (top-k) teacher against the full vocabulary, on a real teacher and student.

For a config's teacher and student (``configs/lm.yaml``: SmolLM2-135M-Instruct and its 10-layer student) and
one training batch, the kd loss and its gradients are computed three ways from the models' output layers:

- ``full``: :func:`distillkit.ops.fused_linear_divergence` against the teacher's whole distribution (the
  reference);
- ``top-k, spread`` and ``top-k, bucket``: :func:`distillkit.ops.fused_linear_divergence_topk` against the
  teacher's top-k log-probabilities and log tail mass, exactly as a top-k teacher cache stores them (what
  ``kd`` runs when it reads such a cache), for each ``k``: the tail spread evenly over the other tokens (the
  cache's dense logits; ``kd``'s default) or compared as one bucket (as verl and Arcee's DistillKit do).

Reported per divergence and ``k``: the loss, its relative error against ``full``, the relative error
``‖g − g_full‖ / ‖g_full‖`` of the gradient with respect to the student's output weight and to its hidden
states, and the time of the op call (forward + its in-pass gradients, median of ``--repeat`` interleaved
calls) with the speed-up of the top-k op over the full one (which computes the teacher's logits).
Divergences: ``forward_kl``, ``reverse_kl`` and ``jsd`` (the bucket form's; the spread form has them all).

    python benchmarks/topk_error.py configs/lm.yaml --k 16,64,256 --repeat 3
    python benchmarks/topk_error.py configs/lm.yaml --set train.batch_size=2 --set data.max_length=16  # small
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distillkit.bench.harness import markdown_table
from distillkit.config import load_config
from distillkit.ops import fused_linear_divergence, fused_linear_divergence_topk
from distillkit.teacher_cache import LOG_TAIL_FLOOR

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def output_layers(config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's and teacher's output layers on the config's first training batch, and the counted rows.

    Returns:
        ``(h_s [N, Ds], W_s [V, Ds], h_t [N, Dt], W_t [V, Dt], mask [N])``, float32, detached.
    """
    from distillkit.objective.output_layer import run_to_output_layer
    from distillkit.run.loaders import train_loader
    from distillkit.run.run import Run
    from distillkit.run.step import micro_batches

    run = Run.from_config(config, finetune_teacher=False, announce=False)
    sampler, loader = train_loader(run)
    batch = next(micro_batches(loader, sampler, 0, torch.device("cpu")))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        _, h_s, w_s = run_to_output_layer(run.student, inputs)
        _, h_t, w_t = run_to_output_layer(run.teacher, inputs)
    mask = (batch["labels"] != -100).reshape(-1)
    rows = mask.numel()
    flat = (h_s.reshape(rows, -1), w_s, h_t.reshape(rows, -1), w_t)
    return (*(t.detach().float() for t in flat), mask)


def teacher_topk(
    h_t: torch.Tensor, w_t: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k at temperature 1 as the cache writer stores it: ``(logp, index, log_tail)``."""
    logp = torch.log_softmax(h_t @ w_t.T, dim=-1)
    values, index = logp.topk(k, dim=-1)
    log_tail = torch.log(-torch.expm1(values.logsumexp(-1).clamp_max(0.0))).clamp_min(LOG_TAIL_FLOOR)
    return values, index, log_tail


def loss_and_grads(
    fn, h_s: torch.Tensor, w_s: torch.Tensor
) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    """``(loss, grad W_s, grad h_s, seconds)`` of ``fn(h, w)``."""
    h, w = h_s.detach().clone().requires_grad_(), w_s.detach().clone().requires_grad_()
    started = time.perf_counter()
    loss = fn(h, w)
    seconds = time.perf_counter() - started
    loss.backward()
    return float(loss.detach()), w.grad, h.grad, seconds


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def measure(layers, ks: list[int], kind: str, temperature: float, repeats: int) -> list[tuple]:
    """The rows of one divergence (see the module)."""
    h_s, w_s, h_t, w_t, mask = layers

    def full(h, w):
        return fused_linear_divergence(h, w, h_t, w_t, divergence=kind, temperature=temperature, mask=mask)

    variants = {"full": full}
    for k in ks:
        values, index, log_tail = teacher_topk(h_t, w_t, k)
        for tail in ("spread", "bucket"):

            def sparse(h, w, values=values, index=index, log_tail=log_tail, tail=tail):
                return fused_linear_divergence_topk(
                    h,
                    w,
                    index,
                    values,
                    log_tail,
                    divergence=kind,
                    temperature=temperature,
                    mask=mask,
                    tail=tail,
                )

            variants[f"top-{k}, {tail}"] = sparse
    results = {name: loss_and_grads(fn, h_s, w_s) for name, fn in variants.items()}
    timed = list(variants)
    seconds = {name: [] for name in timed}
    for _ in range(repeats):
        for name in timed:
            seconds[name].append(loss_and_grads(variants[name], h_s, w_s)[3])
    full_loss, full_gw, full_gh, _ = results["full"]
    full_time = statistics.median(seconds["full"])
    rows = []
    for name, (loss, gw, gh, _) in results.items():
        time_cell = speed = "-"
        if name in seconds:
            median = statistics.median(seconds[name])
            time_cell, speed = f"{median * 1e3:.0f}", f"{full_time / median:.2f}x"
        error = abs(loss - full_loss) / abs(full_loss)
        rows.append(
            (kind, name, f"{loss:.5f}", f"{error:.2%}", f"{relative(gw, full_gw):.2%}",
             f"{relative(gh, full_gh):.2%}", time_cell, speed)
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    """Prints the table (see the module)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a causal-LM distill config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--k", default="16,64,256", help="comma-separated k values")
    parser.add_argument("--temperature", type=float, default=1.0, help="the kd temperature")
    parser.add_argument("--divergences", default=",".join(DIVERGENCES), help="comma-separated divergences")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per variant (median)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    layers = output_layers(config)
    ks = [int(k) for k in args.k.split(",")]
    rows = []
    for kind in args.divergences.split(","):
        rows += measure(layers, ks, kind, args.temperature, args.repeat)
    tokens, vocab = int(layers[4].sum()), layers[1].shape[0]
    print(
        f"kd from the output layers, {tokens} counted tokens of {layers[0].shape[0]}, V = {vocab}, "
        f"T = {args.temperature}, {torch.get_num_threads()} threads; errors against the full vocabulary\n"
    )
    header = (
        "divergence",
        "teacher",
        "loss",
        "loss error",
        "grad W_s error",
        "grad h_s error",
        "op ms",
        "speed-up",
    )
    print(markdown_table(header, rows, right=range(2, len(header))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
