"""A run's experiment trackers (``train.report_to``): accelerate's TensorBoard, MLflow, trackio and W&B ones.

:func:`tracking_options` checks before any weights load that each named tracker's package is installed and
gives the ``Accelerator`` its ``log_with`` and logging directory; :class:`RunTrackers` starts the trackers
with the resolved config as hyperparameters (``accelerator.init_trackers``), mirrors every record of the run
log to them (``accelerator.log``: ``train/<term>``, ``train/total``, ``train/lr``, ``train/grad_norm``,
``eval/<metric>``) and finishes them.

Where each one writes: TensorBoard under ``<output_dir>/tensorboard/``; MLflow to ``MLFLOW_TRACKING_URI`` when
it is set, else to a file store in ``<output_dir>/mlruns``; trackio and W&B where their own settings say
(``WANDB_MODE=offline`` keeps W&B local).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from accelerate.utils import (
    ProjectConfiguration,
    is_mlflow_available,
    is_tensorboard_available,
    is_trackio_available,
    is_wandb_available,
)

from distillkit.errors import ConfigError

if TYPE_CHECKING:
    from distillkit.run.run import Run

PROJECT = "distillkit"
"""The project (MLflow experiment, trackio/W&B project, TensorBoard sub-directory) runs are logged under."""

INSTALL = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "trackio": "trackio", "wandb": "wandb"}
"""Tracker -> the package that provides it (``pip install distillkit[tracking]`` installs them all)."""

_AVAILABLE = {
    "tensorboard": is_tensorboard_available,
    "mlflow": is_mlflow_available,
    "trackio": is_trackio_available,
    "wandb": is_wandb_available,
}


def installed(tracker: str) -> bool:
    """Whether the package of ``tracker`` is importable (accelerate's own check)."""
    return bool(_AVAILABLE[tracker]())


def check_trackers(report_to: Sequence[str]) -> None:
    """Refuses trackers whose package is not installed, naming what to install.

    Raises:
        ConfigError: Naming the missing packages and the ``pip install`` that adds them.

    """
    missing = [name for name in report_to if not installed(name)]
    if missing:
        packages = " ".join(INSTALL[name] for name in missing)
        raise ConfigError(
            f"train.report_to names {', '.join(missing)}, but its package is not installed: "
            f"`pip install {packages}` (or `pip install 'distillkit[tracking]'`), or remove it from "
            "train.report_to"
        )


def tracking_options(report_to: Sequence[str], output_dir: str | Path | None) -> dict[str, Any]:
    """The ``Accelerator`` keyword arguments of a run's trackers (none when ``report_to`` is empty).

    Raises:
        ConfigError: If a tracker's package is missing (before any weights load).

    """
    if not report_to:
        return {}
    check_trackers(report_to)
    root = Path(output_dir or ".")
    project = ProjectConfiguration(project_dir=str(root), logging_dir=str(root / "tensorboard"))
    return {"log_with": list(report_to), "project_config": project}


def flat_hyperparameters(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flattens nested config data into ``{"train.lr": 1e-4, "objective.0.loss": "kd", ...}``.

    Values are ``bool``, ``int``, ``float``, ``str`` or None, which every tracker stores as a hyperparameter.
    """
    if isinstance(data, Mapping):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        value = data if data is None or isinstance(data, (bool, int, float, str)) else str(data)
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flat_hyperparameters(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class RunTrackers:
    """The trackers of one run, on its accelerator.

    Args:
        accelerator: The run's accelerator (built with :func:`tracking_options`).
        hyperparameters: The resolved config, flat (:func:`flat_hyperparameters`).
        output_dir: The run directory (the MLflow file store's default place).
        run_name: The name of the run in MLflow, trackio and W&B.

    """

    def __init__(
        self, accelerator: Accelerator, hyperparameters: dict[str, Any], output_dir: str | Path, run_name: str
    ) -> None:
        self.accelerator = accelerator
        self.hyperparameters = hyperparameters
        self.output_dir = Path(output_dir)
        self.run_name = run_name
        self.started = False

    @classmethod
    def for_run(cls, run: Run) -> RunTrackers | None:
        """The trackers of a loaded run, or None when ``train.report_to`` is empty."""
        if not run.train.report_to or run.accelerator is None:
            return None
        hyperparameters = flat_hyperparameters(run.config.model_dump(mode="json"))
        return cls(run.accelerator, hyperparameters, run.output_dir, run.output_dir.name or PROJECT)

    def start(self) -> None:
        """Starts every tracker of the accelerator and stores the hyperparameters."""
        names = [str(t) for t in self.accelerator.log_with]
        if "mlflow" in names and "MLFLOW_TRACKING_URI" not in os.environ:
            import mlflow

            # MLflow's own default is a SQLite database, which the light ``mlflow-skinny`` cannot write
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((self.output_dir / "mlruns").resolve().as_uri())
        named = {"mlflow": {"run_name": self.run_name}, "trackio": {"name": self.run_name}}
        named["wandb"] = {"name": self.run_name}
        self.accelerator.init_trackers(PROJECT, config=self.hyperparameters, init_kwargs=named)
        self.started = True

    def log(self, split: str, step: int, values: Mapping[str, Any]) -> None:
        """Sends the finite numbers of one record as ``<split>/<key>`` at ``step``."""
        numbers = {
            f"{split}/{key}": value
            for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
        if numbers and self.started:
            self.accelerator.log(numbers, step=step)

    def close(self) -> None:
        """Finishes every tracker (the accelerator can start them again for a later loop)."""
        if not self.started:
            return
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
        self.started = False
