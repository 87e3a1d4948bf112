"""One training step of distillkit against TRL's ``GKDTrainer``: same weights, same batch, same loss.

distillkit's side is the real training loop's step as ``distillkit bench --step`` times it
(:func:`distillkit.bench.step.time_training_step`). TRL's side is ``GKDTrainer.training_step`` (student and
teacher forward, ``generalized_jsd_loss``, backward) plus the optimizer step its ``Trainer`` takes
(gradient clipping, AdamW, schedule, ``zero_grad``), off-policy (``lmbda = 0``: no generation), on the
student and teacher distillkit builds from the config and on the batches distillkit's loader draws (labels
given unshifted: TRL shifts them itself). Each side runs in a fresh process with the same number of threads
and reports its median step time, the peak resident memory one step adds, and its loss on the first batch
before any update; the two losses must agree. With ``--topk-cache DIR`` distillkit also runs with the
teacher read from a top-k cache (written first when missing; that is not timed), whose first-step loss is
compared with the dense one (``--topk-tail spread,bucket``: each form of kd's sparse teacher).

The kd term must be what TRL computes: ``jsd`` (``beta``), ``forward_kl`` (TRL's β = 0) or ``reverse_kl``
(β = 1), at temperature 1 (its trainer calls the loss without one), without ``ce_weight``.

    OMP_NUM_THREADS=1 python benchmarks/trl_step.py configs/lm.yaml \\
        --set 'objective=[{loss: kd, divergence: jsd, beta: 0.5, temperature: 1.0}]' \\
        --topk-cache runs/lm-topk64 --top-k 64 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distillkit.bench.harness import markdown_table, peak_rss_growth
from distillkit.config import DistillConfig, load_config

TRL_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}


def kd_beta(config: DistillConfig) -> float:
    """The β of TRL's generalised JSD that computes the config's single kd term; refuses anything else."""
    terms = [term for term in config.objective if term.loss == "kd"]
    if len(config.objective) != 1 or len(terms) != 1:
        raise SystemExit("trl_step: the objective must be a single kd term (what GKDTrainer computes)")
    params = terms[0].params()
    divergence = params.get("divergence", "forward_kl")
    if float(params.get("temperature", 2.0)) != 1.0 or float(params.get("ce_weight", 0.0)) != 0.0:
        raise SystemExit("trl_step: kd must have temperature: 1.0 and no ce_weight (as GKDTrainer runs it)")
    if divergence == "jsd":
        return float(params.get("beta", 0.5))
    if divergence not in TRL_BETA:
        raise SystemExit(f"trl_step: TRL computes jsd, forward_kl or reverse_kl, not {divergence}")
    return TRL_BETA[divergence]


def trl_side(config: DistillConfig, repeats: int, warmup: int) -> dict[str, Any]:
    """Times GKDTrainer's step on distillkit's student, teacher and batches (see the module)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillkit.run.loaders import train_loader
    from distillkit.run.run import Run
    from distillkit.run.step import micro_batches

    beta, train = kd_beta(config), config.train
    config = config.model_copy(update={"teacher": config.teacher.model_copy(update={"cache": None})})
    run = Run.from_config(config, finetune_teacher=False, announce=False)
    with tempfile.TemporaryDirectory(prefix="trl-step-") as scratch:
        args = GKDConfig(
            output_dir=scratch,
            per_device_train_batch_size=train.batch_size,
            learning_rate=train.lr,
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            lmbda=0.0,
            beta=beta,
            temperature=1.0,
            seq_kd=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            seed=train.seed,
        )
        trainer = GKDTrainer(
            model=run.student,
            teacher_model=run.teacher,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": [[0]]}),
            processing_class=run.tokenizer,
            data_collator=lambda rows: rows,
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=warmup + repeats + 2)
        trainer.current_gradient_accumulation_steps = 1  # what Trainer's own loop sets before each step
        sampler, loader = train_loader(run)
        batches = micro_batches(loader, sampler, 0, torch.device("cpu"))
        losses: list[float] = []

        def step() -> None:
            batch = next(batches)
            inputs = {
                "input_ids": batch["input_ids"],
                "attention_mask": batch["attention_mask"],
                "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100),
            }
            losses.append(float(trainer.training_step(trainer.model, inputs)))
            trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), train.max_grad_norm)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.model.zero_grad()

        times = []
        for index in range(warmup + repeats):
            started = time.perf_counter()
            step()
            if index >= warmup:
                times.append(time.perf_counter() - started)
        peak = peak_rss_growth(step)
    return {"step": statistics.median(times), "peak_step_bytes": peak, "first_loss": losses[0]}


def distillkit_side(config: DistillConfig, repeats: int, warmup: int) -> dict[str, Any]:
    """``distillkit bench --step``'s measurement of the config's training step."""
    from distillkit.bench.step import time_training_step

    result = time_training_step(config, repeats=repeats, warmup=warmup)
    return {
        "step": result["step"],
        "peak_step_bytes": result["peak_step_bytes"],
        "first_loss": result["first_losses"]["kd"],
        "fused_logits": result["fused_logits"],
    }


def in_fresh_process(side: str, config: DistillConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Runs one side in a fresh Python process with ``args.threads`` threads; returns its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    command = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--repeat",
        str(args.repeat),
        "--warmup",
        str(args.warmup),
    ]
    out = subprocess.run(
        command, input=config.model_dump_json(), capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"trl_step: the {side} side failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def with_topk_cache(config: DistillConfig, directory: str, top_k: int) -> DistillConfig:
    """The config reading its teacher from a top-k cache in ``directory``, written first when missing."""
    teacher = config.teacher.model_copy(update={"cache": directory, "cache_top_k": top_k})
    cached = config.model_copy(update={"teacher": teacher})
    if not (Path(directory) / "index.json").is_file():
        from distillkit.run.cache_teacher import cache_teacher

        print(f"trl_step: writing the top-k cache {directory} (not timed)", file=sys.stderr, flush=True)
        cache_teacher(cached, with_eval=False)
    return cached


def main(argv: list[str] | None = None) -> int:
    """Runs both sides (or, with ``--child``, one side on the config read from stdin)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="a distill config (causal LM, one kd term)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--topk-cache", help="also time distillkit reading its teacher from this top-k cache")
    parser.add_argument("--top-k", type=int, default=64, help="k of the top-k cache")
    parser.add_argument(
        "--topk-tail",
        default="spread",
        help="with --topk-cache: kd's topk_tail values to time (comma-separated)",
    )
    parser.add_argument("--child", choices=["trl", "distillkit"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        config = DistillConfig.model_validate_json(sys.stdin.read())
        side = trl_side if args.child == "trl" else distillkit_side
        print(json.dumps(side(config, args.repeat, args.warmup)))
        return 0
    if not args.config:
        parser.error("give a config")
    config = load_config(args.config, args.set)
    kd_beta(config)
    sides = {
        "TRL GKDTrainer, live teacher": in_fresh_process("trl", config, args),
        "distillkit, live teacher": in_fresh_process("distillkit", config, args),
    }
    if args.topk_cache:
        cached = with_topk_cache(config, args.topk_cache, args.top_k)
        for tail in args.topk_tail.split(","):
            term = cached.objective[0].model_copy(update={"topk_tail": tail})
            side = cached.model_copy(update={"objective": [term]})
            sides[f"distillkit, top-{args.top_k} cache, {tail} tail"] = in_fresh_process(
                "distillkit", side, args
            )
    print(report(sides, args))
    return 0


def report(sides: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """A markdown table of the sides: step time, speed-up over TRL, peak step memory, first-step loss."""
    trl = sides["TRL GKDTrainer, live teacher"]
    dense = sides["distillkit, live teacher"]
    rows = []
    for name, side in sides.items():
        rows.append(
            (
                name,
                f"{side['step'] * 1e3:.0f}",
                f"{trl['step'] / side['step']:.2f}x",
                f"{side['peak_step_bytes'] / 2**20:.0f}",
                f"{side['first_loss']:.6f}",
                f"{side['first_loss'] - dense['first_loss']:+.2e}",
            )
        )
    header = ("step", "ms", "speed-up over TRL", "peak step MiB", "first-step loss", "minus distillkit live")
    return "\n".join(
        [
            f"one training step, median of {args.repeat} after {args.warmup} warm-up steps, {args.threads} "
            "thread(s) per process, each side in a fresh process",
            "",
            markdown_table(header, rows, right=range(1, len(header))),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
