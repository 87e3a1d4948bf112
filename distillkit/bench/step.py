"""``distillkit bench --step CONFIG.yaml``: where the time of one training step of a real config goes.

The models, data and objective are built as ``distillkit distill`` builds them (a teacher that would be
fine-tuned is timed as loaded: fine-tuning changes its weights, not its cost). Each timed step runs the phases
of the training loop one after another and times each:

- ``teacher forward``: the frozen teacher's taps (no_grad);
- ``student forward``: the student's taps;
- ``objective``: every term's forward, run under the profiler (its small overhead counts here, so the share
  is an upper bound); the fused InfoNCE op's own forward time is reported apart as ``infonce op`` and is not
  part of ``objective``;
- ``backward``: the student's and the objective's backward pass;
- ``optimizer``: AdamW step and zero_grad;
- ``bookkeeping``: the terms' ``after_step`` (memory banks) and reading the loss values to the host.

Medians over ``repeats`` steps after ``warmup`` untimed ones.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader

from distillkit.bench.harness import cpu_profile, markdown_table, peak_rss_growth
from distillkit.config import DistillConfig
from distillkit.models import quiet_loading
from distillkit.objective.output_layer import choose_output_layer
from distillkit.objective.taps import collect_taps
from distillkit.run.loop import autocast_factory

PHASES = (
    "teacher forward",
    "student forward",
    "objective",
    "infonce op",
    "backward",
    "optimizer",
    "bookkeeping",
)


def _op_seconds(profile: torch.profiler.profile, needle: str) -> float:
    """Self CPU seconds of the profiled events whose name contains ``needle``."""
    return sum(e.self_cpu_time_total for e in profile.key_averages() if needle in e.key) / 1e6


def time_training_step(config: DistillConfig, repeats: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Times each phase of a training step of ``config`` (see the module docstring).

    The logit-reading terms read the models' output layers where ``train.fused_logits`` lets them, as in
    ``distillkit distill``. After the timed steps one more step measures the peak resident memory a step adds
    (:func:`~distillkit.bench.harness.peak_rss_growth`).

    Args:
        config: A distill config.
        repeats: Timed steps (the median of each phase is reported).
        warmup: Untimed steps first.

    Returns:
        ``{"phases": {name: median seconds}, "step": median seconds of the whole step, "batch": size,
        "repeats": n, "peak_step_bytes": bytes, "first_losses": {term: value of the first step},
        "fused_logits": whether the output layers replaced the logits}``.

    """
    from distillkit.models import load_model, load_tokenizer
    from distillkit.run.train import build_objective, build_student
    from distillkit.tasks import make_task

    torch.manual_seed(config.train.seed)
    task = make_task(config)
    tokenizer = load_tokenizer(config.teacher)
    data = task.load_data(tokenizer)
    collator = task.collator(tokenizer)
    objective = build_objective(config, task, data)
    with quiet_loading():
        spec = config.teacher.model_copy(update={"finetune": None})
        teacher = load_model(spec, data.num_labels, "teacher", config.task)
        student = build_student(config, teacher, data.num_labels)
    teacher.eval().requires_grad_(False)
    student.train()
    objective.prepare_models(student, teacher, announce=False)
    sample = collator([data.train[i] for i in range(min(2, len(data.train)))])
    fused = choose_output_layer(
        config.train.fused_logits, objective, student, {"teacher": teacher}, sample, announce=False
    )
    student_request, teacher_request = objective.tap_requests()
    params = [p for p in [*student.parameters(), *objective.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr)
    autocast = autocast_factory(config.train.precision, torch.device("cpu"))
    loader = DataLoader(data.train, batch_size=config.train.batch_size, shuffle=True, collate_fn=collator)
    batches = iter(loader)
    samples: dict[str, list[float]] = {name: [] for name in PHASES}
    totals: list[float] = []

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        samples[name].append(time.perf_counter() - started)

    def step() -> dict[str, float]:
        batch = next(batches)
        started = time.perf_counter()
        with autocast():
            with phase("teacher forward"), torch.no_grad():
                teacher_taps = collect_taps(teacher, batch, teacher_request)
            with phase("student forward"):
                student_taps = collect_taps(student, batch, student_request)
            with cpu_profile() as profile:
                with phase("objective"):
                    out = objective(student_taps, teacher_taps, batch)
        with phase("backward"):
            out.total.backward()
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with phase("bookkeeping"):
            objective.after_step()
            values = {label: float(value.detach()) for label, value in out.terms.items()}
        totals.append(time.perf_counter() - started)
        op = _op_seconds(profile, "membank_infonce")
        samples["objective"][-1] -= op
        samples["infonce op"].append(op)
        return values

    first_losses = step()  # before any update: the losses both logit paths must agree on
    for _ in range(warmup + repeats - 1):
        step()
    for values in (*samples.values(), totals):
        del values[:warmup]
    phases = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "phases": phases,
        "step": statistics.median(totals),
        "batch": config.train.batch_size,
        "repeats": repeats,
        "peak_step_bytes": peak_rss_growth(step),
        "first_losses": first_losses,
        "fused_logits": fused,
    }


def format_step_table(result: dict[str, Any], config_name: str) -> str:
    """A markdown table of the phases: median milliseconds and share of the step."""
    step = result["step"]
    cells = [
        (name, f"{seconds * 1e3:.1f}", f"{seconds / step:.1%}") for name, seconds in result["phases"].items()
    ]
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
