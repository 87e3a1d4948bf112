"""``distillkit bench --step CONFIG.yaml``: where the time of one training step of a real config goes.

The run is built as ``distillkit distill`` builds it (:class:`~distillkit.run.run.Run`; a teacher that would
be fine-tuned is timed as loaded: fine-tuning changes its weights, not its cost), and the steps timed are the
training loop's own (:meth:`~distillkit.run.loop.TrainingLoop.step`, with caches, several teachers, gradient
accumulation, the output-layer path and sampled sequences exactly as configured). The loop's phase timer
splits each step:

- ``sampling``: with ``train.generation``, the student or the teacher sampling continuations of the batch's
  prompts (``generate`` with the KV cache) on the micro-batches the draw picks; the sampled tokens per
  second of sampling are reported beside the table;
- ``teacher``: the frozen teachers' taps (no_grad), or reading them from a cache;
- ``student forward``: the student's taps;
- ``objective``: every term's forward, run under the profiler (its small overhead counts here, so the share is
  an upper bound); the fused InfoNCE op's own forward time is reported apart as ``infonce op`` and is not part
  of ``objective``;
- ``backward``: the student's and the objective's backward pass;
- ``optimizer``: gradient clipping, AdamW step, schedule and zero_grad;
- ``bookkeeping``: reading the loss values to the host and the terms' ``after_step`` (memory banks).

Medians over ``repeats`` steps after ``warmup`` untimed ones; nothing is evaluated, logged or saved.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from distillkit.bench.harness import cpu_profile, markdown_table, peak_rss_growth
from distillkit.config import DistillConfig
from distillkit.run.phases import PHASES as LOOP_PHASES
from distillkit.run.phases import PhaseTimer

_AFTER_OBJECTIVE = LOOP_PHASES.index("objective") + 1
PHASES = (*LOOP_PHASES[:_AFTER_OBJECTIVE], "infonce op", *LOOP_PHASES[_AFTER_OBJECTIVE:])
"""The reported phases: the loop's, with the fused InfoNCE op's forward apart from ``objective``."""


def _op_seconds(profile: torch.profiler.profile, needle: str) -> float:
    """Self CPU seconds of the profiled events whose name contains ``needle``."""
    return sum(e.self_cpu_time_total for e in profile.key_averages() if needle in e.key) / 1e6


def time_training_step(config: DistillConfig, repeats: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Times each phase of the real training steps of ``config`` (see the module docstring).

    After the timed steps one more step measures the peak resident memory a step adds
    (:func:`~distillkit.bench.harness.peak_rss_growth`).

    Args:
        config: A distill config.
        repeats: Timed steps (the median of each phase is reported).
        warmup: Untimed steps first.

    Returns:
        ``{"phases": {name: median seconds}, "step": median seconds of the whole step, "batch": size,
        "repeats": n, "peak_step_bytes": bytes, "first_losses": {term: value of the first step},
        "fused_logits": whether the output layers replaced the logits, "sampling": {"generated_tokens",
        "seconds", "sampled_batches", "micro_batches"} over the timed steps, or None without generation}``.

    """
    from distillkit.run.loop import TrainingLoop
    from distillkit.run.run import Run

    with tempfile.TemporaryDirectory(prefix="distillkit-bench-") as scratch:
        train = config.train.model_copy(
            update={
                "steps": warmup + repeats + 2,
                "eval_every": None,
                "save_every": None,
                "progress": False,
                "report_to": [],
                "log_every": 10**9,
            }
        )
        config = config.model_copy(update={"train": train, "output_dir": str(Path(scratch) / "run")})
        run = Run.from_config(config, finetune_teacher=False, announce=False)
        timer = PhaseTimer(synchronize=True)
        profiles: list[torch.profiler.profile] = []

        @contextmanager
        def profiled() -> Iterator[None]:
            with cpu_profile() as profile:
                yield
            profiles.append(profile)

        timer.wrappers["objective"] = profiled
        loop = TrainingLoop(run, timer=timer)
        loop.start()
        samples: dict[str, list[float]] = {name: [] for name in PHASES}
        totals: list[float] = []
        first_losses: dict[str, float] = {}
        sampled = {"generated_tokens": 0, "seconds": 0.0, "sampled_batches": 0, "micro_batches": 0}
        for index in range(warmup + repeats):
            timer.take()
            started = time.perf_counter()
            values = loop.step()
            total = time.perf_counter() - started
            phases = timer.take()
            if index == 0:
                first_losses = {k: v for k, v in values.losses.items() if k != "total"}
            counts = loop.sequences.take_counts() if loop.sequences is not None else None
            if index < warmup:
                continue
            if counts is not None:
                sampled["generated_tokens"] += counts["generated_tokens"]
                sampled["seconds"] += phases.get("sampling", 0.0)
                sampled["sampled_batches"] += counts["sources"]["student"] + counts["sources"]["teacher"]
                sampled["micro_batches"] += sum(counts["sources"].values())
            op = _op_seconds(profiles[-1], "membank_infonce")
            for name in LOOP_PHASES:
                samples[name].append(phases.get(name, 0.0) - (op if name == "objective" else 0.0))
            samples["infonce op"].append(op)
            totals.append(total)
        peak = peak_rss_growth(loop.step)
        loop.finish()
    return {
        "phases": {name: statistics.median(values) for name, values in samples.items()},
        "step": statistics.median(totals),
        "batch": config.train.batch_size * config.train.grad_accum,
        "repeats": repeats,
        "peak_step_bytes": peak,
        "first_losses": first_losses,
        "fused_logits": run.objective.output_layer,
        "sampling": sampled if loop.sequences is not None else None,
    }


def format_step_table(result: dict[str, Any], config_name: str) -> str:
    """A markdown table of the phases: median milliseconds and share of the step."""
    step = result["step"]
    phases = {
        name: seconds
        for name, seconds in result["phases"].items()
        if name != "sampling" or result.get("sampling")  # a run that samples nothing has no such phase
    }
    cells = [(name, f"{seconds * 1e3:.1f}", f"{seconds / step:.1%}") for name, seconds in phases.items()]
    lines = [
        f"training step of {config_name} (batch {result['batch']}, median of {result['repeats']} steps, "
        f"{torch.get_num_threads()} threads): {step * 1e3:.1f} ms",
        "",
        markdown_table(("phase", "ms", "share of step"), cells, right=(1, 2)),
    ]
    overhead = result["phases"]["objective"] + result["phases"]["bookkeeping"]
    lines.append(f"\nobjective (without the InfoNCE op) + bookkeeping: {overhead / step:.1%} of the step")
    logits = "the output layers (fused op)" if result["fused_logits"] else "materialised logits"
    lines.append(
        f"peak memory one step adds: {result['peak_step_bytes'] / 2**20:.0f} MiB; logit-reading terms read "
        f"{logits}"
    )
    sampling = result.get("sampling")
    if sampling:
        rate = sampling["generated_tokens"] / sampling["seconds"] if sampling["seconds"] > 0 else 0.0
        lines.append(
            f"sampling: {sampling['sampled_batches']} of {sampling['micro_batches']} timed micro-batches "
            f"sampled, {sampling['generated_tokens']} tokens, {rate:.1f} sampled tokens/s "
            f"(mean sampling time per step {sampling['seconds'] / result['repeats'] * 1e3:.1f} ms)"
        )
    return "\n".join(lines)


_CHILD = (
    "import json, sys, torch\n"
    "from distillkit.config import DistillConfig\n"
    "from distillkit.bench.step import time_training_step\n"
    "torch.set_num_threads(int(sys.argv[1]))\n"
    "config = DistillConfig.model_validate_json(sys.stdin.read())\n"
    "print(json.dumps(time_training_step(config, int(sys.argv[2]), int(sys.argv[3]))))\n"
)


def compare_logit_paths(
    config: DistillConfig, repeats: int = 5, warmup: int = 2
) -> dict[str, dict[str, Any]]:
    """Times a step with materialised logits and with the output layers, each in a fresh process.

    Args:
        config: A distill config whose logit-reading terms can read the output layers (a causal LM with
            ``kd``/``ce``).
        repeats: Timed steps per path.
        warmup: Untimed steps first.

    Returns:
        ``{"never": result, "always": result}`` (``train.fused_logits`` of each; results as
        :func:`time_training_step` returns them). Both start from the same initialisation and batches.

    Raises:
        subprocess.CalledProcessError: If a path fails (e.g. the config cannot use the output layers).

    """
    results = {}
    for mode in ("never", "always"):
        train = config.train.model_copy(update={"fused_logits": mode})
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(torch.get_num_threads()), str(repeats), str(warmup)],
            input=config.model_copy(update={"train": train}).model_dump_json(),
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def format_logit_paths(results: dict[str, dict[str, Any]], config_name: str) -> str:
    """A markdown table of :func:`compare_logit_paths`: step time, peak step memory, first-step losses."""
    never, fused = results["never"], results["always"]
    rows = []
    for name, result in (("materialised logits", never), ("output layers, fused op", fused)):
        losses = ", ".join(f"{k} {v:.6f}" for k, v in result["first_losses"].items())
        rows.append((name, f"{result['step'] * 1e3:.0f}", f"{result['peak_step_bytes'] / 2**20:.0f}", losses))
    saved = 1 - fused["peak_step_bytes"] / max(never["peak_step_bytes"], 1)
    return "\n".join(
        [
            f"training step of {config_name} (batch {never['batch']}, median of {never['repeats']} steps, "
            f"{torch.get_num_threads()} threads, each path in a fresh process)",
            "",
            markdown_table(("logits", "step ms", "peak step MiB", "first-step losses"), rows, right=(1, 2)),
            "",
            f"the output layers: {saved:.0%} less peak memory per step, "
            f"{never['step'] / fused['step']:.2f}x the speed of materialised logits",
        ]
    )
