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

Several teachers: each term reads one named teacher (``teacher: name`` in its config, ``teacher`` by
default) and is built for that teacher's sizes (``dims`` maps names to :class:`ModelDims`); the forward pass
takes ``{name: teacher_output}``. A term may also read a weighted mix of several teachers' logits::

    objective = DistillationObjective.from_config(
        [{"loss": "kd", "teacher": ["teacher", "wide"], "teacher_weights": [0.7, 0.3]},
         {"loss": "l2", "teacher": "wide"}],
        {"teacher": dims_a, "wide": dims_b},
    )
    out = objective(student_output, {"teacher": output_a, "wide": output_b}, batch)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distillkit.config import TermConfig, parse_term_configs
from distillkit.errors import ConfigError, LossTermError
from distillkit.objective.model_access import prepare_model
from distillkit.objective.taps import NOTHING, TapRequest, Taps
from distillkit.objective.teachers import (
    DEFAULT_TEACHER,
    TermTeachers,
    teacher_taps_by_name,
    teacher_taps_for,
)
from distillkit.objective.terms import LossTerm, ModelDims, TaskInfo
from distillkit.registry import get_loss


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
        teachers: Which teacher(s) each term reads, one per term (default: every term reads ``teacher``).

    """

    def __init__(
        self,
        terms: Sequence[tuple[LossTerm, float]],
        labels: Sequence[str] | None = None,
        teachers: Sequence[TermTeachers] | None = None,
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("an objective needs at least one loss term")
        labels = list(labels) if labels is not None else _unique_labels([t.name for t, _ in terms])
        if len(labels) != len(terms) or len(set(labels)) != len(labels):
            raise ValueError(f"term labels must be unique, one per term; got {labels}")
        self.terms = nn.ModuleDict({label: term for label, (term, _) in zip(labels, terms, strict=True)})
        self.dims = terms[0][0].dims
        self.weights = {label: float(weight) for label, (_, weight) in zip(labels, terms, strict=True)}
        teachers = list(teachers) if teachers is not None else [TermTeachers()] * len(terms)
        if len(teachers) != len(terms):
            raise ValueError(f"one TermTeachers per term: {len(terms)} terms, {len(teachers)} given")
        self.term_teachers = dict(zip(labels, teachers, strict=True))
        for label, term in self.terms.items():
            reads = term.tap_requests()[1]
            if len(self.term_teachers[label].names) > 1 and (
                reads.hidden_states or reads.attentions or reads.modules
            ):
                names = list(self.term_teachers[label].names)
                raise ConfigError(
                    f"objective term '{label}' mixes teachers {names}, but it "
                    f"reads {reads.describe()} of the teacher; only logits can be mixed: give it one teacher"
                )
        self.output_layer = False
        used = list(dict.fromkeys(n for t in teachers for n in t.names))
        self.default_teacher = used[0] if len(used) == 1 else DEFAULT_TEACHER
        for label, term in self.terms.items():
            if self.term_teachers[label].names[0] == self.default_teacher:
                self.dims = term.dims
                break

    @classmethod
    def from_config(
        cls, specs: Sequence[TermConfig | Mapping[str, Any]], dims: ModelDims | Mapping[str, ModelDims]
    ) -> DistillationObjective:
        """Builds the objective from term configs (the ``objective:`` list of a YAML config).

        Args:
            specs: Each ``{loss: name, weight: w, name: optional label, teacher: name, **params}``.
            dims: Student and teacher sizes; with several teachers, teacher name -> sizes (each term is
                built for its own teacher's sizes: layer maps, projections, banks).

        Returns:
            The objective.

        Raises:
            ConfigError: For a term naming a teacher ``dims`` does not have, or a bad parameter.

        """
        configs = parse_term_configs(specs)
        labels = _unique_labels([c.name or c.loss for c in configs])
        by_teacher = dict(dims) if isinstance(dims, Mapping) else None
        default = next(iter(by_teacher)) if by_teacher and len(by_teacher) == 1 else DEFAULT_TEACHER
        terms, teachers = [], []
        for label, config in zip(labels, configs, strict=True):
            names = config.teacher_names(default)
            if by_teacher is not None and names[0] not in by_teacher:
                raise ConfigError(
                    f"objective term '{label}' reads teacher '{names[0]}', which is not defined; teachers: "
                    f"{', '.join(by_teacher)}"
                )
            if by_teacher is None and config.teacher is not None and names != (DEFAULT_TEACHER,):
                raise ConfigError(
                    f"objective term '{label}' names teacher {config.teacher!r}; pass the sizes of every "
                    "teacher (dims as {name: ModelDims})"
                )
            term_dims = by_teacher[names[0]] if by_teacher is not None else dims
            teachers.append(TermTeachers(names, config.mix_weights(), config.teacher_mix))
            try:
                terms.append((build_term(config.loss, term_dims, **config.params()), config.weight))
            except ConfigError as exc:
                raise type(exc)(f"objective term '{label}': {exc}") from None
            except (ValueError, TypeError) as exc:  # a plugin's own construction check
                raise ConfigError(f"objective term '{label}' (loss '{config.loss}'): {exc}") from None
        return cls(terms, labels=labels, teachers=teachers)

    def forward(
        self, student_output: Any, teacher_output: Any, batch: Mapping[str, torch.Tensor] | None = None
    ) -> ObjectiveOutput:
        """Evaluates every term, each on its own teacher's taps.

        Args:
            student_output: The student's HF output (holding what the terms read of it: ``hidden_states``,
                ``attentions``, ``logits``) or its :class:`Taps`.
            teacher_output: The teacher's HF output or :class:`Taps` (None when no term reads the teacher),
                or, with several teachers, ``{name: output or Taps or None}``; detached here, so no gradient
                ever reaches a teacher.
            batch: The batch dict (``attention_mask``, ``labels``, ``example_ids``); used when outputs are
                given rather than taps.

        Returns:
            The weighted total and each term's value.

        Raises:
            MissingOutputError: When a model output lacks what a term reads of it (naming the output, the
                term and how to ask the model for it).
            LossTermError: When a term raises.

        """
        student = (
            student_output
            if isinstance(student_output, Taps)
            else Taps.from_output(student_output, batch, self.readers(None), "the student")
        )
        by_name = teacher_taps_by_name(teacher_output, batch, self.default_teacher, self.readers)
        values: dict[str, torch.Tensor] = {}
        total = None
        for label, term in self.terms.items():
            teacher = teacher_taps_for(
                term, self.term_teachers[label], by_name, batch, _describe_term(label, term)
            )
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

    def readers(self, teacher: str | None) -> dict[str, TapRequest]:
        """Who reads what of one model: ``objective term 'l2' (loss 'l2')`` -> its request of it.

        Args:
            teacher: A teacher's name, or None for the student.

        """
        return {
            f"objective term '{label}' (loss '{term.name}')": term.tap_requests()[0 if teacher is None else 1]
            for label, term in self.terms.items()
            if teacher is None or teacher in self.term_teachers[label].names
        }

    def tap_requests(self) -> tuple[TapRequest, TapRequest]:
        """The union of the terms' requests: what the student and the teachers (united) produce per batch.

        :meth:`teacher_requests` gives each teacher's own.
        """
        student, teacher = NOTHING, NOTHING
        for term in self.terms.values():
            reads_student, reads_teacher = term.tap_requests()
            student, teacher = student | reads_student, teacher | reads_teacher
        return self._as_run(student), self._as_run(teacher)

    def _as_run(self, request: TapRequest) -> TapRequest:
        """``request`` as the models are asked for it: the output layer in place of logits once switched."""
        return request.logits_as_output_layer() if self.output_layer else request

    def teacher_requests(self) -> dict[str, TapRequest]:
        """Teacher name -> the union of what the terms reading it request.

        A teacher no term reads is absent or asks for nothing, and does not run.
        """
        requests: dict[str, TapRequest] = {}
        for label, term in self.terms.items():
            reads = term.tap_requests()[1]
            for name in self.term_teachers[label].names:
                requests[name] = requests.get(name, NOTHING) | reads
        return {name: self._as_run(request) for name, request in requests.items()}

    def logit_readers(self) -> dict[str, Any]:
        """Who reads logits: ``{"terms": labels, "student": bool, "teachers": names}``."""
        terms, student, teachers = [], False, []
        for label, term in self.terms.items():
            reads_student, reads_teacher = term.tap_requests()
            if reads_student.logits or reads_teacher.logits:
                terms.append(label)
            student = student or reads_student.logits
            if reads_teacher.logits:
                teachers += [n for n in self.term_teachers[label].names if n not in teachers]
        return {"terms": terms, "student": student, "teachers": teachers}

    def output_layer_blocker(self) -> str | None:
        """Why the terms cannot read the models' output layers in place of logits, or None when they can.

        They can when some term reads logits and every such term declares ``reads_output_layer`` and reads
        one teacher (mixed teachers' logits need the logits).
        """
        readers = self.logit_readers()["terms"]
        if not readers:
            return "no objective term reads logits"
        for label in readers:
            term = self.terms[label]
            if not term.reads_output_layer:
                return (
                    f"objective term '{label}' (loss '{term.name}') reads logits and cannot read the "
                    "output layer"
                )
            if len(self.term_teachers[label].names) > 1:
                return f"objective term '{label}' mixes several teachers' logits"
        return None

    def read_output_layer(self, enabled: bool = True) -> None:
        """Has the models asked for their output layers in place of logits (see :mod:`.output_layer`).

        Raises:
            ValueError: When enabling it although :meth:`output_layer_blocker` gives a reason.

        """
        if enabled:
            reason = self.output_layer_blocker()
            if reason is not None:
                raise ValueError(f"the objective cannot read the output layers: {reason}")
        self.output_layer = enabled

    def teacher_layers(self, name: str) -> tuple[int, ...] | None:
        """The hidden-state layers of teacher ``name`` the terms read, or None when some term may read any.

        The union of :meth:`LossTerm.teacher_layers` over the terms reading that teacher.
        """
        layers: set[int] = set()
        for label, term in self.terms.items():
            if name not in self.term_teachers[label].names:
                continue
            read = term.teacher_layers()
            if read is None:
                return None
            layers.update(int(index) for index in read)
        return tuple(sorted(layers))

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

    def prepare_models(
        self,
        student: nn.Module,
        teacher: nn.Module | Mapping[str, nn.Module | None] | None,
        announce: bool = True,
    ) -> None:
        """Checks the models can give what the terms read, before the first step.

        Module paths are looked up (an error names the term and nearby module names); a model some term
        reads attention probabilities of is switched to eager attention without attention-probability
        dropout (so rows sum to 1), said once when ``announce``.

        Args:
            student: The student.
            teacher: The teacher, or teacher name -> model (None for one read from a cache).
            announce: Print the switch to eager attention.

        Raises:
            ConfigError: For a module path a model does not have, or a model that cannot return attentions.

        """
        teachers = dict(teacher) if isinstance(teacher, Mapping) else {self.default_teacher: teacher}
        models = [("student", None, student)]
        for name, model in teachers.items():
            models.append(("teacher" if name == DEFAULT_TEACHER else f"teacher '{name}'", name, model))
        for role, name, model in models:
            if model is None:
                continue
            readers = {
                label: term.tap_requests()[0 if name is None else 1]
                for label, term in self.terms.items()
                if name is None or name in self.term_teachers[label].names
            }
            prepare_model(model, role, readers, announce)

    def terms_reading(self, side: str) -> list[str]:
        """Labels of the terms that read ``side`` (``student`` or ``teacher``), for messages."""
        index = 0 if side == "student" else 1
        return [label for label, term in self.terms.items() if term.tap_requests()[index].needs_forward]

    @property
    def wants_warm_start(self) -> bool:
        """Whether some term asks for a warm-up pass over the training data before the first step."""
        return any(term.wants_warm_start for term in self.terms.values())

    def warm_start_request(self) -> TapRequest:
        """What the student is asked for in the warm-up pass: the union of the warming terms' requests."""
        request = NOTHING
        for term in self.terms.values():
            if term.wants_warm_start:
                request = request | term.tap_requests()[0]
        return self._as_run(request)

    def warm_start(
        self, student: Taps, teacher_output: Any, batch: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Hands one batch of the warm-up pass to every term that asked for it, each with its teacher's taps.

        Args:
            student: The student's taps (:meth:`warm_start_request`).
            teacher_output: As in :meth:`forward`.
            batch: The batch dict.

        """
        by_name = teacher_taps_by_name(teacher_output, batch, self.default_teacher)
        for label, term in self.terms.items():
            if term.wants_warm_start:
                described = _describe_term(label, term)
                term.warm_start(
                    student, teacher_taps_for(term, self.term_teachers[label], by_name, batch, described)
                )

    def after_step(self) -> None:
        """Lets each term update its state after the optimizer step (memory banks)."""
        for term in self.terms.values():
            term.after_step()

    def skip_step(self) -> None:
        """Tells each term that the step was skipped: state collected for it must not be applied."""
        for term in self.terms.values():
            term.skip_step()


def _describe_term(label: str, term: LossTerm) -> str:
    from distillkit.plugin_manager import plugin_for_module

    plugin = plugin_for_module(type(term).__module__)
    where = (
        f"plugin '{plugin.name}' from {plugin.distribution} {plugin.version}"
        if plugin
        else "not from a plugin"
    )
    return f"loss term '{label}' (loss '{term.name}', {where})"
