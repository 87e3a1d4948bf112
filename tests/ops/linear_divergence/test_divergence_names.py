"""The divergence names: one list in Python (``DIVERGENCES``), one table in C++, and they agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from distillkit.ops import DIVERGENCES, divergence
from distillkit.ops.linear_divergence.op import kernel_available

ARGS_HEADER = Path(__file__).resolve().parents[3] / "csrc" / "linear_divergence" / "args.h"


def test_the_kernel_table_lists_the_python_names_in_order():
    table = re.search(r"kDivergenceNames\[\]\s*=\s*\{(.*?)\};", ARGS_HEADER.read_text(), flags=re.S)
    assert table is not None, f"no kDivergenceNames table in {ARGS_HEADER}"
    assert tuple(re.findall(r'"([a-z_]+)"', table.group(1))) == DIVERGENCES


@pytest.mark.skipif(not kernel_available(), reason="compiled op not built")
def test_the_built_kernel_names_the_python_divergences_when_given_another():
    hs, ws = torch.randn(3, 4), torch.randn(7, 4)
    with pytest.raises(RuntimeError, match="unknown divergence 'kl'") as info:
        torch.ops.distillkit.fused_linear_divergence_fwd(
            hs, ws, hs, ws, torch.full((3,), 1 / 3), None, None, "kl", 1.0, 0.5, 0.1
        )
    listed = re.search(r"; use (.*)$", str(info.value).splitlines()[0]).group(1)
    assert tuple(re.split(r", | or ", listed)) == DIVERGENCES


@pytest.mark.skipif(not kernel_available(), reason="compiled op not built")
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_the_built_kernel_takes_every_python_divergence(kind):
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g).double()
    ht, wt = torch.randn(5, 3, generator=g).double(), torch.randn(9, 3, generator=g).double()
    weights = torch.full((5,), 0.2, dtype=torch.float64)
    loss, _, _ = torch.ops.distillkit.fused_linear_divergence_fwd(
        hs, ws, ht, wt, weights, None, None, kind, 1.5, 0.4, 0.2
    )
    log_q = torch.log_softmax(hs @ ws.T / 1.5, dim=-1)
    log_p = torch.log_softmax(ht @ wt.T / 1.5, dim=-1)
    want = 1.5**2 * divergence(log_p, log_q, kind, beta=0.4, alpha=0.2).mean()
    torch.testing.assert_close(loss, want)
