"""The warm-up pass: one pass over the training data before the first step, for terms with memory banks.

A term whose state must hold every training example before it is read (``codir`` with ``bank.warm_start``,
the default of its released form) says so with ``LossTerm.wants_warm_start``. Before the first step of a run
that is not resumed, the loop then runs the student (eval mode, no gradients) over the training data in order,
reads each batch's teacher taps as training does (from the teacher cache when there is one: cheap), and hands
both to the terms' ``warm_start``. No random state is drawn (the data is read in order and nothing is
dropped out), and no parameter changes. Under DDP each process reads its shard (padded to equal batches, so
every bank update's all-gather matches across processes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from distillkit.objective.taps import collect_taps


def warm_start_pass(loop: Any) -> int:
    """Runs the warm-up pass of a :class:`~distillkit.run.loop.TrainingLoop` when a term asks for one.

    Args:
        loop: The training loop (its run, objective, student, teacher sources, device and autocast).

    Returns:
        The batches handed to the terms (0 when no term asked).

    """
    objective = loop.objective
    if not objective.wants_warm_start:
        return 0
    run, accelerator = loop.run, loop.accelerator
    sampler = DistributedSampler(
        run.data.train, num_replicas=accelerator.num_processes, rank=accelerator.process_index, shuffle=False
    )
    loader = DataLoader(
        run.data.train, batch_size=run.train.batch_size, sampler=sampler, collate_fn=run.collator
    )
    request = objective.warm_start_request()
    student = loop.student
    was_training = student.training
    student.eval()
    batches = 0
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(loop.device) for k, v in batch.items()}
            teacher = loop.teacher_taps(batch)
            with loop.autocast():
                taps = collect_taps(student, batch, request)
            objective.warm_start(taps, teacher, batch)
            batches += 1
    student.train(was_training)
    if loop.main:
        print(
            f"distillkit: warm-up pass over the {len(run.data.train)} training examples ({batches} batches): "
            f"{', '.join(label for label, t in objective.terms.items() if t.wants_warm_start)} filled"
        )
    return batches
