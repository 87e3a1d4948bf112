"""``codir``: contrastive intermediate-layer distillation (CoDIR, Sun et al., 2020).

Per mapped layer pair the student's and the teacher's pooled representations go through projection heads to a
shared contrastive space and are L2-normalised; the student's vector (query) is pulled toward the teacher's
vector of the same input (positive) and pushed away from negatives, via InfoNCE computed by the fused
``distillkit.ops.membank_infonce`` op. Negatives come from one of three sources (``bank.kind``):

- ``queue``: a FIFO of past teacher keys (MoCo style), ``bank.size`` keys.
- ``index``: one slot per training example, momentum-updated, ``bank.negatives`` slots drawn per query
  (CRD style, the form of CoDIR's released code). Needs ``example_ids`` in the batch.
- ``in_batch``: the teacher keys of the other examples in the batch, across all processes under DDP
  (CoDIR's pre-training form).

``negatives: other_labels`` drops negatives that share the query's label (CoDIR fine-tuning).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillkit import hookimpl
from distillkit.losses import LossParams, LossTerm, ModelDims, Taps, masked_mean
from distillkit.mapping import LayerMapSpec
from distillkit.membank import IndexBank, QueueBank, all_gather_rows, rank_and_world
from distillkit.ops import membank_infonce


class BankParams(LossParams):
    """Where negatives come from.

    Attributes:
        kind: ``queue``, ``index`` or ``in_batch``.
        size: Queue capacity (``queue``; default 16384) or number of training examples (``index``; required).
        momentum: Momentum of the ``index`` bank update (CRD: 0.5).
        negatives: Slots drawn per query from an ``index`` bank (CRD: 16384).

    """

    kind: Literal["queue", "index", "in_batch"] = "queue"
    size: int | None = Field(default=None, ge=1)
    momentum: float = Field(default=0.5, ge=0.0, lt=1.0)
    negatives: int = Field(default=4096, ge=1)


class CoDIRParams(LossParams):
    """Parameters of ``codir``.

    Attributes:
        layers: Layer map (``uniform``, ``skip``, ``last`` or ``[[s, t], ...]``).
        pooling: ``mean`` over real tokens, or ``cls`` (the first token).
        temperature: InfoNCE temperature τ (CoDIR/CRD: 0.07).
        dim: Size of the shared contrastive space (CRD: 128).
        bank: Negative source, see :class:`BankParams`.
        negatives: ``all``, or ``other_labels`` to exclude same-label negatives (needs labels).

    """

    layers: LayerMapSpec = "uniform"
    pooling: Literal["mean", "cls"] = "mean"
    temperature: float = Field(default=0.07, gt=0.0)
    dim: int = Field(default=128, ge=1)
    bank: BankParams = Field(default_factory=BankParams)
    negatives: Literal["all", "other_labels"] = "all"


class CoDIRLoss(LossTerm):
    """InfoNCE between projected student and teacher layer representations, against a memory bank."""

    name = "codir"
    Params = CoDIRParams

    def __init__(self, params: CoDIRParams, dims: ModelDims) -> None:
        super().__init__(params, dims)
        self.pairs = self.layer_pairs(params.layers)
        layers = len(self.pairs)
        self.student_heads = nn.ModuleList(nn.Linear(dims.student_hidden, params.dim) for _ in self.pairs)
        self.teacher_heads = nn.ModuleList(nn.Linear(dims.teacher_hidden, params.dim) for _ in self.pairs)
        bank = params.bank
        self.bank: nn.Module | None
        if bank.kind == "queue":
            self.bank = QueueBank(layers, bank.size or 16384, params.dim)
        elif bank.kind == "index":
            if bank.size is None:
                raise ValueError(
                    "codir with bank.kind: index needs bank.size = the number of training examples"
                )
            self.bank = IndexBank(layers, bank.size, params.dim, bank.momentum)
        else:
            self.bank = None
        # teacher keys of every micro-batch since the last optimizer step: (keys, labels, example ids)
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.params.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, mask)

    def _embed(self, taps: Taps, heads: nn.ModuleList, side: int) -> torch.Tensor:
        """Returns normalised projections ``[L, B, dim]`` (float32) of one model's mapped layers."""
        mask = taps.token_mask()
        vectors = [
            F.normalize(head(self._pool(taps.hidden_states[pair[side]], mask)).float(), dim=-1)
            for head, pair in zip(heads, self.pairs, strict=True)
        ]
        return torch.stack(vectors)

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss, averaged over layer pairs and examples.

        Args:
            student: Student taps; ``hidden_states[i]`` is ``[B, T, H_s]``.
            teacher: Teacher taps; ``hidden_states[j]`` is ``[B, T, H_t]``.

        Returns:
            Scalar loss.

        """
        query = self._embed(student, self.student_heads, 0)  # [L, B, dim]
        positive = self._embed(teacher, self.teacher_heads, 1)  # [L, B, dim]
        labels = None
        if self.params.negatives == "other_labels":
            if student.labels is None:
                raise ValueError("codir with negatives: other_labels needs labels in the batch")
            labels = student.labels.to(torch.long)
        tau = self.params.temperature
        kind = self.params.bank.kind
        keys = positive.detach()
        if kind == "index":
            if student.example_ids is None:
                raise ValueError("codir with an index bank needs example_ids in the batch")
            ids = student.example_ids.to(torch.long)
            index = self.bank.sample_negatives(ids, self.params.bank.negatives)
            index = index.unsqueeze(0).expand(len(self.pairs), -1, -1)
            loss = membank_infonce(
                query,
                positive,
                self.bank.keys,
                tau,
                query_labels=labels,
                bank_labels=None if labels is None else self.bank.labels,
                negative_index=index,
            )
            self._pending.append((keys, labels, ids))
            return loss.mean()
        if kind == "queue" and int(self.bank.filled) > 0:
            bank, bank_labels = self.bank.negatives()
            loss = membank_infonce(
                query,
                positive,
                bank,
                tau,
                query_labels=labels,
                bank_labels=None if labels is None else bank_labels,
            )
        else:  # in-batch negatives (also the queue's first step, while it is empty)
            loss = self._in_batch(query, positive, keys, labels)
        if self.bank is not None:
            self._pending.append((keys, labels, None))
        return loss.mean()

    def _in_batch(
        self, query: torch.Tensor, positive: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """InfoNCE against the teacher keys of the whole (global, under DDP) batch but the query's own.

        Args:
            query: ``[L, B, dim]``.
            positive: ``[L, B, dim]``.
            keys: ``[L, B, dim]`` detached teacher keys of this rank's batch.
            labels: ``[B]`` class labels for ``other_labels``, or None.

        Returns:
            ``[L, B]`` per-row losses.
        """
        rank, _ = rank_and_world()
        batch = query.shape[1]
        bank = all_gather_rows(keys, dim=1)  # [L, world·B, dim], rank order
        if labels is None:  # each row is its own class, so only the query's own key is excluded
            own = torch.arange(batch, device=query.device) + rank * batch
            return membank_infonce(
                query,
                positive,
                bank,
                self.params.temperature,
                query_labels=own,
                bank_labels=torch.arange(bank.shape[1], device=query.device),
            )
        bank_labels = all_gather_rows(labels, dim=0)  # the own row shares the query's label
        return membank_infonce(
            query, positive, bank, self.params.temperature, query_labels=labels, bank_labels=bank_labels
        )

    def after_step(self) -> None:
        """Adds the teacher keys of every micro-batch since the last step to the bank, oldest first.

        ``queue`` enqueues them, ``index`` momentum-updates their slots. Under DDP each micro-batch is one
        all-gather: every rank runs the same number of micro-batches per step.
        """
        pending, self._pending = self._pending, []
        if self.bank is None:
            return
        for keys, labels, ids in pending:
            if isinstance(self.bank, IndexBank):
                self.bank.update(ids, keys, labels)
            else:
                self.bank.enqueue(keys, labels)

    def discard_pending(self) -> None:
        """Drops the keys collected since the last step (for a step that was skipped, not applied)."""
        self._pending = []


@hookimpl
def distillkit_register_losses(register):
    """Registers ``codir``."""
    register(CoDIRLoss)


@hookimpl
def distillkit_register_bench_cases(register):
    """Adds ``distillkit bench`` cases for the large-bank forms of ``codir``."""
    from distillkit.bench import BenchCase

    register(BenchCase("codir-queue-65k", "codir", {"bank": {"kind": "queue", "size": 65536}}))
    register(
        BenchCase("codir-index-16k", "codir", {"bank": {"kind": "index", "size": 50000, "negatives": 16384}})
    )
