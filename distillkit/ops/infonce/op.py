"""The public memory-bank InfoNCE op and its choice between the compiled kernel and the reference."""

from __future__ import annotations

import warnings

import torch

from distillkit.ops import library
from distillkit.ops.infonce import compiled, selfcheck
from distillkit.ops.infonce.reference import reference_loss
from distillkit.ops.infonce.validate import InfonceArgs, canonicalize

# Device types whose kernel range-checks negative_index itself, inside the kernel that reads it, and raises
# from the same call: one small device-to-host copy instead of the host check's two reductions.
_KERNEL_CHECKS_INDEX = {"cuda"}
_warned_devices: set[str] = set()


def kernel_available(device_type: str) -> bool:
    """Whether the compiled op has a kernel for ``device_type``; warns once per device type when not."""
    if library.has_kernel(compiled.OP_NAME, device_type):
        return True
    if device_type not in _warned_devices and not torch.compiler.is_compiling():
        _warned_devices.add(device_type)
        warnings.warn(
            f"distillkit: compiled membank_infonce not available ({library.missing_reason(device_type)}); "
            "using the pure-PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def use_kernel(device: torch.device) -> bool:
    """Whether a call on ``device`` runs the compiled kernel: built for it, and allowed by the self-check."""
    return kernel_available(device.type) and selfcheck.kernel_allowed(device)


def membank_infonce(
    query: torch.Tensor,
    positive: torch.Tensor,
    bank: torch.Tensor,
    temperature: float,
    *,
    query_labels: torch.Tensor | None = None,
    bank_labels: torch.Tensor | None = None,
    negative_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row InfoNCE of each query against its positive and a memory bank of negatives, fused.

    ``loss = -s_pos/τ + logsumexp([s_pos, s_neg_1, ..., s_neg_K]/τ)`` with ``s = dot(query, key)`` (no
    normalisation inside: normalise the vectors first for cosine similarity). The ``B × K`` similarity
    matrix is never stored; the backward pass needs no second pass over the bank. Uses the compiled kernel
    for the inputs' device when built, else the chunked pure-PyTorch reference.

    Args:
        query: ``[..., B, D]`` float32, bfloat16, float16 or float64; leading dims (e.g. layers) are
            batched in one call.
        positive: ``[..., B, D]``, same shape and dtype.
        bank: ``[..., K, D]`` with the same leading dims, or ``[K, D]`` shared by all of them (not
            copied); ``N`` rows instead of ``K`` when ``negative_index`` is given. Receives no gradient.
        temperature: τ > 0.
        query_labels: ``[B]`` integer labels; a bank row with the query's label is not a negative. A row
            left with no negative has loss 0.
        bank_labels: ``[K]`` (``[N]``) integer labels; required with ``query_labels``.
        negative_index: ``[..., B, K]`` int64 rows of the bank: per-query negatives (CRD style), fused
            so that the gathered ``[..., B, K, D]`` keys are never made. Values outside ``[0, N)`` raise
            ``ValueError`` before any kernel (CPU, and CUDA without the kernel); the CUDA kernel checks them
            on the device while it reads them and the same call raises ``IndexError`` (it waits for its
            kernels to read the result; inside CUDA graph capture it cannot: such a row's loss is NaN).

    A key that is not a negative of a row (same label) never affects that row's result, whatever its
    values (Inf or NaN included); a NaN in a key that is a negative makes that row's loss NaN. On CUDA the
    kernel is compared with the reference on first use per device (``DISTILLKIT_CUDA_KERNEL``, see
    :mod:`distillkit.ops.infonce.selfcheck`).

    Returns:
        ``[..., B]`` loss, float32 (float64 for float64 inputs); gradients reach query and positive in
        their own dtype (accumulated in float32).

    Raises:
        TypeError: Wrong argument type or dtype.
        ValueError: Wrong shape, device or value (the message names the argument and the fix).
        IndexError: ``negative_index`` outside the bank, found by the CUDA kernel.
    """
    device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    kernel = use_kernel(device)
    given = InfonceArgs(query, positive, bank, temperature, query_labels, bank_labels, negative_index)
    args = canonicalize(given, check_index=not (kernel and device.type in _KERNEL_CHECKS_INDEX))
    loss = selfcheck.kernel_forward(args)[0] if kernel else reference_loss(args)
    return args.caller_shape(loss)
