"""A run's output directory holds one run: never two mixed, and a refused rerun touches nothing.

``distillkit distill`` writes a run into ``output_dir``: ``run.json`` (what the run is: its id and the
settings its checkpoints depend on), ``metrics.jsonl``, ``checkpoints/``, ``tensorboard/``, and at the end
``summary.json`` and ``student/``. Before anything loads, :func:`check_output_dir` decides what may happen:

- a new or empty directory: the run starts;
- a directory that is not empty: refused (nothing is touched), unless
- ``--resume``: it continues the run there, if the settings match (:func:`run_identity`; otherwise it names
  every field that differs) and its last checkpoint is not past ``train.steps``;
- ``--overwrite``: the previous run's outputs (:data:`RUN_OUTPUTS`) are removed once the new run has loaded
  (:func:`clear_run_outputs`); other files are left alone.

Paths the config itself reads (a teacher cache, a fine-tuned teacher's directory, data) may lie inside the
directory and do not count. :class:`RunRecord` writes ``run.json`` when training starts and remembers the
run's last checkpoint (what an interrupted command names).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillkit.config import DistillConfig
from distillkit.errors import ConfigError, quote_input, resolved_against
from distillkit.run.callbacks import Callback
from distillkit.run.checkpoint import checkpoint_step, latest_checkpoint
from distillkit.run.teachers import CACHE_FIELDS, fingerprint

if TYPE_CHECKING:
    from distillkit.run.loop import TrainingLoop

RUN_RECORD = "run.json"
"""Written into the output directory when training starts: run id, fingerprint and identity."""

RUN_OUTPUTS = (
    "run.json",
    "metrics.jsonl",
    "checkpoints",
    "tensorboard",
    "mlruns",
    "summary.json",
    "predictions.json",
    "student",
)
"""Everything a run writes into its output directory (what ``--overwrite`` removes)."""

_TERM_TEACHER_FIELDS = {"teacher", "teacher_weights", "teacher_mix"}


def run_identity(config: DistillConfig) -> dict[str, Any]:
    """What a checkpoint of this run holds depends on: task, models, objective and data (JSON values).

    Where a teacher's outputs come from (model or cache) and the schedule (``train``) are left out: a run may
    be resumed with another learning rate or more steps.
    """
    identity = {
        "task": config.task,
        "student": config.student.model_dump(),
        "teacher": config.teacher.model_dump(exclude=CACHE_FIELDS),
        "objective": [
            t.model_dump(exclude=_TERM_TEACHER_FIELDS - t.model_fields_set) for t in config.objective
        ],
        "data": config.data.model_dump(),
    }
    if config.teachers:
        identity["teachers"] = {n: s.model_dump(exclude=CACHE_FIELDS) for n, s in config.teachers.items()}
    return json.loads(json.dumps(identity, default=str))  # keeps the order: run_fingerprint hashes the values


def run_fingerprint(config: DistillConfig) -> str:
    """A short hash of :func:`run_identity`: a checkpoint of another fingerprint is refused on resume."""
    return fingerprint(*run_identity(config).values())


def identity_differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """Each field where two identities differ, as ``objective.0.weight 1.0 -> 0.5`` (lists by index)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        keys = sorted(set(recorded) | set(current), key=str)
        pairs = [(recorded.get(k), current.get(k), f"{prefix}{k}.") for k in keys]
        return [d for a, b, path in pairs for d in identity_differences(a, b, path)]
    both_lists = isinstance(recorded, list) and isinstance(current, list)
    if both_lists and len(recorded) == len(current):
        pairs = [(a, b, f"{prefix}{i}.") for i, (a, b) in enumerate(zip(recorded, current, strict=True))]
        return [d for a, b, path in pairs for d in identity_differences(a, b, path)]
    if recorded == current:
        return []
    return [f"{prefix.rstrip('.') or '<root>'} {quote_input(recorded, 60)} -> {quote_input(current, 60)}"]


def read_run_record(output_dir: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` of a directory, or None when it has none (or an unreadable one)."""
    path = Path(output_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _config_inputs(config: DistillConfig) -> list[Path]:
    """Absolute paths the config reads from (data, models, tokenizers, teacher caches)."""
    found = [config.data.path, config.data.eval_path]
    probe = config.evaluation.probe
    if probe is not None:
        found += [probe.path, probe.eval_path]
    for spec in (config.student, *config.teacher_specs().values()):
        found += [spec.path, spec.tokenizer, spec.cache, spec.finetune.cache_dir if spec.finetune else None]
    return [Path(p).expanduser().absolute() for p in found if p and not p.startswith(("pypi:", "builtin:"))]


def _outputs_in(out: Path, config: DistillConfig) -> list[Path]:
    """The entries of ``out`` that are not inputs of the config (which may live inside it)."""
    inputs = _config_inputs(config)
    return sorted(
        entry
        for entry in out.iterdir()
        if not any(p == entry.absolute() or entry.absolute() in p.parents for p in inputs)
    )


def _describe_run(out: Path, entries: list[Path]) -> str:
    """``a finished run (summary.json, student/, ...)`` or what else the directory holds, for messages."""
    names = [e.name + ("/" if e.is_dir() else "") for e in entries]
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    last = latest_checkpoint(out / "checkpoints")
    if (out / "summary.json").is_file():
        what = "a finished run"
    elif last is not None:
        what = f"an unfinished run (last checkpoint at step {checkpoint_step(last)})"
    elif any(e.name in RUN_OUTPUTS for e in entries):
        what = "a run without checkpoints"
    else:
        what = "files of something else"
    return f"{what} ({shown})"


def refuse_past_end(checkpoint: Path, steps: int) -> None:
    """Refuses to resume from a checkpoint past ``train.steps`` (the run would report its old end state)."""
    step = checkpoint_step(checkpoint)
    if step > steps:
        raise ConfigError(
            f"--resume: the last checkpoint {checkpoint} is at step {step}, past train.steps={steps}; set "
            f"train.steps to at least {step} to continue that run, or start anew with --overwrite"
        )


def check_output_dir(config: DistillConfig, resume: bool = False, overwrite: bool = False) -> None:
    """Decides, before anything loads or is written, whether this run may use ``config.output_dir``.

    Args:
        config: The run's config.
        resume: Continue the run in the directory (``--resume``).
        overwrite: Replace the run in the directory (``--overwrite``).

    Raises:
        ConfigError: For a directory that is not empty without ``resume``/``overwrite``; with ``resume``,
            for a run of other settings (naming each field that differs) or a last checkpoint past
            ``train.steps``. Nothing is touched.

    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite replaces it: give one")
    out = Path(config.output_dir)
    where = f"output_dir {quote_input(config.output_dir)}{resolved_against(out)}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where} is a file; output_dir must be a directory")
    entries = _outputs_in(out, config) if out.is_dir() else []
    if not entries or overwrite:
        return
    if not resume:
        raise ConfigError(
            f"{where} already holds {_describe_run(out, entries)}; nothing was changed. Continue that run "
            "with --resume, replace it with --overwrite, or set output_dir to another directory"
        )
    record = read_run_record(out)
    if record is not None:
        differences = identity_differences(record.get("identity"), run_identity(config))
        if differences:
            more = f" (and {len(differences) - 8} more)" if len(differences) > 8 else ""
            raise ConfigError(
                f"--resume: {where} holds a run of other settings: {'; '.join(differences[:8])}{more}. "
                "Resume it with the config it ran with, start anew with --overwrite, or set another "
                "output_dir"
            )
    last = latest_checkpoint(out / "checkpoints", record["run_id"]) if record else None
    last = last or latest_checkpoint(out / "checkpoints")
    if last is None:
        return
    if record is None:
        written = json.loads((last / "state.json").read_text(encoding="utf-8"))["extra"].get("fingerprint")
        if written not in (None, run_fingerprint(config)):
            raise ConfigError(
                f"--resume: the checkpoint {last} was written by a run with other model/objective/data "
                f"settings (it predates {RUN_RECORD}, which would name them); start anew with --overwrite or "
                "set another output_dir"
            )
    refuse_past_end(last, config.train.steps)


def clear_run_outputs(output_dir: str | Path) -> list[str]:
    """Removes a previous run's outputs (:data:`RUN_OUTPUTS`) from a directory; returns what it removed."""
    out = Path(output_dir)
    removed = []
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def replace_previous_run(output_dir: str | Path, accelerator: Any) -> None:
    """``--overwrite``, once the new run has loaded: the main process removes the previous run's outputs."""
    if accelerator.is_main_process:
        removed = clear_run_outputs(output_dir)
        if removed:
            print(
                f"distillkit: --overwrite: removed the previous run's {', '.join(removed)} from {output_dir}"
            )
    accelerator.wait_for_everyone()


class LastCheckpoint(Callback):
    """Watches a run's loop, to say which checkpoint is its last (e.g. when the run is interrupted).

    Attributes:
        loop: The loop (None before training starts).

    """

    def __init__(self) -> None:
        self.loop: TrainingLoop | None = None

    @property
    def last_checkpoint(self) -> Path | None:
        """This run's newest checkpoint on disk: written by it or resumed from (None before the first)."""
        if self.loop is None:
            return None
        return latest_checkpoint(self.loop.checkpoints, run_id=self.loop.run_id)

    @property
    def main(self) -> bool:
        """Whether this is the main process (or no loop has started)."""
        return self.loop is None or self.loop.main

    def on_train_begin(self, loop: TrainingLoop) -> None:
        """Remembers the loop."""
        self.loop = loop


class RunRecord(LastCheckpoint):
    """Writes ``run.json`` when training starts (and remembers the run's last checkpoint).

    Args:
        config: The run's config (its identity is recorded).

    """

    def __init__(self, config: DistillConfig) -> None:
        super().__init__()
        self.config = config

    def on_train_begin(self, loop: TrainingLoop) -> None:
        """Records the run (main process): its id, fingerprint and identity."""
        super().on_train_begin(loop)
        if not loop.main:
            return
        record = {
            "run_id": loop.run_id,
            "fingerprint": loop.run.fingerprint,
            "identity": run_identity(self.config),
            "steps": loop.train.steps,
        }
        _write_atomically(Path(loop.run.output_dir) / RUN_RECORD, json.dumps(record, indent=2))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
