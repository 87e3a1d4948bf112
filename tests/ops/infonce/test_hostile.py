"""Documented behaviour for awkward but valid op inputs: NaN rows, non-contiguous views.

NaN in an input is not an error the op can afford to look for (that would be an extra pass over the bank);
it propagates: a row's loss is NaN exactly when a NaN reaches one of its scores (its query, its positive, or
a negative it does not mask out), and the other rows are unaffected. The training loop then reports the
non-finite term by name.
"""

import pytest
import torch

from distillkit.ops import membank_infonce, reference_membank_infonce

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_one_query_row_poisons_only_that_row(device):
    torch.manual_seed(0)
    query, positive, bank = (torch.randn(n, 16, device=device) for n in (5, 5, 300))
    clean = membank_infonce(query, positive, bank, 0.1)
    query[2, 3] = float("nan")
    dirty = membank_infonce(query, positive, bank, 0.1)
    assert torch.isnan(dirty[2])
    keep = torch.tensor([0, 1, 3, 4], device=device)
    torch.testing.assert_close(dirty[keep], clean[keep])


@pytest.mark.parametrize("op", [membank_infonce, reference_membank_infonce], ids=["compiled", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_the_bank_reaches_every_row_that_sees_it(op, device):
    torch.manual_seed(1)
    query, positive, bank = (torch.randn(n, 8, device=device) for n in (3, 3, 50))
    bank[7, 0] = float("nan")
    assert torch.isnan(op(query, positive, bank, 0.1)).all()
    labels, bank_labels = (
        torch.tensor([0, 1, 1], device=device),
        torch.zeros(50, dtype=torch.long, device=device),
    )
    bank_labels[7] = 1  # the NaN row is masked out for the queries of label 1
    out = op(query, positive, bank, 0.1, query_labels=labels, bank_labels=bank_labels)
    # query 0 (label 0) keeps only the NaN row as a negative: NaN, never mistaken for "no negatives"
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()


def test_non_contiguous_views_match_contiguous_inputs():
    torch.manual_seed(2)
    query = torch.randn(16, 6).t()  # [6, 16] view with strides (1, 6)
    positive = torch.randn(16, 6).t()
    bank = torch.randn(16, 400).t()[::2]  # [200, 16], every other row
    assert not (query.is_contiguous() or bank.is_contiguous())
    expected = reference_membank_infonce(query.contiguous(), positive.contiguous(), bank.contiguous(), 0.2)
    torch.testing.assert_close(membank_infonce(query, positive, bank, 0.2), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_an_indexed_negative_is_not_dropped(device):
    torch.manual_seed(3)
    query, positive, bank = (torch.randn(n, 8, device=device) for n in (2, 2, 20))
    bank[4] = float("nan")
    index = torch.tensor([[4, 4, 4], [1, 2, 3]], device=device)
    out = membank_infonce(query, positive, bank, 0.1, negative_index=index)
    assert torch.isnan(out[0]) and torch.isfinite(out[1])
