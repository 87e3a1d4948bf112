"""Run logs: one JSON object per line (``metrics.jsonl``), mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class RunLog:
    """Appends records to ``<output_dir>/metrics.jsonl`` (and TensorBoard scalars).

    Args:
        output_dir: The run directory.
        enabled: False on non-main processes: every call is then a no-op.
        tensorboard: Also write ``<output_dir>/tensorboard`` when ``tensorboard`` is importable.
        resume_step: When resuming, records after this step (from the interrupted run) are dropped first, so
            the log reads like one uninterrupted run.

    """

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                self._writer = None

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        """Writes one record ``{"split": split, "step": step, **values}``."""
        if not self.enabled:
            return
        record = {"split": split, "step": step, **values}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        """Flushes and closes TensorBoard."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Reads a JSONL file (skipping a torn last line)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
