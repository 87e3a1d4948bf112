"""The first-use self-check and ``DISTILLKIT_CUDA_KERNEL``, exercised on CPU with injected kernels.

The check logic is device-agnostic: here the CPU is made a checked device type and the kernel under check
is replaced by one that is wrong, raises, models the tf32 tensor-core path, or is the real compiled CPU
kernel.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from distillkit.errors import ConfigError
from distillkit.ops import compiled_available, membank_infonce
from distillkit.ops.infonce import selfcheck
from distillkit.ops.infonce.reference import reference_forward, round_to_tf32
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
    with pytest.warns(RuntimeWarning, match=r"disagrees with the exact formula on cpu .*max \|dloss\|"):
        loss = membank_infonce(q, p, bank, 0.1)
    torch.testing.assert_close(loss.double(), float64_truth(q, p, bank, 0.1), atol=1e-5, rtol=1e-5)
    result = selfcheck.results()["cpu"]
    assert not result.passed and result.max_error > 1 and result.cases == len(selfcheck.CASES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and still the reference
        again = membank_infonce(q, p, bank, 0.1)
    torch.testing.assert_close(again, loss)


def _count_kernel_calls(monkeypatch) -> list:
    """Makes the kernel under check the real CPU kernel, counted: one list item per call."""
    calls = []

    def counting(args):
        calls.append(1)
        return torch.ops.distillkit.membank_infonce_fwd(*args.op_inputs())

    monkeypatch.setattr(selfcheck, "kernel_forward", counting)
    return calls


def test_agreeing_kernel_passes_and_is_used(checked_cpu):
    calls = _count_kernel_calls(checked_cpu)
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


def test_check_passes_under_the_callers_autocast(checked_cpu):
    """The loop computes the objective under autocast: the check must not compute its yardstick in bf16."""
    if not HAS_CPU_KERNEL:
        pytest.skip("distillkit._C is not built")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = selfcheck.run_check(torch.device("cpu"))
        assert torch.is_autocast_enabled("cpu")  # the caller's state is back
    assert result.passed, result
    assert result.max_error < 0.1  # the real CPU kernel, far inside the tolerance


class _FlagRecorder:
    """Stands in for ``torch.backends.cuda.matmul``: reads give tf32 on, every write is recorded."""

    def __init__(self):
        object.__setattr__(self, "writes", [])

    @property
    def allow_tf32(self):
        return True

    def __setattr__(self, name, value):
        self.writes.append((name, value))


@pytest.mark.parametrize("tf32", [None, False, True])
def test_check_never_writes_the_process_wide_tf32_flag(checked_cpu, tf32):
    recorder = _FlagRecorder()
    checked_cpu.setattr(torch.backends.cuda, "matmul", recorder)
    result = selfcheck.run_check(torch.device("cpu"), tf32=tf32)
    assert recorder.writes == []
    assert result.passed and result.tf32 == bool(tf32)  # tf32=None: the cpu kernel never uses it


def tf32_tensor_core_model(args, drop=None):
    """The tensor-core kernel's tf32 arithmetic on float32 dense inputs, optionally losing one key per tile.

    Operands of both products rounded to tf32, float32 products and sums, softmax weights rounded to tf32
    before the weighted sum. ``drop``: the position (0..63) of a key left out of every 64-key tile. Other
    cases (other dtypes, ``negative_index``) run the CPU kernel: the generic path never uses tf32.
    """
    query, positive, bank, tau, query_labels, bank_labels, negative_index = args.op_inputs()
    if negative_index is not None or query.dtype != torch.float32:
        return torch.ops.distillkit.membank_infonce_fwd(*args.op_inputs())
    s_pos = (query * positive).sum(-1) / tau
    keys = round_to_tf32(bank)
    scores = round_to_tf32(query) @ keys.transpose(-1, -2) / tau
    if query_labels is not None:
        scores = scores.masked_fill(bank_labels[None, None, :] == query_labels[None, :, None], float("-inf"))
    if drop is not None:
        scores = scores.masked_fill(torch.arange(scores.shape[-1]) % 64 == drop, float("-inf"))
    lse = torch.logsumexp(torch.cat([s_pos.unsqueeze(-1), scores], -1), -1)
    prob = torch.exp(scores - lse.unsqueeze(-1))
    return lse - s_pos, lse, round_to_tf32(prob) @ keys


def test_round_to_tf32_rounds_to_nearest_ties_away():
    one = 1.0
    ulp = 2.0**-10  # tf32 keeps 10 mantissa bits
    x = torch.tensor([one + 0.49 * ulp, one + 0.5 * ulp, -(one + 0.5 * ulp), one + 1.51 * ulp, float("inf")])
    want = torch.tensor([one, one + ulp, -(one + ulp), one + 2 * ulp, float("inf")])
    assert torch.equal(round_to_tf32(x), want)
    assert torch.isnan(round_to_tf32(torch.tensor([float("nan")]))).all()


def test_tf32_tolerance_passes_the_tensor_core_arithmetic_and_catches_a_dropped_key_per_tile(checked_cpu):
    """A right tf32 kernel stays far inside the tolerance; one lost key per 64-key tile fails by far."""
    cpu = torch.device("cpu")
    right = selfcheck.run_check(cpu, tf32_tensor_core_model, tf32=True)
    assert right.passed and right.max_error < 0.1, right
    for drop in (0, 31, 63):  # first, middle, last key of every tile
        wrong = selfcheck.run_check(cpu, functools.partial(tf32_tensor_core_model, drop=drop), tf32=True)
        assert wrong.max_error > 100, (drop, wrong)
    # Without tf32 the same arithmetic is not float32-exact: the tf32 yardstick applies only when allowed.
    assert not selfcheck.run_check(cpu, tf32_tensor_core_model, tf32=False).passed


def test_each_tf32_setting_gets_its_own_verdict(checked_cpu):
    calls = _count_kernel_calls(checked_cpu)
    cpu = torch.device("cpu")
    checked_cpu.setattr(selfcheck, "kernel_uses_tf32", lambda device: False)
    assert selfcheck.kernel_allowed(cpu) and selfcheck.kernel_allowed(cpu)
    checked_cpu.setattr(selfcheck, "kernel_uses_tf32", lambda device: True)
    assert selfcheck.kernel_allowed(cpu)
    assert set(selfcheck.results()) == {"cpu", "cpu tf32"}
    assert selfcheck.results()["cpu tf32"].tf32 and not selfcheck.results()["cpu"].tf32
    assert len(calls) == 2 * len(selfcheck.CASES)  # one check per setting, none for the repeated call
