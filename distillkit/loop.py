"""The training loop: :func:`fit` trains a student (and the objective's heads) against a frozen teacher.

One optimizer step: for each of ``grad_accum`` micro-batches the frozen teacher runs under ``no_grad`` (eval
mode), the student runs with hidden states, the objective returns the weighted total and each term; the total
is back-propagated. Then gradients are clipped, a non-finite term or gradient stops the run or skips the step,
AdamW and the warm-up/linear-decay schedule step, and the objective's memory banks are updated.

Device placement, DDP wrapping and cross-process gathering are done by ``accelerate``; launched with
``torchrun``/``accelerate launch`` each process reads its own shard of every epoch (``DistributedSampler``)
and only the main process logs and writes checkpoints. The data order depends only on the seed and the step,
and every random generator is checkpointed, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from distillkit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distillkit.config import TrainConfig
from distillkit.data import Collator, TaskData
from distillkit.errors import ConfigError, DistillkitError
from distillkit.evaluate import evaluate
from distillkit.losses import Taps
from distillkit.models import freeze
from distillkit.objective import DistillationObjective
from distillkit.runlog import RunLog

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class NonFiniteLossError(DistillkitError, FloatingPointError):
    """A loss term or the gradient norm became NaN/inf and ``train.on_nonfinite`` is ``stop``."""


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        step: Optimizer steps done.
        skipped: Steps skipped for a non-finite loss.
        final_terms: Mean of each term (and ``total``) over the last logging window.
        eval: The last evaluation metrics.
        history: The first and last logged training records.
        seconds: Wall-clock seconds of the loop.

    """

    step: int
    skipped: int = 0
    final_terms: dict[str, float] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class StudentObjective(nn.Module):
    """The trainable part of a run: the student plus the objective's heads (one module, so DDP wraps both).

    Args:
        student: A Hugging Face model returning ``logits`` and ``hidden_states``.
        objective: The distillation objective.

    """

    def __init__(self, student: nn.Module, objective: DistillationObjective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(
        self, batch: dict[str, torch.Tensor], teacher: Taps | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Taps]:
        """Runs the student and the objective.

        Args:
            batch: ``input_ids``/``attention_mask`` ``[B, T]``, ``labels`` ``[B]``, ``example_ids`` ``[B]``.
            teacher: The teacher's taps; None when only label terms are used (fine-tuning a teacher), then
                the student's own detached taps stand in.

        Returns:
            The weighted total (scalar), each term's value, and the student's taps.

        """
        inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
        student = Taps.from_output(self.student(**inputs, output_hidden_states=True), batch)
        result = self.objective(student, teacher if teacher is not None else student, batch)
        return result.total, result.terms, student


def make_accelerator() -> Accelerator:
    """The accelerate engine: device placement, DDP, gathering (mixed precision is set per run)."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, torchrun then means gloo processes (MULTI_CPU)
        rng_types=[],
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def autocast_factory(precision: str, device: torch.device):
    """Returns a no-argument context-manager factory for the run's precision.

    ``auto`` is bf16 on CUDA devices that support it and fp32 elsewhere (CPU bf16 is slow without AMX).
    """
    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use_bf16 = precision == "bf16"
    if not use_bf16:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _describe_nonfinite(
    label: str, value: torch.Tensor, step: int, student: Taps, teacher: Taps | None
) -> str:
    def stat(name: str, tensor: torch.Tensor | None) -> str:
        if tensor is None:
            return f"{name}: none"
        tensor = tensor.detach().float()
        bad = int((~torch.isfinite(tensor)).sum())
        finite = tensor[torch.isfinite(tensor)]
        peak = float(finite.abs().max()) if finite.numel() else float("nan")
        return f"{name}: {bad}/{tensor.numel()} non-finite, max |x| {peak:.3g}"

    parts = [stat("student logits", student.logits), stat("student last hidden", student.hidden_states[-1])]
    if teacher is not None:
        parts.append(stat("teacher logits", teacher.logits))
    return f"loss term '{label}' is {float(value.detach())} at step {step} ({'; '.join(parts)})"


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _micro_batches(
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


def _mean_across_processes(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Averages per-process loss values over processes, so logs show the global batch's losses."""
    if accelerator.num_processes == 1 or not values:
        return values
    names = sorted(values)
    packed = torch.tensor([values[name] for name in names], dtype=torch.float64, device=accelerator.device)
    return dict(zip(names, accelerator.reduce(packed, "mean").tolist(), strict=True))


def _buffer_checksums(accelerator: Accelerator, objective: nn.Module, step: int) -> list[str]:
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


def fit(
    *,
    accelerator: Accelerator,
    student: nn.Module,
    teacher: nn.Module | None,
    objective: DistillationObjective,
    data: TaskData,
    collator: Collator,
    train: TrainConfig,
    output_dir: Path,
    resume: bool = False,
    fingerprint: str = "",
    stop_after_step: int | None = None,
    description: str = "distill",
) -> FitResult:
    """Trains ``student`` (and the objective's heads) against a frozen ``teacher``.

    Args:
        accelerator: The engine.
        student: The model to train.
        teacher: The frozen teacher, or None when the objective only uses labels.
        objective: The loss terms.
        data: Tokenised train/eval splits.
        collator: Pads batches.
        train: Optimisation settings.
        output_dir: Run directory (``metrics.jsonl``, ``checkpoints/``).
        resume: Continue from the newest checkpoint in ``output_dir/checkpoints``.
        fingerprint: Identifies the model/objective/data setup; a checkpoint of another setup is refused.
        stop_after_step: Return after this step as if interrupted (for time-sliced jobs and tests).
        description: Label of the progress bar.

    Returns:
        The result; the student holds the trained weights.

    Raises:
        NonFiniteLossError: On a non-finite term with ``on_nonfinite: stop``.
        ConfigError: If the data is smaller than one batch or a checkpoint does not match.

    """
    started = time.perf_counter()
    main = accelerator.is_main_process
    device = accelerator.device
    autocast = autocast_factory(train.precision, device)
    if teacher is not None:
        teacher = freeze(teacher).to(device)
        assert not any(p.requires_grad for p in teacher.parameters()), "the teacher must be frozen"
    sampler = DistributedSampler(
        data.train,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        shuffle=True,
        seed=train.seed,
        drop_last=True,
    )
    loader = DataLoader(
        data.train,
        batch_size=train.batch_size,
        sampler=sampler,
        collate_fn=collator,
        drop_last=True,
        generator=torch.Generator().manual_seed(train.seed),
    )
    if len(loader) == 0:
        raise ConfigError(
            f"the training data has {len(data.train)} examples, fewer than one batch of train.batch_size="
            f"{train.batch_size} x {accelerator.num_processes} process(es); lower train.batch_size"
        )
    eval_loader = accelerator.prepare_data_loader(
        DataLoader(data.eval, batch_size=train.eval_batch_size or train.batch_size, collate_fn=collator)
    )

    trainable = StudentObjective(student, objective)
    if teacher is not None:
        teacher_ids = {id(p) for p in teacher.parameters()}
        assert not teacher_ids & {id(p) for p in trainable.parameters()}, "the teacher shares student weights"
    optimizer = torch.optim.AdamW(_param_groups(trainable, train.weight_decay), lr=train.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(train.warmup_ratio * train.steps), train.steps)
    model, optimizer = accelerator.prepare(trainable, optimizer)
    params = [p for p in trainable.parameters() if p.requires_grad]

    checkpoints = output_dir / "checkpoints"
    step, skipped = 0, 0
    last = latest_checkpoint(checkpoints) if resume else None
    if resume and last is None and main:
        print(f"distillkit: no checkpoint in {checkpoints}; starting from step 0")
    if last is not None:
        state = load_checkpoint(
            last, student=student, objective=objective, optimizer=optimizer, scheduler=scheduler
        )
        if fingerprint and state["extra"].get("fingerprint") not in (None, fingerprint):
            raise ConfigError(
                f"the checkpoint {last} was written by a run with other model/objective/data settings; "
                "use another output_dir or drop --resume"
            )
        step, skipped = state["step"], state["extra"].get("skipped", 0)
        if main:
            print(f"distillkit: resumed from {last} at step {step}")
    log = RunLog(output_dir, enabled=main, tensorboard=train.tensorboard, resume_step=step if last else None)

    batches = _micro_batches(loader, sampler, step * train.grad_accum, device)
    window: dict[str, float] = {}
    window_steps = 0
    result = FitResult(step=step, skipped=skipped)
    bar = tqdm(total=train.steps, initial=step, desc=description, disable=not (main and train.progress))
    model.train()
    while step < train.steps:
        problem = None
        sums: dict[str, float] = {}
        for micro in range(train.grad_accum):
            batch = next(batches)
            teacher_taps = None
            if teacher is not None and objective.uses_teacher:
                inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
                with torch.no_grad(), autocast():
                    teacher_taps = Taps.from_output(teacher(**inputs, output_hidden_states=True), batch)
            sync = accelerator.no_sync(model) if micro < train.grad_accum - 1 else nullcontext()
            with sync:
                with autocast():
                    total, terms, student_taps = model(batch, teacher_taps)
                for label, value in [*terms.items(), ("total", total)]:
                    if problem is None and not torch.isfinite(value.detach()).all():
                        problem = _describe_nonfinite(label, value, step + 1, student_taps, teacher_taps)
                    sums[label] = sums.get(label, 0.0) + float(value.detach()) / train.grad_accum
                accelerator.backward(total / train.grad_accum)
        sums = _mean_across_processes(accelerator, sums)
        grad_norm = accelerator.clip_grad_norm_(params, train.max_grad_norm or float("inf"))
        if problem is None and not torch.isfinite(torch.as_tensor(grad_norm)).all():
            problem = f"gradient norm is {float(grad_norm)} at step {step + 1} (all loss terms finite)"
        flagged = torch.tensor(float(problem is not None), device=device)
        if accelerator.num_processes > 1:
            flagged = accelerator.reduce(flagged, "sum")
        step += 1
        if float(flagged) > 0:
            problem = problem or f"a non-finite loss on another process at step {step}"
            log.log("train", step, {"nonfinite": problem, "action": train.on_nonfinite})
            if train.on_nonfinite == "stop":
                log.close()
                bar.close()
                raise NonFiniteLossError(
                    f"{problem}; stopping (no checkpoint written for this step). Lower train.lr, enable "
                    "train.max_grad_norm, check the data, or set train.on_nonfinite: skip"
                )
            if main:
                tqdm.write(f"distillkit: {problem}; skipping the step")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            skipped += 1
        else:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            objective.after_step()
            for label, value in sums.items():
                window[label] = window.get(label, 0.0) + value
            window_steps += 1
        bar.update(1)
        if window_steps:
            bar.set_postfix({k: f"{v / window_steps:.3f}" for k, v in window.items()}, refresh=False)
        if window_steps and (step % train.log_every == 0 or step == train.steps):
            result.final_terms = {k: v / window_steps for k, v in window.items()}
            record = {**result.final_terms, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            log.log("train", step, record)
            result.history.append({"step": step, **record})
            window, window_steps = {}, 0
        if step == train.steps or (train.eval_every and step % train.eval_every == 0):
            result.eval = evaluate(student, eval_loader, data.num_labels, accelerator, autocast)
            log.log("eval", step, result.eval)
            if main:
                tqdm.write(
                    f"[{description}] step {step}: eval accuracy {result.eval['accuracy']:.4f} "
                    f"f1 {result.eval['f1']:.4f} loss {result.eval['loss']:.4f}"
                )
        stopping = stop_after_step is not None and step >= stop_after_step
        if step == train.steps or stopping or (train.save_every and step % train.save_every == 0):
            checksums = _buffer_checksums(accelerator, objective, step)
            if main:
                save_checkpoint(
                    checkpoints,
                    step,
                    student=student,
                    objective=objective,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    extra={"fingerprint": fingerprint, "skipped": skipped, "buffer_checksums": checksums},
                    keep_last=train.keep_last,
                )
            accelerator.wait_for_everyone()
        if stopping:
            break
    bar.close()
    if not result.eval and step >= train.steps:  # resumed from the final checkpoint: nothing left to train
        result.eval = evaluate(student, eval_loader, data.num_labels, accelerator, autocast)
    log.close()
    result.step, result.skipped = step, skipped
    result.history = result.history[:1] + result.history[-1:] if len(result.history) > 1 else result.history
    result.seconds = time.perf_counter() - started
    return result
