"""First-use self-check of the compiled ``membank_infonce`` kernel on each accelerator device.

The CUDA kernel is verified in CI by emulation and compilation, not on real hardware. So before its first
use on a device, the op compares it with the chunked PyTorch reference on that device on a few small
shapes (both partial kernels, every dtype, labels, ``negative_index``). If they disagree, distillkit warns
once with the measured error and uses the reference on that device for the rest of the process.

``DISTILLKIT_CUDA_KERNEL`` (read at each call) controls it: ``check`` (default) as above, ``trust`` uses
the kernel without checking, ``off`` always uses the reference. The CPU kernel is tested directly in CI
and is not checked. :func:`kernel_allowed` is device-agnostic: ``CHECKED_DEVICE_TYPES`` names the device
types it checks, and the kernel it calls is :data:`kernel_forward`, so both can be replaced in tests.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distillkit.errors import ConfigError
from distillkit.ops.infonce import compiled
from distillkit.ops.infonce.reference import reference_forward
from distillkit.ops.infonce.validate import InfonceArgs

ENV = "DISTILLKIT_CUDA_KERNEL"
MODES = ("check", "trust", "off")
CHECKED_DEVICE_TYPES: set[str] = {"cuda"}

Forward = Callable[[InfonceArgs], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

# The kernel under check (canonical InfonceArgs in, (loss, lse, wsum) out); the op calls it too.
kernel_forward: Forward = compiled.forward


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one device's self-check.

    Attributes:
        device: The device, e.g. ``cuda:0``.
        passed: Whether every case agreed within its tolerance.
        max_error: Worst ratio of |kernel - reference| to the case's tolerance (<= 1 passes).
        worst: The case and output where that ratio occurred, or the error the kernel raised.
        cases: Number of cases run.
        seconds: Wall time of the check.
    """

    device: str
    passed: bool
    max_error: float
    worst: str
    cases: int
    seconds: float


_results: dict[str, CheckResult] = {}
_lock = threading.Lock()

# (layers, batch, bank rows, dim, dtype name, labels, index columns or 0): every path the plan can take.
CASES = (
    (1, 3, 37, 5, "float32", False, 0),
    (2, 70, 333, 40, "bfloat16", True, 0),
    (1, 64, 200, 96, "float16", False, 0),
    (1, 64, 150, 300, "bfloat16", False, 0),
    (2, 20, 130, 24, "float64", True, 0),
    (2, 33, 200, 37, "float32", True, 29),
    (1, 48, 257, 64, "float32", False, 0),
)
# (loss and lse, wsum) absolute tolerances against the reference on the same device and inputs.
TOLERANCE = {
    "float64": (1e-9, 1e-9),
    "float32": (2e-4, 2e-5),
    "tf32": (3e-2, 1e-2),
    "bfloat16": (2e-3, 6e-3),
    "float16": (2e-3, 2e-3),
}


def mode() -> str:
    """The kernel policy from ``DISTILLKIT_CUDA_KERNEL``: ``check`` (default), ``trust`` or ``off``.

    Raises:
        ConfigError: The variable holds another value.
    """
    value = os.environ.get(ENV, "check").strip().lower() or "check"
    if value not in MODES:
        raise ConfigError(
            f"{ENV}={value!r} is not one of {', '.join(MODES)}: use 'check' (default: compare the compiled "
            "kernel with the PyTorch reference on first use per device), 'trust' (kernel without the check) "
            "or 'off' (PyTorch reference only)."
        )
    return value


def kernel_allowed(device: torch.device) -> bool:
    """Whether calls on ``device`` should run the compiled kernel (True) or the reference (False).

    Runs the device's self-check on first use in ``check`` mode (under ``torch.compile`` too: the check runs
    eagerly while tracing and its verdict is a constant of the graph).
    """
    if device.type not in CHECKED_DEVICE_TYPES:
        return True
    policy = mode()
    if policy == "off":
        return False
    if policy == "trust":
        return True
    return _verdict(str(device))


def _verdict(device: str) -> bool:
    result = _results.get(device)
    if result is None:
        with _lock:
            result = _results.get(device)
            if result is None:
                result = run_check(torch.device(device))
                _results[device] = result
                if not result.passed:
                    warnings.warn(
                        "distillkit: the compiled membank_infonce kernel disagrees with the PyTorch "
                        f"reference on {device} ({result.worst}, {result.max_error:.3g}x the tolerance); "
                        "using the reference on this device from now on. Please report it with the output of "
                        f"`distillkit doctor`. {ENV}=trust forces the kernel, {ENV}=off skips it.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
    return result.passed


# torch.compile runs _verdict while tracing and bakes its result into the graph: what
# torch.compiler.assume_constant_result does, spelled out so that importing this module skips dynamo.
_verdict._dynamo_marked_constant = True  # type: ignore[attr-defined]


def results() -> dict[str, CheckResult]:
    """Self-check results so far, by device."""
    return dict(_results)


def reset() -> None:
    """Forgets every result (tests)."""
    with _lock:
        _results.clear()


def _case_inputs(case, device: torch.device, seed: int) -> InfonceArgs:
    layers, batch, rows, dim, dtype_name, labels, index_cols = case
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(x, dim=-1).to(dtype).to(device)

    query, positive, bank = unit(layers, batch, dim), unit(layers, batch, dim), unit(layers, rows, dim)
    ql = bl = ni = None
    if labels:
        ql = torch.randint(0, 4, (batch,), generator=g).to(device)
        bl = torch.randint(0, 4, (rows,), generator=g).to(device)
    if index_cols:
        ni = torch.randint(0, rows, (layers, batch, index_cols), generator=g).to(device)
    return InfonceArgs(query, positive, bank, 0.1, ql, bl, ni, lead_shape=(layers,))


def _compare(forward: Forward, args: InfonceArgs, tolerance: tuple[float, float]) -> tuple[float, str]:
    """Worst error ratio of ``forward`` against the reference on ``args``, and the output it is in."""
    got = forward(args)
    want = reference_forward(args)
    worst, where = 0.0, ""
    for name, g, w, tol in zip(
        ("loss", "lse", "wsum"), got, want, (tolerance[0], tolerance[0], tolerance[1]), strict=True
    ):
        g64, w64 = g.double(), w.double()
        if g64.shape != w64.shape:
            return math.inf, f"{name} shape {list(g64.shape)} != {list(w64.shape)}"
        if not torch.equal(torch.isfinite(g64), torch.isfinite(w64)):
            return math.inf, f"{name} finite where the reference is not (or the reverse)"
        finite = torch.isfinite(w64)
        err = float((g64 - w64)[finite].abs().max()) if bool(finite.any()) else 0.0
        bound = tol + 1e-3 * float(w64[finite].abs().max()) if bool(finite.any()) else tol
        if err / bound > worst:
            worst, where = err / bound, f"max |d{name}| = {err:.3g}"
    return worst, where


def run_check(device: torch.device, forward: Forward | None = None) -> CheckResult:
    """Compares the kernel with the reference on every case of :data:`CASES` on ``device``.

    Both fp32 settings of ``torch.backends.cuda.matmul.allow_tf32`` are checked on CUDA (the kernel uses
    tf32 tensor cores for fp32 inputs only when it is set). A kernel that raises fails the check.

    Args:
        device: Where to run.
        forward: The kernel; :data:`kernel_forward` when None.

    Returns:
        The :class:`CheckResult`.
    """
    forward = forward or kernel_forward
    start = time.perf_counter()
    worst, where, count = 0.0, "", 0
    settings = [False, True] if device.type == "cuda" else [None]
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        with torch.no_grad():
            for tf32 in settings:
                if tf32 is not None:
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                for seed, case in enumerate(CASES):
                    if tf32 and case[4] != "float32":
                        continue
                    dtype_key = "tf32" if tf32 and case[4] == "float32" else case[4]
                    ratio, what = _compare(forward, _case_inputs(case, device, seed), TOLERANCE[dtype_key])
                    count += 1
                    if ratio > worst or not math.isfinite(ratio):
                        label = "x".join(map(str, case[:4])) + f" {dtype_key}"
                        worst, where = ratio, f"{what} on case {label}"
    except Exception as exc:  # a kernel that fails to run is as unusable as a wrong one
        return CheckResult(str(device), False, math.inf, f"kernel raised {exc!r}"[:300], count, 0.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    passed = worst <= 1.0
    return CheckResult(
        str(device), passed, worst, where or "all cases exact", count, time.perf_counter() - start
    )
