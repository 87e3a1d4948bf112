"""Typed configuration: YAML (safe loading only) -> pydantic models, with ``--set a.b=c`` overrides.

One module per section: :mod:`~distillkit.config.models` (``teacher``, ``student``, ``teachers``),
:mod:`~distillkit.config.data` (``data``, ``evaluation``), :mod:`~distillkit.config.train` (``train``),
:mod:`~distillkit.config.terms` (each ``objective`` entry), :mod:`~distillkit.config.run` (the whole run) and
:mod:`~distillkit.config.loading` (files, overrides, errors).
"""

from distillkit.config.data import DataConfig, EvaluationConfig
from distillkit.config.loading import (
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    safe_load_yaml,
)
from distillkit.config.models import FinetuneConfig, ModelConfig
from distillkit.config.run import DistillConfig
from distillkit.config.terms import TermConfig, parse_term_configs
from distillkit.config.train import GenerationSettings, TrainConfig

__all__ = [
    "DataConfig",
    "DistillConfig",
    "EvaluationConfig",
    "FinetuneConfig",
    "GenerationSettings",
    "ModelConfig",
    "TermConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_override",
    "parse_term_configs",
    "safe_load_yaml",
]
