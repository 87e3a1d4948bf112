import pytest
import torch
import torch.nn.functional as F

from distillkit import Taps, build_term
from distillkit.errors import ConfigError
from distillkit.objective.terms import ModelDims, masked_mean

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
    term = build_term("codir", DIMS, bank={"kind": "in_batch"}, fusion="per_layer", temperature=0.1, dim=8)
    student, teacher = make_taps(2, 12, 0), make_taps(4, 20, 1)
    loss = term(student, teacher)
    q, k = projections(term, student, teacher)
    logits = q @ k.transpose(1, 2) / 0.1  # [L, B, B], the diagonal holds the positives
    expected = torch.stack(
        [F.cross_entropy(layer, torch.arange(6, dtype=torch.long)) for layer in logits]
    ).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def test_queue_bank_uses_past_teacher_keys():
    term = build_term(
        "codir", DIMS, bank={"kind": "queue", "size": 16}, fusion="per_layer", temperature=0.07, dim=8
    )
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
        "codir",
        DIMS,
        bank={"kind": "in_batch"},
        negatives="other_labels",
        fusion="per_layer",
        temperature=0.5,
        dim=8,
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
    with pytest.raises(ConfigError, match="needs bank.size"):
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
    term = build_term("codir", DIMS, bank=bank, fusion="per_layer", dim=8)
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


# ---- fusion: concat, objective: crd_nce (independent float64 formulas) ----


def random_taps(layers, hidden, batch, seq, seed, dtype=torch.float32, labels=None, ids=None):
    """Random taps with a random amount of right padding per row (at least one real token)."""
    generator = torch.Generator().manual_seed(seed)
    states = tuple(torch.randn(batch, seq, hidden, generator=generator).to(dtype) for _ in range(layers + 1))
    lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
    mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return Taps(hidden_states=states, attention_mask=mask, labels=labels, example_ids=ids)


def ref_pool(hidden, mask, pooling):
    hidden = hidden.double()
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.double().unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1)


def ref_concat_vectors(term, taps, side):
    """float64 [B, dim]: pooled mapped layers concatenated, one linear head, L2-normalised."""
    heads = term.student_heads if side == 0 else term.teacher_heads
    x = torch.cat(
        [ref_pool(taps.hidden_states[p[side]], taps.attention_mask, term.params.pooling) for p in term.pairs],
        -1,
    )
    y = x @ heads[0].weight.double().T + heads[0].bias.double()
    return y / y.norm(dim=-1, keepdim=True)


def ref_nce(anchor, bank, index, z, n_data, tau, eps=1e-7):
    """CRD's ContrastLoss on exp(<anchor, bank[idx]>/tau)/Z, per row, float64, written out directly."""
    rows = bank[index]  # [B, K+1, D]
    p = torch.exp(torch.einsum("bkd,bd->bk", rows, anchor) / tau) / z
    c = (index.shape[1] - 1) / n_data
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + c + eps))
    log_d0 = torch.log(c / (p[:, 1:] + c + eps)).sum(-1)
    return -(log_d1 + log_d0)


@pytest.mark.parametrize(
    "batch,seq,pooling,layers",
    [(1, 3, "mean", "uniform"), (5, 7, "mean", [[1, 1], [2, 3]]), (7, 4, "cls", "skip")],
)
def test_concat_infonce_against_float64(batch, seq, pooling, layers):
    term = build_term(
        "codir",
        DIMS,
        layer_map=layers,
        pooling=pooling,
        bank={"kind": "queue", "size": 9},
        temperature=0.2,
        dim=6,
    )
    assert len(term.student_heads) == 1 and term.student_heads[0].in_features == 2 * 12
    assert term.bank.keys.shape == (1, 9, 6)
    student, teacher = random_taps(2, 12, batch, seq, 0), random_taps(4, 20, batch, seq, 1)
    first = term(student, teacher)
    q, k = ref_concat_vectors(term, student, 0), ref_concat_vectors(term, teacher, 1)
    logits = q @ k.T / 0.2  # the queue is empty on the first step: in-batch negatives
    torch.testing.assert_close(
        first.double(), F.cross_entropy(logits, torch.arange(batch)), rtol=1e-4, atol=1e-5
    )
    term.after_step()
    torch.testing.assert_close(term.bank.negatives()[0][0].double(), k, rtol=1e-5, atol=1e-6)
    student2, teacher2 = random_taps(2, 12, batch, seq, 2), random_taps(4, 20, batch, seq, 3)
    second = term(student2, teacher2)
    q2, k2 = ref_concat_vectors(term, student2, 0), ref_concat_vectors(term, teacher2, 1)
    positive = (q2 * k2).sum(-1, keepdim=True)
    logits = torch.cat([positive, q2 @ k.T], dim=-1) / 0.2
    expected = (torch.logsumexp(logits, -1) - positive.squeeze(-1) / 0.2).mean()
    torch.testing.assert_close(second.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch,negatives", [(1, 1), (3, 5), (6, 17)])
def test_crd_nce_loss_against_float64(batch, negatives):
    from distillkit_plugins.codir_crd import crd_nce_loss, gathered_scores

    generator = torch.Generator().manual_seed(batch)
    n_data, dim, layers, tau = 23, 7, 2, 0.07
    anchor = F.normalize(torch.randn(layers, batch, dim, generator=generator), dim=-1)
    bank = F.normalize(torch.randn(layers, n_data, dim, generator=generator), dim=-1)
    index = torch.randint(0, n_data, (batch, negatives + 1), generator=generator)
    z = torch.rand(layers, generator=generator).double() * 50 + 1
    got = crd_nce_loss(gathered_scores(anchor, bank, index), z.log(), n_data, tau)
    expected = torch.stack(
        [ref_nce(anchor[i].double(), bank[i].double(), index, z[i], n_data, tau) for i in range(layers)]
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    scores = torch.randn(layers, batch, negatives + 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s: crd_nce_loss(s, z.log(), n_data, 0.5).double(), (scores,), eps=1e-6, atol=1e-4
    )


def crd_term(**extra):
    params = {
        "objective": "crd_nce",
        "pooling": "cls",
        "bank": {"kind": "index", "size": 12, "negatives": 4},
        "dim": 8,
        **extra,
    }
    return build_term("codir", DIMS, **params)


def test_crd_nce_term_against_float64_with_z_fixed_on_first_batch():
    term = crd_term()
    assert term.bank is None and term.crd.student_bank.keys.shape == (1, 12, 8)
    ids = torch.tensor([0, 4, 7, 11, 2])
    index = torch.cat(
        [
            ids.unsqueeze(1),
            torch.tensor([[1, 2, 3, 5], [6, 6, 9, 0], [8, 1, 2, 3], [10, 9, 8, 7], [3, 4, 5, 6]]),
        ],
        1,
    )
    term.crd.sample = lambda example_ids, labels, count: (
        index
    )  # fixed negatives, to compare with the reference
    student, teacher = random_taps(2, 12, 5, 6, 0, ids=ids), random_taps(4, 20, 5, 6, 1, ids=ids)
    student_bank = term.crd.student_bank.keys[0].double().clone()
    teacher_bank = term.crd.teacher_bank.keys[0].double().clone()
    loss = term(student, teacher)
    s, t = ref_concat_vectors(term, student, 0), ref_concat_vectors(term, teacher, 1)
    z_s = torch.exp(torch.einsum("bkd,bd->bk", teacher_bank[index], s) / 0.07).mean() * 12
    z_t = torch.exp(torch.einsum("bkd,bd->bk", student_bank[index], t) / 0.07).mean() * 12
    torch.testing.assert_close(term.crd.student_log_z.double().exp()[0], z_s, rtol=1e-4, atol=0)
    torch.testing.assert_close(term.crd.teacher_log_z.double().exp()[0], z_t, rtol=1e-4, atol=0)
    expected = (  # the two directions averaged, as CRDLoss.forward returns (s_loss + t_loss) / 2.0
        ref_nce(s, teacher_bank, index, z_s, 12, 0.07) + ref_nce(t, student_bank, index, z_t, 12, 0.07)
    ).mean() / 2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-4)
    loss.backward()
    assert term.student_heads[0].weight.grad.abs().sum() > 0
    assert term.teacher_heads[0].weight.grad.abs().sum() > 0  # the teacher anchor trains the teacher head
    term.after_step()
    mixed_s = F.normalize(0.5 * student_bank[ids] + 0.5 * s, dim=-1)
    mixed_t = F.normalize(0.5 * teacher_bank[ids] + 0.5 * t, dim=-1)
    torch.testing.assert_close(term.crd.student_bank.keys[0, ids].double(), mixed_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(term.crd.teacher_bank.keys[0, ids].double(), mixed_t, rtol=1e-5, atol=1e-6)
    untouched = torch.tensor([i for i in range(12) if i not in ids.tolist()])
    assert torch.equal(term.crd.student_bank.keys[0, untouched].double(), student_bank[untouched])
    z_before = (term.crd.student_log_z.clone(), term.crd.teacher_log_z.clone())
    term(random_taps(2, 12, 5, 6, 2, ids=ids), random_taps(4, 20, 5, 6, 3, ids=ids))
    assert torch.equal(term.crd.student_log_z, z_before[0]) and torch.equal(
        term.crd.teacher_log_z, z_before[1]
    )


def test_crd_nce_other_labels_draws_only_other_classes():
    term = crd_term(negatives="other_labels", bank={"kind": "index", "size": 12, "negatives": 64})
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    ids = torch.arange(12)
    taps = (
        random_taps(2, 12, 12, 4, 0, labels=labels, ids=ids),
        random_taps(4, 20, 12, 4, 1, labels=labels, ids=ids),
    )
    term(*taps)
    term.after_step()  # every slot now carries its label
    index = term.crd.sample(ids, labels, 64)
    assert torch.equal(index[:, 0], ids)
    assert (labels[index[:, 1:]] != labels.unsqueeze(1)).all()
    assert torch.isfinite(term(*taps))


def test_crd_nce_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    ids = torch.tensor([1, 3, 5])
    term = crd_term()
    for seed in range(2):
        term(random_taps(2, 12, 3, 5, seed, ids=ids), random_taps(4, 20, 3, 5, 10 + seed, ids=ids))
        term.after_step()
    state = term.state_dict()
    assert {
        "crd.student_log_z",
        "crd.teacher_log_z",
        "crd.z_estimated",
        "crd.student_bank.keys",
        "crd.teacher_bank.keys",
    } <= set(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "objective.safetensors"))
    fresh = crd_term()
    fresh.load_state_dict(load_file(str(tmp_path / "objective.safetensors")))
    for name, value in state.items():
        assert torch.equal(fresh.state_dict()[name], value), name
    student, teacher = random_taps(2, 12, 3, 5, 7, ids=ids), random_taps(4, 20, 3, 5, 8, ids=ids)
    torch.manual_seed(0)
    expected = term(student, teacher)
    torch.manual_seed(0)
    torch.testing.assert_close(fresh(student, teacher), expected)
    assert torch.equal(fresh.crd.student_log_z, state["crd.student_log_z"])  # not re-estimated after loading


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("objective", ["infonce", "crd_nce"])
def test_half_precision_inputs_stay_finite(dtype, objective):
    ids = torch.arange(6)
    bank = {"kind": "index", "size": 6, "negatives": 3}
    term = build_term("codir", DIMS, objective=objective, bank=bank, dim=8)
    student = random_taps(2, 12, 6, 5, 0, dtype=dtype, ids=ids)
    teacher = random_taps(4, 20, 6, 5, 1, dtype=dtype, ids=ids)
    with torch.autocast("cpu", dtype=dtype):
        loss = term(student, teacher)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(term.student_heads[0].weight.grad).all()


@pytest.mark.parametrize(
    "params,message",
    [
        ({"objective": "crd_nce"}, "crd_nce .* needs bank: \\{kind: index"),
        ({"objective": "crd_nce", "bank": {"kind": "in_batch"}}, "not kind: in_batch"),
        ({"bank": {"kind": "index"}}, "needs bank.size"),
        ({"fusion": "sum"}, "fusion"),
    ],
)
def test_impossible_combinations_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        build_term("codir", DIMS, **params)


def test_defaults_are_the_papers_form():
    term = build_term("codir", DIMS)
    assert (term.params.fusion, term.params.objective, term.params.pooling) == ("concat", "infonce", "mean")
    assert term.params.temperature == 0.07 and term.params.dim == 128
