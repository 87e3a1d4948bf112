"""Deprecated alias of :mod:`distillkit.terms` (the loss-term contract), kept for plugins that import it."""

import warnings

from distillkit.terms import *  # noqa: F403
from distillkit.terms import __all__  # noqa: F401

warnings.warn(
    "distillkit.losses is now distillkit.terms (or import LossTerm, ModelDims, TaskInfo from distillkit)",
    DeprecationWarning,
    stacklevel=2,
)
