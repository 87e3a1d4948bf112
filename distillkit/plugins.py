"""Deprecated alias of :mod:`distillkit.plugin_manager`, kept for code that imports it."""

import warnings

from distillkit.plugin_manager import *  # noqa: F403
from distillkit.plugin_manager import __all__  # noqa: F401

warnings.warn("distillkit.plugins is now distillkit.plugin_manager", DeprecationWarning, stacklevel=2)
