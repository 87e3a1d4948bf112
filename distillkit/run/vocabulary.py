"""Before any weights load: every model reads token ids of a tokenizer it was made for, and can embed them.

The batches are tokenised with the main teacher's tokenizer (and, when the student has another one, also
with the student's: :mod:`distillkit.run.tokenizers` compares the two and decides). :func:`check_vocabularies`
refuses a run where that cannot be right:

- another teacher whose ``path`` ships its own tokenizer that differs from the main teacher's (other strings,
  ids or special tokens: it would silently read other tokens than it was trained on);
- a model whose vocabulary is smaller than the ids of the tokenizer it reads (an index error at step 1);
- token-level logits compared across models of different vocabulary sizes (when both read the same tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillkit.config import DistillConfig, ModelConfig
from distillkit.errors import ConfigError, quote_input
from distillkit.model_paths import has_tokenizer_files, resolve_path
from distillkit.models import load_config_of, load_tokenizer, student_config
from distillkit.objective.objective import DistillationObjective
from distillkit.tokenizers import compare_tokenizers, describe_tokenizer

TOKEN_LOGIT_TASKS = ("causal_lm", "masked_lm")
"""Tasks whose logits are ``[B, T, V]``: over the vocabulary."""


def model_configs(config: DistillConfig, num_labels: int, student_tokenizer: Any = None) -> tuple[Any, Any]:
    """The teacher's and the student's Hugging Face configs, without weights.

    Args:
        config: The run's config.
        num_labels: The task's classes.
        student_tokenizer: The student's own tokenizer when it differs from the teacher's (a student built
            from the teacher then gets its vocabulary), else None.

    """
    teacher = load_config_of(config.teacher, "teacher", config.task, num_labels)
    spec = config.student
    if spec.path is not None or spec.config is not None:
        return teacher, load_config_of(spec, "student", config.task, num_labels)
    return teacher, student_config(teacher, spec, student_tokenizer)[0]


def own_tokenizer(spec: ModelConfig, role: str, teacher: ModelConfig) -> Any | None:
    """The tokenizer a model's folder ships (or its GGUF file holds), or None (none, or the teacher's own)."""
    if spec.path is None:
        return None
    if spec.tokenizer is None and (spec.path, spec.gguf_file) == (teacher.path, teacher.gguf_file):
        return None
    if (spec.tokenizer or spec.path) == teacher.tokenizer:
        return None
    if spec.tokenizer is None and spec.gguf_file is None:
        folder = resolve_path(spec.path, field=f"{role}.path")
        if not Path(folder).is_dir() or not has_tokenizer_files(folder):
            return None
    return load_tokenizer(spec, role=role)


def check_same_tokenizer(spec: ModelConfig, role: str, teacher_spec: ModelConfig, tokenizer: Any) -> None:
    """Refuses a model whose own tokenizer differs from the teacher's, naming both and the differences.

    Raises:
        ConfigError: Naming the model's field, both tokenizers and what differs.

    """
    own = own_tokenizer(spec, role, teacher_spec)
    if own is None:
        return
    differences = compare_tokenizers(own, tokenizer)
    if differences:
        fix = " (or build it from the teacher with student.layers)" if role == "student" else ""
        raise ConfigError(
            f"{role}.path {quote_input(spec.path)} has its own tokenizer {describe_tokenizer(own)}, which "
            f"differs from the teacher's {describe_tokenizer(tokenizer)}: {'; '.join(differences)}. The "
            f"batches are tokenised with the teacher's tokenizer, so the {role} would read other tokens than "
            f"it was trained on; use a {role} that shares the teacher's tokenizer{fix}"
        )


def _token_count(tokenizer: Any) -> int:
    """The highest token id the tokenizer can give, plus one."""
    return max(tokenizer.get_vocab().values(), default=-1) + 1


def check_vocabularies(
    config: DistillConfig,
    tokenizer: Any,
    num_labels: int,
    objective: DistillationObjective,
    student_tokenizer: Any = None,
) -> None:
    """Checks, before any weights load, that every model reads ids it can embed (see the module).

    Args:
        config: The run's config.
        tokenizer: The main teacher's tokenizer.
        num_labels: The task's classes.
        objective: The run's objective (who reads logits).
        student_tokenizer: The student's own tokenizer in a cross-tokenizer run (the student reads its ids,
            which the objective's construction checked), else None (every model reads the teacher's).

    Raises:
        ConfigError: Naming the model, the sizes or tokenizers, and the fix.

    """
    for name, spec in config.teachers.items():
        check_same_tokenizer(spec, f"teachers.{name}", config.teacher, tokenizer)
    teacher_cfg, student_cfg = model_configs(config, num_labels, student_tokenizer)
    needed = _token_count(tokenizer)
    source = config.teacher.tokenizer or config.teacher.path
    readers = [("teacher", teacher_cfg)] + ([("student", student_cfg)] if student_tokenizer is None else [])
    for role, model_cfg in readers:
        size = getattr(model_cfg, "vocab_size", None)
        if size is not None and size < needed:
            raise ConfigError(
                f"the {role}'s vocab_size is {size:,}, but the teacher's tokenizer '{source}' "
                f"({describe_tokenizer(tokenizer)}) gives token ids up to {needed - 1:,}: the {role} cannot "
                f"embed them; use a {role} with a vocabulary of at least {needed:,} tokens "
                f"({role}.config.vocab_size)"
            )
    if student_tokenizer is not None:
        return  # each model reads its own tokens; only cross-tokenizer terms compare their logits
    logit_readers = objective.logit_readers()
    sizes = getattr(student_cfg, "vocab_size", None), getattr(teacher_cfg, "vocab_size", None)
    compares = logit_readers["student"] and logit_readers["teachers"]
    if config.task in TOKEN_LOGIT_TASKS and compares and None not in sizes and sizes[0] != sizes[1]:
        raise ConfigError(
            f"objective term(s) {', '.join(logit_readers['terms'])} compare token-level logits, but the "
            f"student's vocabulary has {sizes[0]:,} tokens and the teacher's {sizes[1]:,}; give the student "
            "the teacher's vocab_size"
        )
