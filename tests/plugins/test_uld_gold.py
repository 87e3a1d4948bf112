"""``uld`` and ``gold`` against float64 formulas; zero for one function behind permuted vocabularies."""

import math

import pytest
import torch

from distillkit import ConfigError, ModelDims, Taps, TaskInfo, build_term
from distillkit_plugins.span_alignment import _span_groups, align

DIMS = ModelDims(2, 2, 8, 8)
TEACHER_VOCAB = ["a", "b", "c", "d", "e", "f", "g"]
STUDENT_VOCAB = ["c", "x", "a", "y", "e"]  # shares a, c, e with the teacher

# Row 0: the student's tokens "ab|c|def" against the teacher's "a|bc|d|ef"; row 1 starts at different
# characters (its first pair is dropped), has a zero-width piece, and ends unclosed.
STUDENT_SPANS = [[(0, 2), (2, 3), (3, 6), (-1, -1)], [(1, 3), (3, 5), (5, 5), (5, 7)]]
TEACHER_SPANS = [[(0, 1), (1, 3), (3, 4), (4, 6), (-1, -1)], [(0, 3), (3, 4), (4, 5), (5, 6), (-1, -1)]]
EXPECTED = {"student": [[0, 1], [2], [5, 6]], "teacher": [[0, 1], [2, 3], [6, 7]], "rows": [0, 0, 1]}


def _taps(logits, spans, labels, requires_grad=False):
    spans = torch.tensor(spans, dtype=torch.long)
    labels = labels.masked_fill(spans[..., 0] < 0, -100)
    if requires_grad:
        logits.requires_grad_(True)
    return Taps.from_batch({"labels": labels, "label_spans": spans}, logits=logits)


def _example(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(2, 4, len(STUDENT_VOCAB), generator=g, dtype=dtype)
    teacher_logits = torch.randn(2, 5, len(TEACHER_VOCAB), generator=g, dtype=dtype)
    student_labels = torch.randint(len(STUDENT_VOCAB), (2, 4), generator=g)
    teacher_labels = torch.randint(len(TEACHER_VOCAB), (2, 5), generator=g)
    return student_logits, teacher_logits, student_labels, teacher_labels


def _merged(logits, labels, groups, merge="last"):
    """Float64 chain rule, written out: one row per group."""
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1)
    rows = []
    for group in groups:
        base, others = (group[-1], group[:-1]) if merge == "last" else (group[0], group[1:])
        logp = torch.log_softmax(flat_logits[base], -1)
        for k in others:
            logp = logp + torch.log_softmax(flat_logits[k], -1)[flat_labels[k]]
        rows.append(logp)
    return torch.stack(rows)


def _sorted_l1(p, q):
    width = max(len(p), len(q))
    p = torch.cat([p.sort(descending=True).values, p.new_zeros(width - len(p))])
    q = torch.cat([q.sort(descending=True).values, q.new_zeros(width - len(q))])
    return float((p - q).abs().sum())


def _jsd(p, q, beta):
    m = beta * p + (1 - beta) * q
    return float(beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum())


def _per_row_mean(values, rows):
    by_row = {}
    for value, row in zip(values, rows, strict=True):
        by_row.setdefault(row, []).append(value)
    return sum(sum(v) / len(v) for v in by_row.values()) / len(by_row)


def test_span_alignment_pairs_groups_that_cover_the_same_characters():
    s, t = _example()[2:]
    pairs = align(_taps(_example()[0], STUDENT_SPANS, s), _taps(_example()[1], TEACHER_SPANS, t))
    assert pairs.student == EXPECTED["student"] and pairs.teacher == EXPECTED["teacher"]
    assert pairs.rows.tolist() == EXPECTED["rows"]
    # a split character's second piece (empty span at the boundary) joins the group that closes there
    assert _span_groups([(0, 0, 2), (1, 2, 2), (2, 2, 4)], [(7, 0, 2), (8, 2, 4)]) == [
        ([0, 1], [7]),
        ([2], [8]),
    ]


@pytest.mark.parametrize("merge", ["last", "first"])
def test_uld_matches_a_float64_formula(merge):
    s_logits, t_logits, s_labels, t_labels = _example()
    term = build_term("uld", DIMS, merge=merge, temperature=1.5)
    value = term(_taps(s_logits, STUDENT_SPANS, s_labels), _taps(t_logits, TEACHER_SPANS, t_labels))
    q = _merged(s_logits / 1.5, s_labels, EXPECTED["student"], merge).exp()
    p = _merged(t_logits / 1.5, t_labels, EXPECTED["teacher"], merge).exp()
    expected = _per_row_mean([_sorted_l1(p[g], q[g]) for g in range(3)], EXPECTED["rows"])
    assert float(value) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weights", [{}, {"matched_weight": 0.3, "unmatched_weight": 2.0}])
def test_gold_matches_a_float64_formula(weights):
    s_logits, t_logits, s_labels, t_labels = _example()
    term = build_term("gold", DIMS, **weights)
    term.use_vocabularies(
        {w: i for i, w in enumerate(STUDENT_VOCAB)}, {w: i for i, w in enumerate(TEACHER_VOCAB)}
    )
    value = term(_taps(s_logits, STUDENT_SPANS, s_labels), _taps(t_logits, TEACHER_SPANS, t_labels))
    q = _merged(s_logits, s_labels, EXPECTED["student"]).exp()
    p = _merged(t_logits, t_labels, EXPECTED["teacher"]).exp()
    matched_t, matched_s = [0, 2, 4], [2, 0, 4]  # a, c, e
    rest_t, rest_s = [1, 3, 5, 6], [1, 3]
    w_m, w_u = (weights["matched_weight"], weights["unmatched_weight"]) if weights else (3 / 7, 4 / 7)
    per_group = [
        w_m * _jsd(p[g, matched_t], q[g, matched_s], 0.5) + w_u * _sorted_l1(p[g, rest_t], q[g, rest_s])
        for g in range(3)
    ]
    assert float(value) == pytest.approx(_per_row_mean(per_group, EXPECTED["rows"]), rel=1e-6)


def _permuted_pair(seed=1, batch=3, seq=6, vocab=9):
    """A teacher and a student computing the same function through a permuted vocabulary."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)  # teacher id v is student id perm[v]
    teacher_vocab = {f"tok{v}": v for v in range(vocab)}
    student_vocab = {f"tok{v}": int(perm[v]) for v in range(vocab)}
    t_logits = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    s_logits = torch.empty_like(t_logits)
    s_logits[..., perm] = t_logits
    t_labels = torch.randint(vocab, (batch, seq), generator=g)
    spans = [[(2 * i, 2 * i + 2) for i in range(seq)] for _ in range(batch)]
    return s_logits, t_logits, perm[t_labels], t_labels, spans, student_vocab, teacher_vocab


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_one_function_behind_a_permuted_vocabulary_gives_zero(loss):
    s_logits, t_logits, s_labels, t_labels, spans, s_vocab, t_vocab = _permuted_pair()
    term = build_term(loss, DIMS)
    term.use_vocabularies(s_vocab, t_vocab)
    value = term(_taps(s_logits, spans, s_labels), _taps(t_logits, spans, t_labels))
    assert abs(float(value)) < 1e-12


def test_gold_sees_other_tokens_where_uld_sees_the_same_sorted_probabilities():
    s_logits, t_logits, s_labels, t_labels, spans, s_vocab, t_vocab = _permuted_pair()
    gold, uld = build_term("gold", DIMS), build_term("uld", DIMS)
    gold.use_vocabularies(s_vocab, t_vocab)
    # the student's logits indexed by the teacher's ids: the same numbers for other token strings
    student, teacher = _taps(t_logits.clone(), spans, s_labels), _taps(t_logits, spans, t_labels)
    assert float(gold(student, teacher)) > 0.05
    assert abs(float(uld(student, teacher))) < 1e-12


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_gradients_match_finite_differences(loss):
    s_logits, t_logits, s_labels, t_labels = _example()
    term = build_term(loss, DIMS)
    term.use_vocabularies(
        {w: i for i, w in enumerate(STUDENT_VOCAB)}, {w: i for i, w in enumerate(TEACHER_VOCAB)}
    )
    teacher = _taps(t_logits, TEACHER_SPANS, t_labels)

    def value(logits):
        return term(_taps(logits, STUDENT_SPANS, s_labels), teacher).double()

    assert torch.autograd.gradcheck(value, (s_logits.clone().requires_grad_(True),))


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_half_precision_positional_fallback_and_no_groups(loss):
    s_logits, t_logits, s_labels, t_labels, spans, s_vocab, t_vocab = _permuted_pair(batch=1, seq=5)
    term = build_term(loss, DIMS)
    term.use_vocabularies(s_vocab, t_vocab)
    student = Taps.from_batch({"labels": s_labels}, logits=s_logits.to(torch.bfloat16).requires_grad_(True))
    teacher = Taps.from_batch({"labels": t_labels}, logits=t_logits.to(torch.bfloat16))
    value = term(student, teacher)  # no spans: position k with position k
    value.backward()
    assert math.isfinite(float(value.detach())) and abs(float(value.detach())) < 0.05
    assert torch.isfinite(student.logits.grad).all()
    nothing = [[(-1, -1)] * 5]
    empty = term(_taps(s_logits, nothing, s_labels, True), _taps(t_logits, nothing, t_labels))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_they_work_on_next_token_logits_only_and_gold_needs_both_vocabularies():
    with pytest.raises(ConfigError, match="kd for class logits"):
        build_term("gold", DIMS).check_task(TaskInfo("sequence_classification", "class", "class"))
    build_term("uld", DIMS).check_task(TaskInfo("causal_lm", "token", "token"))
    s_logits, t_logits, s_labels, t_labels = _example()
    with pytest.raises(ValueError, match="use_vocabularies"):
        build_term("gold", DIMS)(
            _taps(s_logits, STUDENT_SPANS, s_labels), _taps(t_logits, TEACHER_SPANS, t_labels)
        )
    with pytest.raises(ConfigError, match="together"):
        build_term("gold", DIMS, matched_weight=0.5)
