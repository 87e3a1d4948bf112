"""What a loss term reads of a model, and the one place that runs a model to get it.

A loss term declares, per model, a :class:`TapRequest` (hidden states, attention probabilities, logits, the
outputs of named submodules, the batch's labels). The objective unions its terms' requests;
:func:`collect_taps` runs a model once on a batch, asking it for exactly that, and returns the
:class:`Taps` every term of the objective receives.

Example (a plain ``nn.Module`` works too; module taps need no Hugging Face model)::

    request = TapRequest(hidden_states=True, modules=("bert.encoder.layer.1.attention.self.value",))
    taps = collect_taps(model, batch, request)
    taps.modules["bert.encoder.layer.1.attention.self.value"]   # [B, T, H]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from distillkit.errors import MissingOutputError
from distillkit.objective.model_access import record_modules
from distillkit.objective.output_layer import run_to_output_layer

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
"""Batch keys handed to a model's forward; every other key (labels, ids, masks) stays with the loss terms."""

TEACHER_PREFIX = "teacher_"
"""Prefix of the batch keys of the teacher's own token stream when the student has another tokenizer."""


def teacher_view(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """The batch as the teacher sees it: its own tokens when the student has another tokenizer.

    A cross-tokenizer batch carries the student's token stream under the usual keys (``input_ids``,
    ``attention_mask``, ``labels``, ``label_spans``...) and the teacher's, of the same text, under the same
    keys prefixed with ``teacher_``. The view has each ``teacher_X`` as ``X`` (replacing the student's) and
    the keys both share (``example_ids``) as they are. A batch without ``teacher_input_ids`` is its own view.

    Args:
        batch: A collated batch.

    Returns:
        The teacher's batch (the same object when there is only one token stream).

    """
    if TEACHER_PREFIX + "input_ids" not in batch:
        return batch
    view = {k: v for k, v in batch.items() if not k.startswith(TEACHER_PREFIX)}
    view.update({k[len(TEACHER_PREFIX) :]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)})
    return view


@dataclass(frozen=True)
class TapRequest:
    """What a loss term reads of one model's forward pass on a batch.

    Attributes:
        hidden_states: Per-layer hidden states (``Taps.hidden_states``).
        attentions: Per-layer attention probabilities (``Taps.attentions``); the model then runs with an
            attention implementation that returns them (eager).
        logits: The model's head output (``Taps.logits``).
        modules: Dotted paths of submodules whose outputs are recorded (``Taps.modules[path]``), e.g.
            ``bert.encoder.layer.3.attention.self.query``.
        labels: The batch's labels (``Taps.labels``); a task without labels refuses such a term.
        output_layer: The output layer's input and weight (``Taps.output_hidden``, ``Taps.output_weight``)
            in place of the logits they multiply to; the loop asks for it instead of ``logits`` when every
            term reading logits can work from them (see :mod:`distillkit.objective.output_layer`).

    """

    hidden_states: bool = False
    attentions: bool = False
    logits: bool = False
    modules: tuple[str, ...] = ()
    labels: bool = False
    output_layer: bool = False

    def __or__(self, other: TapRequest) -> TapRequest:
        return TapRequest(
            hidden_states=self.hidden_states or other.hidden_states,
            attentions=self.attentions or other.attentions,
            logits=self.logits or other.logits,
            modules=tuple(dict.fromkeys(self.modules + other.modules)),
            labels=self.labels or other.labels,
            output_layer=self.output_layer or other.output_layer,
        )

    @property
    def needs_forward(self) -> bool:
        """Whether the model has to run at all (labels alone come from the batch)."""
        return self.hidden_states or self.attentions or self.logits or self.output_layer or bool(self.modules)

    def logits_as_output_layer(self) -> TapRequest:
        """This request with ``logits`` replaced by ``output_layer`` (unchanged when it reads no logits)."""
        if not self.logits:
            return self
        return replace(self, logits=False, output_layer=True)

    def describe(self) -> str:
        """Lists what is read, for messages: ``hidden states, logits``."""
        parts = [
            name.replace("_", " ")
            for name in ("hidden_states", "attentions", "logits", "output_layer")
            if getattr(self, name)
        ]
        parts += [f"module '{path}'" for path in self.modules]
        return ", ".join(parts) or "nothing"


NOTHING = TapRequest()
"""The request of a term that does not read a model."""

HOW_TO_ASK = {
    "hidden_states": "call it with output_hidden_states=True",
    "attentions": (
        "call it with output_attentions=True, with eager attention (load it with attn_implementation='eager' "
        "or call model.set_attn_implementation('eager'): sdpa and flash attention return none)"
    ),
    "logits": "use a model with a head (e.g. AutoModelForSequenceClassification or AutoModelForCausalLM)",
}
"""A model output a term may read -> how to have a Hugging Face model return it."""


@dataclass(frozen=True)
class TopKLogits:
    """A token distribution as a top-k teacher cache stores it: ``k`` tokens per position and one tail bucket.

    ``distillkit.ops.fused_linear_divergence_topk`` takes the three tensors (flattened to rows) as they are.

    Attributes:
        index: ``[B, T, k]`` int64 ids of the ``k`` most probable tokens at each position, distinct.
        logp: ``[B, T, k]`` their log-probabilities (temperature 1).
        log_tail: ``[B, T]`` log of the probability mass of the other ``V − k`` tokens.

    """

    index: torch.Tensor
    logp: torch.Tensor
    log_tail: torch.Tensor


@dataclass
class Taps:
    """What a loss term may read of one model's forward pass on a batch.

    Only what some term of the objective requested is filled; the rest is empty (``()``, ``None``, ``{}``).

    Attributes:
        hidden_states: Per-layer outputs ``[B, T, H]``; index 0 is the embedding output, ``i`` the output
            of transformer layer ``i`` (the Hugging Face ``output_hidden_states`` convention).
        logits: ``[B, C]`` for sequence classification or ``[B, T, V]`` for token-level heads, or None.
        attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding, or None (all tokens real).
        labels: ``[B]`` class labels, ``[B, T]`` token labels (-100 ignored), or None.
        example_ids: ``[B]`` int64 dataset indices of the examples, or None. Index-keyed memory banks need
            them.
        attentions: Per-layer attention probabilities ``[B, heads, T, T]``; ``attentions[i - 1]`` is layer
            ``i`` (the Hugging Face convention), rows sum to 1 over real keys.
        modules: Submodule path -> its output on this batch (the first element when it returns a tuple).
        loss_mask: ``[B, T]`` bool, the positions the task's token-level loss counts (labels != -100), or
            None for sequence-level tasks.
        extras: Every other tensor of the batch, by key (nothing the data provides is dropped).
        output_hidden: ``[B, T, D]`` the input of the model's output layer (its last hidden state after the
            final norm), when the output layer was asked for in place of logits; else None.
        output_weight: ``[V, D]`` the output layer's weight (``logits = output_hidden @ output_weight.T``),
            with ``output_hidden``; else None.
        topk_logits: A teacher read from a top-k cache when the output layer was asked for: its distribution
            as :class:`TopKLogits`, in place of ``output_hidden`` and ``output_weight``; else None.

    """

    hidden_states: tuple[torch.Tensor, ...] = ()
    logits: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    example_ids: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] = ()
    modules: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_mask: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    output_hidden: torch.Tensor | None = None
    output_weight: torch.Tensor | None = None
    topk_logits: TopKLogits | None = None

    @classmethod
    def from_batch(cls, batch: Mapping[str, torch.Tensor] | None, **outputs: Any) -> Taps:
        """Builds taps of the batch's own tensors plus the given model outputs.

        Args:
            batch: The batch dict; ``attention_mask``, ``labels``, ``example_ids`` and ``loss_mask`` go to
                their fields, every other non-input key to ``extras``.
            **outputs: ``hidden_states``, ``logits``, ``attentions``, ``modules``, ``output_hidden``,
                ``output_weight``, ``topk_logits``.

        Returns:
            The taps.

        """
        batch = dict(batch or {})
        labels = batch.get("labels")
        loss_mask = batch.get("loss_mask")
        if loss_mask is None and labels is not None and labels.dim() == 2:
            loss_mask = labels != -100
        own = {"attention_mask", "labels", "example_ids", "loss_mask", *MODEL_INPUTS}
        return cls(
            attention_mask=batch.get("attention_mask"),
            labels=labels,
            example_ids=batch.get("example_ids"),
            loss_mask=loss_mask,
            extras={k: v for k, v in batch.items() if k not in own},
            **outputs,
        )

    @classmethod
    def from_output(
        cls,
        output: Any,
        batch: Mapping[str, torch.Tensor] | None = None,
        readers: Mapping[str, TapRequest] | None = None,
        who: str = "the model",
    ) -> Taps:
        """Builds taps from a Hugging Face model output and the batch that produced it.

        Args:
            output: A model output with ``hidden_states`` (``output_hidden_states=True``), ``logits`` and
                ``attentions`` (``output_attentions=True``) as far as the terms read them.
            batch: The batch dict.
            readers: Who reads what of this output (e.g. term -> its request); the output must hold all of
                it. None: it must hold hidden states.
            who: The model, for messages (``the student``).

        Returns:
            The taps.

        Raises:
            MissingOutputError: Naming the first missing output, who reads it and how to ask for it.

        """
        taps = _taps_from_output(output, batch, {})
        default = {"the objective": TapRequest(hidden_states=True)}
        check_outputs(taps, readers if readers is not None else default, who)
        return taps

    def token_mask(self) -> torch.Tensor:
        """Returns the attention mask as a float ``[B, T]`` tensor (all ones when there is none)."""
        if self.attention_mask is not None:
            return self.attention_mask.float()
        reference = next(
            (
                t
                for t in (*self.hidden_states, self.logits, self.output_hidden)
                if t is not None and t.dim() >= 2
            ),
            None,
        )
        if reference is None:
            raise ValueError("these taps hold no token-level tensor to take the sequence shape from")
        return reference.new_ones(reference.shape[:2], dtype=torch.float32)

    def position_mask(self) -> torch.Tensor:
        """Float ``[B, T]`` weights of the positions a token-level loss counts.

        The task's loss mask when it has one (masked positions for masked LM, positions with a next token
        for causal LM), else the attention mask.
        """
        if self.loss_mask is not None:
            return self.loss_mask.float()
        return self.token_mask()

    def detached(self) -> Taps:
        """Returns a copy whose model outputs are detached from the graph (the teacher's side)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["hidden_states"] = tuple(h.detach() for h in self.hidden_states)
        values["attentions"] = tuple(a.detach() for a in self.attentions)
        values["logits"] = None if self.logits is None else self.logits.detach()
        values["modules"] = {k: v.detach() for k, v in self.modules.items()}
        for name in ("output_hidden", "output_weight"):
            values[name] = None if values[name] is None else values[name].detach()
        return Taps(**values)


def collect_taps(model: nn.Module, batch: Mapping[str, torch.Tensor], request: TapRequest) -> Taps:
    """Runs ``model`` once on ``batch`` and returns the taps ``request`` asks for.

    Args:
        model: A Hugging Face model (or any module whose forward takes the batch's model inputs and
            returns a tensor or an object with ``logits``/``hidden_states``/``attentions``).
        batch: The batch; keys in :data:`MODEL_INPUTS` go to the model.
        request: What to collect.

    Returns:
        The taps; when ``request`` needs no forward pass the model is not run.

    Raises:
        ValueError: If the model does not return what was requested.

    """
    if not request.needs_forward:
        return Taps.from_batch(batch)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if request.hidden_states:
        inputs["output_hidden_states"] = True
    if request.attentions:
        inputs["output_attentions"] = True
    head: dict[str, torch.Tensor] = {}
    with record_modules(model, request.modules) as recorded:
        if request.output_layer:
            if request.logits:
                raise ValueError("a model is asked for logits or for its output layer, not both")
            output, head["output_hidden"], head["output_weight"] = run_to_output_layer(model, inputs)
        else:
            output = model(**inputs)
    taps = _taps_from_output(output, batch, recorded, **head)
    check_outputs(taps, {"a loss term": request}, type(model).__name__)
    return taps


def check_outputs(taps: Taps, readers: Mapping[str, TapRequest], who: str) -> None:
    """Checks that taps made from a model's output hold what each reader asks of that model.

    Args:
        taps: The taps.
        readers: Reader (e.g. ``objective term 'att' (loss 'attention')``) -> what it reads of this model.
        who: The model, for messages.

    Raises:
        MissingOutputError: For the first missing output: what is missing, who reads it, how to ask for it.

    """
    for kind in ("hidden_states", "attentions", "logits"):
        missing = taps.logits is None if kind == "logits" else not getattr(taps, kind)
        names = [name for name, request in readers.items() if getattr(request, kind)]
        if missing and names:
            reads = "reads" if len(names) == 1 else "read"
            raise MissingOutputError(
                f"{who}'s output has no {kind.replace('_', ' ')}, which {', '.join(names)} {reads}: "
                f"{HOW_TO_ASK[kind]}"
            )


def _taps_from_output(
    output: Any, batch: Mapping[str, torch.Tensor] | None, modules: dict, **head: torch.Tensor
) -> Taps:
    if isinstance(output, torch.Tensor):
        return Taps.from_batch(batch, logits=output, modules=dict(modules))
    attentions = tuple(getattr(output, "attentions", None) or ())
    return Taps.from_batch(
        batch,
        hidden_states=tuple(getattr(output, "hidden_states", None) or ()),
        logits=getattr(output, "logits", None),
        attentions=attentions if all(a is not None for a in attentions) else (),  # sdpa gives Nones
        modules=dict(modules),
        **head,
    )
