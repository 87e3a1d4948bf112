"""distillkit: knowledge distillation for language models, every loss a plugin.

The names most users need::

    from distillkit import DistillationObjective, ModelDims, build_term, hookimpl, LossTerm, LossParams, Taps
"""

from distillkit.hookspecs import hookimpl
from distillkit.losses import LossParams, LossTerm, ModelDims, Taps
from distillkit.objective import DistillationObjective, ObjectiveOutput, build_term

__version__ = "0.1.0"

__all__ = [
    "DistillationObjective",
    "LossParams",
    "LossTerm",
    "ModelDims",
    "ObjectiveOutput",
    "Taps",
    "build_term",
    "hookimpl",
    "__version__",
]
