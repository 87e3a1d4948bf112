"""Every invalid input to membank_infonce raises a clear TypeError/ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

from distillkit.ops import membank_infonce, naive_membank_infonce, reference_membank_infonce

IMPLS = [membank_infonce, reference_membank_infonce, naive_membank_infonce]


def _base():
    return {
        "query": torch.randn(2, 4, 8),
        "positive": torch.randn(2, 4, 8),
        "bank": torch.randn(2, 30, 8),
        "temperature": 0.1,
    }


def _call(fn, **changes):
    kw = _base()
    kw.update(changes)
    args = [kw.pop(k) for k in ("query", "positive", "bank", "temperature")]
    return fn(*args, **kw)


CASES = [
    ({"query": [[1.0]]}, TypeError, "query must be a torch.Tensor"),
    ({"bank": torch.randn(2, 30, 8, dtype=torch.float64)}, TypeError, "bank has dtype"),
    ({"positive": torch.randn(2, 4, 8).half()}, TypeError, "positive has dtype"),
    (
        {"query": torch.ones(2, 4, 8, dtype=torch.int64), "positive": torch.ones(2, 4, 8, dtype=torch.int64)},
        TypeError,
        "query has dtype",
    ),
    ({"positive": torch.randn(2, 4, 7)}, ValueError, "positive must have query's shape"),
    ({"query": torch.randn(8), "positive": torch.randn(8)}, ValueError, r"query must be \[\.\.\., B, D\]"),
    ({"bank": torch.randn(30)}, ValueError, "bank must be"),
    ({"bank": torch.randn(3, 30, 8)}, ValueError, "leading dims"),
    ({"bank": torch.randn(2, 30, 9)}, ValueError, "bank rows have size 9"),
    ({"bank": torch.randn(2, 0, 8)}, ValueError, "empty input"),
    ({"query": torch.randn(2, 0, 8), "positive": torch.randn(2, 0, 8)}, ValueError, "empty input"),
    ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": "0.1"}, TypeError, "temperature must be a positive float"),
    ({"temperature": True}, TypeError, "temperature"),
    (
        {"query_labels": torch.zeros(4, dtype=torch.int64)},
        ValueError,
        "query_labels given without bank_labels",
    ),
    (
        {"bank_labels": torch.zeros(30, dtype=torch.int64)},
        ValueError,
        "bank_labels given without query_labels",
    ),
    (
        {"query_labels": torch.zeros(4), "bank_labels": torch.zeros(30, dtype=torch.int64)},
        TypeError,
        "query_labels must hold integer",
    ),
    (
        {
            "query_labels": torch.zeros(5, dtype=torch.int64),
            "bank_labels": torch.zeros(30, dtype=torch.int64),
        },
        ValueError,
        r"query_labels must be \[4\]",
    ),
    (
        {
            "query_labels": torch.zeros(4, dtype=torch.int64),
            "bank_labels": torch.zeros(29, dtype=torch.int64),
        },
        ValueError,
        r"bank_labels must be \[30\]",
    ),
    ({"negative_index": torch.zeros(2, 4, 3)}, TypeError, "negative_index must be int64"),
    (
        {"negative_index": torch.zeros(4, 3, dtype=torch.int64)},
        ValueError,
        r"negative_index must be \[2, 4, K\]",
    ),
    ({"negative_index": torch.zeros(2, 5, 3, dtype=torch.int64)}, ValueError, "negative_index must be"),
    ({"negative_index": torch.zeros(2, 4, 0, dtype=torch.int64)}, ValueError, "K=0"),
    ({"negative_index": torch.full((2, 4, 3), 30)}, ValueError, r"holds 30, outside \[0, 30\)"),
    ({"negative_index": torch.full((2, 4, 3), -1)}, ValueError, "holds -1"),
    ({"positive": torch.randn(2, 4, 8, device="meta")}, ValueError, "positive is on meta"),
    (
        {
            "query_labels": torch.zeros(4, dtype=torch.int64, device="meta"),
            "bank_labels": torch.zeros(30).long(),
        },
        ValueError,
        "query_labels is on meta",
    ),
]


@pytest.mark.parametrize("fn", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("changes", "error", "match"), CASES)
def test_invalid_input_raises(fn, changes, error, match):
    with pytest.raises(error, match=match):
        _call(fn, **changes)


def test_int32_labels_and_index_are_accepted():
    got = _call(
        membank_infonce,
        query_labels=torch.zeros(4, dtype=torch.int32),
        bank_labels=torch.arange(30, dtype=torch.int32),
        negative_index=torch.zeros(2, 4, 3, dtype=torch.int32),
    )
    assert got.shape == (2, 4)
