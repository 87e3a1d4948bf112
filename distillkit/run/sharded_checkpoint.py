"""Sharded training checkpoints (``train.strategy: fsdp``), written by every process together.

A checkpoint is a directory ``step-00000042/`` holding

- ``dcp/``: the trainable module's state (student weights, the objective's heads AND memory-bank buffers)
  and AdamW's state, as ``torch.distributed.checkpoint`` (DCP) writes them: each process its own shards, the
  main process the metadata; replicated tensors (banks) once;
- ``rng/rank-NNNNN.safetensors`` + ``.json``: each process's torch (and CUDA), Python and NumPy generators;
- ``state.json``: step, scheduler state, the number of processes, and whatever the loop adds.

It is written to a temporary sibling directory, every file fsynced, then renamed into place by the main
process, so a crash never leaves a half-written ``step-*`` directory; nothing is pickled.

Loading with the same number of processes restores the run bit for bit. With another number, DCP reshards
every tensor to the new processes on load (weights, heads, banks and optimizer state are the same); each
process takes the random generators of the process of the same rank (rank 0's where there was none), and
the data resumes at the same step with the new global batch, so the rest of the run is not the one the
original number of processes would have trained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from distillkit.errors import ConfigError
from distillkit.run.checkpoint import (
    CHECKPOINT_PREFIX,
    fsync_dir,
    list_checkpoints,
    rng_state,
    save_tensors,
    set_rng_state,
    write_bytes,
)

FORMAT = "dcp"
"""``state.json``'s ``format`` of a sharded checkpoint."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint directory ``path`` was written by :func:`save_sharded_checkpoint`."""
    return (Path(path) / "dcp").is_dir()


def _rng_paths(directory: Path, rank: int) -> tuple[Path, Path]:
    stem = directory / "rng" / f"rank-{rank:05d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_sharded_checkpoint(
    directory: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    keep_last: int = 2,
    run_id: str | None = None,
) -> Path | None:
    """Writes a sharded checkpoint atomically and prunes old ones; every process must call it.

    Args:
        directory: The checkpoints directory (``<output_dir>/checkpoints``).
        step: The optimizer step the state is after.
        model: The sharded trainable module (student and the objective's heads and banks).
        optimizer: Its optimizer.
        scheduler: The learning-rate scheduler.
        extra: More JSON-able state (counters, metrics).
        keep_last: How many checkpoints of this run to keep.
        run_id: The run writing it; only checkpoints of the same run id are pruned.

    Returns:
        The checkpoint directory on the main process, None on the others.

    """
    rank, main = dist.get_rank(), dist.get_rank() == 0
    root = Path(directory)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / "dcp"))
    tensors, meta = rng_state()
    tensor_path, meta_path = _rng_paths(tmp, rank)
    save_tensors(tensor_path, tensors)
    write_bytes(meta_path, json.dumps(meta).encode("utf-8"))
    dist.barrier()
    if not main:
        dist.barrier()
        return None
    state = {
        "step": step,
        "format": FORMAT,
        "processes": dist.get_world_size(),
        "scheduler": scheduler.state_dict(),
        "extra": extra or {},
        "run_id": run_id,
    }
    write_bytes(tmp / "state.json", json.dumps(state).encode("utf-8"))
    for folder in (tmp / "dcp", tmp / "rng", tmp):
        fsync_dir(folder)
    if final.exists():  # a re-run of the same step: replace it
        shutil.rmtree(final)
    tmp.replace(final)
    fsync_dir(root)
    for old in list_checkpoints(root, run_id=run_id)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restores a sharded checkpoint into live objects, resharding to this number of processes.

    Args:
        path: A ``step-*`` directory.
        model: The sharded trainable module.
        optimizer: Its optimizer.
        scheduler: The scheduler.
        restore_rng: Also restore the random generators.

    Returns:
        The checkpoint's ``state.json`` (``step``, ``extra``, ``processes``, ...).

    Raises:
        ConfigError: If ``path`` is a checkpoint of ``train.strategy: ddp``.

    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ConfigError(
            f"the checkpoint {path} was written with train.strategy: ddp (whole safetensors files), and this "
            "run uses fsdp; resume it with train.strategy: ddp, or use another output_dir"
        )
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    payload = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(payload, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        tensor_path, meta_path = _rng_paths(path, dist.get_rank())
        if not tensor_path.exists():  # fewer processes wrote it
            tensor_path, meta_path = _rng_paths(path, 0)
        set_rng_state(load_file(str(tensor_path)), json.loads(meta_path.read_text(encoding="utf-8")))
    return state
