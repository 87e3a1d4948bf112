import pytest
import torch
import torch.nn.functional as F

from distillkit import Taps, build_term
from distillkit.losses import ModelDims, masked_mean

DIMS = ModelDims(student_layers=2, teacher_layers=4, student_hidden=12, teacher_hidden=20)


def make_taps(layers, hidden, seed, labels=None, ids=None, batch=6):
    generator = torch.Generator().manual_seed(seed)
    states = tuple(torch.randn(batch, 5, hidden, generator=generator) for _ in range(layers + 1))
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[0, 3:] = 0
    return Taps(hidden_states=states, attention_mask=mask, labels=labels, example_ids=ids)


def projections(term, student, teacher):
    """Recomputes the term's normalised query/positive vectors by hand, [L, B, dim]."""
    q, k = [], []
    for i, (s, t) in enumerate(term.pairs):
        q.append(
            F.normalize(
                term.student_heads[i](masked_mean(student.hidden_states[s], student.token_mask())), dim=-1
            )
        )
        k.append(
            F.normalize(
                term.teacher_heads[i](masked_mean(teacher.hidden_states[t], teacher.token_mask())), dim=-1
            )
        )
    return torch.stack(q).double(), torch.stack(k).double()


def test_in_batch_equals_cross_entropy_over_the_batch():
    term = build_term("codir", DIMS, bank={"kind": "in_batch"}, temperature=0.1, dim=8)
    student, teacher = make_taps(2, 12, 0), make_taps(4, 20, 1)
    loss = term(student, teacher)
    q, k = projections(term, student, teacher)
    logits = q @ k.transpose(1, 2) / 0.1  # [L, B, B], the diagonal holds the positives
    expected = torch.stack(
        [F.cross_entropy(layer, torch.arange(6, dtype=torch.long)) for layer in logits]
    ).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def test_queue_bank_uses_past_teacher_keys():
    term = build_term("codir", DIMS, bank={"kind": "queue", "size": 16}, temperature=0.07, dim=8)
    first_teacher = make_taps(4, 20, 1)
    term(make_taps(2, 12, 0), first_teacher)
    term.after_step()
    assert int(term.bank.filled) == 6
    _, first_keys = projections(term, make_taps(2, 12, 0), first_teacher)
    torch.testing.assert_close(term.bank.negatives()[0].double(), first_keys, rtol=1e-5, atol=1e-6)
    student, teacher = make_taps(2, 12, 2), make_taps(4, 20, 3)
    loss = term(student, teacher)
    q, k = projections(term, student, teacher)
    bank = term.bank.negatives()[0].double()
    positives = (q * k).sum(-1, keepdim=True)
    logits = torch.cat([positives, q @ bank.transpose(1, 2)], dim=-1) / 0.07
    expected = (-positives.squeeze(-1) / 0.07 + torch.logsumexp(logits, dim=-1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def test_other_labels_excludes_same_label_negatives():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    term = build_term(
        "codir", DIMS, bank={"kind": "in_batch"}, negatives="other_labels", temperature=0.5, dim=8
    )
    student, teacher = make_taps(2, 12, 0, labels=labels), make_taps(4, 20, 1, labels=labels)
    loss = term(student, teacher)
    q, k = projections(term, student, teacher)
    logits = q @ k.transpose(1, 2) / 0.5
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    masked = logits.masked_fill(same & ~torch.eye(6, dtype=torch.bool), float("-inf"))
    expected = torch.stack([F.cross_entropy(layer, torch.arange(6)) for layer in masked]).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs labels"):
        term(make_taps(2, 12, 0), make_taps(4, 20, 1))


def test_index_bank_draws_by_example_id_and_updates_with_momentum():
    ids = torch.tensor([0, 3, 5, 7, 8, 9])
    term = build_term("codir", DIMS, bank={"kind": "index", "size": 10, "negatives": 4}, dim=8)
    before = term.bank.keys.clone()
    loss = term(make_taps(2, 12, 0, ids=ids), make_taps(4, 20, 1, ids=ids))
    assert torch.isfinite(loss)
    loss.backward()
    assert term.student_heads[0].weight.grad.abs().sum() > 0
    term.after_step()
    changed = (term.bank.keys != before).any(dim=-1).any(dim=0)
    assert changed.nonzero().flatten().tolist() == ids.tolist()
    with pytest.raises(ValueError, match="needs example_ids"):
        term(make_taps(2, 12, 0), make_taps(4, 20, 1))
    with pytest.raises(ValueError, match="needs bank.size"):
        build_term("codir", DIMS, bank={"kind": "index"})


def test_cls_pooling_reads_first_token_only():
    term = build_term("codir", DIMS, bank={"kind": "in_batch"}, pooling="cls", dim=8)
    student, teacher = make_taps(2, 12, 0), make_taps(4, 20, 1)
    base = term(student, teacher)
    for state in student.hidden_states:
        state[:, 1:] += 3.0
    torch.testing.assert_close(term(student, teacher), base)


@pytest.mark.parametrize("kind", ["queue", "index"])
def test_after_step_adds_every_micro_batch_since_the_last_step(kind):
    bank = {"kind": kind, "size": 16} if kind == "queue" else {"kind": kind, "size": 16, "negatives": 4}
    term = build_term("codir", DIMS, bank=bank, dim=8)
    before = term.bank.keys.clone()
    ids = [torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([6, 7, 8, 9, 10, 11])]
    for micro in range(2):  # two micro-batches of one optimizer step (gradient accumulation)
        term(make_taps(2, 12, micro, ids=ids[micro]), make_taps(4, 20, 10 + micro, ids=ids[micro]))
    term.after_step()
    if kind == "queue":
        assert int(term.bank.filled) == 12 and int(term.bank.pointer) == 12
        expected = torch.cat(
            [projections(term, make_taps(2, 12, m), make_taps(4, 20, 10 + m))[1] for m in range(2)], dim=1
        )
        torch.testing.assert_close(term.bank.negatives()[0].double(), expected, rtol=1e-5, atol=1e-6)
    else:
        changed = (term.bank.keys != before).any(dim=-1).any(dim=0)
        assert changed.nonzero().flatten().tolist() == list(range(12))
    term.after_step()  # nothing pending: the bank does not change
    filled = term.bank.keys.clone()
    term.after_step()
    assert torch.equal(term.bank.keys, filled)
