"""``pkd``: Patient KD's distance of unit first-token vectors, against a float64 reference."""

import pytest
import torch

from distillkit import Taps, build_term
from distillkit.errors import ConfigError
from distillkit.objective.terms import ModelDims


def states(layers, batch, tokens, hidden, generator, dtype=torch.float32):
    return tuple(torch.randn(batch, tokens, hidden, generator=generator).to(dtype) for _ in range(layers + 1))


def reference(student, teacher, pairs, projections=None):
    """Mean over pairs and examples of ‖x/‖x‖ − y/‖y‖‖², example by example in float64."""
    values = []
    for index, (s, t) in enumerate(pairs):
        per_example = []
        for b in range(student[s].shape[0]):
            x = student[s][b, 0].double()
            if projections is not None:
                layer = projections[index]
                x = layer.weight.detach().double() @ x + layer.bias.detach().double()
            y = teacher[t][b, 0].double()
            per_example.append(float(((x / x.norm() - y / y.norm()) ** 2).sum()))
        values.append(sum(per_example) / len(per_example))
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("batch", "tokens", "student_hidden", "teacher_hidden", "layers"),
    [(1, 1, 5, 5, "skip"), (1, 7, 7, 7, "uniform"), (3, 4, 5, 9, "skip"), (5, 3, 8, 8, [[1, 1], [2, 3]])],
)
def test_matches_reference(batch, tokens, student_hidden, teacher_hidden, layers):
    generator = torch.Generator().manual_seed(batch * 7 + student_hidden)
    term = build_term("pkd", ModelDims(2, 4, student_hidden, teacher_hidden), layer_map=layers)
    student = states(2, batch, tokens, student_hidden, generator)
    teacher = states(4, batch, tokens, teacher_hidden, generator)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1:, tokens // 2 + 1 :] = 0
    loss = term(
        Taps(hidden_states=student, attention_mask=mask), Taps(hidden_states=teacher, attention_mask=mask)
    )
    assert loss.item() == pytest.approx(
        reference(student, teacher, term.pairs, term.projections), rel=1e-5, abs=1e-7
    )


def test_default_is_pkd_skip_and_only_the_first_token_counts():
    generator = torch.Generator().manual_seed(1)
    term = build_term("pkd", ModelDims(3, 6, 6, 6))
    assert term.pairs == [(1, 2), (2, 4), (3, 6)] and term.projections is None
    student, teacher = states(3, 2, 5, 6, generator), states(6, 2, 5, 6, generator)
    base = term(Taps(hidden_states=student), Taps(hidden_states=teacher))
    moved = tuple(h.clone() for h in student)
    for h in moved:
        h[:, 1:] = 9.0  # every other token
        h[:, 0] *= 4.0  # and the length of the first
    torch.testing.assert_close(term(Taps(hidden_states=moved), Taps(hidden_states=teacher)), base)
    assert 0.0 < float(base) < 4.0
    same = tuple(teacher[i] for i in (0, 2, 4, 6))
    assert float(term(Taps(hidden_states=same), Taps(hidden_states=teacher))) == pytest.approx(0.0, abs=1e-6)


def test_projection_when_widths_differ():
    generator = torch.Generator().manual_seed(2)
    term = build_term("pkd", ModelDims(2, 4, 6, 10))
    assert len(term.projections) == 2 and term.projections[0].weight.shape == (10, 6)
    loss = term(
        Taps(hidden_states=states(2, 3, 2, 6, generator)), Taps(hidden_states=states(4, 3, 2, 10, generator))
    )
    loss.backward()
    assert term.projections[0].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="projection: auto"):
        build_term("pkd", ModelDims(2, 4, 6, 10), projection="never")
    with pytest.raises(ConfigError, match="'skip' needs a student no deeper"):
        build_term("pkd", ModelDims(4, 2, 6, 6))


def test_gradcheck():
    generator = torch.Generator().manual_seed(3)
    term = build_term("pkd", ModelDims(1, 1, 5, 7)).double()
    teacher = Taps(hidden_states=states(1, 3, 2, 7, generator, torch.float64))
    leaf = torch.randn(3, 2, 5, generator=generator, dtype=torch.float64, requires_grad=True)

    def loss(h):
        return term(Taps(hidden_states=(h, h)), teacher)

    assert torch.autograd.gradcheck(loss, (leaf,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_close(dtype):
    generator = torch.Generator().manual_seed(4)
    term = build_term("pkd", ModelDims(2, 4, 16, 16))
    student, teacher = states(2, 4, 3, 16, generator), states(4, 4, 3, 16, generator)
    half = tuple(h.to(dtype).requires_grad_(True) for h in student)
    half[1].data[0, 0] = 0.0  # a zero first-token vector: no NaN
    loss = term(Taps(hidden_states=half), Taps(hidden_states=tuple(h.to(dtype) for h in teacher)))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(h.grad).all() for h in half[1:])
    assert loss.item() == pytest.approx(reference(student, teacher, term.pairs), abs=0.25)
