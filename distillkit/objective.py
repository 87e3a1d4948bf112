"""The distillation objective: a weighted sum of loss terms built from config or from Python.

Example::

    objective = DistillationObjective.from_config(
        [{"loss": "kd", "weight": 1.0, "temperature": 2.0}, {"loss": "l2", "weight": 0.5}],
        ModelDims.from_models(student, teacher),
    )
    out = objective(student_output, teacher_output, batch)
    out.total.backward()
    optimizer.step()
    objective.after_step()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distillkit.config import TermConfig, parse_term_configs
from distillkit.errors import ConfigError, LossTermError
from distillkit.losses import LossTerm, ModelDims, TaskInfo
from distillkit.registry import get_loss
from distillkit.taps import NOTHING, TapRequest, Taps, find_module, use_eager_attention


@dataclass
class ObjectiveOutput:
    """The result of one objective evaluation.

    Attributes:
        total: Scalar ``Σ weight · term``, differentiable.
        terms: Term label -> unweighted scalar value (differentiable).

    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]

    def detached(self) -> dict[str, float]:
        """Returns ``{"total": ..., label: ...}`` as Python floats, for logging."""
        values = {"total": float(self.total.detach())}
        values.update({label: float(value.detach()) for label, value in self.terms.items()})
        return values


def build_term(loss: str, dims: ModelDims, **params: Any) -> LossTerm:
    """Builds one registered loss term by name.

    Args:
        loss: The registered loss name, e.g. ``"kd"``.
        dims: Student and teacher sizes.
        **params: The loss's parameters.

    Returns:
        The constructed term.

    Raises:
        UnknownLossError: If no plugin registers ``loss``.
        ConfigError: If a parameter is unknown or invalid.

    """
    cls = get_loss(loss).cls
    return cls(cls.parse_params(params), dims)


def _unique_labels(names: Sequence[str]) -> list[str]:
    labels: list[str] = []
    for name in names:
        label, suffix = name, 1
        while label in labels:
            suffix += 1
            label = f"{name}_{suffix}"
        labels.append(label)
    return labels


class DistillationObjective(nn.Module):
    """Combines loss terms with weights: ``total = Σ weight_i · term_i``.

    Args:
        terms: ``(term, weight)`` pairs.
        labels: One label per term for logging; defaults to the loss names, made unique (``l2``, ``l2_2``).

    """

    def __init__(self, terms: Sequence[tuple[LossTerm, float]], labels: Sequence[str] | None = None) -> None:
        super().__init__()
        if not terms:
            raise ValueError("an objective needs at least one loss term")
        labels = list(labels) if labels is not None else _unique_labels([t.name for t, _ in terms])
        if len(labels) != len(terms) or len(set(labels)) != len(labels):
            raise ValueError(f"term labels must be unique, one per term; got {labels}")
        self.terms = nn.ModuleDict({label: term for label, (term, _) in zip(labels, terms, strict=True)})
        self.dims = terms[0][0].dims
        self.weights = {label: float(weight) for label, (_, weight) in zip(labels, terms, strict=True)}

    @classmethod
    def from_config(
        cls, specs: Sequence[TermConfig | Mapping[str, Any]], dims: ModelDims
    ) -> DistillationObjective:
        """Builds the objective from term configs (the ``objective:`` list of a YAML config).

        Args:
            specs: Each ``{loss: name, weight: w, name: optional label, **params}``.
            dims: Student and teacher sizes.

        Returns:
            The objective.

        """
        configs = parse_term_configs(specs)
        labels = _unique_labels([c.name or c.loss for c in configs])
        terms = []
        for label, config in zip(labels, configs, strict=True):
            try:
                terms.append((build_term(config.loss, dims, **config.params()), config.weight))
            except ConfigError as exc:
                raise type(exc)(f"objective term '{label}': {exc}") from None
            except (ValueError, TypeError) as exc:  # a plugin's own construction check
                raise ConfigError(f"objective term '{label}' (loss '{config.loss}'): {exc}") from None
        return cls(terms, labels=labels)

    def forward(
        self, student_output: Any, teacher_output: Any, batch: Mapping[str, torch.Tensor] | None = None
    ) -> ObjectiveOutput:
        """Evaluates every term.

        Args:
            student_output: The student's HF output (with ``hidden_states``) or its :class:`Taps`.
            teacher_output: The teacher's HF output or :class:`Taps` (None when no term reads the teacher);
                detached here, so no gradient ever reaches the teacher.
            batch: The batch dict (``attention_mask``, ``labels``, ``example_ids``); used when outputs are
                given rather than taps.

        Returns:
            The weighted total and each term's value.

        """
        student = (
            student_output if isinstance(student_output, Taps) else Taps.from_output(student_output, batch)
        )
        if teacher_output is None:
            teacher = Taps.from_batch(batch)
        elif isinstance(teacher_output, Taps):
            teacher = teacher_output
        else:
            teacher = Taps.from_output(teacher_output, batch)
        teacher = teacher.detached()
        values: dict[str, torch.Tensor] = {}
        total = None
        for label, term in self.terms.items():
            try:
                value = term(student, teacher)
            except Exception as exc:
                raise LossTermError(
                    f"{_describe_term(label, term)} failed: {type(exc).__name__}: {exc}"
                ) from exc
            values[label] = value
            weighted = self.weights[label] * value
            total = weighted if total is None else total + weighted
        return ObjectiveOutput(total=total, terms=values)

    def tap_requests(self) -> tuple[TapRequest, TapRequest]:
        """The union of the terms' requests: what the student and the teacher must produce per batch."""
        student, teacher = NOTHING, NOTHING
        for term in self.terms.values():
            reads_student, reads_teacher = term.tap_requests()
            student, teacher = student | reads_student, teacher | reads_teacher
        return student, teacher

    @property
    def uses_teacher(self) -> bool:
        """Whether any term reads the teacher's outputs (if not, the teacher need not run)."""
        return self.tap_requests()[1].needs_forward

    def check_task(self, task: TaskInfo) -> None:
        """Refuses terms that cannot work on ``task``, naming the term (before any model loads).

        Raises:
            ConfigError: For the first term that cannot work on the task.

        """
        for label, term in self.terms.items():
            try:
                term.check_task(task)
            except ConfigError as exc:
                raise ConfigError(f"objective term '{label}': {exc}") from None

    def prepare_models(self, student: nn.Module, teacher: nn.Module | None, announce: bool = True) -> None:
        """Checks the models can give what the terms read, before the first step.

        Module paths are looked up (an error names the term and nearby module names); a model some term
        reads attention probabilities of is switched to eager attention, said once when ``announce``.

        Raises:
            ConfigError: For a module path a model does not have, or a model that cannot return attentions.

        """
        for index, (role, model) in enumerate((("student", student), ("teacher", teacher))):
            if model is None:
                continue
            readers = {label: term.tap_requests()[index] for label, term in self.terms.items()}
            for label, request in readers.items():
                for path in request.modules:
                    find_module(model, path, who=f"objective term '{label}' ({role})")
            attention_readers = [label for label, request in readers.items() if request.attentions]
            if attention_readers:
                who = f"objective term '{attention_readers[0]}'"
                if use_eager_attention(model, who) and announce:
                    print(
                        f"distillkit: the {role} runs eager attention, since {', '.join(attention_readers)} "
                        "read(s) its attention probabilities"
                    )

    def terms_reading(self, side: str) -> list[str]:
        """Labels of the terms that read ``side`` (``student`` or ``teacher``), for messages."""
        index = 0 if side == "student" else 1
        return [label for label, term in self.terms.items() if term.tap_requests()[index].needs_forward]

    def after_step(self) -> None:
        """Lets each term update its state after the optimizer step (memory banks)."""
        for term in self.terms.values():
            term.after_step()

    def skip_step(self) -> None:
        """Tells each term that the step was skipped: state collected for it must not be applied."""
        for term in self.terms.values():
            term.skip_step()


def _describe_term(label: str, term: LossTerm) -> str:
    from distillkit.plugins import plugin_for_module

    plugin = plugin_for_module(type(term).__module__)
    where = (
        f"plugin '{plugin.name}' from {plugin.distribution} {plugin.version}"
        if plugin
        else "not from a plugin"
    )
    return f"loss term '{label}' (loss '{term.name}', {where})"
