"""Loads the compiled op (``distillkit._C``, then ``distillkit._C_cuda``) and registers its Python parts.

``distillkit._C`` defines ``distillkit::membank_infonce_fwd`` with ``TORCH_LIBRARY`` and its CPU kernel;
``distillkit._C_cuda``, when built, adds a CUDA kernel for the same schema. Here the op gets its fake
(meta) implementation for ``torch.compile`` and its autograd formula. Nothing fails when the extensions are
missing: :func:`kernel_available` says so and callers use the pure-PyTorch reference.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from distillkit.ops._backward import input_gradients, save_for_backward
from distillkit.ops._validate import InfonceArgs

OP_NAME = "distillkit::membank_infonce_fwd"
_state: dict[str, object] = {"loaded": False, "error": None, "cuda_error": None}
# device type -> whether the compiled op has a kernel for it; filled once by load().
_KERNELS: dict[str, bool] = {}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta", "mps": "MPS", "xpu": "XPU"}


def _fake_fwd(query, *_other_inputs):
    """Output shapes and dtypes of the op (torch calls it with the schema's inputs, positionally)."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    layers, batch, dim = query.shape
    loss = query.new_empty((layers, batch), dtype=acc)
    lse = query.new_empty((layers, batch), dtype=acc)
    wsum = query.new_empty((layers, batch, dim), dtype=acc)
    return loss, lse, wsum


def _setup_context(ctx, inputs, output):
    loss, lse, wsum = output
    save_for_backward(ctx, InfonceArgs(*inputs), loss, wsum)
    ctx.mark_non_differentiable(lse, wsum)


def _backward(ctx, grad_loss, _grad_lse, _grad_wsum):
    return input_gradients(ctx, grad_loss)


def load() -> None:
    """Imports the extensions once and registers the fake and autograd parts of the op."""
    if _state["loaded"]:
        return
    _state["loaded"] = True
    try:
        importlib.import_module("distillkit._C")
    except ImportError as exc:  # not built, or built against another torch
        _state["error"] = exc
        return
    try:
        importlib.import_module("distillkit._C_cuda")
    except ImportError as exc:  # not built (no CUDA toolkit at install time), or built for another torch
        _state["cuda_error"] = exc
    torch.library.register_fake(OP_NAME)(_fake_fwd)
    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
    for device_type, key in _DISPATCH_KEYS.items():
        _KERNELS[device_type] = torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key)


def compiled_available() -> bool:
    """Returns True when the compiled op (``distillkit._C``) is loaded."""
    load()
    return _state["error"] is None


def kernel_available(device_type: str) -> bool:
    """Whether the compiled op has a kernel for ``device_type``; warns once per device type when not."""
    if _KERNELS.get(device_type, False):
        return True
    warned = _state.setdefault("warned_devices", set())
    if device_type not in warned and not torch.compiler.is_compiling():
        warned.add(device_type)
        reason = _state["error"] if _state["error"] is not None else f"no {device_type} kernel built"
        warnings.warn(
            f"distillkit: compiled membank_infonce not available ({reason}); "
            "using the pure-PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def extension_status() -> dict[str, str]:
    """Each compiled extension module and whether it loaded (``loaded`` or why not)."""
    load()
    if _state["error"] is not None:
        return {
            "distillkit._C": f"not loaded ({_state['error']})",
            "distillkit._C_cuda": "not tried (distillkit._C did not load)",
        }
    cuda = _state["cuda_error"]
    return {
        "distillkit._C": "loaded",
        "distillkit._C_cuda": "loaded" if cuda is None else f"not loaded ({cuda})",
    }


def op_kernels() -> dict[str, list[str]]:
    """Each ``distillkit::`` op registered with torch and the device types it has a compiled kernel for."""
    load()
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("distillkit::"))
    return {
        name: [
            dev
            for dev, key in _DISPATCH_KEYS.items()
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
        ]
        for name in names
    }


def take_index_error(device: torch.device | int) -> tuple[int, int]:
    """Out-of-range ``negative_index`` values the CUDA kernel met on ``device`` since the last look.

    Reads host memory only (no device synchronisation; kernels still running report later) and clears it.

    Returns:
        ``(count, one of the values)``; ``(0, 0)`` when none, or when the CUDA kernel is not built.
    """
    if not _KERNELS.get("cuda", False):
        return 0, 0
    index = device if isinstance(device, int) else (device.index or 0)
    count, value = torch.ops.distillkit.membank_infonce_take_index_error(index)
    return int(count), int(value)
