"""``codir``: contrastive intermediate-layer distillation (CoDIR, Sun et al., EMNLP 2020, arXiv 2009.14167).

The student's and the teacher's pooled layer representations are projected to a shared contrastive space and
L2-normalised; the student's vector (query) is pulled toward the teacher's vector of the same input (positive)
and pushed away from negatives.

- ``fusion``: ``concat`` (default; the paper's and the released code's form) pools each mapped layer,
  concatenates the pooled vectors of all mapped layers into one vector per model and projects it once per
  side; ``per_layer`` gives each layer pair its own heads and averages the per-pair losses.
- ``objective``: ``infonce`` (default; the paper's contrastive objective) is
  ``−log exp(<q, k+>/τ) / (exp(<q, k+>/τ) + Σ_neg exp(<q, k−>/τ))``, computed by the fused
  ``distillkit.ops.membank_infonce`` op; ``crd_nce`` is the released code's CRD NCE loss with a student and a
  teacher bank, symmetric, with a normalising constant Z fixed on the first batch (:mod:`codir_crd`).

Negatives for ``infonce`` come from one of three sources (``bank.kind``):

- ``queue``: a FIFO of past teacher keys (MoCo style), ``bank.size`` keys.
- ``index``: one slot per training example, momentum-updated, ``bank.negatives`` slots drawn per query
  (CRD style). Needs ``example_ids`` in the batch.
- ``in_batch``: the teacher keys of the other examples in the batch, across all processes under DDP
  (CoDIR's pre-training form).

``negatives: other_labels`` drops negatives that share the query's label (CoDIR fine-tuning); with
``crd_nce`` negatives are drawn only among slots of other labels.

Settings that reproduce the released code (fairseq criterion ``sentence_prediction_crd``):
``fusion: concat, objective: crd_nce, pooling: cls, bank: {kind: index, size: N, negatives: K, momentum: 0.5},
negatives: other_labels, temperature: 0.07, dim: 128``, with the layer map of the script (student layers 1..6
against teacher layers 1, 3, ..., 11: ``layer_map: [[1, 1], [2, 3], [3, 5], [4, 7], [5, 9], [6, 11]]``). See
``docs/losses.md`` for the source of each choice.

Keys enter the banks in :meth:`CoDIRLoss.after_step`, for every micro-batch since the previous step.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from distillkit import (
    BenchCase,
    ConfigError,
    LayerMapSpec,
    LossParams,
    LossTerm,
    ModelDims,
    TapRequest,
    Taps,
    TaskInfo,
    hookimpl,
    masked_mean,
)
from distillkit.ops import membank_infonce
from distillkit_plugins.codir_banks import IndexBank, QueueBank, all_gather_rows, rank_and_world
from distillkit_plugins.codir_crd import CRDMemory


class BankParams(LossParams):
    """Where negatives come from.

    Attributes:
        kind: ``queue``, ``index`` or ``in_batch``.
        size: Queue capacity (``queue``; default 16384) or number of training examples (``index``; default:
            the run's training examples).
        momentum: Momentum of the ``index`` bank update (CRD: 0.5).
        negatives: Slots drawn per query from an ``index`` bank (CRD: 16384).
        warm_start: ``index`` banks: fill every slot with one pass over the training data before the first
            step (the teacher cache makes it cheap), so that no slot is read before it holds its example.
            Default: on for ``objective: crd_nce`` (the released form, which trains for 10 epochs: its slots
            are read warm from the second epoch on), off otherwise.

    """

    kind: Literal["queue", "index", "in_batch"] = "queue"
    size: int | None = Field(default=None, ge=1)
    momentum: float = Field(default=0.5, ge=0.0, lt=1.0)
    negatives: int = Field(default=4096, ge=1)
    warm_start: bool | None = None


class CoDIRParams(LossParams):
    """Parameters of ``codir``.

    Attributes:
        layer_map: Layer map (``uniform``, ``skip``, ``last`` or ``[[s, t], ...]``).
        pooling: ``mean`` over real tokens, or ``cls`` (the first token).
        temperature: Temperature τ (CoDIR/CRD: 0.07).
        dim: Size of the shared contrastive space (CRD: 128).
        bank: Negative source, see :class:`BankParams`.
        negatives: ``all``, or ``other_labels`` to exclude same-label negatives (needs labels).
        fusion: ``concat`` (one vector from all mapped layers, one projection per side) or ``per_layer``.
        objective: ``infonce`` (softmax over positive and negatives) or ``crd_nce`` (CRD's NCE loss with
            student and teacher banks; needs ``bank.kind: index``).

    """

    layer_map: LayerMapSpec = "uniform"
    pooling: Literal["mean", "cls"] = "mean"
    temperature: float = Field(default=0.07, gt=0.0)
    dim: int = Field(default=128, ge=1)
    bank: BankParams = Field(default_factory=BankParams)
    negatives: Literal["all", "other_labels"] = "all"
    fusion: Literal["concat", "per_layer"] = "concat"
    objective: Literal["infonce", "crd_nce"] = "infonce"

    @model_validator(mode="after")
    def _check_combination(self) -> CoDIRParams:
        if self.objective == "crd_nce" and self.bank.kind != "index":
            raise ValueError(
                f"codir with objective: crd_nce keeps one student and one teacher slot per training example, "
                f"so it needs bank: {{kind: index, size: <number of training examples>}}, not kind: "
                f"{self.bank.kind}; use objective: infonce for queue or in_batch negatives"
            )
        if self.bank.warm_start and self.bank.kind != "index":
            raise ValueError(
                f"bank.warm_start fills one slot per training example, so it needs bank.kind: index, not "
                f"{self.bank.kind}"
            )
        return self

    @property
    def warms_bank(self) -> bool:
        """Whether the bank is filled by a pass over the training data before the first step."""
        if self.bank.warm_start is None:
            return self.objective == "crd_nce"
        return self.bank.warm_start


def _index_slots(bank: BankParams, dims: ModelDims) -> int:
    """Slots of an index bank: ``bank.size``, else the number of training examples of the run."""
    examples = dims.train_examples
    if bank.size is None:
        if examples is None:
            raise ConfigError(
                "codir with bank.kind: index needs bank.size = the number of training examples (a run sets "
                "it from the data; set it when building the term yourself)"
            )
        return examples
    if examples is not None and bank.size < examples:
        raise ConfigError(
            f"an index bank of {bank.size} slots but the training data has {examples} examples; set its "
            f"bank.size to {examples} or leave it out"
        )
    return bank.size


class CoDIRLoss(LossTerm):
    """Contrastive distillation of intermediate representations: InfoNCE or CRD's NCE, with memory banks."""

    name = "codir"
    Params = CoDIRParams
    teacher_reads = TapRequest(hidden_states=True)
    cross_tokenizer = True  # mean-pooled sequence vectors; not with pooling: cls (check_cross_tokenizer)

    def __init__(self, params: CoDIRParams, dims: ModelDims) -> None:
        super().__init__(params, dims)
        self.pairs = self.layer_pairs(params.layer_map)
        if params.fusion == "concat":
            heads = 1
            student_in, teacher_in = (
                len(self.pairs) * dims.student_hidden,
                len(self.pairs) * dims.teacher_hidden,
            )
        else:
            heads = len(self.pairs)
            student_in, teacher_in = dims.student_hidden, dims.teacher_hidden
        self.student_heads = nn.ModuleList(nn.Linear(student_in, params.dim) for _ in range(heads))
        self.teacher_heads = nn.ModuleList(nn.Linear(teacher_in, params.dim) for _ in range(heads))
        bank = params.bank
        self.bank: nn.Module | None = None
        self.crd: CRDMemory | None = None
        slots = _index_slots(bank, dims) if bank.kind == "index" else None
        if params.objective == "crd_nce":
            self.crd = CRDMemory(heads, slots, params.dim, bank.momentum)
        elif bank.kind == "queue":
            self.bank = QueueBank(heads, bank.size or 16384, params.dim)
        elif bank.kind == "index":
            self.bank = IndexBank(heads, slots, params.dim, bank.momentum)
        # every micro-batch since the last optimizer step: (teacher keys, labels, example ids, student keys)
        self._pending: list[
            tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
        ] = []

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.params.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, mask)

    def _embed(self, taps: Taps, heads: nn.ModuleList, side: int) -> torch.Tensor:
        """Returns normalised projections ``[L, B, dim]`` (float32); ``L`` = 1 with ``fusion: concat``.

        Args:
            taps: One model's taps.
            heads: That model's projection heads.
            side: 0 for the student's layer of each pair, 1 for the teacher's.

        """
        mask = taps.token_mask()
        pooled = [self._pool(taps.hidden_states[pair[side]], mask) for pair in self.pairs]  # each [B, H]
        if self.params.fusion == "concat":
            pooled = [torch.cat(pooled, dim=-1)]  # [B, L·H]
        vectors = [F.normalize(head(x).float(), dim=-1) for head, x in zip(heads, pooled, strict=True)]
        return torch.stack(vectors)

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss, averaged over heads (layer pairs, or the one fused head) and examples.

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
        ids = None
        if kind == "index":
            if student.example_ids is None:
                raise ValueError("codir with an index bank needs example_ids in the batch")
            ids = student.example_ids.to(torch.long)
        if self.crd is not None:
            index = self.crd.sample(ids, labels, self.params.bank.negatives)
            loss = self.crd.loss(query, positive, index, tau)
            self._pending.append((keys, labels, ids, query.detach()))
            return loss.mean()
        if kind == "index":
            index = self.bank.sample_negatives(ids, self.params.bank.negatives)
            index = index.unsqueeze(0).expand(query.shape[0], -1, -1)
            loss = membank_infonce(
                query,
                positive,
                self.bank.keys,
                tau,
                query_labels=labels,
                bank_labels=None if labels is None else self.bank.labels,
                negative_index=index,
            )
        elif kind == "queue" and int(self.bank.filled) > 0:
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
            self._pending.append((keys, labels, ids, None))
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

    def tap_requests(self) -> tuple[TapRequest, TapRequest]:
        """Hidden states of both models; the batch's labels too with ``negatives: other_labels``."""
        labels = self.params.negatives == "other_labels"
        return TapRequest(hidden_states=True, labels=labels), self.teacher_reads

    def check_task(self, task: TaskInfo) -> None:
        """``other_labels`` needs one class label per example."""
        super().check_task(task)
        if self.params.negatives == "other_labels" and task.labels != "class":
            raise ConfigError(
                f"codir with negatives: other_labels needs a class label per example, and task '{task.name}' "
                "has none; use negatives: all"
            )

    def check_cross_tokenizer(self, task: TaskInfo) -> None:
        """Mean-pooled vectors work on two tokenizations of the same text; first tokens need not."""
        if self.params.pooling == "cls":
            raise ConfigError(
                "loss 'codir' with pooling: cls compares the two models' first tokens, which two tokenizers "
                "need not give for the same text; use pooling: mean"
            )

    def after_step(self) -> None:
        """Adds the keys of every micro-batch since the last step to the bank(s), oldest first.

        ``queue`` enqueues the teacher keys, ``index`` momentum-updates their slots, ``crd_nce`` updates the
        student and the teacher bank. Under DDP each micro-batch is one all-gather: every rank runs the same
        number of micro-batches per step.
        """
        pending, self._pending = self._pending, []
        for keys, labels, ids, student_keys in pending:
            if self.crd is not None:
                self.crd.update(ids, student_keys, keys, labels)
            elif isinstance(self.bank, IndexBank):
                self.bank.update(ids, keys, labels)
            elif self.bank is not None:
                self.bank.enqueue(keys, labels)

    @property
    def wants_warm_start(self) -> bool:
        """True with ``bank.warm_start`` (the default of ``crd_nce``): a warm-up pass fills the bank."""
        return self.params.warms_bank

    @torch.no_grad()
    def warm_start(self, student: Taps, teacher: Taps) -> None:
        """Writes one batch of the warm-up pass into the bank(s): the slots of its examples, overwritten.

        ``crd_nce`` also sets its normalising constants ``Z`` on the first batch, against the starting banks.
        """
        query = self._embed(student, self.student_heads, 0)
        keys = self._embed(teacher, self.teacher_heads, 1)
        if student.example_ids is None:
            raise ValueError("codir with an index bank needs example_ids in the batch")
        ids = student.example_ids.to(torch.long)
        labels = student.labels.to(torch.long) if self.params.negatives == "other_labels" else None
        if self.crd is not None:
            bank = self.params.bank
            self.crd.warm(ids, query, keys, labels, self.params.temperature, bank.negatives)
        elif isinstance(self.bank, IndexBank):
            self.bank.update(ids, keys, labels, momentum=0.0)

    def prepare_benchmark(self) -> None:
        """Fills a queue bank with random keys, so a benchmark times the steady state."""
        if isinstance(self.bank, QueueBank):
            self.bank.fill_random()

    def skip_step(self) -> None:
        """Drops the keys collected since the last step: the step was skipped, not applied."""
        self._pending = []


@hookimpl
def distillkit_register_losses(register):
    """Registers ``codir``."""
    register(CoDIRLoss)


@hookimpl
def distillkit_register_bench_cases(register):
    """Adds ``distillkit bench`` cases for the large-bank forms of ``codir``."""
    queue = {"kind": "queue", "size": 65536}
    register(BenchCase("codir-queue-65k", "codir", {"bank": queue}))
    index = {"kind": "index", "size": 50000, "negatives": 16384}
    register(BenchCase("codir-index-16k", "codir", {"bank": index}))
    register(BenchCase("codir-per-layer-queue-65k", "codir", {"fusion": "per_layer", "bank": queue}))
    register(BenchCase("codir-per-layer-index-16k", "codir", {"fusion": "per_layer", "bank": index}))
    released = {"objective": "crd_nce", "pooling": "cls", "bank": index, "negatives": "other_labels"}
    register(BenchCase("codir-crd-nce-16k", "codir", released))
    register(BenchCase("codir-crd-nce-per-layer-16k", "codir", {**released, "fusion": "per_layer"}))
