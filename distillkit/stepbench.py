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

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader

from distillkit.benchmarking import markdown_table
from distillkit.config import DistillConfig
from distillkit.loop import autocast_factory
from distillkit.models import quiet_loading
from distillkit.taps import collect_taps

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

    Args:
        config: A distill config.
        repeats: Timed steps (the median of each phase is reported).
        warmup: Untimed steps first.

    Returns:
        ``{"phases": {name: median seconds}, "step": median seconds of the whole step, "batch": size}``.

    """
    from distillkit.models import load_model, load_tokenizer
    from distillkit.tasks import make_task
    from distillkit.train import build_objective, build_student

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
    student_request, teacher_request = objective.tap_requests()
    params = [p for p in [*student.parameters(), *objective.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr)
    autocast = autocast_factory(config.train.precision, torch.device("cpu"))
    loader = DataLoader(data.train, batch_size=config.train.batch_size, shuffle=True, collate_fn=collator)
    batches = iter(loader)
    samples: dict[str, list[float]] = {name: [] for name in PHASES}
    totals = []

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        samples[name].append(time.perf_counter() - started)

    for step in range(warmup + repeats):
        batch = next(batches)
        started = time.perf_counter()
        with autocast():
            with phase("teacher forward"), torch.no_grad():
                teacher_taps = collect_taps(teacher, batch, teacher_request)
            with phase("student forward"):
                student_taps = collect_taps(student, batch, student_request)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                with phase("objective"):
                    out = objective(student_taps, teacher_taps, batch)
        with phase("backward"):
            out.total.backward()
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with phase("bookkeeping"):
            objective.after_step()
            _ = [float(value.detach()) for value in out.terms.values()]
        totals.append(time.perf_counter() - started)
        op = _op_seconds(profile, "membank_infonce")
        samples["objective"][-1] -= op
        samples["infonce op"].append(op)
        if step < warmup:
            for values in samples.values():
                values.pop()
            totals.pop()
    return {
        "phases": {name: statistics.median(values) for name, values in samples.items()},
        "step": statistics.median(totals),
        "batch": config.train.batch_size,
        "repeats": repeats,
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
    return "\n".join(lines)
