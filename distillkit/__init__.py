"""distillkit: knowledge distillation for language models, every loss a plugin.

The names most users need::

    from distillkit import DistillationObjective, ModelDims, build_term, hookimpl, LossTerm, LossParams, Taps
    from distillkit import TapRequest, TaskInfo, LayerMapSpec, BenchCase   # for plugin authors
"""

from distillkit.hookspecs import BenchCase, hookimpl
from distillkit.objective.mapping import LayerMapSpec
from distillkit.objective.objective import DistillationObjective, ObjectiveOutput, build_term
from distillkit.objective.taps import TapRequest, Taps
from distillkit.objective.terms import LossParams, LossTerm, ModelDims, TaskInfo

__version__ = "0.1.0"

__all__ = [
    "BenchCase",
    "DistillationObjective",
    "LayerMapSpec",
    "LossParams",
    "LossTerm",
    "ModelDims",
    "ObjectiveOutput",
    "TapRequest",
    "Taps",
    "TaskInfo",
    "build_term",
    "hookimpl",
    "__version__",
]
