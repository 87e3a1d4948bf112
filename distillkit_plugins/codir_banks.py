"""Memory banks of teacher keys for contrastive terms.

Two kinds, both ``nn.Module`` with their state in buffers, so they are saved and restored with the
objective's ``state_dict``:

- :class:`QueueBank`: a FIFO of the most recent teacher keys (MoCo style).
- :class:`IndexBank`: one slot per training example, updated with momentum (CRD style); negatives are drawn
  by index.

Under ``torch.distributed`` every update first all-gathers the keys (and ids / labels) of all ranks, so each
rank holds the identical bank and the queue pointer advances by the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def rank_and_world() -> tuple[int, int]:
    """Returns ``(rank, world_size)``; ``(0, 1)`` outside distributed runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_rows(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """All-gathers ``tensor`` along ``dim`` across ranks, in rank order (identity outside distributed runs).

    The result carries no gradient. Every rank must pass a tensor of the same shape (the distributed
    sampler gives every rank equal batches).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=dim)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Returns the mean of ``tensor`` over ranks (``tensor`` itself outside distributed runs); no gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


class QueueBank(nn.Module):
    """A FIFO queue of keys shared by ``heads`` contrastive heads.

    Args:
        heads: Number of contrastive heads (leading dim of the keys).
        size: Capacity ``K``.
        dim: Key size ``D``.

    """

    def __init__(self, heads: int, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("keys", torch.zeros(heads, size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the filled part of the queue.

        Returns:
            keys ``[heads, K_filled, D]`` and labels ``[K_filled]`` (-1 where unknown).

        """
        filled = int(self.filled)
        return self.keys[:, :filled], self.labels[:filled]

    @torch.no_grad()
    def fill_random(self, seed: int = 0) -> None:
        """Fills the whole queue with random unit keys (benchmarks use it to time a full bank)."""
        generator = torch.Generator().manual_seed(seed)
        keys = F.normalize(torch.randn(self.keys.shape, generator=generator), dim=-1)
        self.keys.copy_(keys)
        self.pointer.zero_()
        self.filled.fill_(self.size)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Adds keys of a batch (from every rank), overwriting the oldest.

        Args:
            keys: ``[heads, n, D]`` new keys.
            labels: ``[n]`` their labels, or None.

        """
        if labels is None:
            labels = torch.full((keys.shape[1],), -1, dtype=torch.long, device=keys.device)
        keys = all_gather_rows(keys.detach().to(self.keys.dtype), dim=1)
        labels = all_gather_rows(labels.detach().to(torch.long), dim=0)
        count = keys.shape[1]
        if count >= self.size:
            keys, labels, count = keys[:, -self.size :], labels[-self.size :], self.size
        slots = (int(self.pointer) + torch.arange(count, device=self.keys.device)) % self.size
        self.keys[:, slots] = keys
        self.labels[slots] = labels
        self.pointer.fill_((int(self.pointer) + count) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + count))


class IndexBank(nn.Module):
    """One key per training example, updated with momentum: ``k <- normalize(m·k + (1−m)·k_new)``.

    Slots start as random unit vectors (normal, seed 0) with label -1, or as the ``initial`` keys given.

    Args:
        heads: Number of contrastive heads.
        size: Number of training examples ``N``.
        dim: Key size ``D``.
        momentum: ``m``; CRD uses 0.5.
        initial: ``[heads, N, D]`` starting keys (CRD's own initialisation, see ``codir_crd``); None: the
            normal unit vectors.

    """

    def __init__(
        self, heads: int, size: int, dim: int, momentum: float = 0.5, initial: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.size = size
        self.momentum = momentum
        if initial is None:
            generator = torch.Generator().manual_seed(0)
            initial = F.normalize(torch.randn(heads, size, dim, generator=generator), dim=-1)
        self.register_buffer("keys", initial)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))

    def check_ids(self, example_ids: torch.Tensor) -> None:
        """Raises a clear error when example ids do not fit the bank."""
        if example_ids.numel() and (int(example_ids.min()) < 0 or int(example_ids.max()) >= self.size):
            raise ValueError(
                f"example id {int(example_ids.max())} does not fit an index bank of size {self.size}: set "
                "bank.size to at least the number of training examples"
            )

    def sample_negatives(
        self, example_ids: torch.Tensor, count: int, replacement: bool = True
    ) -> torch.Tensor:
        """Draws ``count`` negative slots per example, never the example's own slot.

        Args:
            example_ids: ``[B]`` int64.
            count: ``K``.
            replacement: Draw with replacement; False draws ``K`` distinct slots per example (with
                replacement only when fewer than ``K`` slots are eligible).

        Returns:
            ``[B, K]`` int64 slot indices.

        """
        self.check_ids(example_ids)
        rows = example_ids.shape[0]
        draws = distinct_draws(rows, self.size - 1, count, self.keys.device, replacement)
        return draws + (draws >= example_ids.to(draws.device).unsqueeze(1)).long()

    def sample_other_labels(
        self, example_ids: torch.Tensor, labels: torch.Tensor, count: int, replacement: bool = True
    ) -> torch.Tensor:
        """Draws ``count`` slots per example among slots whose label differs from its own.

        Slots not yet updated have label -1 and are eligible (they hold their starting keys, not an example
        of the query's class); the example's own slot never is. Once every example has been seen (one epoch,
        or a warm-up pass) this is exactly sampling from the examples of other classes.

        Args:
            example_ids: ``[B]`` int64.
            labels: ``[B]`` int64 class labels (non-negative).
            count: ``K``.
            replacement: Draw with replacement; False draws ``K`` distinct slots per example (with
                replacement only for a label with fewer than ``K`` eligible slots).

        Returns:
            ``[B, K]`` int64 slot indices.

        Raises:
            ValueError: If some example has no slot of another label.

        """
        self.check_ids(example_ids)
        device = self.keys.device
        example_ids, labels = example_ids.to(device, torch.long), labels.to(device, torch.long)
        out = torch.empty(example_ids.shape[0], count, dtype=torch.long, device=device)
        for label in labels.unique().tolist():
            rows = (labels == label).nonzero().flatten()
            candidates = (self.labels != label).nonzero().flatten()  # sorted slot indices
            own = example_ids[rows]
            where = torch.searchsorted(candidates, own)  # position of the own slot if it is a candidate
            padded = torch.cat([candidates, candidates.new_full((1,), -1)])
            present = padded[where] == own
            eligible = candidates.numel() - present.long()  # [rows]
            if int(eligible.min()) < 1:
                raise ValueError(
                    f"no memory-bank slot has a label other than {label}: negatives: other_labels needs at "
                    "least two classes in the training data"
                )
            if not replacement and int(eligible.min()) >= count:
                scores = torch.rand(rows.numel(), candidates.numel(), device=device)
                scores[present.nonzero().flatten(), where[present]] = -1.0  # the own slot is never drawn
                out[rows] = candidates[scores.topk(count, dim=1).indices]
                continue
            draws = (torch.rand(rows.numel(), count, device=device) * eligible.unsqueeze(1)).long()
            draws = torch.minimum(draws, (eligible - 1).unsqueeze(1))  # guards rand() rounding up to 1
            draws = draws + ((draws >= where.unsqueeze(1)) & present.unsqueeze(1)).long()
            out[rows] = candidates[draws]
        return out

    @torch.no_grad()
    def update(
        self,
        example_ids: torch.Tensor,
        keys: torch.Tensor,
        labels: torch.Tensor | None = None,
        momentum: float | None = None,
    ) -> None:
        """Momentum-updates the slots of a batch (from every rank).

        Args:
            example_ids: ``[n]`` int64.
            keys: ``[heads, n, D]``.
            labels: ``[n]`` or None.
            momentum: Instead of the bank's; 0 overwrites the slots (a warm-up pass fills them this way).

        """
        momentum = self.momentum if momentum is None else momentum
        example_ids = all_gather_rows(example_ids.to(torch.long), dim=0)
        keys = all_gather_rows(keys.detach().to(self.keys.dtype), dim=1)
        self.check_ids(example_ids)
        mixed = momentum * self.keys[:, example_ids] + (1.0 - momentum) * keys
        self.keys[:, example_ids] = F.normalize(mixed, dim=-1)
        if labels is not None:
            self.labels[example_ids] = all_gather_rows(labels.detach().to(torch.long), dim=0)


def distinct_draws(rows: int, pool: int, count: int, device: torch.device, replacement: bool) -> torch.Tensor:
    """``[rows, count]`` positions in ``[0, pool)``, distinct within a row unless ``replacement``.

    Without replacement (and ``pool ≥ count``) the positions of the ``count`` largest of ``pool`` uniform
    draws are taken: a uniformly random subset.
    """
    if replacement or pool < count:
        return torch.randint(0, pool, (rows, count), device=device)
    return torch.rand(rows, pool, device=device).topk(count, dim=1).indices
