"""Argument checks and canonical shapes for :func:`distillkit.ops.membank_infonce`.

Every problem a caller can fix raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape,
device, value) naming the argument and the fix, before any kernel runs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class InfonceArgs:
    """The memory-bank InfoNCE op's arguments: the one description every internal function takes.

    ``membank_infonce`` (and its pure-PyTorch twins) wrap the caller's arguments in it as given;
    :func:`canonicalize` checks them and returns the canonical form the forward implementations (compiled
    kernel, chunked reference, naive baseline) take. In the canonical form:

    Attributes:
        query: ``[L, B, D]`` contiguous (``L`` = the product of the caller's leading dims).
        positive: ``[L, B, D]`` contiguous, same dtype as ``query``.
        bank: ``[L, K, D]``, or ``[K, D]`` when one bank is shared by every layer; ``N`` rows instead of
            ``K`` with ``negative_index``. Detached, contiguous.
        temperature: A positive float.
        query_labels: ``[B]`` int64 or None.
        bank_labels: ``[K]`` (``[N]`` with ``negative_index``) int64 or None; given with ``query_labels``.
        negative_index: ``[L, B, K]`` int64 rows of the bank, or None.
        lead_shape: The caller's leading dims of ``query``; the loss is returned as ``[*lead_shape, B]``.
    """

    query: torch.Tensor
    positive: torch.Tensor
    bank: torch.Tensor
    temperature: float
    query_labels: torch.Tensor | None = None
    bank_labels: torch.Tensor | None = None
    negative_index: torch.Tensor | None = None
    lead_shape: tuple[int, ...] = ()

    def op_inputs(self) -> tuple:
        """The arguments in the order of the ``distillkit::membank_infonce_fwd`` schema (without lead_shape).

        ``InfonceArgs(*inputs)`` turns such a tuple back into canonical arguments.
        """
        return (
            self.query,
            self.positive,
            self.bank,
            self.temperature,
            self.query_labels,
            self.bank_labels,
            self.negative_index,
        )

    def caller_shape(self, loss: torch.Tensor) -> torch.Tensor:
        """A canonical ``[L, B]`` loss reshaped to the caller's ``[*lead_shape, B]``."""
        return loss.reshape(*self.lead_shape, self.query.shape[1])


# Inputs of the compiled op's schema: every field of InfonceArgs but lead_shape.
OP_INPUT_COUNT = len(fields(InfonceArgs)) - 1


def _tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"membank_infonce: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _labels(name: str, value: object, length: int, what: str, device: torch.device) -> torch.Tensor:
    t = _tensor(name, value)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"membank_infonce: {name} must hold integer class ids (int64), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(
            f"membank_infonce: {name} must be [{length}] (one label per {what}), got {list(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"membank_infonce: {name} is on {t.device} but query is on {device}; move it there")
    return t.to(torch.int64).contiguous()


def _temperature(value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not torch.compiler.is_compiling():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"membank_infonce: temperature must be a positive float, got {type(value).__name__}")
    tau = float(value)
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"membank_infonce: temperature must be a finite number > 0, got {tau}")
    return tau


def canonicalize(given: InfonceArgs, *, check_index: bool = True) -> InfonceArgs:
    """Validates the caller's arguments and brings them to the kernels' layout.

    Args:
        given: The arguments as passed to ``membank_infonce``:
            query ``[..., B, D]``; positive ``[..., B, D]``, same shape as query; bank ``[..., K, D]`` with
            query's leading dims, or ``[K, D]`` shared by all of them (``N`` rows instead of ``K`` with
            negative_index); temperature > 0; query_labels ``[B]`` and bank_labels ``[K]`` (or ``[N]``)
            integer labels, both or neither; negative_index ``[..., B, K]`` integer rows of the bank.
        check_index: Range-check ``negative_index`` here (two host reads: a device synchronisation on
            accelerators). False when the kernel that runs checks it on the device.

    Returns:
        The canonical :class:`InfonceArgs`.

    Raises:
        TypeError: An argument is not a tensor or has an unsupported or mismatched dtype.
        ValueError: A shape, device or value is wrong; the message names the argument and the fix.
    """
    query = _tensor("query", given.query)
    positive = _tensor("positive", given.positive)
    bank = _tensor("bank", given.bank)
    tau = _temperature(given.temperature)
    query_labels, bank_labels, negative_index = given.query_labels, given.bank_labels, given.negative_index
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"membank_infonce: query has dtype {query.dtype}; use float32, bfloat16, float16 or float64"
        )
    for name, t in (("positive", positive), ("bank", bank)):
        if t.dtype != query.dtype:
            raise TypeError(
                f"membank_infonce: {name} has dtype {t.dtype} but query has {query.dtype}; "
                f"cast them to one dtype (e.g. {name}.to(query.dtype))"
            )
        if t.device != query.device:
            raise ValueError(
                f"membank_infonce: {name} is on {t.device} but query is on {query.device}; move it there"
            )
    if query.dim() < 2:
        raise ValueError(f"membank_infonce: query must be [..., B, D], got shape {list(query.shape)}")
    if positive.shape != query.shape:
        raise ValueError(
            f"membank_infonce: positive must have query's shape {list(query.shape)}, "
            f"got {list(positive.shape)}"
        )
    lead = tuple(query.shape[:-2])
    batch, dim = query.shape[-2], query.shape[-1]
    if bank.dim() < 2:
        raise ValueError(f"membank_infonce: bank must be [..., K, D] or [K, D], got shape {list(bank.shape)}")
    if bank.dim() != 2 and tuple(bank.shape[:-2]) != lead:
        raise ValueError(
            f"membank_infonce: bank's leading dims {list(bank.shape[:-2])} must equal query's {list(lead)}, "
            "or pass a 2-D [K, D] bank shared by all of them"
        )
    if bank.shape[-1] != dim:
        raise ValueError(f"membank_infonce: bank rows have size {bank.shape[-1]} but query has D={dim}")
    rows = bank.shape[-2]
    layers = math.prod(lead)
    if layers == 0 or batch == 0 or dim == 0 or rows == 0:
        raise ValueError(
            f"membank_infonce: empty input (query {list(query.shape)}, bank {list(bank.shape)}); "
            "every dim must be >= 1"
        )
    if (query_labels is None) != (bank_labels is None):
        given = "query_labels" if query_labels is not None else "bank_labels"
        missing = "bank_labels" if query_labels is not None else "query_labels"
        raise ValueError(f"membank_infonce: {given} given without {missing}; pass both or neither")
    ql = bl = None
    if query_labels is not None:
        ql = _labels("query_labels", query_labels, batch, "query row", query.device)
        bl = _labels("bank_labels", bank_labels, rows, "bank row", query.device)

    ni = None
    if negative_index is not None:
        ni = _tensor("negative_index", negative_index)
        if ni.dtype.is_floating_point or ni.dtype.is_complex or ni.dtype == torch.bool:
            raise TypeError(f"membank_infonce: negative_index must be int64 row numbers, got {ni.dtype}")
        if ni.device != query.device:
            raise ValueError(
                f"membank_infonce: negative_index is on {ni.device} but query is on {query.device}; "
                "move it there"
            )
        if ni.dim() != query.dim() or tuple(ni.shape[:-1]) != (*lead, batch):
            raise ValueError(
                f"membank_infonce: negative_index must be [{', '.join(map(str, (*lead, batch)))}, K] "
                f"(query's leading dims and B, then negatives per query), got {list(ni.shape)}"
            )
        if ni.shape[-1] == 0:
            raise ValueError(
                "membank_infonce: negative_index has no negatives (K=0); give at least one per query"
            )
        ni = ni.to(torch.int64).reshape(layers, batch, ni.shape[-1]).contiguous()
        if check_index and not torch.compiler.is_compiling() and ni.device.type != "meta":
            low, high = int(ni.min()), int(ni.max())
            if low < 0 or high >= rows:
                bad = low if low < 0 else high
                raise ValueError(
                    f"membank_infonce: negative_index holds {bad}, outside [0, {rows}) "
                    f"for a bank of {rows} rows"
                )

    bank = bank.detach()
    bank = bank.contiguous() if bank.dim() == 2 else bank.reshape(layers, rows, dim).contiguous()
    return InfonceArgs(
        query=query.reshape(layers, batch, dim).contiguous(),
        positive=positive.reshape(layers, batch, dim).contiguous(),
        bank=bank,
        temperature=tau,
        query_labels=ql,
        bank_labels=bl,
        negative_index=ni,
        lead_shape=lead,
    )
