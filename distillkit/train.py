"""The distillation loop and ``distillkit distill``.

One optimizer step: for each of ``grad_accum`` micro-batches the frozen teacher runs under ``no_grad`` (eval
mode), the student runs with hidden states, the objective returns the weighted total and each term; the total
is back-propagated. Then gradients are clipped, a non-finite term or gradient stops the run or skips the step,
AdamW and the warm-up/linear-decay schedule step, and the objective's memory banks are updated.

Device placement, DDP wrapping and cross-process gathering are done by ``accelerate``; launched with
``torchrun``/``accelerate launch`` each process reads its own shard of every epoch (``DistributedSampler``)
and only the main process logs and writes checkpoints.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from distillkit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distillkit.config import DistillConfig, TrainConfig, load_config
from distillkit.data import Collator, TaskData, load_task_data
from distillkit.errors import ConfigError, DistillkitError
from distillkit.evaluate import evaluate, time_inference
from distillkit.losses import ModelDims, Taps
from distillkit.models import count_parameters, freeze, load_model, load_tokenizer, student_from_teacher
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
        rng_types=[], kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
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
            if teacher is not None:
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
            if main:
                save_checkpoint(
                    checkpoints,
                    step,
                    student=student,
                    objective=objective,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    extra={"fingerprint": fingerprint, "skipped": skipped},
                    keep_last=train.keep_last,
                )
            accelerator.wait_for_everyone()
        if stopping:
            break
    bar.close()
    log.close()
    result.step, result.skipped = step, skipped
    result.history = result.history[:1] + result.history[-1:] if len(result.history) > 1 else result.history
    result.seconds = time.perf_counter() - started
    return result


def _fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


def prepare_teacher(
    config: DistillConfig, data: TaskData, collator: Collator, tokenizer: Any, accelerator: Accelerator
) -> tuple[nn.Module, dict[str, Any]]:
    """Loads the teacher, fine-tuning it on the task first (once; cached) when ``teacher.finetune`` is set.

    Args:
        config: The run config.
        data: The task data.
        collator: Pads batches.
        tokenizer: Saved with a fine-tuned teacher.
        accelerator: The engine.

    Returns:
        The frozen teacher, and ``{"cache": dir, "eval": metrics}`` for a fine-tuned one (else ``{}``).

    """
    spec = config.teacher
    tune = spec.finetune
    set_seed(config.data.split_seed)  # a teacher built from `config` is the same in every run and seed
    if tune is None:
        return freeze(load_model(spec, data.num_labels, "teacher")), {}
    # The cache key covers what the fine-tuning sees (not the size of the evaluation subset).
    data_key = config.data.model_dump(exclude={"max_eval_examples"})
    key = _fingerprint(spec.model_dump(), data_key, data.label_names, config.train.precision)
    eval_key = _fingerprint(config.data.model_dump())
    name = Path((spec.path or "config").rstrip("/")).name.replace(":", "_")
    cache = Path(tune.cache_dir) / f"{name}-{key}"
    done = cache / "finetune.json"
    if done.exists():
        teacher = load_model(spec.model_copy(update={"path": str(cache)}), data.num_labels, "teacher")
        info = json.loads(done.read_text(encoding="utf-8"))
        scored = cache / f"eval-{eval_key}.json"  # the teacher's score on this evaluation subset, if known
        info["eval"] = json.loads(scored.read_text(encoding="utf-8")) if scored.exists() else {}
        info["eval_cache"] = str(scored)
        return freeze(teacher), info
    teacher = load_model(spec, data.num_labels, "teacher")
    dims = ModelDims.from_models(teacher, teacher)
    objective = DistillationObjective.from_config([{"loss": "ce"}], dims)
    train = config.train.model_copy(
        update={
            "steps": tune.steps,
            "batch_size": tune.batch_size,
            "lr": tune.lr,
            "warmup_ratio": tune.warmup_ratio,
            "grad_accum": 1,
            "eval_every": None,
            "save_every": None,
            "seed": config.data.split_seed,
        }
    )
    result = fit(
        accelerator=accelerator,
        student=teacher,
        teacher=None,
        objective=objective,
        data=data,
        collator=collator,
        train=train,
        output_dir=cache / "run",
        description="fine-tune teacher",
    )
    info = {
        "cache": str(cache),
        "eval": result.eval,
        "eval_key": eval_key,
        "seconds": result.seconds,
        "steps": result.step,
    }
    if accelerator.is_main_process:
        teacher.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
        done.write_text(json.dumps(info, indent=2), encoding="utf-8")
        (cache / f"eval-{eval_key}.json").write_text(json.dumps(result.eval), encoding="utf-8")
    accelerator.wait_for_everyone()
    return freeze(teacher), info


def build_student(config: DistillConfig, teacher: nn.Module, num_labels: int) -> nn.Module:
    """Builds the student from its path or config, or from the teacher (``layers``, ``hidden_size``)."""
    spec = config.student
    if spec.path is not None or spec.config is not None:
        return load_model(spec, num_labels, "student")
    return student_from_teacher(teacher, spec)


def distill(
    config: DistillConfig, resume: bool = False, stop_after_step: int | None = None
) -> dict[str, Any]:
    """Runs a whole distillation: data, teacher (fine-tuned if asked), student, loop, evaluation, saving.

    Everything the user can get wrong (config fields, data columns, labels, loss parameters) is checked before
    the first training step.

    Args:
        config: The validated config.
        resume: Continue from the newest checkpoint in ``output_dir``.
        stop_after_step: Stop after this step as if interrupted (the checkpoint is written).

    Returns:
        The summary also written to ``<output_dir>/summary.json``.

    """
    started = time.perf_counter()
    accelerator = make_accelerator()
    output_dir = Path(config.output_dir)
    tokenizer = load_tokenizer(config.teacher)
    data = load_task_data(config.data, tokenizer)
    collator = Collator(tokenizer)
    # Validate the objective against the real model sizes before any training (also the teacher's).
    base = load_model(config.teacher.model_copy(update={"finetune": None}), data.num_labels, "teacher")
    probe = build_student(config, base, data.num_labels)
    DistillationObjective.from_config(config.objective, ModelDims.from_models(probe, base))
    del base, probe

    teacher, teacher_info = prepare_teacher(config, data, collator, tokenizer, accelerator)
    set_seed(config.train.seed)
    student = build_student(config, teacher, data.num_labels)
    objective = DistillationObjective.from_config(config.objective, ModelDims.from_models(student, teacher))
    fingerprint = _fingerprint(
        config.student.model_dump(),
        config.teacher.model_dump(),
        [t.model_dump() for t in config.objective],
        config.data.model_dump(),
    )
    result = fit(
        accelerator=accelerator,
        student=student,
        teacher=teacher,
        objective=objective,
        data=data,
        collator=collator,
        train=config.train,
        output_dir=output_dir,
        resume=resume,
        fingerprint=fingerprint,
        stop_after_step=stop_after_step,
    )
    if result.step < config.train.steps:
        return {"step": result.step, "stopped_early": True}
    summary = _finish(config, accelerator, student, teacher, teacher_info, data, collator, tokenizer, result)
    summary["wall_seconds"] = time.perf_counter() - started
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        _print_summary(summary)
    return summary


def _finish(
    config: DistillConfig,
    accelerator: Accelerator,
    student: nn.Module,
    teacher: nn.Module,
    teacher_info: dict[str, Any],
    data: TaskData,
    collator: Collator,
    tokenizer: Any,
    result: FitResult,
) -> dict[str, Any]:
    output_dir = Path(config.output_dir)
    eval_loader = accelerator.prepare_data_loader(
        DataLoader(
            data.eval, batch_size=config.train.eval_batch_size or config.train.batch_size, collate_fn=collator
        )
    )
    teacher_eval = teacher_info.get("eval")  # a fine-tuned teacher was scored on this eval split
    if not teacher_eval:
        teacher_eval = evaluate(teacher, eval_loader, data.num_labels, accelerator)
        if teacher_info.get("eval_cache") and accelerator.is_main_process:
            Path(teacher_info["eval_cache"]).write_text(json.dumps(teacher_eval), encoding="utf-8")
    summary: dict[str, Any] = {
        "steps": result.step,
        "skipped_steps": result.skipped,
        "train_seconds": result.seconds,
        "final_terms": result.final_terms,
        "student": {"eval": result.eval, "parameters": count_parameters(student)},
        "teacher": {**teacher_info, "eval": teacher_eval, "parameters": count_parameters(teacher)},
        "labels": data.label_names,
        "eval_examples": len(data.eval),
        "train_examples": len(data.train),
    }
    if accelerator.is_main_process:
        timing = [
            {
                k: v.to(accelerator.device)
                for k, v in collator([data.eval[i] for i in range(s, min(s + 32, len(data.eval)))]).items()
            }
            for s in range(0, min(len(data.eval), 128), 32)
        ]
        teacher_s = time_inference(teacher, timing, repeats=2)
        student_s = time_inference(student, timing, repeats=2)
        summary["inference"] = {
            "examples": sum(len(b["labels"]) for b in timing),
            "teacher_seconds": teacher_s,
            "student_seconds": student_s,
            "speedup": teacher_s / student_s if student_s > 0 else math.nan,
        }
        final = output_dir / "student"
        student.config.id2label = dict(enumerate(data.label_names))
        student.config.label2id = {name: i for i, name in enumerate(data.label_names)}
        student.save_pretrained(final)
        tokenizer.save_pretrained(final)
        summary["student"]["path"] = str(final)
    accelerator.wait_for_everyone()
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    teacher, student = summary["teacher"], summary["student"]
    lines = [
        "",
        f"{'':10} {'accuracy':>9} {'macro-F1':>9} {'params':>12}",
        *(
            f"{name:10} {part['eval']['accuracy']:9.4f} {part['eval']['f1']:9.4f} {part['parameters']:12,}"
            for name, part in (("teacher", teacher), ("student", student))
        ),
        f"held-out examples: {summary['eval_examples']}  (trained on {summary['train_examples']})",
    ]
    if "inference" in summary:
        inf = summary["inference"]
        lines.append(
            f"inference on {inf['examples']} examples: teacher {inf['teacher_seconds']:.3f}s, student "
            f"{inf['student_seconds']:.3f}s, speed-up x{inf['speedup']:.2f}"
        )
    lines.append("final losses: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["final_terms"].items()))
    lines.append(f"student saved to {student.get('path')}")
    print("\n".join(lines))


def run_distill(
    config_path: str | Path, overrides: Sequence[str] = (), resume: bool = False
) -> dict[str, Any]:
    """``distillkit distill CONFIG.yaml [--set key=value ...] [--resume]``.

    Args:
        config_path: The YAML config.
        overrides: ``key.path=value`` strings.
        resume: Continue from the newest checkpoint.

    Returns:
        The run summary.

    """
    return distill(load_config(config_path, overrides), resume=resume)
