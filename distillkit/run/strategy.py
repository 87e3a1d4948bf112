"""How a run's models are spread over its processes (``train.strategy``): replicated (DDP) or sharded (FSDP2).

A :class:`Strategy` is what the training loop asks for everything that depends on it:

- :meth:`~Strategy.place_teachers`: each live teacher frozen on the device (``ddp``) or sharded per block;
- :meth:`~Strategy.prepare`: the trainable module (student + objective heads) wrapped in DDP, or sharded,
  and its optimizer built over the parameters the strategy left;
- :meth:`~Strategy.no_sync`, :meth:`~Strategy.clip_grad_norm`: gradient accumulation and clipping;
- :meth:`~Strategy.gathered`: lets code call the student directly (evaluation, reports);
- :meth:`~Strategy.save_checkpoint`, :meth:`~Strategy.load_checkpoint`: whole safetensors files written by the
  main process (``ddp``, :mod:`~distillkit.run.checkpoint`) or DCP shards written by every process
  (``fsdp``, :mod:`~distillkit.run.sharded_checkpoint`);
- :meth:`~Strategy.full_state_dict`: the student's whole weights for ``save_pretrained``.

``ddp`` is what ``accelerate`` does (one process alone: no wrapping at all). ``fsdp`` is described in
:mod:`~distillkit.run.sharding`; :attr:`Strategy.sharded` tells callers that every process must take part in
each forward of a sharded model (a report run by the main process alone would wait forever).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from distillkit.config import DistillConfig, TrainConfig
from distillkit.errors import ConfigError
from distillkit.models import AUTO_CLASSES, freeze, layer_stack_prefix, load_config_of, student_config
from distillkit.run.checkpoint import load_checkpoint, save_checkpoint
from distillkit.run.engine import uses_bf16
from distillkit.run.sharded_checkpoint import (
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)
from distillkit.run.sharding import (
    data_parallel_mesh,
    gradient_norm,
    mixed_precision,
    shard_teacher,
    shard_trainable,
)
from distillkit.run.step import Unwalked

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
"""Builds the optimizer over a (wrapped or sharded) trainable module's parameters."""


class Strategy:
    """Replicated training (``ddp``): every process holds the whole student, optimizer state and teachers.

    Args:
        accelerator: The run's engine (device, processes, DDP).

    """

    name = "ddp"
    sharded = False

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.device = accelerator.device

    def place_teachers(
        self, sources: dict[str, Any], teacher: nn.Module | None
    ) -> tuple[dict[str, Any], nn.Module | None]:
        """Each teacher's source ready to run: models frozen (eval mode, no gradients) on the device.

        Args:
            sources: Teacher name -> live model, or a cache (left as it is).
            teacher: The main teacher model (evaluation compares the student with it), or None.

        Returns:
            The sources and the main teacher, placed.

        """
        placed = {n: self._place(s) if isinstance(s, nn.Module) else s for n, s in sources.items()}
        for source in placed.values():
            if isinstance(source, nn.Module):
                assert not any(p.requires_grad for p in source.parameters()), "a teacher must be frozen"
        return placed, self._place(teacher) if teacher is not None else None

    def _place(self, model: nn.Module) -> nn.Module:
        return freeze(model).to(self.device)

    def prepare(
        self, trainable: nn.Module, student: nn.Module, make_optimizer: MakeOptimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wraps ``trainable`` (which holds ``student``) for training and builds its optimizer.

        Returns:
            The module to call in training steps and the optimizer.

        """
        return self.accelerator.prepare(trainable, make_optimizer(trainable))

    def no_sync(self, model: nn.Module) -> Any:
        """A context in which a backward accumulates gradients without synchronising them."""
        return self.accelerator.no_sync(model)

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float | None) -> float:
        """Clips the gradients to ``max_norm`` (None: no clipping); returns their norm before clipping."""
        return float(self.accelerator.clip_grad_norm_(params, max_norm or float("inf")))

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """A context in which the student may be called directly, outside the training step."""
        yield

    def save_checkpoint(self, directory: Path, step: int, **parts: Any) -> Path | None:
        """Writes a checkpoint (see :func:`~distillkit.run.checkpoint.save_checkpoint` for ``parts``).

        Every process calls it; the path is returned on the main process (None elsewhere).
        """
        if not self.accelerator.is_main_process:
            return None
        return save_checkpoint(directory, step, **parts)

    def load_checkpoint(self, path: Path, **parts: Any) -> dict[str, Any]:
        """Restores a checkpoint (see :func:`~distillkit.run.checkpoint.load_checkpoint` for ``parts``).

        Raises:
            ConfigError: If it was written with another strategy.

        """
        if is_sharded_checkpoint(path):
            raise ConfigError(
                f"the checkpoint {path} was written with train.strategy: fsdp (sharded), and this run uses "
                f"{self.name}; resume it with train.strategy: fsdp, or use another output_dir"
            )
        return load_checkpoint(path, **parts)

    def full_state_dict(self, student: nn.Module) -> dict[str, torch.Tensor] | None:
        """The student's whole state dict for ``save_pretrained`` (None: the model's own state dict)."""
        return None


class FSDPStrategy(Strategy):
    """Sharded training (``fsdp``, FSDP2): see :mod:`distillkit.run.sharding` for what is split and when.

    Args:
        accelerator: The run's engine; its processes' group (gloo on CPU, NCCL on CUDA) carries the shards.
        train: ``train.precision`` (bf16 gathers and compute, fp32 gradient reduction) and ``train.fsdp``.

    """

    name = "fsdp"
    sharded = True

    def __init__(self, accelerator: Accelerator, train: TrainConfig) -> None:
        super().__init__(accelerator)
        self.policy = mixed_precision(uses_bf16(train.precision, self.device))
        self.offload = train.fsdp.teacher_offload
        self.root: nn.Module | None = None

    @functools.cached_property
    def mesh(self) -> DeviceMesh:
        """The processes the models are sharded over (made on first use: a run that only reads is not)."""
        return data_parallel_mesh(self.device)

    def _place(self, model: nn.Module) -> nn.Module:
        return shard_teacher(freeze(model), self.mesh, self.policy, self.offload, self.device)

    def prepare(
        self, trainable: nn.Module, student: nn.Module, make_optimizer: MakeOptimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Shards the student's blocks and ``trainable`` (the root); builds the optimizer over the shards."""
        shard_trainable(trainable, student, self.mesh, self.policy)
        self.root = trainable
        return _TeachersUnwalked(trainable), make_optimizer(trainable)

    @contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Gradients accumulate unsharded in the backward; the next synchronised one reduce-scatters them."""
        self.root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.root.set_requires_gradient_sync(True)

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float | None) -> float:
        """Clips the sharded gradients by their global norm (computed across processes)."""
        return gradient_norm(params, max_norm)

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Gathers the root unit (embeddings, final norm, output layer, heads) so the student runs alone.

        Its blocks gather themselves as they run; every process must run the same forwards in the block.
        """
        if self.root is None:
            yield
            return
        self.root.unshard()
        try:
            yield
        finally:
            self.root.reshard()

    def save_checkpoint(self, directory: Path, step: int, **parts: Any) -> Path | None:
        """Writes a DCP checkpoint, every process its shards (:mod:`~distillkit.run.sharded_checkpoint`)."""
        return save_sharded_checkpoint(
            directory,
            step,
            model=self.root,
            optimizer=parts["optimizer"],
            scheduler=parts["scheduler"],
            extra=parts.get("extra"),
            keep_last=parts.get("keep_last", 2),
            run_id=parts.get("run_id"),
        )

    def load_checkpoint(self, path: Path, **parts: Any) -> dict[str, Any]:
        """Restores a DCP checkpoint, resharded to this run's processes."""
        state = load_sharded_checkpoint(
            path, model=self.root, optimizer=parts["optimizer"], scheduler=parts["scheduler"]
        )
        written = state.get("processes")
        if written != self.accelerator.num_processes and self.accelerator.is_main_process:
            print(
                f"distillkit: {path} was written by {written} processes and is resharded to "
                f"{self.accelerator.num_processes}; the global batch changes from here on"
            )
        return state

    def full_state_dict(self, student: nn.Module) -> dict[str, torch.Tensor] | None:
        """Gathers the student's whole weights to the main process's CPU memory (every process calls it)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(student, options=options)


class _TeachersUnwalked(nn.Module):
    """Calls the sharded root with the teachers' taps in an :class:`~distillkit.run.step.Unwalked`.

    FSDP's root pre-forward looks for tensors that need gradients in its arguments; the teachers' taps hold
    none (they are detached), and a cache's taps raise for the layers it does not store.
    """

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.root = root

    def forward(self, batch: dict[str, torch.Tensor], teacher: Any) -> Any:
        """``root(batch, Unwalked(teacher))``."""
        return self.root(batch, Unwalked(teacher))


def make_strategy(train: TrainConfig, accelerator: Accelerator) -> Strategy:
    """The strategy ``train.strategy`` names, on ``accelerator``'s processes."""
    if train.strategy == "fsdp":
        return FSDPStrategy(accelerator, train)
    return Strategy(accelerator)


def check_strategy(config: DistillConfig, num_labels: int) -> None:
    """Refuses, before any weights load, a sharded run of a model whose transformer blocks cannot be found.

    Each model is built on the meta device (no memory, no weights) from its config.

    Raises:
        ConfigError: Naming the model and the fix.

    """
    if config.train.strategy != "fsdp":
        return
    auto = AUTO_CLASSES[config.task]
    teacher = load_config_of(config.teacher, "teacher", config.task, num_labels)
    spec = config.student
    if spec.path is not None or spec.config is not None:
        student = load_config_of(spec, "student", config.task, num_labels)
    else:
        student = student_config(teacher, spec)[0]
    configs = {"student": student, "teacher": teacher}
    for name, other in config.teachers.items():
        configs[f"teachers.{name}"] = load_config_of(other, f"teachers.{name}", config.task, num_labels)
    for role, model_config in configs.items():
        with torch.device("meta"):
            model = auto.from_config(model_config)
        try:
            layer_stack_prefix(model)
        except ConfigError:
            raise ConfigError(
                f"train.strategy: fsdp shards each transformer block, but the {role} "
                f"({type(model).__name__}) has no module list of its {model_config.num_hidden_layers} layers "
                "(e.g. it shares one layer group across its depth); use train.strategy: ddp for this model"
            ) from None
