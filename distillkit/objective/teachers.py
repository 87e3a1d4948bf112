"""Several teachers: which one(s) each term reads, and one teacher's logits made from a weighted mix.

Each term reads one named teacher (``teacher: name`` in its config; ``teacher`` by default) or a weighted mix
of several teachers' logits (``teacher: [a, b]``, ``teacher_weights``, ``teacher_mix``). The mix is made at
the temperature the term reads teacher logits at (:meth:`LossTerm.teacher_logit_temperature`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from distillkit.errors import LossTermError
from distillkit.objective.taps import TapRequest, Taps
from distillkit.objective.terms import LossTerm

DEFAULT_TEACHER = "teacher"
"""The name of the main teacher (``teacher:`` in a config); terms read it unless they name another."""


@dataclass(frozen=True)
class TermTeachers:
    """Which teacher(s) a term reads.

    Attributes:
        names: One teacher name, or several whose logits are mixed into one teacher.
        weights: Normalised mixing weights, one per name.
        mix: ``probabilities`` (``Σ w_i·softmax(z_i/T)``, presented as logits ``T·log`` of it) or ``logits``
            (``Σ w_i·z_i``).

    """

    names: tuple[str, ...] = (DEFAULT_TEACHER,)
    weights: tuple[float, ...] = (1.0,)
    mix: Literal["probabilities", "logits"] = "probabilities"


def mix_teacher_logits(
    logits: Sequence[torch.Tensor], weights: Sequence[float], mix: str, temperature: float
) -> torch.Tensor:
    """Mixes several teachers' logits into the logits of one teacher.

    Args:
        logits: One ``[B, C]`` or ``[B, T, V]`` tensor per teacher, equal shapes.
        weights: Normalised weights, one per teacher.
        mix: ``probabilities``: returns ``T·log Σ w_i·softmax(z_i/T)``, whose softmax at temperature ``T`` is
            exactly the weighted mean of the teachers' distributions; ``logits``: returns ``Σ w_i·z_i``.
        temperature: The reading term's temperature ``T``.

    Returns:
        Float32 logits of the shape of each input.

    """
    if mix == "logits":
        return sum(w * z.float() for w, z in zip(weights, logits, strict=True))
    logs = [
        math.log(w) + torch.log_softmax(z.float() / temperature, dim=-1)
        for w, z in zip(weights, logits, strict=True)
        if w > 0
    ]
    return temperature * torch.logsumexp(torch.stack(logs), dim=0)


def teacher_taps_by_name(
    teacher_output: Any,
    batch: Mapping[str, torch.Tensor] | None,
    default: str,
    readers: Callable[[str], Mapping[str, TapRequest]] | None = None,
) -> dict[str, Taps]:
    """Teacher name -> detached taps, from one teacher's output (the default teacher's) or a mapping.

    Args:
        teacher_output: One teacher's output or taps, or ``{name: output or taps or None}``.
        batch: The batch.
        default: The name of a teacher given alone.
        readers: Teacher name -> who reads what of it; each output given (not taps) must hold that (None: it
            must hold hidden states).

    Raises:
        MissingOutputError: For an output lacking what a term reads, naming it and how to ask for it.

    """
    if isinstance(teacher_output, dict) and not hasattr(teacher_output, "to_tuple"):  # not a ModelOutput
        outputs = dict(teacher_output)
    else:
        outputs = {default: teacher_output}
    taps = {}
    for name, output in outputs.items():
        if output is None:
            continue
        if not isinstance(output, Taps):
            who = "the teacher" if name == DEFAULT_TEACHER else f"teacher '{name}'"
            output = Taps.from_output(output, batch, readers(name) if readers else None, who)
        taps[name] = output.detached()
    return taps


def teacher_taps_for(
    term: LossTerm,
    spec: TermTeachers,
    by_name: dict[str, Taps],
    batch: Mapping[str, torch.Tensor] | None,
    who: str,
) -> Taps:
    """The teacher taps a term receives: its teacher's, or the mix of its teachers' logits.

    Args:
        term: The term.
        spec: Which teacher(s) it reads.
        by_name: Teacher name -> this batch's taps.
        batch: The batch (the term gets taps of the batch alone when its teacher gave none).
        who: The term, for messages.

    Raises:
        LossTermError: When mixed teachers lack logits or their logits differ in shape.

    """
    present = [by_name.get(name) for name in spec.names]
    if len(spec.names) == 1 or not term.tap_requests()[1].logits:
        return present[0] if present[0] is not None else Taps.from_batch(batch)
    pairs = list(zip(spec.names, present, strict=True))
    missing = [name for name, taps in pairs if taps is None or taps.logits is None]
    if missing:
        raise LossTermError(
            f"{who} mixes teachers {list(spec.names)}, but no logits were given for {', '.join(missing)}"
        )
    shapes = {tuple(t.logits.shape) for t in present}
    if len(shapes) > 1:
        raise LossTermError(
            f"{who} mixes teachers whose logits differ in shape "
            f"({', '.join(f'{n}: {tuple(t.logits.shape)}' for n, t in pairs)}); "
            "mixed teachers must share the label set or vocabulary"
        )
    temperature = term.teacher_logit_temperature()
    mixed = mix_teacher_logits([t.logits for t in present], spec.weights, spec.mix, temperature)
    return replace(present[0], logits=mixed)
