"""Run logs: one JSON object per line (``metrics.jsonl``), mirrored to the run's experiment trackers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distillkit.run.trackers import RunTrackers


class RunLog:
    """Appends records to ``<output_dir>/metrics.jsonl`` and sends them to the experiment trackers.

    Args:
        output_dir: The run directory.
        enabled: False on non-main processes: every call is then a no-op.
        resume_step: When resuming, records after this step (from the interrupted run) are dropped first, so
            the log reads like one uninterrupted run.
        trackers: The run's trackers (``train.report_to``), started here and finished by :meth:`close`.

    """

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool = True,
        resume_step: int | None = None,
        trackers: RunTrackers | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.trackers = trackers if enabled else None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        if self.trackers is not None:
            self.trackers.start()

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        """Writes one record ``{"split": split, "step": step, **values}``."""
        if not self.enabled:
            return
        record = {"split": split, "step": step, **values}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(split, step, values)

    def close(self) -> None:
        """Finishes the trackers."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Reads a JSONL file (skipping a torn last line)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
