"""One objective term of a config: ``{loss: name, weight: w, name: label, teacher: t, **params}``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from distillkit.config.errors import format_validation_error
from distillkit.errors import ConfigError


class TermConfig(BaseModel):
    """One objective term: ``{loss: name, weight: w, name: label, teacher: t, **params}``.

    Every key other than ``loss``, ``weight``, ``name``, ``teacher``, ``teacher_weights`` and ``teacher_mix``
    is a parameter of the loss, validated by the loss's own ``Params`` model when the term is built.

    Attributes:
        teacher: The teacher the term reads (a name of ``teachers:``, or ``teacher``, the default), or a
            list of names whose logits are mixed into one teacher (logit-reading terms only).
        teacher_weights: Mixing weights of a list of teachers (normalised; default equal).
        teacher_mix: ``probabilities``: the mixed teacher's distribution is ``Σ w_i·softmax(z_i/T)`` (``T``
            the term's ``temperature``, 1 when it has none); ``logits``: its logits are ``Σ w_i·z_i``.
    """

    model_config = ConfigDict(extra="allow")

    loss: str
    weight: float = 1.0
    name: str | None = None
    teacher: str | list[str] | None = None
    teacher_weights: list[float] | None = None
    teacher_mix: Literal["probabilities", "logits"] = "probabilities"

    def params(self) -> dict[str, Any]:
        """Returns the loss parameters (the keys other than the term-level ones)."""
        return dict(self.model_extra or {})

    def teacher_names(self, default: str = "teacher") -> tuple[str, ...]:
        """The teachers this term reads: ``teacher`` as a tuple, or ``(default,)`` when not given."""
        if self.teacher is None:
            return (default,)
        return (self.teacher,) if isinstance(self.teacher, str) else tuple(self.teacher)

    @model_validator(mode="after")
    def _teachers_and_weights_agree(self) -> TermConfig:
        names = self.teacher_names()
        if not names or len(set(names)) != len(names):
            raise ValueError(f"teacher must name distinct teachers, got {self.teacher!r}")
        if self.teacher_weights is not None:
            if len(self.teacher_weights) != len(names) or len(names) < 2:
                raise ValueError(
                    f"teacher_weights needs one weight per teacher of a term with several teachers "
                    f"(teachers {list(names)}, weights {self.teacher_weights})"
                )
            if any(w < 0 for w in self.teacher_weights) or sum(self.teacher_weights) <= 0:
                raise ValueError(
                    f"teacher_weights must be >= 0 with a positive sum, got {self.teacher_weights}"
                )
        return self

    def mix_weights(self) -> tuple[float, ...]:
        """The normalised weights of the term's teachers (equal when ``teacher_weights`` is not given)."""
        names = self.teacher_names()
        raw = self.teacher_weights or [1.0] * len(names)
        total = float(sum(raw))
        return tuple(float(w) / total for w in raw)


def parse_term_configs(specs: Sequence[TermConfig | Mapping[str, Any]]) -> list[TermConfig]:
    """Validates a list of term specs.

    Args:
        specs: Term configs or plain mappings.

    Returns:
        The validated term configs.

    Raises:
        ConfigError: When an entry is not a mapping or lacks ``loss``.

    """
    configs = []
    for index, spec in enumerate(specs):
        if isinstance(spec, TermConfig):
            configs.append(spec)
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"objective[{index}] must be a mapping like {{loss: kd, weight: 1.0}}, got {spec!r}"
            )
        try:
            configs.append(TermConfig.model_validate(dict(spec)))
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, TermConfig).replace("field '", f"field 'objective.{index}.")
            ) from None
    return configs
