"""The training loop: :func:`fit` trains a student (and the objective's heads) against a frozen teacher.

One optimizer step, in the order the code runs it (``_Run``'s phases):

1. ``forward_backward``: for each of ``grad_accum`` micro-batches, each frozen teacher runs under ``no_grad``
   (eval mode) and returns only what some term reads of it (``collect_taps``; it does
   not run when no term reads it), or its taps are read from its cache (``teacher.cache``); the student
   runs once the same way; the objective returns the weighted total and each term (each term on its own
   teacher's taps); the total is back-propagated. Loss values stay on the device and are read once.
2. ``apply_or_skip``: a non-finite term or gradient stops the run or skips the step; otherwise gradients are
   clipped, AdamW and the warm-up/linear-decay schedule step, and the terms update their state
   (``after_step``: memory banks).
3. ``log_window``: progress bar and, every ``log_every`` steps, the JSONL log.
4. ``evaluate``: every ``eval_every`` steps and at the end, the task's evaluation.
5. ``save``: every ``save_every`` steps and at the end, an atomic checkpoint.

Device placement, DDP wrapping and cross-process gathering are done by ``accelerate``; launched with
``torchrun``/``accelerate launch`` each process reads its own shard of every epoch (``DistributedSampler``)
and only the main process logs and writes checkpoints. The data order depends only on the seed and the step,
and every random generator is checkpointed, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
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

from distillkit.config import TrainConfig
from distillkit.data import TaskData
from distillkit.errors import ConfigError, DistillkitError
from distillkit.models import freeze
from distillkit.objective.objective import DistillationObjective, ObjectiveOutput
from distillkit.objective.output_layer import choose_output_layer
from distillkit.objective.taps import Taps, collect_taps
from distillkit.run.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distillkit.run.runlog import RunLog
from distillkit.tasks.base import Batch, EvalContext
from distillkit.teacher_cache import TeacherCache


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
        logged: The first and the last training records written to the log.
        seconds: Wall-clock seconds of the loop.

    """

    step: int
    skipped: int = 0
    final_terms: dict[str, float] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)
    logged: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class StudentWithHeads(nn.Module):
    """The trainable part of a run: the student plus the objective's heads (one module, so DDP wraps both).

    Args:
        student: The student model.
        objective: The distillation objective; its terms' requests decide what the student is asked for.

    """

    def __init__(self, student: nn.Module, objective: DistillationObjective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.request = objective.tap_requests()[0]

    def forward(
        self, batch: dict[str, torch.Tensor], teacher: Taps | dict[str, Taps] | None
    ) -> tuple[ObjectiveOutput, Taps]:
        """Runs the student once and evaluates the objective.

        Args:
            batch: The batch (model inputs ``[B, T]``, labels, ``example_ids``...).
            teacher: The teachers' taps by name (or one teacher's), or None when no term reads a teacher.

        Returns:
            The objective's output and the student's taps.

        """
        student = collect_taps(self.student, batch, self.request)
        return self.objective(student, teacher, batch), student


def make_accelerator() -> Accelerator:
    """The accelerate engine: device placement, DDP, gathering (mixed precision is set per run)."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, torchrun then means gloo processes (MULTI_CPU)
        rng_types=[],
        # Parts of the student often get no gradient in a step: the pooler and classifier when no term reads
        # logits, layers above the last mapped one, a term's heads on a step it skips. DDP without this flag
        # stops with "Expected to have finished reduction"; its cost is one walk of the autograd graph per
        # backward, small next to the all-reduce on the models this trains.
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
    label: str, value: torch.Tensor, step: int, student: Taps, teacher: Taps | dict[str, Taps] | None
) -> str:
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


Evaluator = Callable[[nn.Module, Iterable[Batch], EvalContext], dict[str, float]]
"""``evaluator(model, batches, context) -> metrics`` (a task's ``evaluate``)."""


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


class _Run:
    """One call of :func:`fit`, split into the phases of a step: step, apply-or-skip, log, evaluate, save."""

    def __init__(
        self,
        *,
        accelerator: Accelerator,
        student: nn.Module,
        teacher: nn.Module | None,
        objective: DistillationObjective,
        data: TaskData,
        collator: Callable,
        train: TrainConfig,
        output_dir: Path,
        evaluator: Evaluator,
        fingerprint: str,
        description: str,
        teachers: Mapping[str, nn.Module | TeacherCache] | None = None,
    ) -> None:
        self.accelerator, self.train, self.description = accelerator, train, description
        self.student, self.objective, self.data, self.evaluator = student, objective, data, evaluator
        self.fingerprint = fingerprint
        self.main = accelerator.is_main_process
        self.device = accelerator.device
        self.autocast = autocast_factory(train.precision, self.device)
        if teachers is None:
            teachers = {objective.default_teacher: teacher} if teacher is not None else {}
        self.sources: dict[str, nn.Module | TeacherCache] = {}
        for name, source in teachers.items():
            if isinstance(source, nn.Module):
                source = freeze(source).to(self.device)
                assert not any(p.requires_grad for p in source.parameters()), "a teacher must be frozen"
            self.sources[name] = source
        if teacher is not None:
            teacher = freeze(teacher).to(self.device)
        self.teacher = teacher  # evaluation compares the student with it
        live = {n: s for n, s in self.sources.items() if isinstance(s, nn.Module)}
        objective.prepare_models(student, live, announce=self.main)
        if len(data.train):
            sample = collator([data.train[i] for i in range(min(2, len(data.train)))])
            choose_output_layer(train.fused_logits, objective, student, self.sources, sample, self.main)
        self.teacher_requests = objective.teacher_requests()
        self.sampler = DistributedSampler(
            data.train,
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
            shuffle=True,
            seed=train.seed,
            drop_last=True,
        )
        self.loader = DataLoader(
            data.train,
            batch_size=train.batch_size,
            sampler=self.sampler,
            collate_fn=collator,
            drop_last=True,
            generator=torch.Generator().manual_seed(train.seed),
        )
        if len(self.loader) == 0:
            raise ConfigError(
                f"the training data has {len(data.train)} examples, fewer than one batch of train.batch_size="
                f"{train.batch_size} x {accelerator.num_processes} process(es); lower train.batch_size"
            )
        self.eval_loader = eval_loader(accelerator, data, collator, train)
        trainable = StudentWithHeads(student, objective)
        for model in [*live.values(), *([teacher] if teacher is not None else [])]:
            teacher_ids = {id(p) for p in model.parameters()}
            assert not teacher_ids & {id(p) for p in trainable.parameters()}, (
                "the teacher shares student weights"
            )
        optimizer = torch.optim.AdamW(_param_groups(trainable, train.weight_decay), lr=train.lr)
        self.scheduler = get_linear_schedule_with_warmup(
            optimizer, int(train.warmup_ratio * train.steps), train.steps
        )
        self.model, self.optimizer = accelerator.prepare(trainable, optimizer)
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        self.checkpoints = output_dir / "checkpoints"
        self.output_dir = output_dir
        self.step, self.skipped = 0, 0
        self.window: dict[str, float] = {}
        self.window_steps = 0
        self.result = FitResult(step=0)

    # -- resume -------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        """Loads the newest checkpoint, if any; returns whether one was loaded."""
        last = latest_checkpoint(self.checkpoints)
        if last is None:
            if self.main:
                print(f"distillkit: no checkpoint in {self.checkpoints}; starting from step 0")
            return False
        state = load_checkpoint(
            last,
            student=self.student,
            objective=self.objective,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )
        if self.fingerprint and state["extra"].get("fingerprint") not in (None, self.fingerprint):
            raise ConfigError(
                f"the checkpoint {last} was written by a run with other model/objective/data settings; "
                "use another output_dir or drop --resume"
            )
        self.step, self.skipped = state["step"], state["extra"].get("skipped", 0)
        if self.main:
            print(f"distillkit: resumed from {last} at step {self.step}")
        return True

    # -- phase 1: forward and backward over the micro-batches of one optimizer step ---------------------
    def teacher_taps(self, batch: dict[str, torch.Tensor]) -> dict[str, Taps] | None:
        """Each read teacher's taps for ``batch`` by name, or None when no term reads a teacher.

        A live teacher runs once (``no_grad``, eval mode) and is asked for what its terms read; a cached one
        is read from its cache; a teacher no term reads does not run.

        Raises:
            DistillkitError: If a term reads a teacher the run has neither a model nor a cache for.

        """
        taps: dict[str, Taps] = {}
        for name, request in self.teacher_requests.items():
            if not request.needs_forward:
                continue
            source = self.sources.get(name)
            if source is None:
                if not self.sources:  # no teacher at all (e.g. a teacher's own fine-tuning)
                    continue
                raise DistillkitError(f"terms read teacher '{name}', but the run has no such teacher")
            if isinstance(source, nn.Module):
                with torch.no_grad(), self.autocast():
                    taps[name] = collect_taps(source, batch, request)
            else:
                taps[name] = source.taps(batch, request)
        return taps or None

    def forward_backward(self, batches: Iterator[dict[str, torch.Tensor]]) -> StepValues:
        """Runs ``grad_accum`` micro-batches; values are summed on the device and read once per step."""
        accum = self.train.grad_accum
        sums, labels, student, teacher = None, [], None, None
        for micro in range(accum):
            batch = next(batches)
            teacher = self.teacher_taps(batch)
            sync = self.accelerator.no_sync(self.model) if micro < accum - 1 else nullcontext()
            with sync:
                with self.autocast():
                    out, student = self.model(batch, teacher)
                labels = ["total", *out.terms]
                values = torch.stack(
                    [out.total.detach().float(), *(v.detach().float() for v in out.terms.values())]
                )
                sums = values / accum if sums is None else sums + values / accum
                self.accelerator.backward(out.total / accum)
        losses = dict(zip(labels, sums.tolist(), strict=True))  # the step's one host sync for the losses
        problem = None
        bad = [label for label in labels[1:] + labels[:1] if not math.isfinite(losses[label])]
        if bad:
            problem = _describe_nonfinite(bad[0], losses[bad[0]], self.step + 1, student, teacher)
        losses = _mean_across_processes(self.accelerator, losses)
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.train.max_grad_norm or float("inf"))
        grad_norm = float(grad_norm)
        if problem is None and not math.isfinite(grad_norm):
            problem = f"gradient norm is {grad_norm} at step {self.step + 1} (all loss terms finite)"
        return StepValues(losses=losses, grad_norm=grad_norm, problem=problem)

    # -- phase 2: apply the step, or skip it -------------------------------------------------------------
    def apply_or_skip(self, values: StepValues, log: RunLog, bar: tqdm) -> None:
        """Steps the optimizer, scheduler and the objective's state; or skips a non-finite step."""
        flagged = torch.tensor(float(values.problem is not None), device=self.device)
        if self.accelerator.num_processes > 1:
            flagged = self.accelerator.reduce(flagged, "sum")
        self.step += 1
        if float(flagged) > 0:
            problem = values.problem or f"a non-finite loss on another process at step {self.step}"
            log.log("train", self.step, {"nonfinite": problem, "action": self.train.on_nonfinite})
            if self.train.on_nonfinite == "stop":
                log.close()
                bar.close()
                raise NonFiniteLossError(
                    f"{problem}; stopping (no checkpoint written for this step). Lower train.lr, enable "
                    "train.max_grad_norm, check the data, or set train.on_nonfinite: skip"
                )
            if self.main:
                tqdm.write(f"distillkit: {problem}; skipping the step")
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.objective.skip_step()
            self.skipped += 1
            return
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.after_step()
        for label, value in values.losses.items():
            self.window[label] = self.window.get(label, 0.0) + value
        self.window_steps += 1

    # -- phase 3: log ------------------------------------------------------------------------------------
    def log_window(self, values: StepValues, log: RunLog, bar: tqdm) -> None:
        """Updates the progress bar; every ``log_every`` steps writes the window's mean losses."""
        bar.update(1)
        if not self.window_steps:
            return
        bar.set_postfix({k: f"{v / self.window_steps:.3f}" for k, v in self.window.items()}, refresh=False)
        if self.step % self.train.log_every == 0 or self.step == self.train.steps:
            self.result.final_terms = {k: v / self.window_steps for k, v in self.window.items()}
            record = {
                **self.result.final_terms,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": values.grad_norm,
            }
            log.log("train", self.step, record)
            self.result.logged.append({"step": self.step, **record})
            self.window, self.window_steps = {}, 0

    # -- phase 4: evaluate -------------------------------------------------------------------------------
    def evaluate(self, log: RunLog | None = None) -> None:
        """Evaluates the student (with the teacher for comparisons) and logs the metrics."""
        context = EvalContext(accelerator=self.accelerator, autocast=self.autocast, teacher=self.teacher)
        self.result.eval = self.evaluator(self.student, self.eval_loader, context)
        if log is not None:
            log.log("eval", self.step, self.result.eval)
        if self.main:
            describe = getattr(self.evaluator, "__self__", None)
            text = describe.describe(self.result.eval) if describe is not None else str(self.result.eval)
            tqdm.write(f"[{self.description}] step {self.step}: eval {text}")

    # -- phase 5: save -----------------------------------------------------------------------------------
    def save(self) -> None:
        """Writes a checkpoint (main process), after checking the banks agree across processes."""
        checksums = _buffer_checksums(self.accelerator, self.objective, self.step)
        if self.main:
            save_checkpoint(
                self.checkpoints,
                self.step,
                student=self.student,
                objective=self.objective,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                extra={
                    "fingerprint": self.fingerprint,
                    "skipped": self.skipped,
                    "buffer_checksums": checksums,
                },
                keep_last=self.train.keep_last,
            )
        self.accelerator.wait_for_everyone()


def eval_loader(
    accelerator: Accelerator, data: TaskData, collator: Callable, train: TrainConfig
) -> DataLoader:
    """The evaluation DataLoader (sharded across processes by accelerate)."""
    return accelerator.prepare_data_loader(
        DataLoader(data.eval, batch_size=train.eval_batch_size or train.batch_size, collate_fn=collator)
    )


def _classification_evaluator(model, batches, context: EvalContext) -> dict[str, float]:
    from distillkit.tasks.evaluate_classification import evaluate

    return evaluate(model, batches, model.config.num_labels, context.accelerator, context.autocast)


def fit(
    *,
    accelerator: Accelerator,
    student: nn.Module,
    teacher: nn.Module | None,
    objective: DistillationObjective,
    data: TaskData,
    collator: Callable,
    train: TrainConfig,
    output_dir: Path,
    evaluator: Evaluator | None = None,
    resume: bool = False,
    fingerprint: str = "",
    stop_after_step: int | None = None,
    description: str = "distill",
    teachers: Mapping[str, nn.Module | TeacherCache] | None = None,
) -> FitResult:
    """Trains ``student`` (and the objective's heads) against a frozen ``teacher``.

    Each optimizer step goes through five phases (methods of ``_Run``): ``forward_backward`` (per
    micro-batch: the teacher's taps, the student's taps, the objective, backward), ``apply_or_skip``,
    ``log_window``, ``evaluate`` and ``save``.

    Args:
        accelerator: The engine.
        student: The model to train.
        teacher: The frozen teacher, or None when no term reads it.
        objective: The loss terms.
        data: Tokenised train/eval splits.
        collator: Turns rows into batches.
        train: Optimisation settings.
        output_dir: Run directory (``metrics.jsonl``, ``checkpoints/``).
        evaluator: ``evaluator(model, batches, context)`` with an
            :class:`~distillkit.tasks.base.EvalContext` (a task's ``evaluate``); default: classification
            accuracy/F1/loss.
        resume: Continue from the newest checkpoint in ``output_dir/checkpoints``.
        fingerprint: Identifies the model/objective/data setup; a checkpoint of another setup is refused.
        stop_after_step: Return after this step as if interrupted (for time-sliced jobs and tests).
        description: Label of the progress bar.
        teachers: Where each teacher's taps come from, by name: a frozen model (run live) or a
            :class:`~distillkit.teacher_cache.TeacherCache`. Default: ``teacher`` run live.

    Returns:
        The result; the student holds the trained weights.

    Raises:
        NonFiniteLossError: On a non-finite term with ``on_nonfinite: stop``.
        ConfigError: If the data is smaller than one batch or a checkpoint does not match.

    """
    started = time.perf_counter()
    run = _Run(
        accelerator=accelerator,
        student=student,
        teacher=teacher,
        objective=objective,
        data=data,
        collator=collator,
        train=train,
        output_dir=output_dir,
        evaluator=evaluator or _classification_evaluator,
        fingerprint=fingerprint,
        description=description,
        teachers=teachers,
    )
    resumed = run.resume() if resume else False
    log = RunLog(
        output_dir, enabled=run.main, tensorboard=train.tensorboard, resume_step=run.step if resumed else None
    )
    batches = _micro_batches(run.loader, run.sampler, run.step * train.grad_accum, run.device)
    bar = tqdm(
        total=train.steps, initial=run.step, desc=description, disable=not (run.main and train.progress)
    )
    run.model.train()
    while run.step < train.steps:
        values = run.forward_backward(batches)
        run.apply_or_skip(values, log, bar)
        run.log_window(values, log, bar)
        if run.step == train.steps or (train.eval_every and run.step % train.eval_every == 0):
            run.evaluate(log)
        stopping = stop_after_step is not None and run.step >= stop_after_step
        if run.step == train.steps or stopping or (train.save_every and run.step % train.save_every == 0):
            run.save()
        if stopping:
            break
    bar.close()
    if not run.result.eval and run.step >= train.steps:  # resumed from the final checkpoint
        run.evaluate()
    log.close()
    result = run.result
    result.step, result.skipped = run.step, run.skipped
    result.logged = result.logged[:1] + result.logged[-1:] if len(result.logged) > 1 else result.logged
    result.seconds = time.perf_counter() - started
    return result
