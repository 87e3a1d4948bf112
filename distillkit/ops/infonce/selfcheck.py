"""First-use self-check of the compiled ``membank_infonce`` kernel on each accelerator device.

The CUDA kernel is verified in CI by emulation and compilation, not on real hardware. So before its first
use on a device, the op compares it with the exact float64 formula on that device on a few small shapes
(both partial kernels, every dtype, labels, ``negative_index``). If they disagree, distillkit warns once with
the measured error and uses the PyTorch reference on that device for the rest of the process.

The check is independent of the caller's state: autocast is off inside it for every device type, it never
changes a process-wide setting (other threads would see it), and its yardstick does not depend on
``torch.backends.cuda.matmul.allow_tf32``. The kernel computes float32 inputs with tf32 tensor cores when
that flag is set, so the check runs the kernel as the process has it configured and accepts tf32 rounding
only then; each setting of the flag gets its own verdict (a flip triggers one more check).

``DISTILLKIT_CUDA_KERNEL`` (read at each call) controls it: ``check`` (default) as above, ``trust`` uses
the kernel without checking, ``off`` always uses the reference. The CPU kernel is tested directly in CI
and is not checked. :func:`kernel_allowed` is device-agnostic: ``CHECKED_DEVICE_TYPES`` names the device
types it checks, and the kernel it calls is :data:`kernel_forward`, so both can be replaced in tests.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from distillkit.errors import ConfigError
from distillkit.ops.infonce import compiled
from distillkit.ops.infonce.reference import exact_forward
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
        max_error: Worst ratio of |kernel - exact| to the case's tolerance (<= 1 passes).
        worst: The case and output where that ratio occurred, or the error the kernel raised.
        cases: Number of cases run.
        seconds: Wall time of the check.
        tf32: Whether float32 inputs were allowed tf32 rounding (the kernel's setting during the check).
    """

    device: str
    passed: bool
    max_error: float
    worst: str
    cases: int
    seconds: float
    tf32: bool = False


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
    (1, 64, 192, 32, "float32", False, 0),  # tf32: one whole query tile against three whole 64-key tiles
)
# The tolerance model. The yardstick is exact_forward: float64 on the device, from the inputs as the kernel
# reads them (half precision exactly; float32 as given or, with tf32, rounded as tensor cores read it). What
# remains is the kernel's own arithmetic: float32 accumulation and exp/log (float64 for float64 inputs), and,
# in wsum only, the rounding of the softmax weights to the tensor cores' operand type (bf16: 2^-9, fp16 and
# tf32: 2^-11 relative). Per precision: (loss and lse atol, wsum atol, rtol on max |reference|).
TOLERANCE = {
    "float64": (1e-9, 1e-9, 1e-12),
    "float32": (2e-4, 2e-5, 1e-5),
    "tf32": (2e-4, 2e-3, 1e-5),
    "bfloat16": (2e-4, 6e-3, 1e-5),
    "float16": (2e-4, 2e-3, 1e-5),
}
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu", "mtia", "privateuseone")


def mode() -> str:
    """The kernel policy from ``DISTILLKIT_CUDA_KERNEL``: ``check`` (default), ``trust`` or ``off``.

    Raises:
        ConfigError: The variable holds another value.
    """
    value = os.environ.get(ENV, "check").strip().lower() or "check"
    if value not in MODES:
        raise ConfigError(
            f"{ENV}={value!r} is not one of {', '.join(MODES)}: use 'check' (default: compare the compiled "
            "kernel with the exact formula on first use per device), 'trust' (kernel without the check) "
            "or 'off' (PyTorch reference only)."
        )
    return value


def kernel_uses_tf32(device: torch.device) -> bool:
    """Whether the kernel on ``device`` may compute float32 inputs with tf32 tensor cores right now.

    The CUDA kernel reads ``torch.backends.cuda.matmul.allow_tf32`` at each call; other devices never do.
    """
    return device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)


def result_key(device: str, tf32: bool) -> str:
    """The key of a verdict in :func:`results`: the device, with `` tf32`` when tf32 was allowed."""
    return f"{device} tf32" if tf32 else device


def kernel_allowed(device: torch.device) -> bool:
    """Whether calls on ``device`` should run the compiled kernel (True) or the reference (False).

    Runs the device's self-check on first use in ``check`` mode, once per setting of tf32 (under
    ``torch.compile`` too: the check runs eagerly while tracing and its verdict is a constant of the graph).
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
    tf32 = kernel_uses_tf32(torch.device(device))
    key = result_key(device, tf32)
    result = _results.get(key)
    if result is None:
        with _lock:
            result = _results.get(key)
            if result is None:
                result = run_check(torch.device(device), tf32=tf32)
                _results[key] = result
                if not result.passed:
                    warnings.warn(
                        "distillkit: the compiled membank_infonce kernel disagrees with the exact formula "
                        f"on {key} ({result.worst}, {result.max_error:.3g}x the tolerance); "
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
    """Self-check results so far, by :func:`result_key` (the device, plus `` tf32`` when it was allowed)."""
    return dict(_results)


def reset() -> None:
    """Forgets every result (tests)."""
    with _lock:
        _results.clear()


@contextlib.contextmanager
def isolated(device: torch.device) -> Iterator[None]:
    """No autograd and no autocast for any device type: the check's arithmetic is its own."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for device_type in dict.fromkeys((*_AUTOCAST_DEVICE_TYPES, device.type)):
            try:
                enabled = torch.is_autocast_enabled(device_type)
            except (RuntimeError, TypeError, ValueError):  # a device type this torch does not know
                continue
            if enabled:
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


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


def _error(got, want, precision: str) -> tuple[float, str]:
    """Worst ratio of |got - want| to the tolerance of ``precision`` over (loss, lse, wsum), and where."""
    atol_loss, atol_wsum, rtol = TOLERANCE[precision]
    worst, where = 0.0, ""
    for name, g, w, atol in zip(
        ("loss", "lse", "wsum"), got, want, (atol_loss, atol_loss, atol_wsum), strict=True
    ):
        g64, w64 = g.double(), w.double()
        if g64.shape != w64.shape:
            return math.inf, f"{name} shape {list(g64.shape)} != {list(w64.shape)}"
        if not torch.equal(torch.isfinite(g64), torch.isfinite(w64)):
            return math.inf, f"{name} finite where the exact value is not (or the reverse)"
        finite = torch.isfinite(w64)
        if not bool(finite.any()):
            continue
        err = float((g64 - w64)[finite].abs().max())
        bound = atol + rtol * float(w64[finite].abs().max())
        if err / bound > worst:
            worst, where = err / bound, f"max |d{name}| = {err:.3g}"
    return worst, where


def compare(forward: Forward, args: InfonceArgs, tf32: bool) -> tuple[float, str, str]:
    """Error of ``forward`` on ``args`` against :func:`exact_forward`, in units of the tolerance.

    Args:
        forward: The kernel.
        args: One case's canonical arguments.
        tf32: Float32 inputs may have been computed with tf32 tensor cores: the kernel passes if it matches
            either the float32 or the tf32 yardstick (which path ran depends on the device and shape).

    Returns:
        ``(ratio, where, precision)``: the worst error ratio, the output it is in, and the precision it was
        measured against.
    """
    got = forward(args)
    precision = str(args.query.dtype).removeprefix("torch.")
    ratio, where = _error(got, exact_forward(args), precision)
    if tf32 and args.query.dtype == torch.float32:
        ratio_tf32, where_tf32 = _error(got, exact_forward(args, tf32=True), "tf32")
        if ratio_tf32 < ratio:
            return ratio_tf32, where_tf32, "tf32"
    return ratio, where, precision


def run_check(
    device: torch.device, forward: Forward | None = None, *, tf32: bool | None = None
) -> CheckResult:
    """Compares the kernel with the exact formula on every case of :data:`CASES` on ``device``.

    Changes no process-wide state. A kernel that raises fails the check.

    Args:
        device: Where to run.
        forward: The kernel; :data:`kernel_forward` when None.
        tf32: Whether float32 inputs may be computed in tf32; when None, :func:`kernel_uses_tf32`.

    Returns:
        The :class:`CheckResult`.
    """
    forward = forward or kernel_forward
    tf32 = kernel_uses_tf32(device) if tf32 is None else tf32
    start = time.perf_counter()
    worst, where, count = 0.0, "", 0
    try:
        with isolated(device):
            for seed, case in enumerate(CASES):
                ratio, what, precision = compare(forward, _case_inputs(case, device, seed), tf32)
                count += 1
                if ratio > worst or not math.isfinite(ratio):
                    label = "x".join(map(str, case[:4])) + f" {precision}"
                    worst, where = ratio, f"{what} on case {label}"
    except Exception as exc:  # a kernel that fails to run is as unusable as a wrong one
        return CheckResult(str(device), False, math.inf, f"kernel raised {exc!r}"[:300], count, 0.0, tf32)
    passed = worst <= 1.0
    seconds = time.perf_counter() - start
    return CheckResult(str(device), passed, worst, where or "all cases exact", count, seconds, tf32)
