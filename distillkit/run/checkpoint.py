"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``step-00000042/`` holding

- ``student.safetensors``: the student's state dict;
- ``objective.safetensors``: the objective's state dict (projection heads AND memory-bank buffers);
- ``optimizer.safetensors`` + the optimizer's param groups in ``state.json``;
- ``rng.safetensors``: torch CPU (and CUDA) generator states;
- ``state.json``: step, the id of the run that wrote it, scheduler state, Python/NumPy RNG states, and
  whatever the loop adds.

It is written to a temporary sibling directory, every file fsynced, then renamed into place, so a crash never
leaves a half-written ``step-*`` directory. Nothing is ever unpickled on load. Pruning old checkpoints
(``keep_last``) only ever removes checkpoints of the run writing (same ``run_id``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step-"
"""A checkpoint directory's name: this prefix and the step, ``step-00000042``."""


def fsync_dir(path: Path) -> None:
    """Flushes a directory's entries to disk (after files were written or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` and fsyncs it."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes ``tensors`` to a safetensors file (on the CPU) and fsyncs it."""
    # clone: tied weights share storage, which safetensors refuses
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits an optimizer state dict into tensors and JSON-able metadata.

    Args:
        state: ``optimizer.state_dict()``.

    Returns:
        ``{"state.<param>.<key>": tensor}`` and ``{"param_groups": ..., "scalars": {...}}``.

    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param, values in state["state"].items():
        for key, value in values.items():
            name = f"state.{param}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        _, param, key = name.split(".", 2)
        state.setdefault(int(param), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Captures every random generator: tensors (torch) and JSON (Python, NumPy)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    student: torch.nn.Module,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    keep_last: int = 2,
    run_id: str | None = None,
) -> Path:
    """Writes a checkpoint atomically and prunes this run's old ones.

    Args:
        directory: The checkpoints directory (``<output_dir>/checkpoints``).
        step: The optimizer step the state is after.
        student: The (unwrapped) student.
        objective: The objective (heads and memory banks).
        optimizer: The optimizer.
        scheduler: The learning-rate scheduler.
        extra: More JSON-able state (counters, metrics).
        keep_last: How many checkpoints of this run to keep.
        run_id: The run writing it, recorded in ``state.json``; only checkpoints of the same run id are pruned
            (None: those without one).

    Returns:
        The checkpoint directory.

    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_tensors(tmp / "student.safetensors", student.state_dict())
    save_tensors(tmp / "objective.safetensors", objective.state_dict())
    opt_tensors, opt_meta = optimizer_to_flat(optimizer.state_dict())
    save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    rng_tensors, rng_meta = rng_state()
    save_tensors(tmp / "rng.safetensors", rng_tensors)
    state = {
        "step": step,
        "run_id": run_id,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict(),
        "rng": rng_meta,
        "extra": extra or {},
    }
    write_bytes(tmp / "state.json", json.dumps(state).encode("utf-8"))
    fsync_dir(tmp)
    if final.exists():  # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(root, run_id=run_id)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


_ANY = object()


def checkpoint_run_id(path: str | Path) -> str | None:
    """The id of the run that wrote a checkpoint (None for one written before checkpoints recorded it)."""
    return json.loads((Path(path) / "state.json").read_text(encoding="utf-8")).get("run_id")


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint directory holds the state after."""
    return int(Path(path).name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(directory: str | Path, run_id: Any = _ANY) -> list[Path]:
    """Returns the complete checkpoints in ``directory``, oldest first.

    Args:
        directory: The checkpoints directory.
        run_id: Only those of this run (None: those that record no run id); default: all.

    """
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").exists()
    ]
    if run_id is not _ANY:
        found = [p for p in found if checkpoint_run_id(p) == run_id]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(directory: str | Path, run_id: Any = _ANY) -> Path | None:
    """Returns the newest complete checkpoint (of run ``run_id`` when given), or None."""
    found = list_checkpoints(directory, run_id)
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path,
    *,
    student: torch.nn.Module,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restores a checkpoint into live objects.

    Args:
        path: A ``step-*`` directory.
        student: The (unwrapped) student.
        objective: The objective.
        optimizer: The optimizer (built over the same parameters in the same order).
        scheduler: The scheduler.
        restore_rng: Also restore the random generators.

    Returns:
        The checkpoint's ``state.json`` (``step``, ``extra``, ...).

    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    device = next(student.parameters()).device
    student.load_state_dict(load_file(str(path / "student.safetensors"), device=str(device)))
    objective.load_state_dict(load_file(str(path / "objective.safetensors"), device=str(device)))
    optimizer.load_state_dict(
        optimizer_from_flat(load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    )
    scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state
