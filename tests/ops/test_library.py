"""The library loader: every op of ``library.OPS`` is registered, with its kernels reported per device."""

from __future__ import annotations

import pytest

from distillkit.ops import compiled_available, library

needs_op = pytest.mark.skipif(not compiled_available(), reason="distillkit._C not built")


@needs_op
def test_every_op_has_a_cpu_kernel_and_a_fake():
    for op in library.OPS:
        assert library.has_kernel(op.OP_NAME, "cpu"), op.OP_NAME
        assert library.has_kernel(op.OP_NAME, "meta"), op.OP_NAME  # the registered fake


@needs_op
def test_op_kernels_lists_the_ops_with_a_kernel():
    kernels = library.op_kernels()
    assert {op.OP_NAME for op in library.OPS} <= set(kernels)
    cuda_loaded = library.extension_status()["distillkit._C_cuda"] == "loaded"
    # The CUDA extension adds CUDA kernels to the ops the CPU extension defines.
    assert ("cuda" in kernels[library.OPS[0].OP_NAME]) == cuda_loaded


def test_unknown_op_or_device_has_no_kernel():
    assert not library.has_kernel("distillkit::no_such_op", "cpu")
    assert not library.has_kernel(library.OPS[0].OP_NAME, "no_such_device")
