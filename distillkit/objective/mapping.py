"""Layer maps: which student layer is matched with which teacher layer.

Layers are numbered as in Hugging Face ``hidden_states``: 0 is the embedding output, ``1..depth`` the
outputs of the transformer layers. A map is a list of ``(student_layer, teacher_layer)`` pairs.

Named maps (``S`` student layers, ``T`` teacher layers):
    - ``uniform``: student layer ``i`` <-> teacher layer ``round(i * T / S)`` for ``i = 1..S`` (TinyBERT);
      the last student layer always meets the last teacher layer.
    - ``skip``: student layer ``i`` <-> teacher layer ``i * (T // S)`` (every k-th teacher layer, the
      DistilBERT "take one in two" scheme when ``T = 2S``).
    - ``last``: only ``(S, T)``.
    - explicit: ``[[s, t], ...]``, each index checked against both depths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from distillkit.errors import LayerMapError, quote_input

LayerPairs = list[tuple[int, int]]
LayerMapSpec = Union[str, Sequence[Sequence[int]]]  # noqa: UP007 - used in pydantic models on py3.10
NAMED_MAPS = ("uniform", "skip", "last")


def _check_index(index: int, depth: int, model: str) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise LayerMapError(f"layer index {index!r} for the {model} is not an integer")
    if not 0 <= index <= depth:
        raise LayerMapError(
            f"layer {index} is out of range for the {model}, which has {depth} layers: use 0 (embeddings) "
            f"to {depth}"
        )
    return index


def resolve_layer_map(spec: LayerMapSpec, student_depth: int, teacher_depth: int) -> LayerPairs:
    """Turns a layer-map spec into checked ``(student, teacher)`` pairs.

    Args:
        spec: ``"uniform"``, ``"skip"``, ``"last"`` or explicit pairs ``[[s, t], ...]``.
        student_depth: Number of transformer layers in the student.
        teacher_depth: Number of transformer layers in the teacher.

    Returns:
        The pairs, in student-layer order for named maps and as given for explicit ones.

    Raises:
        LayerMapError: For an unknown name, a malformed pair, or an index outside a model's depth.

    """
    if student_depth < 1 or teacher_depth < 1:
        raise LayerMapError(
            f"layer maps need at least one layer per model (student has {student_depth}, teacher "
            f"{teacher_depth})"
        )
    if isinstance(spec, str):
        if spec == "uniform":
            return [(i, round(i * teacher_depth / student_depth)) for i in range(1, student_depth + 1)]
        if spec == "skip":
            if student_depth > teacher_depth:
                raise LayerMapError(
                    f"'skip' needs a student no deeper than the teacher (student {student_depth} layers, "
                    f"teacher {teacher_depth}); use 'uniform' or explicit pairs"
                )
            step = teacher_depth // student_depth
            return [(i, i * step) for i in range(1, student_depth + 1)]
        if spec == "last":
            return [(student_depth, teacher_depth)]
        raise LayerMapError(
            f"unknown layer map {quote_input(spec)}: use one of {', '.join(NAMED_MAPS)} or explicit pairs "
            "[[s, t], ...]"
        )
    pairs: LayerPairs = []
    for pair in spec:
        if isinstance(pair, str) or len(pair) != 2:
            raise LayerMapError(f"layer pair {pair!r} must be [student_layer, teacher_layer]")
        student_layer = _check_index(pair[0], student_depth, "student")
        teacher_layer = _check_index(pair[1], teacher_depth, "teacher")
        pairs.append((student_layer, teacher_layer))
    if not pairs:
        raise LayerMapError("an explicit layer map needs at least one [student_layer, teacher_layer] pair")
    return pairs
