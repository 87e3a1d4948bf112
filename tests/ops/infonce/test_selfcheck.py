"""The first-use self-check and ``DISTILLKIT_CUDA_KERNEL``, exercised on CPU with injected kernels.

The check logic is device-agnostic: here the CPU is made a checked device type and the kernel under check
is replaced by one that is wrong, raises, or is the real compiled CPU kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from distillkit.errors import ConfigError
from distillkit.ops import compiled_available, membank_infonce
from distillkit.ops.infonce import selfcheck
from distillkit.ops.infonce.reference import reference_forward
from tests.ops.infonce.helpers import float64_truth

HAS_CPU_KERNEL = compiled_available()


def _off_by_one_percent(args):
    loss, lse, wsum = torch.ops.distillkit.membank_infonce_fwd(*args.op_inputs())
    return loss * 1.01, lse, wsum


def _raises(args):
    raise RuntimeError("no kernel image is available for execution on the device")


def _must_not_run(args):
    raise AssertionError("the kernel ran although the policy excludes it")


@pytest.fixture
def checked_cpu(monkeypatch):
    """Makes the CPU a checked device type with fresh results; restores everything afterwards."""
    if not HAS_CPU_KERNEL:
        pytest.skip("distillkit._C is not built")
    monkeypatch.setattr(selfcheck, "CHECKED_DEVICE_TYPES", {"cpu"})
    monkeypatch.delenv(selfcheck.ENV, raising=False)
    selfcheck.reset()
    yield monkeypatch
    selfcheck.reset()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(2, 6, 16, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(2, 6, 16, generator=g), dim=-1)
    bank = torch.nn.functional.normalize(torch.randn(2, 40, 16, generator=g), dim=-1)
    return q, p, bank


def test_disagreeing_kernel_warns_once_and_reference_is_used(checked_cpu):
    checked_cpu.setattr(selfcheck, "kernel_forward", _off_by_one_percent)
    q, p, bank = _inputs()
    with pytest.warns(RuntimeWarning, match=r"disagrees with the PyTorch reference on cpu .*max \|dloss\|"):
        loss = membank_infonce(q, p, bank, 0.1)
    torch.testing.assert_close(loss.double(), float64_truth(q, p, bank, 0.1), atol=1e-5, rtol=1e-5)
    result = selfcheck.results()["cpu"]
    assert not result.passed and result.max_error > 1 and result.cases == len(selfcheck.CASES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and still the reference
        again = membank_infonce(q, p, bank, 0.1)
    torch.testing.assert_close(again, loss)


def test_agreeing_kernel_passes_and_is_used(checked_cpu):
    calls = []

    def counting(args):
        calls.append(1)
        return torch.ops.distillkit.membank_infonce_fwd(*args.op_inputs())

    checked_cpu.setattr(selfcheck, "kernel_forward", counting)
    q, p, bank = _inputs(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = membank_infonce(q, p, bank, 0.1)
    result = selfcheck.results()["cpu"]
    assert result.passed and result.max_error <= 1
    assert len(calls) == result.cases + 1  # the check's cases, then the call itself
    torch.testing.assert_close(loss.double(), float64_truth(q, p, bank, 0.1), atol=1e-5, rtol=1e-5)


def test_kernel_that_raises_fails_the_check(checked_cpu):
    checked_cpu.setattr(selfcheck, "kernel_forward", _raises)
    q, p, bank = _inputs(2)
    with pytest.warns(RuntimeWarning, match="kernel raised"):
        loss = membank_infonce(q, p, bank, 0.1)
    torch.testing.assert_close(loss.double(), float64_truth(q, p, bank, 0.1), atol=1e-5, rtol=1e-5)


def test_trust_uses_the_kernel_without_checking(checked_cpu):
    checked_cpu.setenv(selfcheck.ENV, "trust")
    checked_cpu.setattr(selfcheck, "kernel_forward", _off_by_one_percent)
    q, p, bank = _inputs(3)
    loss = membank_infonce(q, p, bank, 0.1)
    torch.testing.assert_close(loss.double(), 1.01 * float64_truth(q, p, bank, 0.1), atol=1e-5, rtol=1e-5)
    assert selfcheck.results() == {}


def test_off_uses_the_reference(checked_cpu):
    checked_cpu.setenv(selfcheck.ENV, "off")
    checked_cpu.setattr(selfcheck, "kernel_forward", _must_not_run)
    q, p, bank = _inputs(4)
    loss = membank_infonce(q, p, bank, 0.1)
    torch.testing.assert_close(loss.double(), float64_truth(q, p, bank, 0.1), atol=1e-5, rtol=1e-5)


def test_unchecked_device_types_are_not_checked(monkeypatch):
    monkeypatch.setattr(selfcheck, "kernel_forward", _must_not_run)
    assert selfcheck.kernel_allowed(torch.device("cpu"))  # cpu is not a checked type by default
    assert selfcheck.results().get("cpu") is None


@pytest.mark.parametrize("value", ["maybe", "1"])
def test_bad_policy_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv(selfcheck.ENV, value)
    with pytest.raises(ConfigError, match="DISTILLKIT_CUDA_KERNEL"):
        selfcheck.mode()


def test_check_compares_all_three_outputs(checked_cpu):
    """A kernel wrong only in wsum (what the backward uses) fails the check too."""

    def bad_wsum(args):
        loss, lse, wsum = reference_forward(args)
        return loss, lse, wsum + 1e-3

    result = selfcheck.run_check(torch.device("cpu"), bad_wsum)
    assert not result.passed and "wsum" in result.worst


def test_check_runs_while_tracing_under_torch_compile(checked_cpu):
    """fullgraph=True: the verdict is computed eagerly at trace time and the graph uses the reference."""
    checked_cpu.setattr(selfcheck, "kernel_forward", _off_by_one_percent)
    q, p, bank = _inputs(5)
    compiled = torch.compile(lambda q, p, b: membank_infonce(q, p, b, 0.1), fullgraph=True)
    with pytest.warns(RuntimeWarning, match="disagrees"):
        loss = compiled(q, p, bank)
    assert not selfcheck.results()["cpu"].passed
    torch.testing.assert_close(loss.double(), float64_truth(q, p, bank, 0.1), atol=1e-5, rtol=1e-5)
