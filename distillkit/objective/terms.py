"""The loss-term base class and the tensors every loss term receives.

A loss plugin subclasses :class:`LossTerm`, gives it a ``name`` and a pydantic ``Params`` model, and
implements :meth:`LossTerm.forward`. See ``examples/distillkit-cosine`` for a complete third-party loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from distillkit.errors import ConfigError, close_matches, quote_input
from distillkit.objective.mapping import LayerMapSpec, LayerPairs, resolve_layer_map
from distillkit.objective.taps import NOTHING, TapRequest, Taps

__all__ = [
    "HiddenStateParams",
    "HiddenStateTerm",
    "LossParams",
    "LossTerm",
    "ModelDims",
    "TaskInfo",
    "masked_mean",
    "student_projections",
]


@dataclass(frozen=True)
class TaskInfo:
    """What a task gives its loss terms, so a term that cannot work on it is refused before models load.

    Attributes:
        name: The task (``sequence_classification``, ``causal_lm``, ``masked_lm``, ``representation``).
        labels: ``class`` (``[B]``), ``token`` (``[B, T]``, -100 ignored) or None (unlabelled text).
        logits: ``class`` (``[B, C]``), ``token`` (``[B, T, V]``) or None (models without a head).

    """

    name: str
    labels: Literal["class", "token"] | None
    logits: Literal["class", "token"] | None


@dataclass(frozen=True)
class ModelDims:
    """The sizes of the two models a loss term is built for.

    Attributes:
        student_layers: Number of transformer layers of the student.
        teacher_layers: Number of transformer layers of the teacher.
        student_hidden: Hidden size of the student.
        teacher_hidden: Hidden size of the teacher.
        student_heads: Attention heads per layer of the student (None when unknown).
        teacher_heads: Attention heads per layer of the teacher (None when unknown).
        train_examples: Number of training examples (``example_ids`` run over ``0..N-1``), when known;
            index-keyed memory banks default to it.

    """

    student_layers: int
    teacher_layers: int
    student_hidden: int
    teacher_hidden: int
    student_heads: int | None = None
    teacher_heads: int | None = None
    train_examples: int | None = None

    @classmethod
    def from_configs(
        cls, student_config: Any, teacher_config: Any, train_examples: int | None = None
    ) -> ModelDims:
        """Reads the sizes from two Hugging Face model configs (no weights needed)."""
        heads = [getattr(c, "num_attention_heads", None) for c in (student_config, teacher_config)]
        return cls(
            student_layers=int(student_config.num_hidden_layers),
            teacher_layers=int(teacher_config.num_hidden_layers),
            student_hidden=int(student_config.hidden_size),
            teacher_hidden=int(teacher_config.hidden_size),
            student_heads=None if heads[0] is None else int(heads[0]),
            teacher_heads=None if heads[1] is None else int(heads[1]),
            train_examples=train_examples,
        )

    @classmethod
    def from_models(
        cls, student: nn.Module, teacher: nn.Module, train_examples: int | None = None
    ) -> ModelDims:
        """Reads the sizes from two Hugging Face models."""
        return cls.from_configs(student.config, teacher.config, train_examples)


class LossParams(BaseModel):
    """Base of every loss's parameter model; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LossTerm(nn.Module):
    """A distillation loss term: one plugin-provided piece of the objective.

    Subclasses set ``name`` (the config name) and ``Params`` (a :class:`LossParams` subclass), and implement
    :meth:`forward`. Learned parts (projections, heads) are submodules, so the objective's parameters include
    them. State that changes after the optimizer step (memory banks) is updated in :meth:`after_step`.

    What the core may ask of a term, and nothing else:

    - :meth:`tap_requests`: what it reads of the student and of its teacher (``student_reads`` /
      ``teacher_reads`` class attributes by default; ``uses_teacher = False`` means it reads no teacher).
      Each model runs once per batch and is asked only for what some term reads.
    - :meth:`teacher_layers`: which of the teacher's hidden-state layers it reads (a teacher cache stores
      only those); by default the teacher side of the layer maps it resolved with :meth:`layer_pairs`.
    - :meth:`teacher_logit_temperature`: the temperature its teacher logits are read at, so that several
      teachers' distributions can be mixed into the one it reads (``teacher: [a, b]``).
    - ``reads_output_layer``: it also works from ``Taps.output_hidden`` and ``Taps.output_weight`` when
      ``Taps.logits`` is None (the loop then never builds ``[B, T, V]`` logits); :meth:`reads_topk_teacher`:
      also from a teacher's ``Taps.topk_logits`` (a top-k teacher cache).
    - :meth:`check_task`: refuse a task it cannot work on, before any model loads.
    - ``cross_tokenizer`` / :meth:`check_cross_tokenizer`: whether it works when the student has another
      tokenizer than the teacher (each model then reads its own tokens of the same text), and
      :meth:`use_vocabularies`: the two vocabularies, for a term that matches tokens by their strings.
    - :meth:`after_step` / :meth:`skip_step`: state after an applied or a skipped optimizer step.

    Args:
        params: The validated parameters.
        dims: The student's and teacher's sizes.

    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[LossParams]] = LossParams
    uses_teacher: ClassVar[bool] = True
    reads_output_layer: ClassVar[bool] = False
    student_reads: ClassVar[TapRequest] = TapRequest(hidden_states=True, logits=True)
    teacher_reads: ClassVar[TapRequest] = TapRequest(hidden_states=True, logits=True)
    cross_tokenizer: ClassVar[bool] = False
    """The term works when the student's tokenizer differs from the teacher's: it compares the models on
    the text (pooled or sequence-level representations, or tokens aligned by their character spans), never
    position by position; terms that read no teacher work either way. :meth:`check_cross_tokenizer` may
    refuse some parameters (e.g. first-token pooling)."""

    def __init__(self, params: LossParams, dims: ModelDims) -> None:
        super().__init__()
        self.params = params
        self.dims = dims
        self._mapped_teacher_layers: set[int] = set()

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
        raw = _renamed_layer_map(cls.name, raw, accepted)
        unknown = [key for key in raw if key not in accepted]
        if unknown:
            key = unknown[0]
            raise ConfigError(
                f"loss '{cls.name}' does not accept parameter {quote_input(key)}"
                f"{close_matches(key, accepted)}. "
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
        """Resolves a layer-map spec against this term's models (see :mod:`distillkit.objective.mapping`).

        The teacher layers of the pairs are what :meth:`teacher_layers` reports by default.
        """
        pairs = resolve_layer_map(spec, self.dims.student_layers, self.dims.teacher_layers)
        self._mapped_teacher_layers.update(teacher for _, teacher in pairs)
        return pairs

    def teacher_layers(self) -> tuple[int, ...] | None:
        """The teacher hidden-state layers this term reads (0 = embeddings), or None for any layer.

        The default: ``()`` when the term reads no teacher hidden states; else the teacher side of every layer
        map resolved with :meth:`layer_pairs`; None when it reads teacher hidden states without one.
        Override when the term picks layers another way.
        """
        if not self.tap_requests()[1].hidden_states:
            return ()
        if not self._mapped_teacher_layers:
            return None
        return tuple(sorted(self._mapped_teacher_layers))

    def teacher_logit_temperature(self) -> float:
        """The temperature ``T`` at which this term reads teacher logits (softmax of ``z / T``).

        When the term reads a mix of several teachers, the mix is made at this temperature, so that the
        term's softmax of the mixed logits is exactly the weighted mean of the teachers' distributions. 1 by
        default; a term with a temperature parameter returns it.
        """
        return 1.0

    def reads_topk_teacher(self) -> bool:
        """Whether, reading output layers, it also works from a teacher read from a top-k cache.

        Such a teacher gives ``Taps.topk_logits`` (its top-k tokens and tail mass) in place of its output
        layer. False by default; ``kd`` says True for the divergences a top-k teacher serves.
        """
        return False

    def topk_logits_note(self) -> str | None:
        """Why this term is approximate when the teacher's logits come from a top-k cache, or None.

        A top-k cache (``teacher.cache_top_k``) keeps each token's k largest probabilities and spreads the
        remaining mass evenly over the other tokens (``docs/teachers.md``); the run prints the note once
        before training. The default says nothing; a term whose value depends on the tail overrides it.
        """
        return None

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

    @property
    def wants_warm_start(self) -> bool:
        """Whether the loop runs a warm-up pass over the training data before the first step.

        Every batch of it goes to :meth:`warm_start` (for memory banks that must hold every example before
        they are read).
        """
        return False

    def warm_start(self, student: Taps, teacher: Taps) -> None:
        """Takes one batch of the warm-up pass (no gradients, eval mode); see :attr:`wants_warm_start`.

        Args:
            student: The student's taps of the batch.
            teacher: The teacher's taps of the batch.

        """

    def prepare_benchmark(self) -> None:
        """Puts the term in a steady state before ``distillkit bench`` times it (e.g. fills memory banks)."""

    def skip_step(self) -> None:
        """Forgets what was collected for a step the loop skipped (a non-finite loss): nothing was applied."""

    def tap_requests(self) -> tuple[TapRequest, TapRequest]:
        """Returns what this term reads of the student and of the teacher."""
        return self.student_reads, (self.teacher_reads if self.uses_teacher else NOTHING)

    def check_task(self, task: TaskInfo) -> None:
        """Refuses a task this term cannot work on (called before any model loads).

        The default refuses logits on a task whose models have no head and labels on unlabelled data;
        override to add the term's own conditions (call ``super().check_task(task)``).

        Raises:
            ConfigError: Saying why the term cannot work on ``task``.

        """
        student, teacher = self.tap_requests()
        if (student.logits or teacher.logits) and task.logits is None:
            raise ConfigError(
                f"loss '{self.name}' reads logits, but the models of task '{task.name}' have no head; "
                "use a term on hidden states (l2, cosine, codir) or another task"
            )
        if student.labels and task.labels is None:
            raise ConfigError(
                f"loss '{self.name}' reads labels, but task '{task.name}' trains on unlabelled text"
            )

    def check_cross_tokenizer(self, task: TaskInfo) -> None:
        """Refuses to compare models that tokenise the text differently (called before any model loads).

        Each model then runs on its own tokens of the same text: ``T`` differs between the two models' taps,
        and token ``i`` of one is not token ``i`` of the other. The default accepts a term that declares
        ``cross_tokenizer`` or reads nothing of the teacher, and refuses every other one.

        Raises:
            ConfigError: Saying why the term cannot compare the two models across tokenizers.

        """
        if self.cross_tokenizer or not self.tap_requests()[1].needs_forward:
            return
        raise ConfigError(
            f"loss '{self.name}' compares the two models token by token, and their tokens differ"
        )

    def use_vocabularies(self, student: Mapping[str, int], teacher: Mapping[str, int]) -> None:
        """Receives the two vocabularies (token string -> id) before training; by default ignores them.

        Args:
            student: The student tokenizer's vocabulary.
            teacher: The teacher tokenizer's vocabulary (the same mapping when both models share it).

        """


def _renamed_layer_map(loss: str, raw: dict[str, Any], accepted: list[str]) -> dict[str, Any]:
    """Reads a layer map given under its former name ``layers`` as ``layer_map``, saying so once."""
    if "layers" not in raw or "layers" in accepted or "layer_map" not in accepted:
        return raw
    if "layer_map" in raw:
        raise ConfigError(f"loss '{loss}': give the layer map once, as layer_map (layers is its former name)")
    warnings.warn(
        f"loss '{loss}': the parameter `layers` is now `layer_map` (`layers` means a number of layers); "
        "rename it in the config",
        FutureWarning,
        stacklevel=4,
    )
    return {("layer_map" if key == "layers" else key): value for key, value in raw.items()}


def _describe_error(err: Any) -> str:
    """Formats a pydantic error as ``field: message (got value)``, or the message alone for a model check."""
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


def student_projections(
    loss: str, projection: str, pairs: LayerPairs, dims: ModelDims
) -> nn.ModuleList | None:
    """Learned maps of student hidden states to the teacher's width, one per layer pair (TinyBERT's ``W_h``).

    Args:
        loss: The loss name, for the error message.
        projection: ``auto`` (a map when the hidden sizes differ), ``always`` or ``never``.
        pairs: The term's ``(student, teacher)`` layer pairs.
        dims: The models' sizes.

    Returns:
        One ``Linear(H_s, H_t)`` per pair, or None when no map is used.

    Raises:
        ConfigError: For ``never`` with different hidden sizes.

    """
    differ = dims.student_hidden != dims.teacher_hidden
    if projection == "never" and differ:
        raise ConfigError(
            f"loss '{loss}' with projection: never needs equal hidden sizes (student {dims.student_hidden}, "
            f"teacher {dims.teacher_hidden}); use projection: auto"
        )
    if projection == "always" or (projection == "auto" and differ):
        return nn.ModuleList(nn.Linear(dims.student_hidden, dims.teacher_hidden) for _ in pairs)
    return None


class HiddenStateParams(LossParams):
    """Parameters of a :class:`HiddenStateTerm` (subclasses may change the defaults).

    Attributes:
        layer_map: ``uniform``, ``skip``, ``last`` or ``[[s, t], ...]`` (0 is the embedding output).
        projection: ``auto`` adds a learned linear map per pair when hidden sizes differ; ``always`` /
            ``never`` force it.

    """

    layer_map: LayerMapSpec = "uniform"
    projection: Literal["auto", "always", "never"] = "auto"


class HiddenStateTerm(LossTerm):
    """A term comparing mapped student and teacher hidden states, through a learned projection if needed.

    Builds ``pairs`` from ``params.layer_map`` and one ``Linear(H_s, H_t)`` per pair (``projections``, see
    :func:`student_projections`); :meth:`mapped_states` yields each pair's projected student states and the
    teacher's. Subclasses implement :meth:`forward` on top of it (``l2``, ``cosine``, ``pkd``).
    """

    Params = HiddenStateParams
    student_reads = TapRequest(hidden_states=True)
    teacher_reads = TapRequest(hidden_states=True)

    def __init__(self, params: HiddenStateParams, dims: ModelDims) -> None:
        super().__init__(params, dims)
        self.pairs = self.layer_pairs(params.layer_map)
        self.projections = student_projections(self.name, params.projection, self.pairs, dims)

    def mapped_states(
        self, student: Taps, teacher: Taps, select: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields ``(projected student states, teacher states)`` per layer pair.

        Args:
            student: Student taps; ``hidden_states[s]`` is ``[B, T, H_s]``.
            teacher: Teacher taps; ``hidden_states[t]`` is ``[B, T, H_t]``.
            select: Applied to both sides' states before the projection (e.g. ``lambda h: h[:, 0]`` for the
                first token); default: all of them.

        Yields:
            ``[..., H_t]`` student states mapped to the teacher's width and the teacher's ``[..., H_t]``.

        """
        for index, (s, t) in enumerate(self.pairs):
            hidden, target = student.hidden_states[s], teacher.hidden_states[t]
            if select is not None:
                hidden, target = select(hidden), select(target)
            if self.projections is not None:
                hidden = self.projections[index](hidden)
            yield hidden, target
