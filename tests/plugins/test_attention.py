"""``attention``: TinyBERT's MSE and MiniLM's KL on attention probabilities, against a float64 reference."""

import math

import pytest
import torch

from distillkit import Taps, build_term
from distillkit.errors import ConfigError
from distillkit.objective.terms import ModelDims


def random_mask(batch, tokens, generator):
    """Attention mask with the first example complete and the others padded to random lengths (>= 1)."""
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for b in range(1, batch):
        mask[b, int(torch.randint(1, tokens + 1, (1,), generator=generator)) :] = 0
    return mask


def attention_maps(layers, batch, heads, tokens, mask, generator, dtype=torch.float32):
    """Per-layer ``[B, H, T, T]`` rows summing to 1 over real keys, exact 0 at padded keys (as models do)."""
    maps = []
    for _ in range(layers):
        scores = torch.randn(batch, heads, tokens, tokens, generator=generator, dtype=torch.float64) * 2
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        maps.append(torch.softmax(scores, dim=-1).to(dtype))
    return tuple(maps)


def reference(student, teacher, mask, pairs, kind, mean_heads):
    """The formula, one example and one pair at a time, on the real tokens only, in float64."""
    values = []
    for s, t in pairs:
        total, count = 0.0, 0
        for b in range(mask.shape[0]):
            real = mask[b].nonzero().flatten()
            a_s = student[s - 1][b].double()[:, real][:, :, real]  # [H, n, n]
            a_t = teacher[t - 1][b].double()[:, real][:, :, real]
            if mean_heads:
                a_s, a_t = a_s.mean(0, keepdim=True), a_t.mean(0, keepdim=True)
            heads, n = a_s.shape[0], len(real)
            if kind == "mse":
                total += float(((a_s - a_t) ** 2).sum())
                count += heads * n * n
            else:
                for h in range(heads):
                    for q in range(n):
                        for k in range(n):
                            p = float(a_t[h, q, k])
                            if p > 0:
                                total += p * (math.log(p) - math.log(max(float(a_s[h, q, k]), 1e-12)))
                count += heads * n
        values.append(total / count)
    return sum(values) / len(values)


def dims(student_layers=2, teacher_layers=4, student_heads=3, teacher_heads=3):
    return ModelDims(student_layers, teacher_layers, 8, 8, student_heads, teacher_heads)


@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize(("batch", "tokens", "heads"), [(1, 1, 1), (1, 7, 3), (3, 5, 2), (4, 13, 5)])
def test_matches_reference(kind, batch, tokens, heads):
    generator = torch.Generator().manual_seed(batch * 100 + tokens * 10 + heads)
    mask = random_mask(batch, tokens, generator)
    student = attention_maps(2, batch, heads, tokens, mask, generator)
    teacher = attention_maps(4, batch, heads, tokens, mask, generator)
    term = build_term("attention", dims(student_heads=heads, teacher_heads=heads), kind=kind)
    assert term.pairs == [(1, 2), (2, 4)]
    loss = term(Taps(attentions=student, attention_mask=mask), Taps(attentions=teacher, attention_mask=mask))
    expected = reference(student, teacher, mask, term.pairs, kind, mean_heads=False)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_different_head_counts_with_heads_mean(kind):
    generator = torch.Generator().manual_seed(3)
    mask = random_mask(3, 6, generator)
    student = attention_maps(2, 3, 2, 6, mask, generator)
    teacher = attention_maps(4, 3, 5, 6, mask, generator)
    layers = [[1, 3], [2, 2]]
    term = build_term(
        "attention", dims(student_heads=2, teacher_heads=5), kind=kind, heads="mean", layer_map=layers
    )
    loss = term(Taps(attentions=student, attention_mask=mask), Taps(attentions=teacher, attention_mask=mask))
    expected = reference(student, teacher, mask, [(1, 3), (2, 2)], kind, mean_heads=True)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_different_head_counts_are_refused_without_heads_mean():
    with pytest.raises(ConfigError, match="heads: mean"):
        build_term("attention", dims(student_heads=2, teacher_heads=4))
    term = build_term("attention", dims(student_heads=None, teacher_heads=None))  # unknown until forward
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 4, dtype=torch.long)
    student = Taps(attentions=attention_maps(2, 2, 2, 4, mask, generator), attention_mask=mask)
    teacher = Taps(attentions=attention_maps(4, 2, 4, 4, mask, generator), attention_mask=mask)
    with pytest.raises(ValueError, match="heads: mean"):
        term(student, teacher)


@pytest.mark.parametrize(
    ("spec", "student_layers", "teacher_layers"),
    [([[0, 1]], 2, 4), ([[1, 0]], 2, 4), ("uniform", 4, 2)],  # uniform puts student layer 1 on teacher 0 here
)
def test_layer_zero_is_refused(spec, student_layers, teacher_layers):
    with pytest.raises(ConfigError, match="layer 0 is the embedding output"):
        build_term("attention", dims(student_layers, teacher_layers), layer_map=spec)


def test_unknown_kind_and_out_of_range_layers_are_config_errors():
    with pytest.raises(ConfigError, match="kind"):
        build_term("attention", dims(), kind="l1")
    with pytest.raises(ConfigError, match="out of range"):
        build_term("attention", dims(), layer_map=[[3, 1]])


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_padding_does_not_count_and_equal_maps_give_zero(kind):
    generator = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    student = attention_maps(2, 2, 3, 5, mask, generator)
    teacher = attention_maps(4, 2, 3, 5, mask, generator)
    term = build_term("attention", dims(), kind=kind)
    base = term(Taps(attentions=student, attention_mask=mask), Taps(attentions=teacher, attention_mask=mask))
    noisy = tuple(a.clone() for a in student)
    for a in noisy:
        a[0, :, 3:, :] = torch.rand(3, 2, 5, generator=generator)  # padded query rows
        a[0, :, :, 3:] = 0.7  # padded key columns
    changed = term(Taps(attentions=noisy, attention_mask=mask), Taps(attentions=teacher, attention_mask=mask))
    torch.testing.assert_close(changed, base)
    same = term(
        Taps(attentions=teacher[1::2], attention_mask=mask), Taps(attentions=teacher, attention_mask=mask)
    )
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_kl_is_safe_with_exact_zeros():
    mask = torch.tensor([[1, 1, 1, 0]])
    teacher_row = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a one-hot teacher row: 0·log 0 terms
    student_row = torch.tensor([0.5, 0.5, 0.0, 0.0])  # zero where the teacher is zero
    teacher = (teacher_row.expand(1, 1, 4, 4).clone(),)
    student = (student_row.expand(1, 1, 4, 4).clone().requires_grad_(True),)
    term = build_term("attention", ModelDims(1, 1, 8, 8, 1, 1), kind="kl")
    loss = term(Taps(attentions=student, attention_mask=mask), Taps(attentions=teacher, attention_mask=mask))
    assert float(loss.detach()) == pytest.approx(math.log(2.0), rel=1e-6)
    loss.backward()
    assert torch.isfinite(student[0].grad).all()
    underflow = (torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(1, 1, 4, 4),)  # student 0 where teacher is 1
    worst = term(
        Taps(attentions=underflow, attention_mask=mask), Taps(attentions=teacher, attention_mask=mask)
    )
    assert math.isfinite(float(worst)) and float(worst) == pytest.approx(-math.log(1e-12), rel=1e-5)


@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize("heads", ["each", "mean"])
def test_gradcheck(kind, heads):
    generator = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    student = attention_maps(1, 2, 2, 3, mask, generator, torch.float64)
    teacher = attention_maps(1, 2, 2, 3, mask, generator, torch.float64)
    term = build_term("attention", ModelDims(1, 1, 8, 8, 2, 2), kind=kind, heads=heads)
    leaf = student[0].clone().requires_grad_(True)

    def loss(a):
        return term(Taps(attentions=(a,), attention_mask=mask), Taps(attentions=teacher, attention_mask=mask))

    assert loss(leaf).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, (leaf,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_half_precision_is_finite_and_close(dtype, kind):
    generator = torch.Generator().manual_seed(4)
    mask = random_mask(3, 9, generator)
    student = attention_maps(2, 3, 4, 9, mask, generator)
    teacher = attention_maps(4, 3, 4, 9, mask, generator)
    term = build_term("attention", dims(student_heads=4, teacher_heads=4), kind=kind)
    half = tuple(a.to(dtype).requires_grad_(True) for a in student)
    loss = term(
        Taps(attentions=half, attention_mask=mask), Taps(attentions=tuple(a.to(dtype) for a in teacher))
    )
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(a.grad).all() for a in half)
    expected = reference(student, teacher, mask, term.pairs, kind, mean_heads=False)
    assert loss.item() == pytest.approx(expected, rel=0.1)


def test_no_attention_mask_means_every_token_is_real():
    generator = torch.Generator().manual_seed(8)
    ones = torch.ones(2, 5, dtype=torch.long)
    student, teacher = (
        attention_maps(2, 2, 3, 5, ones, generator),
        attention_maps(4, 2, 3, 5, ones, generator),
    )
    term = build_term("attention", dims(), kind="kl")
    torch.testing.assert_close(
        term(Taps(attentions=student), Taps(attentions=teacher)),
        term(Taps(attentions=student, attention_mask=ones), Taps(attentions=teacher, attention_mask=ones)),
    )
