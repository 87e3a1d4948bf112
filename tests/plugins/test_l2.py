import pytest
import torch

from distillkit import Taps, build_term
from distillkit.errors import ConfigError
from distillkit.objective.terms import ModelDims


def make_taps(layers, hidden, mask, seed):
    generator = torch.Generator().manual_seed(seed)
    states = tuple(torch.randn(2, 4, hidden, generator=generator) for _ in range(layers + 1))
    return Taps(hidden_states=states, attention_mask=mask)


MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])


def test_equal_sizes_no_projection_and_exact_masked_mse():
    dims = ModelDims(2, 4, 8, 8)
    term = build_term("l2", dims, layer_map="uniform")
    assert term.projections is None and term.pairs == [(1, 2), (2, 4)]
    s, t = make_taps(2, 8, MASK, 0), make_taps(4, 8, MASK, 1)
    expected = []
    for a, b in term.pairs:
        diff = (s.hidden_states[a] - t.hidden_states[b]).pow(2) * MASK.unsqueeze(-1)
        expected.append(diff.sum() / (MASK.sum() * 8))
    torch.testing.assert_close(term(s, t), torch.stack(expected).mean())


def test_padding_does_not_count():
    dims = ModelDims(2, 4, 8, 8)
    term = build_term("l2", dims)
    s, t = make_taps(2, 8, MASK, 0), make_taps(4, 8, MASK, 1)
    base = term(s, t)
    s.hidden_states[2][0, 3] += 50.0
    torch.testing.assert_close(term(s, t), base)


def test_projection_when_hidden_sizes_differ():
    dims = ModelDims(2, 4, 6, 8)
    term = build_term("l2", dims)
    assert len(term.projections) == 2 and term.projections[0].weight.shape == (8, 6)
    loss = term(make_taps(2, 6, MASK, 0), make_taps(4, 8, MASK, 1))
    loss.backward()
    assert term.projections[0].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="projection: auto"):
        build_term("l2", dims, projection="never")


@pytest.mark.parametrize("loss", ["l2", "cosine", "pkd"])
def test_hidden_state_terms_refuse_the_same_mistake_with_the_same_error(loss):
    with pytest.raises(ConfigError) as caught:
        build_term(loss, ModelDims(2, 4, 6, 8), projection="never")
    assert str(caught.value) == (
        f"loss '{loss}' with projection: never needs equal hidden sizes (student 6, teacher 8); "
        "use projection: auto"
    )
