"""What a training loop reads from: the training and evaluation batches (teachers: :mod:`.strategy`)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from distillkit.errors import ConfigError
from distillkit.run.run import Run


def train_loader(run: Run) -> tuple[DistributedSampler, DataLoader]:
    """The training sampler and DataLoader: each process reads its shard of an epoch-seeded permutation.

    Raises:
        ConfigError: If the training data is smaller than one batch.

    """
    accelerator, train, data = run.accelerator, run.train, run.data
    sampler = DistributedSampler(
        data.train,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        shuffle=True,
        seed=train.seed,
        drop_last=True,
    )
    loader = DataLoader(
        data.train,
        batch_size=train.batch_size,
        sampler=sampler,
        collate_fn=run.collator,
        drop_last=True,
        generator=torch.Generator().manual_seed(train.seed),
    )
    if len(loader) == 0:
        raise ConfigError(
            f"the training data has {len(data.train)} examples, fewer than one batch of train.batch_size="
            f"{train.batch_size} x {accelerator.num_processes} process(es); lower train.batch_size"
        )
    return sampler, loader


def eval_loader(run: Run) -> DataLoader:
    """The evaluation DataLoader of a loaded run (sharded across processes by accelerate)."""
    batch_size = run.train.eval_batch_size or run.train.batch_size
    return run.accelerator.prepare_data_loader(
        DataLoader(run.data.eval, batch_size=batch_size, collate_fn=run.collator)
    )
