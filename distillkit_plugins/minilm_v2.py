"""``minilm_v2``: multi-head self-attention relation distillation (MiniLMv2).

Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained
Transformers", Findings of ACL 2021. The query, key and value vectors of one teacher layer and one student
layer (the outputs of their ``query``/``key``/``value`` projections, ``[B, T, D]``) are each split into the
same number ``R`` of relation heads, ``X → X_r`` of width ``d_r = D / R`` (``D`` may differ between the
models, ``R`` may differ from the attention-head count). For each relation type ``x ∈ {query, key, value}``:

    rel_x[r] = softmax(X_r X_rᵀ / √d_r)       over the real keys, [B, R, T, T]
    L_x = mean over relation heads r and real query rows q of
          KL(rel_x^teacher[r, q, :] ‖ rel_x^student[r, q, :])

and the loss is the mean of ``L_query``, ``L_key`` and ``L_value`` (the paper's q-q, k-k and v-v relations).

The vectors come from module taps. Module paths are built from a template with ``{layer}`` (the 0-based
index of the transformer layer in the model's layer list, i.e. ``layer − 1``) and ``{proj}`` (the
projection's name). The default, ``base_model.encoder.layer.{layer}.attention.self.{proj}``, works for BERT
and RoBERTa-style encoders whether the model is the bare encoder (``BertModel``) or has a head on top
(``BertForSequenceClassification``, ``BertForMaskedLM``): Hugging Face models expose their encoder as
``base_model``, which is the model itself for a bare encoder. Other families set ``modules`` (and
``proj_names``), e.g. DistilBERT: ``base_model.transformer.layer.{layer}.attention.{proj}`` with
``proj_names: [q_lin, k_lin, v_lin]``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from distillkit import ConfigError, LossParams, LossTerm, ModelDims, TapRequest, Taps, hookimpl

DEFAULT_TEMPLATE = "base_model.encoder.layer.{layer}.attention.self.{proj}"
RELATIONS = ("query", "key", "value")


class MiniLMv2Params(LossParams):
    """Parameters of ``minilm_v2``.

    Attributes:
        student_layer: Student transformer layer, ``1..depth`` as for hidden states (default: the last).
        teacher_layer: Teacher transformer layer (default: the last; the paper takes an upper-middle layer of
            large teachers).
        relation_heads: Relation heads ``R``; must divide both models' projection widths (default: the
            student's attention-head count).
        relations: Which relations to match (default all three: q-q, k-k, v-v).
        modules: Module path template with ``{layer}`` (0-based layer index) and ``{proj}``.
        teacher_modules: The teacher's template when it differs from the student's (default: ``modules``).
        proj_names: The names ``{proj}`` takes for the query, key and value projections.

    """

    student_layer: int | None = None
    teacher_layer: int | None = None
    relation_heads: int | None = Field(default=None, ge=1)
    relations: list[Literal["query", "key", "value"]] = Field(default_factory=lambda: list(RELATIONS))
    modules: str = DEFAULT_TEMPLATE
    teacher_modules: str | None = None
    proj_names: tuple[str, str, str] = RELATIONS


def module_path(template: str, layer: int, proj: str, which: str) -> str:
    """Fills a template, refusing one without both placeholders or with others."""
    key = "modules" if which == "student" else "teacher_modules"
    if "{layer}" not in template or "{proj}" not in template:
        raise ConfigError(
            f"loss 'minilm_v2': {key} {template!r} needs both placeholders {{layer}} and {{proj}}, e.g. "
            f"{DEFAULT_TEMPLATE!r}"
        )
    try:
        return template.format(layer=layer - 1, proj=proj)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"loss 'minilm_v2': {key} {template!r} is not a valid template ({exc}); use only the "
            "placeholders {layer} and {proj}"
        ) from None


def relation_log_probs(x: torch.Tensor, heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    """Log relation distributions of one projection's output.

    Args:
        x: ``[B, T, D]`` projection output, ``D`` divisible by ``heads``.
        heads: Relation heads ``R``.
        key_mask: ``[B, 1, 1, T]`` bool, True for real keys.

    Returns:
        ``[B, R, T, T]`` log-softmax of ``X_r X_rᵀ / √d_r`` over real keys (padded keys hold a huge negative).

    """
    batch, tokens, width = x.shape
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    split = x.view(batch, tokens, heads, width // heads).transpose(1, 2)  # [B, R, T, d_r]
    scores = split @ split.transpose(-1, -2) / math.sqrt(width // heads)
    scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


class MiniLMv2Loss(LossTerm):
    """KL between teacher and student q-q, k-k and v-v relations of one layer each."""

    name = "minilm_v2"
    Params = MiniLMv2Params

    def __init__(self, params: MiniLMv2Params, dims: ModelDims) -> None:
        super().__init__(params, dims)
        self.student_layer = self._layer(params.student_layer, dims.student_layers, "student")
        self.teacher_layer = self._layer(params.teacher_layer, dims.teacher_layers, "teacher")
        self.relation_heads = params.relation_heads or dims.student_heads
        if self.relation_heads is None:
            raise ConfigError(
                "loss 'minilm_v2': the student's attention-head count is unknown, so set relation_heads (a "
                "divisor of both models' query/key/value widths)"
            )
        bert_paths = params.modules == DEFAULT_TEMPLATE and params.teacher_modules in (None, DEFAULT_TEMPLATE)
        widths = (("student", dims.student_hidden), ("teacher", dims.teacher_hidden)) if bert_paths else ()
        for side, width in widths:  # BERT's projections are as wide as the hidden states
            if width % self.relation_heads:
                common = math.gcd(dims.student_hidden, dims.teacher_hidden)
                raise ConfigError(
                    f"loss 'minilm_v2': relation_heads {self.relation_heads} does not divide the {side}'s "
                    f"width {width}; choose a divisor of {common} (the widths' greatest common divisor)"
                )
        if not params.relations:
            raise ConfigError("loss 'minilm_v2': relations is empty; use some of query, key, value")
        names = dict(zip(RELATIONS, params.proj_names, strict=True))
        teacher_template = params.teacher_modules or params.modules
        self.paths = [
            (
                relation,
                module_path(params.modules, self.student_layer, names[relation], "student"),
                module_path(teacher_template, self.teacher_layer, names[relation], "teacher"),
            )
            for relation in dict.fromkeys(params.relations)
        ]

    @staticmethod
    def _layer(layer: int | None, depth: int, side: str) -> int:
        if layer is None:
            return depth
        if not 1 <= layer <= depth:
            raise ConfigError(
                f"loss 'minilm_v2': {side}_layer {layer} is out of range; the {side} has transformer layers "
                f"1..{depth} (layer 0, the embeddings, has no query/key/value)"
            )
        return layer

    def tap_requests(self) -> tuple[TapRequest, TapRequest]:
        """Reads the chosen layers' query/key/value projection outputs of both models."""
        return (
            TapRequest(modules=tuple(path for _, path, _ in self.paths)),
            TapRequest(modules=tuple(path for _, _, path in self.paths)),
        )

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss.

        Args:
            student: Student taps; ``modules[path]`` is ``[B, T, D_s]`` for each tapped projection.
            teacher: Teacher taps; ``modules[path]`` is ``[B, T, D_t]``.

        Returns:
            Scalar loss (float32, or float64 for float64 inputs).

        """
        first = self._output(student, self.paths[0][1])
        mask = (  # [B, T]; every token is real when the batch has no attention mask
            student.token_mask()
            if student.attention_mask is not None
            else first.new_ones(first.shape[:2], dtype=torch.float32)
        )
        key_mask = mask[:, None, None, :] > 0
        heads = self.relation_heads
        losses = []
        for relation, student_path, teacher_path in self.paths:
            x_s, x_t = self._output(student, student_path), self._output(teacher, teacher_path)
            for side, x in (("student", x_s), ("teacher", x_t)):
                if x.dim() != 3 or x.shape[:2] != mask.shape or x.shape[-1] % heads:
                    raise ValueError(
                        f"the {side}'s {relation} output has shape {tuple(x.shape)}; expected [B, T, D] with "
                        f"[B, T] = {tuple(mask.shape)} and D divisible by relation_heads {heads}"
                    )
            log_s = relation_log_probs(x_s, heads, key_mask)
            log_t = relation_log_probs(x_t, heads, key_mask).to(log_s.dtype)
            per_key = (log_t.exp() * (log_t - log_s)).masked_fill(~key_mask, 0.0)
            rows = per_key.sum(dim=-1) * mask[:, None, :].to(per_key.dtype)  # [B, R, T]
            losses.append(rows.sum() / (mask.sum() * heads).clamp_min(1.0))
        return torch.stack(losses).mean()

    @staticmethod
    def _output(taps: Taps, path: str) -> torch.Tensor:
        if path not in taps.modules:
            raise ValueError(
                f"no output recorded for module '{path}' (Taps.modules has {list(taps.modules)})"
            )
        return taps.modules[path]


@hookimpl
def distillkit_register_losses(register):
    """Registers ``minilm_v2``."""
    register(MiniLMv2Loss)
