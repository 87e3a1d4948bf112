"""Loss benchmarks: forward+backward of any registered loss on synthetic taps.

Every registered loss gets a default case (its default parameters); a plugin can add cases of its own through
the ``distillkit_register_bench_cases`` hook::

    @hookimpl
    def distillkit_register_bench_cases(register):
        register(BenchCase("codir-queue-64k", "codir", {"bank": {"kind": "queue", "size": 65536}}))

``distillkit bench`` prints them as one table; the pytest-benchmark suite (``benchmarks/test_losses.py``)
times the same steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from distillkit.bench.harness import Row, time_steps
from distillkit.hookspecs import BenchCase
from distillkit.objective.objective import build_term
from distillkit.objective.taps import TapRequest, Taps
from distillkit.objective.terms import LossTerm, ModelDims

__all__ = ["BenchCase", "BenchShapes", "LossCase", "collect_cases", "make_step", "time_case"]


@dataclass(frozen=True)
class BenchShapes:
    """Synthetic tap shapes.

    Attributes:
        batch: ``B``.
        seq: Tokens per example ``T``.
        student_hidden: ``H_s``.
        teacher_hidden: ``H_t``.
        student_layers: Student depth.
        teacher_layers: Teacher depth.
        classes: Logit width ``C``.
    """

    batch: int = 32
    seq: int = 128
    student_hidden: int = 384
    teacher_hidden: int = 768
    student_layers: int = 6
    teacher_layers: int = 12
    classes: int = 2

    def dims(self) -> ModelDims:
        """Returns the model sizes these shapes imply."""
        heads = synthetic_heads(self.student_hidden, self.teacher_hidden)
        return ModelDims(
            self.student_layers, self.teacher_layers, self.student_hidden, self.teacher_hidden, heads, heads
        )


def synthetic_heads(student_hidden: int, teacher_hidden: int) -> int:
    """Attention heads of both synthetic models: the largest of 12, 8, 6, 4, 2, 1 dividing both widths."""
    return next(h for h in (12, 8, 6, 4, 2, 1) if student_hidden % h == 0 and teacher_hidden % h == 0)


def synthetic_taps(
    shapes: BenchShapes,
    device: str,
    dtype: torch.dtype,
    requests: tuple[TapRequest, TapRequest] | None = None,
) -> tuple[Taps, Taps, list[torch.Tensor]]:
    """Builds random student/teacher taps.

    Hidden states, logits, mask, labels and ids always; attention probabilities ``[B, heads, T, T]``
    (softmax over real keys, heads from :func:`synthetic_heads`) and module outputs ``[B, T, hidden]`` (one
    per requested path, as wide as the model) only when ``requests`` (the term's student and teacher
    requests) asks for them.

    Returns:
        student taps (leaf tensors requiring grad), teacher taps, and the student leaves.
    """
    generator = torch.Generator().manual_seed(0)

    def states(layers: int, hidden: int, grad: bool) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.randn(shapes.batch, shapes.seq, hidden, generator=generator)
            .to(device, dtype)
            .requires_grad_(grad)
            for _ in range(layers + 1)
        )

    mask = torch.ones(shapes.batch, shapes.seq, dtype=torch.long, device=device)
    mask[: shapes.batch // 2, shapes.seq // 2 :] = 0
    heads = synthetic_heads(shapes.student_hidden, shapes.teacher_hidden)

    def attentions(request: TapRequest | None, layers: int, grad: bool) -> tuple[torch.Tensor, ...]:
        if request is None or not request.attentions:
            return ()
        maps = []
        for _ in range(layers):
            scores = torch.randn(shapes.batch, heads, shapes.seq, shapes.seq, generator=generator).to(device)
            scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
            maps.append(torch.softmax(scores, dim=-1).to(dtype).requires_grad_(grad))
        return tuple(maps)

    def modules(request: TapRequest | None, hidden: int, grad: bool) -> dict[str, torch.Tensor]:
        paths = () if request is None else request.modules
        return {
            path: torch.randn(shapes.batch, shapes.seq, hidden, generator=generator)
            .to(device, dtype)
            .requires_grad_(grad)
            for path in paths
        }

    reads_student, reads_teacher = requests or (None, None)
    labels = torch.randint(0, shapes.classes, (shapes.batch,), generator=generator).to(device)
    ids = torch.arange(shapes.batch, device=device)
    student_logits = torch.randn(shapes.batch, shapes.classes, generator=generator).to(device, dtype)
    student_logits.requires_grad_(True)
    student_states = states(shapes.student_layers, shapes.student_hidden, True)
    student_maps = attentions(reads_student, shapes.student_layers, True)
    student_modules = modules(reads_student, shapes.student_hidden, True)
    student = Taps(
        student_states, student_logits, mask, labels, ids, attentions=student_maps, modules=student_modules
    )
    teacher_logits = torch.randn(shapes.batch, shapes.classes, generator=generator).to(device, dtype)
    teacher = Taps(
        states(shapes.teacher_layers, shapes.teacher_hidden, False),
        teacher_logits,
        mask,
        labels,
        ids,
        attentions=attentions(reads_teacher, shapes.teacher_layers, False),
        modules=modules(reads_teacher, shapes.teacher_hidden, False),
    )
    return student, teacher, [*student_states, student_logits, *student_maps, *student_modules.values()]


def collect_cases(losses: list[str] | None = None) -> list[BenchCase]:
    """Returns a default case per registered loss plus every plugin-contributed case.

    Args:
        losses: Keep only cases of these losses (None: all).

    Raises:
        UnknownLossError: For a name in ``losses`` that no plugin registers.
    """
    from distillkit.plugin_manager import load_plugins
    from distillkit.registry import get_loss, loss_registry

    for name in losses or ():
        get_loss(name)  # an unknown name is an error, never an empty table
    cases = [BenchCase(name, name) for name in sorted(loss_registry())]
    load_plugins().hook.distillkit_register_bench_cases(register=cases.append)
    if losses is not None:
        cases = [case for case in cases if case.loss in losses]
    return cases


def make_step(
    case: BenchCase, shapes: BenchShapes, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Callable[[], None]:
    """Builds the case's term and synthetic taps and returns one forward+backward step.

    ``distillkit bench`` and the pytest-benchmark suite time the same closure.

    Args:
        case: The case.
        shapes: Base shapes (``case.shapes`` overrides them).
        device: Where to run.
        dtype: Dtype of the synthetic hidden states and logits.

    Returns:
        A function running forward, backward and ``after_step`` once.
    """
    shapes = replace(shapes, **case.shapes)
    term: LossTerm = build_term(case.loss, shapes.dims(), **case.params).to(device)
    student, teacher, leaves = synthetic_taps(shapes, device, dtype, term.tap_requests())
    term.prepare_benchmark()  # e.g. a full memory bank, not the first steps of an empty one

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        term.zero_grad(set_to_none=True)
        loss = term(student, teacher)
        loss.backward()
        term.after_step()

    return step


def time_case(
    case: BenchCase,
    shapes: BenchShapes,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeat: int = 5,
    warmup: int = 1,
) -> Row:
    """Times forward+backward of one case (:func:`~distillkit.bench.harness.time_steps`).

    Returns:
        A table row: case, loss, median and min milliseconds, and peak CUDA memory when on a GPU.
    """
    step = make_step(case, shapes, device, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    for _ in range(warmup):
        step()
    if sync is not None:
        sync()
        torch.cuda.reset_peak_memory_stats()
    timing = time_steps({case.name: step}, repeat, warmup=0, sync=sync)[case.name]
    row: Row = {
        "case": case.name,
        "loss": case.loss,
        "median_ms": timing.median * 1e3,
        "min_ms": timing.min * 1e3,
    }
    if sync is not None:
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


@dataclass(frozen=True)
class LossCase:
    """A loss benchmark as a harness :class:`~distillkit.bench.harness.Case` (one variant: forward+backward).

    Attributes:
        name: The case name.
        loss: The registered loss.
        params: Its parameters.
        shapes: :class:`BenchShapes` fields.
        device: Where to run.
        dtype: Dtype name of the synthetic taps.

    """

    name: str
    loss: str
    params: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def of(
        cls, case: BenchCase, shapes: BenchShapes, device: str = "cpu", dtype: str = "float32"
    ) -> LossCase:
        """The loss case of a registered :class:`BenchCase` at ``shapes`` (its own overrides applied)."""
        return cls(
            case.name, case.loss, dict(case.params), asdict(replace(shapes, **case.shapes)), device, dtype
        )

    def variants(self) -> tuple[str, ...]:
        """One variant: the term's forward, backward and ``after_step``."""
        return ("forward+backward",)

    def make_step(self, variant: str = "forward+backward") -> Callable[[], None]:
        """See :func:`make_step`."""
        case = BenchCase(self.name, self.loss, self.params)
        return make_step(case, BenchShapes(**self.shapes), self.device, getattr(torch, self.dtype))
