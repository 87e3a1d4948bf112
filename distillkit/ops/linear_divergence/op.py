"""The fused linear-divergence op: ``kd``'s token-level loss on ``hidden @ weight.T`` without the logits.

On CPU it runs the compiled kernel ``distillkit::fused_linear_divergence_fwd`` (``csrc/linear_divergence/``)
when the extension is built; on other devices, and when it is not built, the chunked pure-PyTorch path of
:mod:`distillkit.ops.linear_divergence.chunked`. Both compute the gradients with respect to the student's
hidden states and output weight in the forward pass and scale them by the upstream gradient in the backward
pass, so the loss must be used once (as the terminal loss or a term of it).
"""

from __future__ import annotations

import torch

from distillkit.ops import library
from distillkit.ops.linear_divergence import compiled
from distillkit.ops.linear_divergence.chunked import chunked_linear_divergence
from distillkit.ops.linear_divergence.validate import validate


def kernel_available() -> bool:
    """Whether the compiled CPU kernel of the op is built and registered."""
    return library.has_kernel(compiled.OP_NAME, "cpu")


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """``kd``'s token-level loss on the logits ``hidden @ weight.T`` of both models, never materialising them.

    ``loss = T² · mean_{counted rows} D(p ‖ q) + ce_weight · mean_{rows with a label} CE(softmax(s), label)``
    with ``s = student_hidden @ student_weight.T``, ``q = softmax(s / T)``, ``p = softmax(teacher_hidden @
    teacher_weight.T / T)`` and ``D`` one of :data:`distillkit.ops.divergences.DIVERGENCES`. No tensor of
    ``N × V`` elements is allocated (the CPU kernel keeps two ``[R, V]`` row-block buffers of about 32 MiB;
    the chunked path ``chunk × V`` temporaries). Gradients reach ``student_hidden`` and ``student_weight``
    only; they are computed in the forward pass, so the result may be backpropagated once.

    Args:
        student_hidden: ``[N, Ds]`` the student's last hidden states (the rows of all sequences).
        student_weight: ``[V, Ds]`` the student's output embedding (``lm_head.weight``).
        teacher_hidden: ``[N, Dt]`` the teacher's last hidden states for the same tokens.
        teacher_weight: ``[V, Dt]`` the teacher's output embedding; ``V`` must equal the student's.
        divergence: One of :data:`distillkit.ops.divergences.DIVERGENCES`.
        temperature: ``T > 0``.
        beta: JSD's mixing weight in ``(0, 1)`` (used with ``jsd`` only).
        alpha: The skew weight in ``(0, 1)`` (used with the skew forms only).
        mask: ``[N]`` bool, the rows whose divergence counts (all when None). No counted row gives 0.
        labels: ``[N]`` integer next-token ids in ``[0, V)``, -100 for rows without one; needed when
            ``ce_weight > 0``.
        ce_weight: Weight of the hard-label cross-entropy (temperature 1) on the student's logits, averaged
            over rows with a label (0 when there is none); 0 disables it.

    Returns:
        Scalar loss, float32 (float64 when ``student_hidden`` is float64). Inputs may be float32, float64,
        bfloat16 or float16 (mixed allowed); computation is in float32 (float64).

    Raises:
        TypeError: A tensor or number of the wrong kind or dtype.
        ValueError: Wrong shapes (the message names both sizes), devices or values.
    """
    temperature, beta, alpha, ce_weight = validate(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        divergence,
        temperature,
        beta,
        alpha,
        mask,
        labels,
        ce_weight,
    )
    kd_weight, row_ce, row_labels = row_weights(student_hidden, mask, labels, ce_weight)
    args = (
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        kd_weight,
        row_ce,
        row_labels,
        divergence,
        temperature,
        beta,
        alpha,
    )
    if student_hidden.device.type == "cpu" and kernel_available():
        return compiled.run_compiled(torch.ops.distillkit.fused_linear_divergence_fwd, args)
    return chunked_linear_divergence(*args)


def row_weights(
    student_hidden: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor | None, ce_weight: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Each row's weight of the divergence and of the cross-entropy, as the compiled ops take them.

    Args:
        student_hidden: ``[N, Ds]`` (its dtype picks the accumulation dtype, its device the device).
        mask: ``[N]`` bool, the counted rows (all when None).
        labels: ``[N]`` integer labels, -100 = none; used when ``ce_weight > 0``.
        ce_weight: The cross-entropy's weight (0: none).

    Returns:
        ``(kd_weight [N], ce_weight [N] or None, labels [N] int64 or None)``: the divergence averaged over
        the counted rows and the cross-entropy over the rows with a label.
    """
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    n_rows = student_hidden.shape[0]
    if mask is None:
        kd_weight = student_hidden.new_full((n_rows,), 1.0 / max(n_rows, 1), dtype=acc)
    else:
        counted = mask.to(acc)
        kd_weight = counted / counted.sum().clamp_min(1.0)
    row_ce, row_labels = None, None
    if ce_weight > 0:
        row_labels = labels.to(torch.int64)
        valid = (row_labels != -100).to(acc)
        row_ce = valid * (ce_weight / valid.sum().clamp_min(1.0))
    return kd_weight, row_ce, row_labels
