"""``cosine``: DistilBERT's cosine alignment of hidden states, against a float64 reference."""

import pytest
import torch

from distillkit import Taps, build_term
from distillkit.errors import ConfigError
from distillkit.objective.terms import ModelDims


def random_mask(batch, tokens, generator):
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for b in range(1, batch):
        mask[b, int(torch.randint(1, tokens + 1, (1,), generator=generator)) :] = 0
    return mask


def states(layers, batch, tokens, hidden, generator, dtype=torch.float32):
    return tuple(torch.randn(batch, tokens, hidden, generator=generator).to(dtype) for _ in range(layers + 1))


def reference(student, teacher, mask, pairs, projections=None):
    """Mean over pairs of the mean over real tokens of 1 − cos, token by token in float64."""
    values = []
    for index, (s, t) in enumerate(pairs):
        total, count = 0.0, 0
        for b, i in mask.nonzero().tolist():
            x = student[s][b, i].double()
            if projections is not None:
                layer = projections[index]
                x = layer.weight.detach().double() @ x + layer.bias.detach().double()
            y = teacher[t][b, i].double()
            total += 1.0 - float(x @ y / (x.norm() * y.norm()))
            count += 1
        values.append(total / count)
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("batch", "tokens", "student_hidden", "teacher_hidden", "layers"),
    [(1, 1, 5, 5, "last"), (1, 9, 7, 7, "uniform"), (3, 6, 5, 11, "skip"), (4, 13, 8, 8, [[0, 0], [2, 3]])],
)
def test_matches_reference(batch, tokens, student_hidden, teacher_hidden, layers):
    generator = torch.Generator().manual_seed(batch * tokens + student_hidden)
    term = build_term("cosine", ModelDims(2, 4, student_hidden, teacher_hidden), layer_map=layers)
    assert (term.projections is None) == (student_hidden == teacher_hidden)
    mask = random_mask(batch, tokens, generator)
    student = states(2, batch, tokens, student_hidden, generator)
    teacher = states(4, batch, tokens, teacher_hidden, generator)
    loss = term(
        Taps(hidden_states=student, attention_mask=mask), Taps(hidden_states=teacher, attention_mask=mask)
    )
    expected = reference(student, teacher, mask, term.pairs, term.projections)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_default_is_the_last_layer_and_reads_hidden_states_only():
    term = build_term("cosine", ModelDims(3, 6, 8, 8))
    assert term.pairs == [(3, 6)]
    student, teacher = term.tap_requests()
    assert student.hidden_states and teacher.hidden_states and not (student.logits or teacher.attentions)


def test_padding_does_not_count_and_scale_does_not_matter():
    generator = torch.Generator().manual_seed(1)
    term = build_term("cosine", ModelDims(2, 2, 6, 6), layer_map="uniform")
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    student, teacher = states(2, 2, 4, 6, generator), states(2, 2, 4, 6, generator)
    base = term(Taps(hidden_states=student, attention_mask=mask), Taps(hidden_states=teacher))
    moved = tuple(h.clone() for h in student)
    moved[1][0, 2:] = 50.0
    moved[2][:] *= 3.0  # cosine ignores length
    torch.testing.assert_close(
        term(Taps(hidden_states=moved, attention_mask=mask), Taps(hidden_states=teacher)), base
    )
    assert float(
        term(Taps(hidden_states=teacher, attention_mask=mask), Taps(hidden_states=teacher))
    ) == pytest.approx(0.0, abs=1e-6)


def test_projection_learns_and_never_is_refused_for_different_widths():
    generator = torch.Generator().manual_seed(2)
    term = build_term("cosine", ModelDims(2, 4, 6, 10), layer_map="uniform")
    assert len(term.projections) == 2 and term.projections[0].weight.shape == (10, 6)
    loss = term(
        Taps(hidden_states=states(2, 2, 3, 6, generator)), Taps(hidden_states=states(4, 2, 3, 10, generator))
    )
    loss.backward()
    assert term.projections[1].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="projection: auto"):
        build_term("cosine", ModelDims(2, 4, 6, 10), projection="never")
    assert build_term("cosine", ModelDims(2, 4, 6, 6), projection="always").projections is not None


def test_gradcheck():
    generator = torch.Generator().manual_seed(3)
    term = build_term("cosine", ModelDims(1, 1, 5, 5), layer_map="last").double()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    teacher = Taps(hidden_states=states(1, 2, 3, 5, generator, torch.float64))
    leaf = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)

    def loss(h):
        return term(Taps(hidden_states=(h, h), attention_mask=mask), teacher)

    assert torch.autograd.gradcheck(loss, (leaf,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_close(dtype):
    generator = torch.Generator().manual_seed(4)
    term = build_term("cosine", ModelDims(2, 4, 8, 8), layer_map="uniform")
    mask = random_mask(3, 7, generator)
    student, teacher = states(2, 3, 7, 8, generator), states(4, 3, 7, 8, generator)
    half = tuple(h.to(dtype).requires_grad_(True) for h in student)
    half[1].data[0, 0] = 0.0  # a zero vector: cos is 0, no NaN
    loss = term(
        Taps(hidden_states=half, attention_mask=mask), Taps(hidden_states=tuple(h.to(dtype) for h in teacher))
    )
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(h.grad).all() for h in half[1:])
    assert loss.item() == pytest.approx(reference(student, teacher, mask, term.pairs), abs=0.05)
