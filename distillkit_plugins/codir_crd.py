"""CRD's NCE objective for ``codir`` (``objective: crd_nce``), the form of CoDIR's released code.

Contrastive Representation Distillation (Tian et al., ICLR 2020, section 3 and its ``crd/criterion.py`` /
``crd/memory.py``) as CoDIR's fairseq criterion ``sentence_prediction_crd`` uses it:

- two memory banks with one slot per training example, momentum-updated (``k <- normalize(m·k + (1−m)·v)``,
  m = 0.5): the student bank holds past student vectors, the teacher bank past teacher vectors; each starts
  from its own draw of CRD's initialisation (uniform in ``±1/√(D/3)``, from the run's random state);
- for a batch, slot indices ``idx = [own id, K negatives]``; the student anchor ``s`` is scored against the
  teacher bank's rows, the teacher anchor ``t`` against the student bank's rows:
  ``p_j = exp(<anchor, bank[idx_j]> / τ) / Z`` (τ = 0.07), so the positive is the other model's bank slot of
  the same example, not the other model's current vector;
- NCE with uniform noise ``P_n = 1/N`` and ``c = K·P_n``:
  ``loss = −log(p_0 / (p_0 + c + ε)) − Σ_{j≥1} log(c / (p_j + c + ε))`` per anchor, ε = 1e-7, averaged over
  the batch and over the two directions, ``(student anchor + teacher anchor) / 2``;
- ``Z`` is estimated once, on the first batch, as ``N · mean(exp(<anchor, bank[idx]> / τ))`` over all
  ``B·(K+1)`` scores, separately per direction, then kept fixed. Here it is kept in log space (``log_z``
  buffers, so it is saved in checkpoints and cannot overflow at small τ) and averaged over ranks under DDP;
- the negatives are ``K`` distinct slots (of other labels with ``negatives: other_labels``).

:meth:`CRDMemory.warm` fills both banks before training (the loop's warm-up pass over the training data),
after setting ``Z`` on its first batch against the starting banks, as the release sets it on its first batch.

The scores are not a softmax over the row, so the fused ``membank_infonce`` op does not apply. They are
computed gather-free: ``anchor @ bank.T`` (one ``[B, N]`` BLAS product per layer), then ``K+1`` scalars per
row are gathered, so the ``[B, K+1, D]`` tensor of gathered keys is never made.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distillkit_plugins.codir_banks import IndexBank, all_reduce_mean

EPS = 1e-7


def gathered_scores(anchor: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Dot products of each anchor with the bank rows it indexes, without gathering the rows.

    Args:
        anchor: ``[L, B, D]``.
        bank: ``[L, N, D]`` (no gradient flows to it).
        index: ``[B, M]`` int64 slot indices (shared by the ``L`` heads).

    Returns:
        ``[L, B, M]`` scores ``<anchor[l, b], bank[l, index[b, m]]>``.

    """
    scores = torch.matmul(anchor, bank.detach().to(anchor.dtype).transpose(-1, -2))  # [L, B, N]
    return scores.gather(-1, index.unsqueeze(0).expand(anchor.shape[0], -1, -1))


def crd_nce_loss(scores: torch.Tensor, log_z: torch.Tensor, n_data: int, temperature: float) -> torch.Tensor:
    """CRD's NCE loss per anchor.

    Args:
        scores: ``[L, B, K+1]`` dot products, column 0 the positive.
        log_z: ``[L]`` log of the normalising constant ``Z``.
        n_data: ``N``, the number of bank slots (training examples).
        temperature: τ.

    Returns:
        ``[L, B]``: ``−log(p_0/(p_0 + c + ε)) − Σ_j log(c/(p_j + c + ε))`` with ``p = exp(s/τ)/Z`` and
        ``c = K/N``, computed in log space.

    """
    negatives = scores.shape[-1] - 1
    dtype = torch.promote_types(scores.dtype, torch.float32)  # fp32 at least, fp64 kept (gradcheck)
    log_p = scores.to(dtype) / temperature - log_z.to(dtype).view(-1, 1, 1)
    noise = math.log(negatives / n_data + EPS)  # log(c + ε)
    denominator = torch.logaddexp(log_p, torch.full_like(log_p, noise))  # log(p + c + ε)
    positive = denominator[..., 0] - log_p[..., 0]
    negative = (denominator[..., 1:] - math.log(negatives / n_data)).sum(-1) if negatives else 0.0
    return positive + negative


def estimate_log_z(scores: torch.Tensor, n_data: int, temperature: float) -> torch.Tensor:
    """``log(N · mean(exp(s/τ)))`` per layer over a batch's scores, averaged over ranks in ``Z`` space.

    Args:
        scores: ``[L, B, K+1]``.
        n_data: ``N``.
        temperature: τ.

    Returns:
        ``[L]`` float32.

    """
    flat = scores.detach().double().flatten(1) / temperature
    mean = torch.exp(torch.logsumexp(flat, dim=1) - math.log(flat.shape[1]))
    return torch.log(all_reduce_mean(mean) * n_data).float()


def crd_initial_keys(heads: int, size: int, dim: int) -> torch.Tensor:
    """CRD's starting bank ``[heads, size, dim]``: uniform in ``±1/√(dim/3)``, from the global RNG."""
    bound = 1.0 / math.sqrt(dim / 3)
    return torch.rand(heads, size, dim) * (2 * bound) - bound


class CRDMemory(nn.Module):
    """The two index banks and the two normalising constants of ``crd_nce``.

    Args:
        heads: Number of contrastive heads (1 with ``fusion: concat``).
        size: ``N``, the number of training examples.
        dim: Key size.
        momentum: Bank momentum (CRD: 0.5).

    """

    def __init__(self, heads: int, size: int, dim: int, momentum: float) -> None:
        super().__init__()
        self.size = size
        self.student_bank = IndexBank(heads, size, dim, momentum, initial=crd_initial_keys(heads, size, dim))
        self.teacher_bank = IndexBank(heads, size, dim, momentum, initial=crd_initial_keys(heads, size, dim))
        self.register_buffer("student_log_z", torch.zeros(heads))  # Z of student anchors vs teacher bank
        self.register_buffer("teacher_log_z", torch.zeros(heads))  # Z of teacher anchors vs student bank
        self.register_buffer("z_estimated", torch.zeros((), dtype=torch.long))

    def sample(self, example_ids: torch.Tensor, labels: torch.Tensor | None, count: int) -> torch.Tensor:
        """Returns ``[B, 1+K]`` slot indices: the own slot, then ``K`` distinct negatives (of other labels).

        As the release (``np.random.choice(..., replace=nce_k >= pool)``), negatives repeat only when fewer
        than ``K`` slots are eligible.
        """
        if labels is None:
            negatives = self.teacher_bank.sample_negatives(example_ids, count, replacement=False)
        else:
            negatives = self.teacher_bank.sample_other_labels(example_ids, labels, count, replacement=False)
        return torch.cat([example_ids.to(negatives).unsqueeze(1), negatives], dim=1)

    def estimate_z(
        self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor, temperature: float
    ) -> None:
        """Sets both normalising constants from one batch's scores against the banks as they are now."""
        student_scores = gathered_scores(student, self.teacher_bank.keys, index)
        teacher_scores = gathered_scores(teacher, self.student_bank.keys, index)
        self.student_log_z.copy_(estimate_log_z(student_scores, self.size, temperature))
        self.teacher_log_z.copy_(estimate_log_z(teacher_scores, self.size, temperature))
        self.z_estimated.fill_(1)

    @torch.no_grad()
    def warm(
        self,
        example_ids: torch.Tensor,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        temperature: float,
        count: int,
    ) -> None:
        """One batch of the warm-up pass: ``Z`` on the first batch, then the batch's slots are written.

        ``Z`` is set against the starting banks, as the release sets it on its first batch; the slots are
        overwritten (as if their random start had decayed over many epochs).

        Args:
            example_ids: ``[B]`` int64.
            student: ``[L, B, D]`` normalised student vectors.
            teacher: ``[L, B, D]`` normalised teacher vectors.
            labels: ``[B]`` class labels (recorded in the banks, for ``other_labels``), or None.
            temperature: τ.
            count: ``K``, the negatives per example (for the ``Z`` batch).

        """
        if not int(self.z_estimated):
            self.estimate_z(student, teacher, self.sample(example_ids, labels, count), temperature)
        self.student_bank.update(example_ids, student, labels, momentum=0.0)
        self.teacher_bank.update(example_ids, teacher, labels, momentum=0.0)

    def loss(
        self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """The symmetric NCE loss.

        Args:
            student: ``[L, B, D]`` normalised student anchors.
            teacher: ``[L, B, D]`` normalised teacher anchors (gradients reach the teacher's head only).
            index: ``[B, 1+K]`` from :meth:`sample`.
            temperature: τ.

        Returns:
            ``[L, B]``: ``(student-anchor loss + teacher-anchor loss) / 2`` per example.

        """
        if not int(self.z_estimated):
            self.estimate_z(student, teacher, index, temperature)
        student_scores = gathered_scores(student, self.teacher_bank.keys, index)
        teacher_scores = gathered_scores(teacher, self.student_bank.keys, index)
        student_loss = crd_nce_loss(student_scores, self.student_log_z, self.size, temperature)
        return (student_loss + crd_nce_loss(teacher_scores, self.teacher_log_z, self.size, temperature)) / 2

    @torch.no_grad()
    def update(
        self,
        example_ids: torch.Tensor,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> None:
        """Momentum-updates both banks' slots of a batch (gathered from every rank)."""
        self.student_bank.update(example_ids, student, labels)
        self.teacher_bank.update(example_ids, teacher, labels)
