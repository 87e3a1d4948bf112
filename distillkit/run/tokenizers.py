"""The run's two tokenizers: the student's is compared with the teacher's before any weights load.

The same: the student trains on the teacher's token ids, as always. Different: a cross-tokenizer run, where
each model reads its own tokens of the same text; it is refused here, before any weights load, when the task,
a tokenizer (no character offsets) or a teacher cache cannot serve it (the objective's terms are checked
once built: :func:`distillkit.objective.cross_tokenizer.check_across_tokenizers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillkit.config import DistillConfig, ModelConfig
from distillkit.errors import ConfigError
from distillkit.tasks import Task
from distillkit.teacher_cache import TeacherCache, tokenizers_meta
from distillkit.tokenizers import (
    compare_tokenizers,
    describe_tokenizer,
    load_student_tokenizer,
    require_offsets,
)


def _source(spec: ModelConfig) -> str:
    return spec.tokenizer or spec.path or "config"


def both_tokenizers(config: DistillConfig, teacher: Any, student: Any) -> str:
    """``teacher tokenizer 'X' (...) and student tokenizer 'Y' (...)``, for messages."""
    return (
        f"teacher tokenizer '{_source(config.teacher)}' ({describe_tokenizer(teacher)}) and student "
        f"tokenizer '{_source(config.student)}' ({describe_tokenizer(student)})"
    )


def student_tokenizer_of(config: DistillConfig, task: Task, tokenizer: Any) -> tuple[Any, list[str]]:
    """Loads the student's tokenizer and compares it with the teacher's.

    Args:
        config: The run config.
        task: The run's task.
        tokenizer: The teacher's tokenizer.

    Returns:
        ``(student tokenizer, differences)``: no differences means the student trains on the teacher's
        tokens (the student's tokenizer is still the one saved with it).

    Raises:
        ConfigError: When the student's tokenizer cannot be loaded, or it differs and the task, a tokenizer
            without character offsets or a teacher cache written for other tokenizers cannot serve the run.

    """
    student = load_student_tokenizer(config.student, tokenizer)
    differences = compare_tokenizers(tokenizer, student)
    if differences and not task.cross_tokenizer:
        raise ConfigError(
            f"the {both_tokenizers(config, tokenizer, student)} differ ({'; '.join(differences[:3])}); task "
            f"'{task.name}' trains the student on the teacher's tokens. Give the student the teacher's "
            f"tokenizer (student.tokenizer: '{_source(config.teacher)}'), or use task causal_lm, which "
            "distils across tokenizers"
        )
    if differences:
        require_offsets(tokenizer, "teacher")
        require_offsets(student, "student")
    meta = tokenizers_meta(tokenizer, student if differences else None)
    for spec in config.teacher_specs().values():
        if (
            spec.cache is not None and (Path(spec.cache) / "index.json").is_file()
        ):  # (cache-teacher writes it)
            TeacherCache(spec.cache).check_tokenizers(meta)
    return student, differences
