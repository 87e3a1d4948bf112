import pytest
import torch
import torch.nn.functional as F

from distillkit import Taps, build_term
from distillkit.losses import ModelDims

DIMS = ModelDims(student_layers=2, teacher_layers=4, student_hidden=8, teacher_hidden=8)


def taps(logits, mask=None, labels=None):
    hidden = (torch.zeros(logits.shape[0], 3, 8),)
    return Taps(hidden_states=hidden, logits=logits, attention_mask=mask, labels=labels)


def test_matches_hinton_formula_for_sequence_logits():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    loss = build_term("kd", DIMS, temperature=3.0)(taps(s), taps(t))
    expected = F.kl_div(
        F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), reduction="batchmean", log_target=True
    )
    torch.testing.assert_close(loss, 9.0 * expected)


def test_identical_logits_give_zero():
    logits = torch.randn(3, 7)
    assert build_term("kd", DIMS)(taps(logits), taps(logits.clone())).abs() < 1e-6


def test_token_logits_ignore_padding():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    term = build_term("kd", DIMS, temperature=1.0)
    base = term(taps(s, mask), taps(t, mask))
    s2 = s.clone()
    s2[0, 3:] = 100.0  # change only padded positions
    torch.testing.assert_close(term(taps(s2, mask), taps(t, mask)), base)
    kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    torch.testing.assert_close(base, (kl * mask).sum() / mask.sum())


def test_ce_weight_adds_hard_label_term():
    torch.manual_seed(2)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    soft = build_term("kd", DIMS, temperature=2.0)(taps(s), taps(t))
    mixed = build_term("kd", DIMS, temperature=2.0, ce_weight=0.5)(taps(s, labels=y), taps(t))
    torch.testing.assert_close(mixed, soft + 0.5 * F.cross_entropy(s, y))
    with pytest.raises(ValueError, match="needs labels"):
        build_term("kd", DIMS, ce_weight=0.5)(taps(s), taps(t))


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="logits of equal shape"):
        build_term("kd", DIMS)(taps(torch.randn(2, 3)), taps(torch.randn(2, 4)))
