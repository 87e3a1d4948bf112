"""The engine a run computes on: accelerate's ``Accelerator`` (devices, DDP, gathering), mixed precision."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from distillkit.run.trackers import tracking_options

Autocast = Callable[[], AbstractContextManager]
"""A factory of the mixed-precision context: ``with autocast(): ...``."""


def make_accelerator(report_to: Sequence[str] = (), output_dir: str | Path | None = None) -> Accelerator:
    """The accelerate engine: device placement, DDP, gathering (mixed precision is set per run).

    ``report_to`` names its experiment trackers (``train.report_to``; see :mod:`.trackers`), which log under
    ``output_dir``; a tracker whose package is missing raises :class:`~distillkit.errors.ConfigError`.
    """
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU, torchrun then means gloo processes (MULTI_CPU)
        rng_types=[],
        # Parts of the student often get no gradient in a step: the pooler and classifier when no term reads
        # logits, layers above the last mapped one, a term's heads on a step it skips. DDP without this flag
        # stops with "Expected to have finished reduction"; its cost is one walk of the autograd graph per
        # backward, small next to the all-reduce on the models this trains.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        **tracking_options(report_to, output_dir),
    )


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``train.precision`` computes in bf16 on ``device``.

    ``auto`` is bf16 on CUDA devices that support it and fp32 elsewhere (CPU bf16 is slow without AMX).
    """
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def autocast_factory(precision: str, device: torch.device) -> Autocast:
    """Returns a no-argument context-manager factory for the run's precision (:func:`uses_bf16`)."""
    if not uses_bf16(precision, device):
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
