"""distillkit: knowledge distillation for language models, every loss a plugin.

This module is the public API: everything a loss plugin or a user script imports comes from here (and the
fused ops from :mod:`distillkit.ops`). Nothing else is public.

Users::

    from distillkit import DistillationObjective, ModelDims, build_term

Inside a ``transformers.Trainer`` run (imported on first use, so ``import distillkit`` loads no Trainer)::

    from distillkit.hf import DistillationTrainer

Plugin authors::

    from distillkit import LossTerm, LossParams, TapRequest, Taps, LayerMapSpec, hookimpl
    from distillkit import ConfigError, TaskInfo, BenchCase, masked_mean, student_projections
    from distillkit.ops import divergence, fused_linear_divergence, membank_infonce
"""

from distillkit.errors import ConfigError, DistillkitError
from distillkit.hookspecs import BenchCase, hookimpl
from distillkit.objective.mapping import LayerMapSpec, LayerPairs
from distillkit.objective.objective import DistillationObjective, ObjectiveOutput, build_term
from distillkit.objective.taps import NOTHING, TapRequest, Taps
from distillkit.objective.terms import (
    HiddenStateParams,
    HiddenStateTerm,
    LossParams,
    LossTerm,
    ModelDims,
    TaskInfo,
    masked_mean,
    student_projections,
)

__version__ = "0.1.0"

__all__ = [
    "NOTHING",
    "BenchCase",
    "ConfigError",
    "DistillationObjective",
    "DistillkitError",
    "HiddenStateParams",
    "HiddenStateTerm",
    "LayerMapSpec",
    "LayerPairs",
    "LossParams",
    "LossTerm",
    "ModelDims",
    "ObjectiveOutput",
    "TapRequest",
    "Taps",
    "TaskInfo",
    "build_term",
    "hookimpl",
    "masked_mean",
    "student_projections",
    "__version__",
]


def __getattr__(name: str) -> object:
    """``distillkit.DistillationTrainer`` / ``DistillationMixin``: from :mod:`distillkit.hf`, on first use."""
    if name in ("DistillationTrainer", "DistillationMixin"):
        from distillkit import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'distillkit' has no attribute {name!r}")
