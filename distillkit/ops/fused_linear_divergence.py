"""The fused linear-divergence op: ``kd``'s token-level loss on ``hidden @ weight.T`` without the logits.

On CPU it runs the compiled kernel ``distillkit::fused_linear_divergence_fwd`` (``csrc/cpu/
fused_linear_divergence_*``) when the extension is built; on other devices, and when it is not built, the
chunked pure-PyTorch path of :mod:`distillkit.ops.linear_divergence_chunked`. Both compute the gradients with
respect to the student's hidden states and output weight in the forward pass and scale them by the upstream
gradient in the backward pass, so the loss must be used once (as the terminal loss or a term of it).
"""

from __future__ import annotations

import math
import numbers

import torch

from distillkit.ops import _loader
from distillkit.ops.divergences import DIVERGENCES, check_divergence
from distillkit.ops.linear_divergence_chunked import chunked_linear_divergence

OP_NAME = "distillkit::fused_linear_divergence_fwd"
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_state: dict[str, bool] = {"registered": False, "kernel": False}
HANDOVER_ELEMENTS = 1 << 20
"""From this many ``student_weight`` elements on, eager CPU calls hand the stored gradients to autograd
without a copy, and the loss can then be backpropagated only once; smaller calls keep them reusable."""


def _fake(hs, ws, ht, wt, kd_weight, ce_weight, labels, divergence, temperature, beta, alpha):
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    return hs.new_empty((), dtype=acc), hs.new_empty(hs.shape, dtype=acc), ws.new_empty(ws.shape, dtype=acc)


def _setup_context(ctx, inputs, output):
    hs, ws, *_ = inputs
    _loss, grad_h, grad_w = output
    ctx.save_for_backward(grad_h, grad_w)
    ctx.dtypes = (hs.dtype, ws.dtype)
    ctx.mark_non_differentiable(grad_h, grad_w)


def _eager(tensor: torch.Tensor) -> bool:
    """True for a plain CPU tensor outside any tracing (its value may be read without breaking a graph)."""
    return type(tensor) is torch.Tensor and not torch.compiler.is_compiling() and tensor.device.type == "cpu"


def _scaled(grad_loss, grad_h, grad_w, dtypes, needs_input_grad):
    """The stored gradients times the upstream gradient, in the inputs' dtypes."""
    if _eager(grad_loss) and float(grad_loss) == 1.0:
        scaled_h, scaled_w = grad_h, grad_w  # the usual terminal case: no [V, Ds] copy
    else:
        scale = grad_loss.to(grad_h.dtype)
        scaled_h, scaled_w = grad_h * scale, grad_w * scale
    grad_hs = scaled_h.to(dtypes[0]) if needs_input_grad[0] else None
    grad_ws = scaled_w.to(dtypes[1]) if needs_input_grad[1] else None
    return grad_hs, grad_ws


def _backward(ctx, grad_loss, _grad_h, _grad_w):
    grad_h, grad_w = ctx.saved_tensors
    grads = _scaled(grad_loss, grad_h, grad_w, ctx.dtypes, ctx.needs_input_grad)
    return *grads, None, None, None, None, None, None, None, None, None


class _EagerFunction(torch.autograd.Function):
    """Eager calls of the compiled op: hands its gradients over without a copy.

    Through the op's registered autograd formula the stored ``[V, Ds]`` gradient is still referenced when
    autograd accumulates it, so autograd copies it into ``weight.grad``; here ctx gives up its only
    reference first, so a second backward through the same loss is refused. Traced calls
    (``torch.compile``) and small problems use the registered formula.
    """

    @staticmethod
    def forward(ctx, hs, ws, *rest):
        loss, grad_h, grad_w = torch.ops.distillkit.fused_linear_divergence_fwd(hs, ws, *rest)
        ctx.gradients = [grad_h, grad_w]
        ctx.dtypes = (hs.dtype, ws.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.gradients:
            raise RuntimeError(
                "fused_linear_divergence: backward ran twice through the same loss; its gradients are "
                "computed in the forward pass and handed over once (compute the loss again instead)"
            )
        grad_h, grad_w = ctx.gradients
        ctx.gradients.clear()
        grads = _scaled(grad_loss, grad_h, grad_w, ctx.dtypes, ctx.needs_input_grad)
        del grad_h, grad_w
        return *grads, None, None, None, None, None, None, None, None, None


def _register() -> bool:
    """Registers the fake and autograd parts of the compiled op once; True when its CPU kernel exists."""
    if _state["registered"]:
        return _state["kernel"]
    _state["registered"] = True
    if not _loader.compiled_available():
        return False
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CPU")
    except RuntimeError:  # an extension built before this op existed
        return False
    if has_kernel:
        torch.library.register_fake(OP_NAME)(_fake)
        torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
    _state["kernel"] = has_kernel
    return has_kernel


def kernel_available() -> bool:
    """Whether the compiled CPU kernel of the op is built and registered."""
    return _register()


def _check_tensor(name: str, value: object, dims: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fused_linear_divergence: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"fused_linear_divergence: {name} must be float32, float64, bfloat16 or float16: {value.dtype}"
        )
    if value.dim() != dims:
        shape = "[N, D]" if name.endswith("hidden") else "[V, D]"
        raise ValueError(f"fused_linear_divergence: {name} must be {shape} (2-D), got {list(value.shape)}")
    return value


def _check_number(name: str, value: object, low: float, high: float | None = None) -> float:
    """Returns ``value`` as a float, checking ``low < value`` (``< high`` when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fused_linear_divergence: {name} must be a float, got {type(value).__name__}")
    number = float(value)
    if not (math.isfinite(number) and number > low and (high is None or number < high)):
        bounds = f"in ({low}, {high})" if high is not None else f"> {low}"
        raise ValueError(f"fused_linear_divergence: {name} must be {bounds}, got {number}")
    return number


def _validate(hs, ws, ht, wt, divergence, temperature, beta, alpha, mask, labels, ce_weight):
    hs = _check_tensor("student_hidden", hs, 2)
    ws = _check_tensor("student_weight", ws, 2)
    ht = _check_tensor("teacher_hidden", ht, 2)
    wt = _check_tensor("teacher_weight", wt, 2)
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(
            f"fused_linear_divergence: the vocabularies differ: student_weight has V = {ws.shape[0]} rows"
            f" and teacher_weight V = {wt.shape[0]}; distillation over tokens needs a shared vocabulary"
        )
    for side, hidden, weight, size in (("student", hs, ws, "Ds"), ("teacher", ht, wt, "Dt")):
        if weight.shape[1] != hidden.shape[1]:
            raise ValueError(
                f"fused_linear_divergence: {side}_weight is {list(weight.shape)} but {side}_hidden has "
                f"{size} = {hidden.shape[1]} features; the weight must be [V, {hidden.shape[1]}]"
            )
    if ht.shape[0] != hs.shape[0]:
        raise ValueError(
            f"fused_linear_divergence: student_hidden has N = {hs.shape[0]} rows but teacher_hidden "
            f"{ht.shape[0]}; pass the same tokens of both models"
        )
    for name, tensor in (("student_weight", ws), ("teacher_hidden", ht), ("teacher_weight", wt)):
        if tensor.device != hs.device:
            raise ValueError(
                f"fused_linear_divergence: {name} is on {tensor.device} but student_hidden is on "
                f"{hs.device}; move every input to one device"
            )
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(
            f"fused_linear_divergence: unknown divergence {divergence!r}; "
            f"choose one of {', '.join(DIVERGENCES)}"
        )
    temperature = _check_number("temperature", temperature, 0.0)
    beta = _check_number("beta", beta, 0.0, 1.0)
    alpha = _check_number("alpha", alpha, 0.0, 1.0)
    check_divergence(divergence, beta, alpha)
    ce_weight = 0.0 if ce_weight == 0 else _check_number("ce_weight", ce_weight, 0.0)
    n_rows = hs.shape[0]
    for name, tensor in (("mask", mask), ("labels", labels)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"fused_linear_divergence: {name} must be a torch.Tensor, got {type(tensor).__name__}"
            )
        if tensor.shape != (n_rows,):
            raise ValueError(
                f"fused_linear_divergence: {name} must be [N] = [{n_rows}], got {list(tensor.shape)}"
            )
        if tensor.device != hs.device:
            raise ValueError(
                f"fused_linear_divergence: {name} is on {tensor.device} but the rows on {hs.device}"
            )
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(
            f"fused_linear_divergence: mask must be bool (True = the row counts), got {mask.dtype}"
        )
    if labels is not None and (
        labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool
    ):
        raise TypeError(
            f"fused_linear_divergence: labels must be integer token ids (int64), got {labels.dtype}"
        )
    if ce_weight > 0 and labels is None:
        raise ValueError("fused_linear_divergence: ce_weight > 0 needs labels ([N] int64, -100 = ignored)")
    return temperature, beta, alpha, ce_weight


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
        divergence: ``forward_kl``, ``reverse_kl``, ``jsd``, ``tvd``, ``skew_forward_kl`` or
            ``skew_reverse_kl``.
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
    temperature, beta, alpha, ce_weight = _validate(
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
    if student_hidden.device.type == "cpu" and _register():
        if torch.compiler.is_compiling() or student_weight.numel() < HANDOVER_ELEMENTS:
            return torch.ops.distillkit.fused_linear_divergence_fwd(*args)[0]
        return _EagerFunction.apply(*args)
    return chunked_linear_divergence(*args)
