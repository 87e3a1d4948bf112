"""Loads the compiled ops (``distillkit._C``, then ``distillkit._C_cuda``) and registers their Python parts.

``distillkit._C`` defines every ``distillkit::`` op's schema (``csrc/registration.cpp``) and the CPU kernels;
``distillkit._C_cuda``, when built, adds CUDA kernels. Here each op of :data:`OPS` gets its fake (meta)
implementation for ``torch.compile`` and its autograd formula. Nothing fails when the extensions are
missing: :func:`has_kernel` says False and each op runs its pure-PyTorch path.
"""

from __future__ import annotations

import importlib

import torch

from distillkit.ops.infonce import compiled as infonce_compiled
from distillkit.ops.linear_divergence import compiled as linear_divergence_compiled
from distillkit.ops.linear_divergence import topk_compiled as linear_divergence_topk_compiled

OPS = (infonce_compiled, linear_divergence_compiled, linear_divergence_topk_compiled)
"""Each compiled op's Python parts: a module with ``OP_NAME``, ``fake``, ``setup_context``, ``backward``."""

DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta", "mps": "MPS", "xpu": "XPU"}
"""The device types whose kernels are looked up, and their dispatch keys."""

_COMPOSITE_KEYS = ("CompositeExplicitAutograd", "CompositeImplicitAutograd")
_state: dict[str, object] = {"loaded": False, "error": None, "cuda_error": None}
# (op name, device type) -> whether the op has a compiled kernel for it; filled once by load().
_KERNELS: dict[tuple[str, str], bool] = {}


def _has_kernel_for(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)


def _is_defined(name: str) -> bool:
    try:
        _has_kernel_for(name, "CPU")
    except RuntimeError:  # not in the built library (an extension built before the op existed)
        return False
    return True


def load() -> None:
    """Imports the extensions once and registers the fake and autograd parts of every op they define."""
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
    for op in OPS:
        if not _is_defined(op.OP_NAME):
            continue
        torch.library.register_fake(op.OP_NAME)(op.fake)
        torch.library.register_autograd(op.OP_NAME, op.backward, setup_context=op.setup_context)
        for device_type, key in DISPATCH_KEYS.items():
            _KERNELS[op.OP_NAME, device_type] = _has_kernel_for(op.OP_NAME, key)


def compiled_available() -> bool:
    """Returns True when the compiled ops (``distillkit._C``) are loaded."""
    load()
    return _state["error"] is None


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether the op ``op_name`` (``distillkit::<name>``) has a compiled kernel for ``device_type``."""
    load()
    return _KERNELS.get((op_name, device_type), False)


def missing_reason(device_type: str) -> str:
    """Why an op has no compiled kernel for ``device_type``: the extension's load error, or none built."""
    load()
    return str(_state["error"]) if _state["error"] is not None else f"no {device_type} kernel built"


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
    """Each ``distillkit::`` op with a compiled kernel, and the device types it has one for."""
    load()
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("distillkit::"))
    kernels = {}
    for name in names:
        devices = [dev for dev, key in DISPATCH_KEYS.items() if _has_kernel_for(name, key)]
        if devices or any(_has_kernel_for(name, key) for key in _COMPOSITE_KEYS):
            kernels[name] = devices
    return kernels
