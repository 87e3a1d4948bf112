"""The loss-term base class and the tensors every loss term receives.

A loss plugin subclasses :class:`LossTerm`, gives it a ``name`` and a pydantic ``Params`` model, and
implements :meth:`LossTerm.forward`. See ``examples/distillkit-cosine`` for a complete third-party loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from distillkit.errors import ConfigError, close_matches
from distillkit.mapping import LayerMapSpec, LayerPairs, resolve_layer_map


@dataclass
class Taps:
    """What a loss term may read of one model's forward pass on a batch.

    Attributes:
        hidden_states: Per-layer outputs ``[B, T, H]``; index 0 is the embedding output, ``i`` the output
            of transformer layer ``i`` (the Hugging Face ``output_hidden_states`` convention).
        logits: ``[B, C]`` for sequence classification or ``[B, T, V]`` for token-level heads, or None.
        attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding, or None (all tokens real).
        labels: ``[B]`` class labels (or ``[B, T]`` token labels, -100 ignored), or None.
        example_ids: ``[B]`` int64 dataset indices of the examples, or None. Index-keyed memory banks need
            them.

    """

    hidden_states: tuple[torch.Tensor, ...]
    logits: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    example_ids: torch.Tensor | None = None

    @classmethod
    def from_output(cls, output: Any, batch: dict[str, torch.Tensor] | None = None) -> Taps:
        """Builds taps from a Hugging Face model output and the batch that produced it.

        Args:
            output: A model output with ``hidden_states`` (run the model with
                ``output_hidden_states=True``) and optionally ``logits``.
            batch: The batch dict; ``attention_mask``, ``labels`` and ``example_ids`` are taken from it.

        Returns:
            The taps.

        """
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is None:
            raise ValueError(
                "the model output has no hidden_states: call the model with output_hidden_states=True"
            )
        batch = batch or {}
        return cls(
            hidden_states=tuple(hidden_states),
            logits=getattr(output, "logits", None),
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels"),
            example_ids=batch.get("example_ids"),
        )

    def token_mask(self) -> torch.Tensor:
        """Returns the attention mask as a float ``[B, T]`` tensor (all ones when there is none)."""
        reference = self.hidden_states[0]
        if self.attention_mask is None:
            return reference.new_ones(reference.shape[:2])
        return self.attention_mask.to(reference.dtype)


@dataclass(frozen=True)
class ModelDims:
    """The sizes of the two models a loss term is built for.

    Attributes:
        student_layers: Number of transformer layers of the student.
        teacher_layers: Number of transformer layers of the teacher.
        student_hidden: Hidden size of the student.
        teacher_hidden: Hidden size of the teacher.

    """

    student_layers: int
    teacher_layers: int
    student_hidden: int
    teacher_hidden: int

    @classmethod
    def from_configs(cls, student_config: Any, teacher_config: Any) -> ModelDims:
        """Reads the sizes from two Hugging Face model configs."""
        return cls(
            student_layers=int(student_config.num_hidden_layers),
            teacher_layers=int(teacher_config.num_hidden_layers),
            student_hidden=int(student_config.hidden_size),
            teacher_hidden=int(teacher_config.hidden_size),
        )

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module) -> ModelDims:
        """Reads the sizes from two Hugging Face models."""
        return cls.from_configs(student.config, teacher.config)


class LossParams(BaseModel):
    """Base of every loss's parameter model; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LossTerm(nn.Module):
    """A distillation loss term: one plugin-provided piece of the objective.

    Subclasses set ``name`` (the config name) and ``Params`` (a :class:`LossParams` subclass), and implement
    :meth:`forward`. Learned parts (projections, heads) are submodules, so the objective's parameters include
    them. State that changes after the optimizer step (memory banks) is updated in :meth:`after_step`. A
    term that reads nothing of the teacher sets ``uses_teacher = False``; when no term of an objective uses
    it, the training loop skips the teacher's forward pass.

    Args:
        params: The validated parameters.
        dims: The student's and teacher's sizes.

    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[LossParams]] = LossParams
    uses_teacher: ClassVar[bool] = True

    def __init__(self, params: LossParams, dims: ModelDims) -> None:
        super().__init__()
        self.params = params
        self.dims = dims

    @classmethod
    def parse_params(cls, raw: dict[str, Any]) -> LossParams:
        """Validates raw parameters against ``Params``.

        Args:
            raw: Parameter name -> value, e.g. from YAML.

        Returns:
            The validated parameters.

        Raises:
            ConfigError: Naming the loss, the bad parameter and the accepted ones.

        """
        accepted = list(cls.Params.model_fields)
        unknown = [key for key in raw if key not in accepted]
        if unknown:
            key = unknown[0]
            raise ConfigError(
                f"loss '{cls.name}' does not accept parameter '{key}'{close_matches(key, accepted)}. "
                f"Accepted parameters: {', '.join(accepted) or 'none'}."
            )
        try:
            return cls.Params(**raw)
        except ValidationError as exc:
            problems = "; ".join(_describe_error(err) for err in exc.errors())
            raise ConfigError(f"loss '{cls.name}': invalid parameters: {problems}") from None

    @classmethod
    def describe_params(cls) -> list[tuple[str, str, Any]]:
        """Returns ``(name, type, default)`` for each parameter, for ``distillkit losses``."""
        rows = []
        for field_name, field in cls.Params.model_fields.items():
            default = "required" if field.is_required() else field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump()
            rows.append((field_name, _type_name(field.annotation), default))
        return rows

    def layer_pairs(self, spec: LayerMapSpec) -> LayerPairs:
        """Resolves a layer-map spec against this term's models (see :mod:`distillkit.mapping`)."""
        return resolve_layer_map(spec, self.dims.student_layers, self.dims.teacher_layers)

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the term.

        Args:
            student: The student's taps (with gradients).
            teacher: The teacher's taps (no gradients).

        Returns:
            A scalar loss.

        """
        raise NotImplementedError

    def after_step(self) -> None:
        """Updates state after the optimizer step (e.g. enqueue teacher keys into a memory bank)."""


def _describe_error(err: Any) -> str:
    """Formats one pydantic error as ``field: message (got value)``, or the message alone for a model check."""
    if not err["loc"]:
        return err["msg"].removeprefix("Value error, ")
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"


def _type_name(annotation: Any) -> str:
    """Formats a parameter annotation for people: ``auto|always|never``, ``int | None``, ``layer map``."""
    if annotation is LayerMapSpec:
        return "layer map"
    origin = get_origin(annotation)
    if origin is Literal:
        return "|".join(str(arg) for arg in get_args(annotation))
    if origin in (Union, UnionType):
        return " | ".join(_type_name(arg) for arg in get_args(annotation))
    if isinstance(annotation, type):
        return "None" if annotation is type(None) else annotation.__name__
    return str(annotation).replace("typing.", "")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Averages token vectors over real tokens.

    Args:
        hidden: ``[B, T, H]``.
        mask: ``[B, T]`` float, 1 for real tokens.

    Returns:
        ``[B, H]``; rows with no real token are zero.

    """
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
