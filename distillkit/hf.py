"""Distillation inside a ``transformers.Trainer`` run: :class:`DistillationTrainer` (and TRL's trainers).

::

    from transformers import TrainingArguments
    from distillkit.hf import DistillationTrainer

    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,                       # or {"teacher": t1, "wide": t2}
        objective=[{"loss": "kd", "temperature": 2.0}, {"loss": "l2", "weight": 0.5}],
        args=TrainingArguments(output_dir="out", max_steps=200, logging_steps=10),
        train_dataset=train,
        data_collator=collator,
    )
    trainer.train()        # trainer.state.log_history: loss, loss_kd, loss_l2, learning_rate, grad_norm, ...
    trainer.save_model()   # the student, with its model card (README.md)

Per micro-batch (:meth:`DistillationMixin.compute_loss`) every teacher runs frozen (``no_grad``, eval mode,
on the batch's device) and is asked only for what its terms read; the student runs once the same way; the
objective (the :class:`~distillkit.DistillationObjective` ``distillkit distill`` trains) weighs the terms.
Its learned parts (projections) join the optimizer and gradient clipping, ``objective.after_step()`` runs
after each optimizer step (memory banks), and their state goes into every checkpoint.

Loss normalisation: each term is a mean over its micro-batch (per example, or per counted token), and
micro-batches are weighed equally under gradient accumulation, as ``distillkit distill`` does: the Trainer
divides the loss by the number of accumulated micro-batches (``loss_is_scaled_for_ga = False``), and its
token count ``num_items_in_batch`` is not used. Each term's loss is logged as ``loss_<term>`` (and
``eval_loss_<term>``), averaged over the logging window like the Trainer's own ``loss``.

Causal LM batches from Hugging Face collators carry unshifted labels (the model shifts them); the terms read
next-token labels, so they are shifted here (``shift_labels``, automatic for causal LM students; a
collator's own ``shift_labels`` key is used as given).

Another ``Trainer`` subclass gets the same mechanism by putting :class:`DistillationMixin` first::

    from trl import SFTTrainer
    class DistillationSFTTrainer(DistillationMixin, SFTTrainer):
        pass
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, set_seed

from distillkit.errors import ConfigError
from distillkit.models import freeze
from distillkit.objective.objective import DistillationObjective
from distillkit.objective.taps import Taps, collect_taps
from distillkit.run.fused_logits import choose_output_layer
from distillkit.run.given_models import (
    base_model_of,
    check_models,
    model_task,
    objective_for_models,
    teachers_by_name,
)
from distillkit.run.model_card import write_model_card
from distillkit.run.trainer_parts import DistillationOutput, TermMeans, trainer_card

__all__ = ["DistillationMixin", "DistillationOutput", "DistillationTrainer"]

OBJECTIVE_STATE = "distillation_objective.safetensors"
"""The objective's learned parts and memory banks in each checkpoint folder."""

BATCH_KEYS = ("example_ids", "loss_mask", "shift_labels")
"""Batch columns the terms read that a model's forward does not take (kept by ``remove_unused_columns``)."""


class _ObjectiveEvents(TrainerCallback):
    """Tells the trainer's objective of optimizer steps and checkpoints."""

    def __init__(self, trainer: DistillationMixin) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.after_optimizer_step()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and folder.is_dir():
            self.trainer.save_objective_state(folder)


class DistillationMixin:
    """Turns a ``transformers.Trainer`` (subclass) into a distillation trainer; put it first in the bases.

    Args:
        *args: The trainer's own arguments (``model`` is the student).
        teacher: The teacher, or teacher name -> model (terms name theirs with ``teacher:``); frozen here.
        objective: The ``objective:`` list of a config as dicts (or YAML text), or a
            :class:`~distillkit.DistillationObjective`.
        fused_logits: ``auto``, ``always`` or ``never``: let logit-reading terms of causal LMs read the output
            layers instead of ``[tokens, vocab]`` logits (``train.fused_logits`` of a config run).
        shift_labels: Shift ``labels [B, T]`` left for next-token terms; None: for causal LM students.
        **kwargs: The trainer's own keyword arguments.

    Raises:
        ConfigError: For a bad objective, a missing teacher, a teacher with another vocabulary, or terms
            reading outputs the models cannot give, before training starts.

    """

    loss_is_scaled_for_ga = False  # a mean per micro-batch: the Trainer divides it by the accumulation steps

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | Mapping[str, nn.Module] | None = None,
        objective: DistillationObjective | Sequence[Mapping[str, Any]] | str | None = None,
        fused_logits: str = "auto",
        shift_labels: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if objective is None:
            raise ConfigError("a DistillationTrainer needs objective=[{'loss': 'kd', ...}, ...]")
        if fused_logits not in ("auto", "always", "never"):
            raise ConfigError(f"fused_logits must be auto, always or never, got {fused_logits!r}")
        super().__init__(*args, **kwargs)
        student = self.model
        examples = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        set_seed(self.args.seed)  # the learned parts start as in `distillkit distill` with this seed
        self.objective = objective_for_models(objective, student, teacher, examples)
        self.teachers = teachers_by_name(teacher, self.objective.default_teacher)
        check_models(self.objective, student, self.teachers)
        self.objective.prepare_models(student, self.teachers, announce=self.is_world_process_zero())
        self.teachers = {name: freeze(model).to(self.args.device) for name, model in self.teachers.items()}
        self.objective.to(self.args.device)
        if any(True for _ in self.objective.parameters()) and (
            self.is_deepspeed_enabled or self.is_fsdp_enabled
        ):
            raise ConfigError(
                "the objective has learned parts (projections), which DeepSpeed and FSDP do not shard; train "
                "with DDP, or use terms without projections (projection: never, equal hidden sizes)"
            )
        self.fused_logits = fused_logits
        found = model_task(student)
        self.shift_labels = (
            (found is not None and found[0] == "causal_lm") if shift_labels is None else shift_labels
        )
        self.teacher_metrics: dict[str, float] = {}
        self._output_layer_decided = False
        self._train_terms, self._eval_terms = TermMeans(), TermMeans()
        self.add_callback(_ObjectiveEvents(self))

    # -- the loss ------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, DistillationOutput]:
        """The objective's weighted total on one micro-batch (its terms are logged as ``loss_<term>``)."""
        batch = self.distillation_batch(inputs)
        self._decide_output_layer(model, batch)
        with self.accelerator.autocast():
            teacher = self.teacher_taps(batch)
            student = self.student_taps(model, batch)
            output = self.objective(student, teacher, batch)
        if model.training:
            self._train_terms.add(output, 1.0 / getattr(self, "current_gradient_accumulation_steps", 1))
        else:
            self._eval_terms.add(output, float(batch["input_ids"].shape[0]) if "input_ids" in batch else 1.0)
            self.objective.skip_step()  # an evaluation batch must not reach a memory bank
        if return_outputs:
            return output.total, DistillationOutput(loss=output.total, logits=student.logits)
        return output.total

    def distillation_batch(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The batch the terms read: labels as next-token labels for causal LMs (see ``shift_labels``)."""
        batch = dict(inputs)
        if "shift_labels" in batch:
            batch["labels"] = batch.pop("shift_labels")
        elif (
            self.shift_labels and isinstance(batch.get("labels"), torch.Tensor) and batch["labels"].dim() == 2
        ):
            labels = batch["labels"]
            shifted = torch.full_like(labels, -100)
            shifted[:, :-1] = labels[:, 1:]
            batch["labels"] = shifted
        return batch

    def teacher_taps(self, batch: Mapping[str, Any]) -> dict[str, Taps] | None:
        """Each teacher's taps (frozen, ``no_grad``); a teacher no term reads does not run."""
        taps = {}
        for name, request in self.objective.teacher_requests().items():
            if request.needs_forward:
                with torch.no_grad():
                    taps[name] = collect_taps(self.teachers[name], batch, request)
        return taps or None

    def student_taps(self, model: nn.Module, batch: Mapping[str, Any]) -> Taps:
        """The student's taps, through the model as the Trainer wrapped it (module paths: the student's)."""
        request = self.objective.tap_requests()[0]
        student = self.accelerator.unwrap_model(model)
        if student is model or not request.modules:
            return collect_taps(model, batch, request)
        prefix = next(name for name, module in model.named_modules() if module is student) + "."
        wrapped = dataclasses.replace(request, modules=tuple(prefix + path for path in request.modules))
        taps = collect_taps(model, batch, wrapped)
        taps.modules = {path: taps.modules[prefix + path] for path in request.modules}
        return taps

    def _decide_output_layer(self, model: nn.Module, batch: Mapping[str, Any]) -> None:
        """Once, on the first batch: whether logit-reading terms read the output layers instead."""
        if self._output_layer_decided:
            return
        self._output_layer_decided = True
        mode = self.fused_logits
        student = self.accelerator.unwrap_model(model)
        if mode != "never" and (student is not model or base_model_of(student) is not student):
            if mode == "always":
                raise ConfigError(
                    "fused_logits='always' needs the student run as it is; a wrapped (DDP) or adapter "
                    "student runs through its own forward: use fused_logits='auto' or 'never'"
                )
            mode = "never"
        choose_output_layer(mode, self.objective, student, self.teachers, batch, self.is_world_process_zero())

    # -- the optimizer ---------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus the objective's learned parts (weight decay on their matrices)."""
        optimizer = super().create_optimizer(model)
        heads = [p for p in self.objective.parameters() if p.requires_grad]
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in heads if id(p) not in present]
        if not missing:
            return optimizer
        if self.lr_scheduler is not None:
            raise ConfigError(
                "the optimizer and scheduler given to the trainer do not hold the objective's learned parts; "
                "add trainer.objective.parameters() to the optimizer, or let the trainer create both"
            )
        decay = set(self.get_decay_parameter_names(self.objective))
        wanted = {id(p) for p in missing}
        named = [(n, p) for n, p in self.objective.named_parameters() if id(p) in wanted]
        for weight_decay, params in (
            (self.args.weight_decay, [p for n, p in named if n in decay]),
            (0.0, [p for n, p in named if n not in decay]),
        ):
            if params:
                optimizer.add_param_group({"params": params, "weight_decay": weight_decay})
        return optimizer

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The Trainer's step; across processes, the objective's gradients are averaged like the student's."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            for param in self.objective.parameters():
                if param.grad is not None:
                    param.grad.copy_(self.accelerator.reduce(param.grad, reduction="mean"))
        return loss

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        heads = [p for p in self.objective.parameters() if p.requires_grad]
        if not heads:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *heads], self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        heads = [p for p in self.objective.parameters() if p.requires_grad]
        if grad_norm is None and heads:
            grad_norm = self.accelerator.clip_grad_norm_([*model.parameters(), *heads], float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def after_optimizer_step(self) -> None:
        """After each optimizer step: the terms update their state (or drop it if the step was skipped)."""
        if self.accelerator.optimizer_step_was_skipped:
            self.objective.skip_step()
        else:
            self.objective.after_step()
        self.objective.zero_grad(set_to_none=True)

    # -- logs ------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds each term's mean over the window: ``loss_<term>`` (training), ``<prefix>_loss_<term>``."""
        if "loss" in logs:
            logs.update({f"loss_{k}": v for k, v in self._train_terms.pop(self.accelerator).items()})
        else:
            prefix = next((key[: -len("_loss")] for key in logs if key.endswith("_loss")), None)
            if prefix is not None:
                means = self._eval_terms.pop(self.accelerator)
                logs.update({f"{prefix}_loss_{k}": v for k, v in means.items()})
        super().log(logs, *args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's ``evaluate``, with ``<prefix>_loss_<term>`` for each term over these batches only."""
        self._eval_terms = TermMeans()
        return super().evaluate(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            key for key in BATCH_KEYS if key not in self._signature_columns
        ]

    # -- checkpoints and saving -----------------------------------------------------------------------------
    def save_objective_state(self, folder: str | Path) -> None:
        """Writes the objective's learned parts and memory banks into a checkpoint folder."""
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.objective.state_dict().items()}
        if state:
            save_file(state, str(Path(folder) / OBJECTIVE_STATE))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """The Trainer's ``train``; resuming also restores the objective's learned parts and memory banks."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        if isinstance(folder, (str, Path)) and self.objective.state_dict():
            path = Path(folder) / OBJECTIVE_STATE
            if path.exists():
                self.objective.load_state_dict(load_file(str(path), device=str(self.args.device)))
            else:
                warnings.warn(
                    f"{folder} holds no {OBJECTIVE_STATE}: the objective's learned parts start afresh",
                    stacklevel=2,
                )
        self._train_terms = (
            TermMeans()
        )  # like the Trainer's own loss: nothing carries over from a former call
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the student (``from_pretrained`` loads it) with its model card (``README.md``)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        output_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Writes the student's card into ``output_dir`` (default ``args.output_dir``).

        The teacher is the ``base_model`` (``finetuned_from`` overrides it); the card names the objective,
        the data and the last evaluation's metrics next to :attr:`teacher_metrics` (set them from an
        evaluation of the teacher).
        """
        if not self.is_world_process_zero():
            return
        folder = Path(output_dir or self.args.output_dir)
        write_model_card(
            folder,
            trainer_card(
                self, model_name or folder.resolve().name, finetuned_from, dataset or dataset_tags, tags
            ),
        )


class DistillationTrainer(DistillationMixin, Trainer):
    """A ``transformers.Trainer`` that distils ``teacher`` into ``model`` with a distillkit objective.

    Takes every ``Trainer`` argument plus ``teacher``, ``objective``, ``fused_logits`` and ``shift_labels``
    (see :class:`DistillationMixin`).
    """
