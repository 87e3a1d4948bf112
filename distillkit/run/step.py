"""The pieces of one optimizer step: the trainable module, its micro-batches and what a step yields."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from distillkit.errors import DistillkitError
from distillkit.objective.objective import DistillationObjective, ObjectiveOutput
from distillkit.objective.taps import Taps, collect_taps
from distillkit.run.phases import PhaseTimer


class NonFiniteLossError(DistillkitError, FloatingPointError):
    """A loss term or the gradient norm became NaN/inf and ``train.on_nonfinite`` is ``stop``."""


@dataclass
class StepValues:
    """One optimizer step's outcome before it is applied.

    Attributes:
        losses: ``total`` and each term, averaged over micro-batches (and processes).
        grad_norm: The gradient norm before clipping.
        problem: Why the step must not be applied (a non-finite value), or None.

    """

    losses: dict[str, float]
    grad_norm: float
    problem: str | None


class Unwalked:
    """Hands a value to a module's forward untouched.

    Hooks that look for tensors in a forward's arguments (FSDP's) do not walk into it, nor into what it holds
    (a teacher cache's lazily read layers).

    Attributes:
        value: What is handed over.

    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class StudentWithHeads(nn.Module):
    """The trainable part of a run: the student plus the objective's heads (one module, so DDP wraps both).

    Args:
        student: The student model.
        objective: The distillation objective; its terms' requests decide what the student is asked for.
        timer: Times the ``student forward`` and ``objective`` phases.

    """

    def __init__(self, student: nn.Module, objective: DistillationObjective, timer: PhaseTimer) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.timer = timer
        self.request = objective.tap_requests()[0]

    def forward(
        self, batch: dict[str, torch.Tensor], teacher: Taps | dict[str, Taps] | Unwalked | None
    ) -> tuple[ObjectiveOutput, Taps]:
        """Runs the student once and evaluates the objective.

        Args:
            batch: The batch (model inputs ``[B, T]``, labels, ``example_ids``...).
            teacher: The teachers' taps by name (or one teacher's), or None when no term reads a teacher;
                possibly in an :class:`Unwalked`.

        Returns:
            The objective's output and the student's taps.

        """
        teacher = teacher.value if isinstance(teacher, Unwalked) else teacher
        with self.timer.phase("student forward"):
            student = collect_taps(self.student, batch, self.request)
        with self.timer.phase("objective"):
            return self.objective(student, teacher, batch), student


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases and norms."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def micro_batches(
    loader: DataLoader, sampler: DistributedSampler, start: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields micro-batches forever, starting at global micro-batch ``start`` (epoch-seeded order)."""
    per_epoch = len(loader)
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        for batch in itertools.islice(iter(loader), skip, None):
            yield {k: v.to(device) for k, v in batch.items()}
        epoch, skip = epoch + 1, 0


def mean_across_processes(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Averages per-process loss values over processes, so logs show the global batch's losses."""
    if accelerator.num_processes == 1 or not values:
        return values
    names = sorted(values)
    packed = torch.tensor([values[name] for name in names], dtype=torch.float64, device=accelerator.device)
    return dict(zip(names, accelerator.reduce(packed, "mean").tolist(), strict=True))


def buffer_checksums(accelerator: Accelerator, objective: nn.Module, step: int) -> list[str]:
    """Returns every process's SHA-256 of the objective's buffers (memory banks), in rank order.

    Raises:
        DistillkitError: If the processes' banks differ: a checkpoint of one rank would not describe the run.

    """
    digest = hashlib.sha256()
    for name, buffer in sorted(objective.named_buffers()):
        digest.update(name.encode())
        digest.update(buffer.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    checksums = [digest.hexdigest()[:16]]
    if accelerator.num_processes > 1:
        checksums = gather_object(checksums)
    if len(set(checksums)) > 1:
        raise DistillkitError(
            f"the objective's memory banks differ across processes at step {step} ({checksums}); every rank "
            "must call objective.after_step() after each optimizer step"
        )
    return checksums


def describe_nonfinite(
    label: str, value: float, step: int, student: Taps, teacher: Taps | dict[str, Taps] | None
) -> str:
    """Says which term went non-finite at which step, with the state of the tensors that fed it."""

    def stat(name: str, tensor: torch.Tensor | None) -> str:
        if tensor is None:
            return f"{name}: none"
        tensor = tensor.detach().float()
        bad = int((~torch.isfinite(tensor)).sum())
        finite = tensor[torch.isfinite(tensor)]
        peak = float(finite.abs().max()) if finite.numel() else float("nan")
        return f"{name}: {bad}/{tensor.numel()} non-finite, max |x| {peak:.3g}"

    parts = [stat("student logits", student.logits)]
    if student.hidden_states:
        parts.append(stat("student last hidden", student.hidden_states[-1]))
    teachers = teacher if isinstance(teacher, dict) else {"teacher": teacher}
    for name, taps in teachers.items():
        if taps is not None:
            parts.append(stat(f"{name} logits" if name != "teacher" else "teacher logits", taps.logits))
    return f"loss term '{label}' is {value} at step {step} ({'; '.join(parts)}, last micro-batch)"
