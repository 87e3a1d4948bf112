"""Correctness of the CUDA memory-bank InfoNCE kernel (``distillkit._C_cuda``) against a float64 reference.

Every test runs on CUDA tensors and is skipped without a GPU or without the CUDA extension. Both partial
kernels are exercised through ``DISTILLKIT_CUDA_PATH`` (``generic``: warp per row, any dtype, gather;
``tensorcore``: WMMA tiles for bf16/fp16, and fp32 when tf32 is allowed).
"""

from __future__ import annotations

import math

import pytest
import torch

from distillkit.ops import library, membank_infonce
from distillkit.ops.infonce import compiled, selfcheck
from distillkit.ops.infonce.reference import reference_forward
from distillkit.ops.infonce.validate import InfonceArgs

HAS_CUDA = torch.cuda.is_available()
HAS_KERNEL = HAS_CUDA and library.has_kernel(compiled.OP_NAME, "cuda")

pytestmark = [
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"),
    pytest.mark.skipif(HAS_CUDA and not HAS_KERNEL, reason="distillkit._C_cuda is not built"),
]

FWD = torch.ops.distillkit.membank_infonce_fwd if HAS_KERNEL else None
PATHS = ["generic", "tensorcore"]

# (loss/lse atol, wsum atol) against the float64 reference evaluated on the same (rounded) inputs.
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-5),
    "tf32": (3e-2, 1e-2),
    torch.bfloat16: (2e-3, 6e-3),
    torch.float16: (2e-3, 2e-3),
}


def naive(query, positive, bank, tau, query_labels=None, bank_labels=None, negative_index=None):
    """Float64 loss ``[L, B]``, lse ``[L, B]`` and wsum ``[L, B, D]``, materialising every logit.

    ``query``/``positive`` are ``[L, B, D]``; ``bank`` is ``[L, K, D]`` or ``[K, D]`` (``N`` rows with
    ``negative_index`` ``[L, B, K]``).
    """
    q, p, bk = query.double(), positive.double(), bank.double()
    layers = q.shape[0]
    if bk.dim() == 2:
        bk = bk.expand(layers, *bk.shape)
    s_pos = (q * p).sum(-1)
    if negative_index is not None:
        keys = torch.stack([bk[i][negative_index[i]] for i in range(layers)])  # [L, B, K, D]
        s_neg = torch.einsum("lbd,lbkd->lbk", q, keys)
        key_labels = bank_labels[negative_index] if bank_labels is not None else None
    else:
        s_neg = q @ bk.transpose(-1, -2)  # [L, B, K]
        key_labels = bank_labels
    if query_labels is not None:
        s_neg = s_neg.masked_fill(key_labels.expand_as(s_neg) == query_labels[None, :, None], -math.inf)
    logits = torch.cat([s_pos[..., None], s_neg], -1) / tau
    lse = torch.logsumexp(logits, -1)
    prob = torch.exp(logits[..., 1:] - lse[..., None])  # masked negatives -> 0
    if negative_index is not None:
        wsum = torch.einsum("lbk,lbkd->lbd", prob, keys)
    else:
        wsum = prob @ bk
    return lse - s_pos / tau, lse, wsum


def make(layers, batch, keys, dim, dtype, *, shared=False, seed=0):
    """Unit-norm query/positive ``[L, B, D]`` and bank (``[K, D]`` when shared) on CUDA in ``dtype``."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def unit(*shape):
        x = torch.randn(*shape, device="cuda", generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(x, dim=-1).to(dtype)

    bank = unit(keys, dim) if shared else unit(layers, keys, dim)
    return unit(layers, batch, dim), unit(layers, batch, dim), bank


def check(out, ref, tol):
    loss, lse, wsum = out
    for got, want, atol in zip((loss, lse, wsum), ref, (tol[0], tol[0], tol[1]), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-3 if atol > 1e-8 else 1e-9)


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_CUDA_PATH", request.param)
    return request.param


@pytest.fixture
def tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


SHAPES = [
    # (L, B, K, D, shared bank)
    (1, 1, 1, 1, False),
    (1, 1, 37, 5, False),
    (2, 3, 100, 17, False),
    (3, 65, 130, 64, False),  # one query tile + 1 row, bank tail of 2
    (1, 130, 1000, 96, False),
    (2, 17, 257, 33, True),  # odd D, shared 2-D bank
    (1, 64, 200, 300, False),  # D > 256: O accumulated in the workspace on the tensor-core path
    (2, 40, 4099, 8, True),
    (1, 256, 8192, 128, False),  # many bank splits
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, path):
    layers, batch, keys, dim, shared = shape
    q, p, bank = make(layers, batch, keys, dim, dtype, shared=shared)
    out = FWD(q, p, bank, 0.1, None, None, None)
    assert [t.dtype for t in out] == [torch.float64 if dtype == torch.float64 else torch.float32] * 3
    assert out[2].shape == (layers, batch, dim)
    check(out, naive(q, p, bank, 0.1), TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES[2:], ids=lambda s: "x".join(map(str, s)))
def test_tf32_matches_reference(shape, path, tf32):
    layers, batch, keys, dim, shared = shape
    q, p, bank = make(layers, batch, keys, dim, torch.float32, shared=shared)
    check(FWD(q, p, bank, 0.1, None, None, None), naive(q, p, bank, 0.1), TOL["tf32"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [False, True])
def test_labels_mask_negatives(dtype, shared, path):
    layers, batch, keys, dim = 2, 70, 333, 40
    q, p, bank = make(layers, batch, keys, dim, dtype, shared=shared, seed=1)
    g = torch.Generator(device="cuda").manual_seed(2)
    query_labels = torch.randint(0, 5, (batch,), device="cuda", generator=g)
    bank_labels = torch.randint(0, 5, (keys,), device="cuda", generator=g)
    query_labels[0] = 99  # no bank row shares it: every row is a negative
    query_labels[1] = 7
    bank_labels[-1] = 7  # exactly one masked row, at the very end of the bank
    out = FWD(q, p, bank, 0.2, query_labels, bank_labels, None)
    check(out, naive(q, p, bank, 0.2, query_labels, bank_labels), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_row_without_negatives(dtype, path):
    """All bank rows share the query's label: lse = s_pos / tau, loss = 0, wsum = 0, no NaN."""
    q, p, bank = make(1, 20, 300, 24, dtype, seed=3)
    query_labels = torch.zeros(20, dtype=torch.int64, device="cuda")
    query_labels[1::2] = 1
    bank_labels = torch.zeros(300, dtype=torch.int64, device="cuda")
    loss, lse, wsum = FWD(q, p, bank, 0.05, query_labels, bank_labels, None)
    s_pos = (q.double() * p.double()).sum(-1)
    torch.testing.assert_close(lse[:, ::2].double(), s_pos[:, ::2] / 0.05, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(loss[:, ::2].double(), torch.zeros_like(s_pos[:, ::2]), atol=1e-4, rtol=0)
    assert (wsum[:, ::2] == 0).all()
    check((loss, lse, wsum), naive(q, p, bank, 0.05, query_labels, bank_labels), TOL[dtype])


def test_fully_masked_splits(path):
    """The first 7/8 of a long bank is masked for every query: whole tiles and splits have max = -inf."""
    q, p, bank = make(1, 48, 16384, 64, torch.bfloat16, seed=4)
    query_labels = torch.zeros(48, dtype=torch.int64, device="cuda")
    bank_labels = torch.zeros(16384, dtype=torch.int64, device="cuda")
    bank_labels[-2048:] = 1
    out = FWD(q, p, bank, 0.1, query_labels, bank_labels, None)
    check(out, naive(q, p, bank, 0.1, query_labels, bank_labels), TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("labels", [False, True])
def test_negative_index(dtype, shared, labels):
    layers, batch, rows, keys, dim = 2, 33, 500, 129, 37
    q, p, bank = make(layers, batch, rows, dim, dtype, shared=shared, seed=5)
    g = torch.Generator(device="cuda").manual_seed(6)
    index = torch.randint(0, rows, (layers, batch, keys), device="cuda", generator=g)
    ql = torch.randint(0, 4, (batch,), device="cuda", generator=g) if labels else None
    bl = torch.randint(0, 4, (rows,), device="cuda", generator=g) if labels else None
    out = FWD(q, p, bank, 0.1, ql, bl, index)
    assert out[2].shape == (layers, batch, dim)
    check(out, naive(q, p, bank, 0.1, ql, bl, index), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_small_temperature_is_finite(dtype, path):
    q, p, bank = make(2, 96, 4096, 128, dtype, seed=7)
    out = FWD(q, p, bank, 0.01, None, None, None)
    for t in out:
        assert torch.isfinite(t).all()
    ref = naive(q, p, bank, 0.01)
    torch.testing.assert_close(out[0].double(), ref[0], atol=2e-2, rtol=1e-3)
    torch.testing.assert_close(out[2].double(), ref[2], atol=2e-2, rtol=2e-2)


def test_public_op_matches_reference_with_leading_dims(path):
    q, p, bank = make(6, 40, 700, 48, torch.bfloat16, seed=8)
    loss = membank_infonce(q.view(2, 3, 40, 48), p.view(2, 3, 40, 48), bank.view(2, 3, 700, 48), 0.07)
    assert loss.shape == (2, 3, 40) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().view(6, 40), naive(q, p, bank, 0.07)[0], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("with_index", [False, True])
def test_gradcheck_float64(with_index, path):
    q, p, bank = make(2, 5, 23, 7, torch.float64, seed=9)
    q.requires_grad_(True)
    p.requires_grad_(True)
    ql = torch.tensor([0, 1, 2, 0, 1], device="cuda")
    bl = torch.randint(0, 3, (23,), device="cuda")
    index = torch.randint(0, 23, (2, 5, 11), device="cuda") if with_index else None

    def fn(query, positive):
        return membank_infonce(
            query, positive, bank, 0.3, query_labels=ql, bank_labels=bl, negative_index=index
        )

    assert torch.autograd.gradcheck(fn, (q, p))


def _opcheck_samples():
    samples = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, p, bank = make(2, 9, 70, 24, dtype, seed=10)
        q.requires_grad_(dtype != torch.bfloat16)
        p.requires_grad_(dtype != torch.bfloat16)
        ql = torch.randint(0, 3, (9,), device="cuda")
        bl = torch.randint(0, 3, (70,), device="cuda")
        index = torch.randint(0, 70, (2, 9, 31), device="cuda")
        samples += [
            (q, p, bank, 0.1, None, None, None),
            (q, p, bank[0], 0.1, ql, bl, None),
            (q, p, bank, 0.1, ql, bl, index),
        ]
    return samples


@pytest.mark.parametrize("sample", range(9))
def test_opcheck(sample):
    args = _opcheck_samples()[sample]
    torch.library.opcheck(FWD.default, args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_no_allocation_proportional_to_batch_times_bank(dtype, path):
    """Peak extra memory stays far below one float32 [B, K] logit matrix (here 64 MiB)."""
    batch, keys, dim = 256, 65536, 64
    q, p, bank = make(1, batch, keys, dim, dtype, seed=11)
    FWD(q, p, bank, 0.1, None, None, None)  # warm-up: kernel attributes, allocator blocks
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = FWD(q, p, bank, 0.1, None, None, None)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < batch * keys * 4 // 8, f"peak extra allocation {extra} bytes"
    assert torch.isfinite(out[0]).all()


def _offset_copy(t: torch.Tensor, elements: int = 1) -> torch.Tensor:
    """A contiguous copy of ``t`` starting ``elements`` past an aligned address (breaks 16-byte alignment)."""
    storage = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    out = storage[elements:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_misaligned_inputs(dtype, path):
    q, p, bank = make(1, 65, 150, 64, dtype, seed=12)
    qm, bm = _offset_copy(q), _offset_copy(bank)
    assert qm.data_ptr() % 16 != 0 and bm.data_ptr() % 16 != 0
    check(FWD(qm, p, bm, 0.1, None, None, None), naive(q, p, bank, 0.1), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_nonfinite_values_in_masked_rows_change_nothing(dtype, path):
    """NaN / +-Inf in bank rows every query masks: results equal those of the clean bank, exactly."""
    q, p, bank = make(2, 40, 150, 64, dtype, seed=13)
    ql = torch.zeros(40, dtype=torch.int64, device="cuda")
    bl = torch.randint(1, 4, (150,), device="cuda")
    bl[[3, 77, 149]] = 0
    dirty = bank.clone()
    dirty[:, 3], dirty[:, 77, ::2], dirty[:, 149] = float("nan"), float("inf"), float("-inf")
    got = FWD(q, p, dirty, 0.1, ql, bl, None)
    want = FWD(q, p, bank, 0.1, ql, bl, None)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_row_without_negatives_is_exactly_zero(path):
    q, p, bank = make(1, 20, 300, 24, torch.bfloat16, seed=14)
    ql = torch.arange(20, device="cuda") % 2
    bl = torch.zeros(300, dtype=torch.int64, device="cuda")
    loss = FWD(q * 3, p * 3, bank, 0.05, ql, bl, None)[0]
    assert (loss[:, 0::2] == 0).all()


@pytest.mark.parametrize("rows", [70, 0])
def test_out_of_range_index_raises_from_the_call_that_passed_it(rows, path):
    """The kernel checks the index while it reads it; the same call raises (also for an empty bank)."""
    q, p, bank = make(2, 9, 70, 24, torch.float32, seed=15)
    bank = bank[:, :rows].contiguous()
    index = torch.randint(0, 70, (2, 9, 31), device="cuda")
    index[0, 3, 5], index[1, 8, 0] = 70, -2
    with pytest.raises(IndexError, match=rf"negative_index holds (70|-2), outside \[0, {rows}\)"):
        FWD(q, p, bank, 0.1, None, None, index)
    if rows:  # the next call with a good index is clean: nothing is left over from the bad one
        good = index.clamp(0, rows - 1)
        check(
            FWD(q, p, bank, 0.1, None, None, good),
            naive(q, p, bank, 0.1, None, None, good),
            TOL[torch.float32],
        )
        with pytest.raises(IndexError, match="negative_index holds"):
            membank_infonce(q, p, bank, 0.1, negative_index=index)  # the public op, kernel path


def test_out_of_range_index_under_cuda_graph_capture_gives_nan_rows():
    """Capture cannot wait for the kernel's verdict: the rows holding a bad value are NaN, nothing raises."""
    q, p, bank = make(2, 9, 70, 24, torch.float32, seed=19)
    index = torch.randint(0, 70, (2, 9, 31), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        FWD(q, p, bank, 0.1, None, None, index)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, _, wsum = FWD(q, p, bank, 0.1, None, None, index)
    index[0, 3, 5] = 70  # the replay reads the new value
    graph.replay()
    torch.cuda.synchronize()
    bad = torch.zeros(2, 9, dtype=torch.bool, device="cuda")
    bad[0, 3] = True
    assert torch.isnan(loss[bad]).all() and torch.isnan(wsum[bad]).all()
    want = naive(q, p, bank, 0.1, None, None, index.clamp(0, 69))[0]
    torch.testing.assert_close(loss[~bad].double(), want[~bad], atol=2e-4, rtol=1e-3)


def test_non_default_stream_and_device(path):
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # device != 0 when there are two
    q, p, bank = (t.to(device) for t in make(2, 70, 333, 40, torch.bfloat16, seed=16))
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        out = FWD(q, p, bank, 0.1, None, None, None)
    stream.synchronize()
    assert out[0].device == device
    check(out, naive(q, p, bank, 0.1), TOL[torch.bfloat16])


def test_more_than_65535_layers_tensorcore(monkeypatch):
    monkeypatch.setenv("DISTILLKIT_CUDA_PATH", "tensorcore")
    q, p, bank = make(65537, 16, 64, 8, torch.bfloat16, shared=True, seed=17)
    check(FWD(q, p, bank, 0.1, None, None, None), naive(q, p, bank, 0.1), TOL[torch.bfloat16])


def test_bank_with_more_than_2_31_elements(path):
    """K * D > 2^31 (4.3 GB of bf16): offsets must be 64-bit everywhere."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    keys, dim = (1 << 21) + 3, 1032
    q, p, _ = make(1, 16, 1, dim, torch.bfloat16, seed=18)
    bank = torch.empty(keys, dim, dtype=torch.bfloat16, device="cuda").uniform_(-0.03, 0.03)
    bank[-1] = q[0, 0]  # the last row matters: it is the largest score of query 0
    loss, lse, wsum = FWD(q, p, bank, 0.1, None, None, None)
    ref = reference_forward(InfonceArgs(q, p, bank, 0.1))
    torch.testing.assert_close(loss, ref[0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(wsum, ref[2], atol=2e-3, rtol=2e-2)


def test_self_check_passes_on_this_device():
    result = selfcheck.run_check(torch.device("cuda"))
    assert result.passed, result


def test_self_check_passes_with_tf32_and_under_autocast(tf32):
    """tf32 allowed (fp32 on the tensor cores) and the caller's bf16 autocast, as in training."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        result = selfcheck.run_check(torch.device("cuda"))
    assert result.passed and result.tf32, result
    assert torch.backends.cuda.matmul.allow_tf32  # the check left the caller's setting alone
