"""The training loop: :class:`TrainingLoop` trains a run's student (and the objective's heads).

One optimizer step (:meth:`TrainingLoop.step`), in the order the code runs it:

1. ``forward_backward``: for each of ``grad_accum`` micro-batches (with ``train.generation`` first handed to
   the run's :class:`~distillkit.run.sources.SequenceSource`, which may replace it by sampled sequences: the
   ``sampling`` phase), each frozen teacher runs under ``no_grad`` (eval mode) and returns only what some
   term reads of it (it does not run when no term reads it), or its taps are read from its cache; the student
   runs once the same way; the objective returns the weighted total and each term (each term on its own
   teacher's taps); the total is back-propagated. Loss values stay on the device and are read once per step.
2. ``apply_or_skip``: a non-finite term or gradient stops the run or skips the step; otherwise gradients are
   clipped, AdamW and the warm-up/linear-decay schedule step, and the terms update their state
   (``after_step``: memory banks).
3. ``log_window``: progress bar and, every ``log_every`` steps, the JSONL log (losses, learning rate,
   gradient norm and the seconds each phase took since the previous record).
4. ``evaluate``: every ``eval_every`` steps and at the end, the task's evaluation.
5. ``save``: every ``save_every`` steps and at the end, an atomic checkpoint.

:class:`~distillkit.run.callbacks.Callback` objects hear of each step, log record, evaluation and checkpoint.
Device placement and cross-process gathering are done by ``accelerate``; replicating (DDP) or sharding
(FSDP2) the models, gradient clipping and the checkpoint format are the run's
:class:`~distillkit.run.strategy.Strategy` (``train.strategy``). Launched with ``torchrun``/``accelerate
launch`` each process reads its own shard of every epoch (``DistributedSampler``) and only the main process
logs. The data order depends only on the seed and the step, and every random generator is checkpointed, so
a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from distillkit.errors import ConfigError, DistillkitError
from distillkit.objective.taps import Taps, collect_taps, teacher_view
from distillkit.run.callbacks import Callback, CallbackList
from distillkit.run.checkpoint import latest_checkpoint
from distillkit.run.engine import autocast_factory
from distillkit.run.fused_logits import choose_output_layer
from distillkit.run.loaders import eval_loader, train_loader
from distillkit.run.numbers import format_loss
from distillkit.run.output_dir import refuse_past_end
from distillkit.run.phases import PhaseTimer
from distillkit.run.run import Run
from distillkit.run.runlog import RunLog
from distillkit.run.sources import sequence_source
from distillkit.run.step import (
    NonFiniteLossError,
    StepValues,
    StudentWithHeads,
    buffer_checksums,
    describe_nonfinite,
    mean_across_processes,
    micro_batches,
    param_groups,
)
from distillkit.run.strategy import Strategy
from distillkit.run.trackers import RunTrackers
from distillkit.run.warm_start import warm_start_pass
from distillkit.tasks.base import EvalContext


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


class TrainingLoop:
    """Trains a loaded :class:`~distillkit.run.run.Run`, step by step.

    ``fit`` runs it to the end; :meth:`start`, :meth:`step` and :meth:`finish` let a caller drive it one
    optimizer step at a time (``distillkit bench --step`` times the real steps this way).

    Args:
        run: A loaded run.
        callbacks: Told of each step, log record, evaluation and checkpoint.
        timer: Times the phases of each step (default: a new one).

    Raises:
        ConfigError: If the training data is smaller than one batch.

    """

    def __init__(self, run: Run, callbacks: Sequence[Callback] = (), timer: PhaseTimer | None = None) -> None:
        if run.accelerator is None or run.student is None:
            raise ValueError("TrainingLoop needs a loaded run (Run.load())")
        self.run, self.train = run, run.train
        self.callbacks = CallbackList(callbacks)
        self.timer = timer or PhaseTimer()
        accelerator = run.accelerator
        self.accelerator, self.objective, self.student = accelerator, run.objective, run.student
        self.main = accelerator.is_main_process
        self.device = accelerator.device
        self.autocast = autocast_factory(self.train.precision, self.device)
        self.strategy = run.strategy or Strategy(accelerator)
        self.sources, self.teacher = self.strategy.place_teachers(run.teachers, run.teacher)
        self.sequences = sequence_source(
            self.train.generation,
            run.tokenizer,
            run.config.data.max_length,
            {"student": self.student, "teacher": self.teacher},
            seed=self.train.seed,
            rank=accelerator.process_index,
            autocast=self.autocast,
        )
        live = {n: s for n, s in self.sources.items() if isinstance(s, nn.Module)}
        self.objective.prepare_models(self.student, live, announce=self.main)
        data, collator = run.data, run.collator
        if len(data.train):
            sample = collator([data.train[i] for i in range(min(2, len(data.train)))])
            choose_output_layer(
                self.train.fused_logits, self.objective, self.student, self.sources, sample, self.main
            )
        self.teacher_requests = self.objective.teacher_requests()
        self.sampler, self.loader = train_loader(run)
        self.eval_loader = eval_loader(run)
        trainable = StudentWithHeads(self.student, self.objective, self.timer)
        for model in [*live.values(), *([self.teacher] if self.teacher is not None else [])]:
            teacher_ids = {id(p) for p in model.parameters()}
            assert not teacher_ids & {id(p) for p in trainable.parameters()}, (
                "the teacher shares student weights"
            )
        self.model, self.optimizer = self.strategy.prepare(
            trainable,
            self.student,
            lambda module: torch.optim.AdamW(param_groups(module, self.train.weight_decay), lr=self.train.lr),
        )
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(self.train.warmup_ratio * self.train.steps), self.train.steps
        )
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        self.checkpoints = run.output_dir / "checkpoints"
        self.run_id = uuid.uuid4().hex[:12]  # a resumed run takes its checkpoint's; pruning keeps to it
        self.step_count, self.skipped = 0, 0
        self.window: dict[str, float] = {}
        self.window_steps = 0
        self.result = FitResult(step=0)
        self.log: RunLog | None = None
        self.bar: tqdm | None = None
        self.batches: Iterator[dict[str, torch.Tensor]] | None = None
        self.last_values: StepValues | None = None
        self._started = 0.0

    # -- driving the loop --------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Whether every step of ``train.steps`` has run."""
        return self.step_count >= self.train.steps

    def start(self, resume: bool = False) -> None:
        """Resumes from the newest checkpoint (when asked), opens the log and the progress bar."""
        self._started = time.perf_counter()
        resumed = self.resume() if resume else False
        if not resumed:  # a resumed run's banks come from its checkpoint
            warm_start_pass(self)
        self.log = RunLog(
            self.run.output_dir,
            enabled=self.main,
            trackers=RunTrackers.for_run(self.run) if self.main else None,
            resume_step=self.step_count if resumed else None,
        )
        self.batches = micro_batches(
            self.loader, self.sampler, self.step_count * self.train.grad_accum, self.device
        )
        self.bar = tqdm(
            total=self.train.steps,
            initial=self.step_count,
            desc=self.run.description,
            disable=not (self.main and self.train.progress),
        )
        self.model.train()
        self.callbacks.emit("on_train_begin", self)

    def step(self, save_now: bool = False) -> StepValues:
        """Runs one optimizer step through its five phases (evaluating and saving when they are due).

        Args:
            save_now: Write a checkpoint after this step even if none is due.

        Returns:
            The step's losses and gradient norm.

        """
        values = self.forward_backward(self.batches)
        self.apply_or_skip(values)
        self.last_values = values
        self.callbacks.emit("on_step_end", self, values)
        self.log_window(values)
        step, train = self.step_count, self.train
        if step == train.steps or (train.eval_every and step % train.eval_every == 0):
            self.evaluate()
        if save_now or step == train.steps or (train.save_every and step % train.save_every == 0):
            self.save()
        return values

    def finish(self) -> FitResult:
        """Closes the log and the progress bar and returns the result."""
        if self.bar is not None:
            self.bar.close()
        if not self.result.eval and self.done:  # resumed from the final checkpoint
            self.evaluate(log=False)
        if self.log is not None:
            self.log.close()
        result = self.result
        result.step, result.skipped = self.step_count, self.skipped
        result.logged = result.logged[:1] + result.logged[-1:] if len(result.logged) > 1 else result.logged
        result.seconds = time.perf_counter() - self._started
        self.callbacks.emit("on_train_end", self, result)
        return result

    def fit(self, resume: bool = False, stop_after_step: int | None = None) -> FitResult:
        """Trains to ``train.steps`` (or stops after ``stop_after_step``, checkpointed, as if interrupted)."""
        self.start(resume)
        while not self.done:
            stopping = stop_after_step is not None and self.step_count + 1 >= stop_after_step
            self.step(save_now=stopping)
            if stopping:
                break
        return self.finish()

    # -- resume -------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        """Loads the newest checkpoint, if any; returns whether one was loaded.

        Raises:
            ConfigError: If the checkpoint is past ``train.steps`` or of other model/objective/data settings.

        """
        last = latest_checkpoint(self.checkpoints)
        if last is None:
            if self.main:
                print(f"distillkit: no checkpoint in {self.checkpoints}; starting from step 0")
            return False
        refuse_past_end(last, self.train.steps)
        state = self.strategy.load_checkpoint(
            last,
            student=self.student,
            objective=self.objective,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )
        fingerprint = self.run.fingerprint
        if fingerprint and state["extra"].get("fingerprint") not in (None, fingerprint):
            raise ConfigError(
                f"the checkpoint {last} was written by a run with other model/objective/data settings; "
                "use another output_dir or drop --resume"
            )
        self.step_count, self.skipped = state["step"], state["extra"].get("skipped", 0)
        self.run_id = state.get("run_id") or self.run_id
        if self.sequences is not None and "sequences" in state["extra"]:
            self.sequences.load_state_dict(state["extra"]["sequences"])
        if self.main:
            print(f"distillkit: resumed from {last} at step {self.step_count}")
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
        batch = teacher_view(batch)  # the teacher's own tokens when the student has another tokenizer
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
        accum, timer = self.train.grad_accum, self.timer
        sums, labels, student, teacher = None, [], None, None
        for micro in range(accum):
            batch = next(batches)
            if self.sequences is not None:  # the data block, or sequences sampled from its prompts
                with timer.phase("sampling"):
                    batch = self.sequences(batch)
            with timer.phase("teacher"):
                teacher = self.teacher_taps(batch)
            sync = self.strategy.no_sync(self.model) if micro < accum - 1 else nullcontext()
            with sync:
                with self.autocast():
                    out, student = self.model(batch, teacher)
                labels = ["total", *out.terms]
                values = torch.stack(
                    [out.total.detach().float(), *(v.detach().float() for v in out.terms.values())]
                )
                sums = values / accum if sums is None else sums + values / accum
                with timer.phase("backward"):
                    self.accelerator.backward(out.total / accum)
        with timer.phase("bookkeeping"):
            losses = dict(zip(labels, sums.tolist(), strict=True))  # the step's one host sync for the losses
            problem = None
            bad = [label for label in labels[1:] + labels[:1] if not math.isfinite(losses[label])]
            if bad:
                problem = describe_nonfinite(bad[0], losses[bad[0]], self.step_count + 1, student, teacher)
            losses = mean_across_processes(self.accelerator, losses)
        with timer.phase("optimizer"):
            grad_norm = self.strategy.clip_grad_norm(self.params, self.train.max_grad_norm)
        if problem is None and not math.isfinite(grad_norm):
            problem = f"gradient norm is {grad_norm} at step {self.step_count + 1} (all loss terms finite)"
        return StepValues(losses=losses, grad_norm=grad_norm, problem=problem)

    # -- phase 2: apply the step, or skip it -------------------------------------------------------------
    def apply_or_skip(self, values: StepValues) -> None:
        """Steps the optimizer, scheduler and the objective's state; or skips a non-finite step."""
        flagged = torch.tensor(float(values.problem is not None), device=self.device)
        if self.accelerator.num_processes > 1:
            flagged = self.accelerator.reduce(flagged, "sum")
        self.step_count += 1
        if float(flagged) > 0:
            problem = values.problem or f"a non-finite loss on another process at step {self.step_count}"
            self.log.log("train", self.step_count, {"nonfinite": problem, "action": self.train.on_nonfinite})
            if self.train.on_nonfinite == "stop":
                self.log.close()
                self.bar.close()
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
        with self.timer.phase("optimizer"):
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        with self.timer.phase("bookkeeping"):
            self.objective.after_step()
        for label, value in values.losses.items():
            self.window[label] = self.window.get(label, 0.0) + value
        self.window_steps += 1

    # -- phase 3: log ------------------------------------------------------------------------------------
    def log_window(self, values: StepValues) -> None:
        """Updates the progress bar; every ``log_every`` steps writes the window's mean losses."""
        self.bar.update(1)
        if not self.window_steps:
            return
        postfix = {k: format_loss(v / self.window_steps) for k, v in self.window.items()}
        if self.sequences is not None:
            postfix["sampled tok/s"] = f"{self.sequences.rate():.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        if self.step_count % self.train.log_every == 0 or self.step_count == self.train.steps:
            self.result.final_terms = {k: v / self.window_steps for k, v in self.window.items()}
            record = {
                **self.result.final_terms,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": values.grad_norm,
                "seconds": {phase: round(s, 6) for phase, s in self.timer.take().items()},
            }
            if self.sequences is not None:
                record.update(self.sequences.take_counts(self.accelerator))
            self.log.log("train", self.step_count, record)
            self.result.logged.append({"step": self.step_count, **record})
            self.callbacks.emit("on_log", self, record)
            self.window, self.window_steps = {}, 0

    # -- phase 4: evaluate -------------------------------------------------------------------------------
    def evaluate(self, log: bool = True) -> dict[str, float]:
        """Evaluates the student (with the teacher for comparisons) and logs the metrics."""
        context = EvalContext(accelerator=self.accelerator, autocast=self.autocast, teacher=self.teacher)
        with self.strategy.gathered():
            self.result.eval = self.run.task.evaluate(self.student, self.eval_loader, context)
        if log:
            self.log.log("eval", self.step_count, self.result.eval)
        if self.main:
            text = self.run.task.describe(self.result.eval)
            tqdm.write(f"[{self.run.description}] step {self.step_count}: eval {text}")
        self.callbacks.emit("on_evaluate", self, self.result.eval)
        return self.result.eval

    # -- phase 5: save -----------------------------------------------------------------------------------
    def save(self) -> None:
        """Writes a checkpoint, after checking the banks agree across processes."""
        checksums = buffer_checksums(self.accelerator, self.objective, self.step_count)
        path = self.strategy.save_checkpoint(
            self.checkpoints,
            self.step_count,
            student=self.student,
            objective=self.objective,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra={
                "fingerprint": self.run.fingerprint,
                "skipped": self.skipped,
                "buffer_checksums": checksums,
                **({"sequences": self.sequences.state_dict()} if self.sequences is not None else {}),
            },
            keep_last=self.train.keep_last,
            run_id=self.run_id,
        )
        self.accelerator.wait_for_everyone()
        self.callbacks.emit("on_save", self, path)


def fit(
    run: Run, resume: bool = False, stop_after_step: int | None = None, callbacks: Sequence[Callback] = ()
) -> FitResult:
    """Trains a loaded run's student (and the objective's heads) against its frozen teachers.

    Args:
        run: A loaded :class:`~distillkit.run.run.Run`.
        resume: Continue from the newest checkpoint in ``run.output_dir/checkpoints``.
        stop_after_step: Return after this step as if interrupted (a checkpoint is written).
        callbacks: Told of each step, log record, evaluation and checkpoint.

    Returns:
        The result; the student holds the trained weights.

    Raises:
        NonFiniteLossError: On a non-finite term with ``on_nonfinite: stop``.
        ConfigError: If the data is smaller than one batch or a checkpoint does not match.

    """
    return TrainingLoop(run, callbacks).fit(resume=resume, stop_after_step=stop_after_step)
