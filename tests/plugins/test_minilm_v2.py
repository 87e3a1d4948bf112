"""``minilm_v2``: q-q, k-k, v-v relation KL (MiniLMv2), against a float64 reference of the formula."""

import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

from distillkit import Taps, build_term
from distillkit.errors import ConfigError
from distillkit.objective.taps import collect_taps
from distillkit.objective.terms import ModelDims

RELATIONS = ("query", "key", "value")


def random_mask(batch, tokens, generator):
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for b in range(1, batch):
        mask[b, int(torch.randint(1, tokens + 1, (1,), generator=generator)) :] = 0
    return mask


def taps_for(term, side, batch, tokens, width, mask, generator, dtype=torch.float32):
    """Random projection outputs ``[B, T, D]`` at the paths the term reads of ``side``."""
    request = term.tap_requests()[0 if side == "student" else 1]
    modules = {
        path: torch.randn(batch, tokens, width, generator=generator).to(dtype) for path in request.modules
    }
    return Taps(modules=modules, attention_mask=mask)


def reference_kl(x_s, x_t, mask, heads):
    """Mean over relation heads and real query rows of KL(teacher relation ‖ student relation), float64."""
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().flatten()
        xs, xt = x_s[b, real].double(), x_t[b, real].double()  # [n, D]
        ds, dt = xs.shape[1] // heads, xt.shape[1] // heads
        for r in range(heads):
            a = xs[:, r * ds : (r + 1) * ds]
            c = xt[:, r * dt : (r + 1) * dt]
            log_q = torch.log_softmax(a @ a.T / math.sqrt(ds), dim=-1)
            log_p = torch.log_softmax(c @ c.T / math.sqrt(dt), dim=-1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += len(real)
    return total / count


def reference(term, student, teacher, mask, heads, relations=RELATIONS):
    values = []
    for relation in relations:
        s_path = next(p for p in student.modules if p.endswith(relation))
        t_path = next(p for p in teacher.modules if p.endswith(relation))
        values.append(reference_kl(student.modules[s_path], teacher.modules[t_path], mask, heads))
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("batch", "tokens", "student_width", "teacher_width", "heads"),
    [(1, 1, 4, 4, 1), (1, 7, 6, 9, 3), (3, 5, 8, 12, 4), (4, 11, 10, 15, 5)],
)
def test_matches_reference(batch, tokens, student_width, teacher_width, heads):
    generator = torch.Generator().manual_seed(batch + tokens + heads)
    dims = ModelDims(2, 4, student_width, teacher_width, 1, 1)
    term = build_term("minilm_v2", dims, relation_heads=heads)
    assert term.student_layer == 2 and term.teacher_layer == 4
    mask = random_mask(batch, tokens, generator)
    student = taps_for(term, "student", batch, tokens, student_width, mask, generator)
    teacher = taps_for(term, "teacher", batch, tokens, teacher_width, mask, generator)
    loss = term(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference(term, student, teacher, mask, heads), rel=1e-5, abs=1e-7)


def test_paths_default_and_templates():
    dims = ModelDims(3, 6, 8, 8, 2, 4)
    term = build_term("minilm_v2", dims, student_layer=2, teacher_layer=5)
    student, teacher = term.tap_requests()
    assert student.modules == tuple(f"base_model.encoder.layer.1.attention.self.{p}" for p in RELATIONS)
    assert teacher.modules == tuple(f"base_model.encoder.layer.4.attention.self.{p}" for p in RELATIONS)
    assert not (student.hidden_states or student.attentions or student.logits)
    assert term.relation_heads == 2  # the student's attention heads by default
    custom = build_term(
        "minilm_v2",
        dims,
        relations=["value"],
        modules="student.blocks.{layer}.{proj}",
        teacher_modules="base_model.transformer.layer.{layer}.attention.{proj}",
        proj_names=["q_lin", "k_lin", "v_lin"],
    )
    assert custom.tap_requests()[0].modules == ("student.blocks.2.v_lin",)
    assert custom.tap_requests()[1].modules == ("base_model.transformer.layer.5.attention.v_lin",)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"student_layer": 0}, "student_layer 0 is out of range"),
        ({"teacher_layer": 7}, "teacher_layer 7 is out of range"),
        ({"relation_heads": 3}, "does not divide the student's width 8"),
        ({"relation_heads": 0}, "relation_heads"),
        ({"modules": "encoder.layer.{layer}.query"}, "needs both placeholders"),
        ({"teacher_modules": "x.{layer}.{proj}.{other}"}, "not a valid template"),
        ({"relations": []}, "relations is empty"),
        ({"relations": ["query", "score"]}, "relations"),
        ({"layer_map": "uniform"}, "does not accept parameter 'layer_map'"),
    ],
)
def test_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        build_term("minilm_v2", ModelDims(3, 6, 8, 12, 2, 4), **params)


def test_unknown_head_count_needs_relation_heads():
    with pytest.raises(ConfigError, match="set relation_heads"):
        build_term("minilm_v2", ModelDims(2, 4, 8, 8))


def test_wrong_output_width_is_a_clear_error():
    term = build_term("minilm_v2", ModelDims(1, 1, 8, 8), relation_heads=4, modules="a.{layer}.{proj}")
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 3, dtype=torch.long)
    student = taps_for(term, "student", 2, 3, 6, mask, generator)
    teacher = taps_for(term, "teacher", 2, 3, 8, mask, generator)
    with pytest.raises(ValueError, match="divisible by relation_heads 4"):
        term(student, teacher)


def test_relation_subset_padding_and_identity():
    generator = torch.Generator().manual_seed(5)
    dims = ModelDims(2, 2, 6, 6, 2, 2)
    term = build_term("minilm_v2", dims, relations=["value", "key"])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    student = taps_for(term, "student", 2, 6, 6, mask, generator)
    teacher = taps_for(term, "teacher", 2, 6, 6, mask, generator)
    base = term(student, teacher)
    assert float(base) == pytest.approx(
        reference(term, student, teacher, mask, 2, ("value", "key")), rel=1e-5
    )
    for value in student.modules.values():
        value[0, 4:] = 100.0  # padded tokens: neither queries nor keys
    torch.testing.assert_close(term(student, teacher), base)
    assert float(term(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_gradcheck():
    generator = torch.Generator().manual_seed(6)
    term = build_term("minilm_v2", ModelDims(1, 1, 4, 6, 2, 2))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    teacher = taps_for(term, "teacher", 2, 3, 6, mask, generator, torch.float64)
    paths = term.tap_requests()[0].modules
    leaves = [
        torch.randn(2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True) for _ in paths
    ]

    def loss(*xs):
        return term(Taps(modules=dict(zip(paths, xs, strict=True)), attention_mask=mask), teacher)

    assert loss(*leaves).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, tuple(leaves))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite(dtype):
    generator = torch.Generator().manual_seed(7)
    term = build_term("minilm_v2", ModelDims(2, 4, 16, 24, 4, 4))
    mask = random_mask(4, 9, generator)
    student = taps_for(term, "student", 4, 9, 16, mask, generator)
    teacher = taps_for(term, "teacher", 4, 9, 24, mask, generator)
    half = {k: (v * 4).to(dtype).requires_grad_(True) for k, v in student.modules.items()}
    loss = term(
        Taps(modules=half, attention_mask=mask),
        Taps(modules={k: (v * 4).to(dtype) for k, v in teacher.modules.items()}),
    )
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v.grad).all() for v in half.values())


@pytest.mark.parametrize("model_class", [BertModel, BertForSequenceClassification, BertForMaskedLM])
def test_default_paths_tap_every_bert_layout(model_class):
    """The default template reaches the projections of a bare encoder and of a model with a head."""
    config = BertConfig(
        vocab_size=30, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=24
    )
    torch.manual_seed(0)
    model = model_class(config).eval()
    term = build_term("minilm_v2", ModelDims(2, 2, 12, 12, 3, 3), student_layer=1)
    batch = {
        "input_ids": torch.randint(0, 30, (2, 5)),
        "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
    }
    encoder = model if model_class is BertModel else model.bert
    seen = []
    handle = encoder.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda m, i, o: seen.append(o)
    )
    taps = collect_taps(model, batch, term.tap_requests()[0])
    handle.remove()
    assert set(taps.modules) == set(term.tap_requests()[0].modules)
    query = taps.modules["base_model.encoder.layer.0.attention.self.query"]
    assert query.shape == (2, 5, 12) and torch.equal(query, seen[0])


def test_no_attention_mask_means_every_token_is_real():
    generator = torch.Generator().manual_seed(9)
    term = build_term("minilm_v2", ModelDims(1, 1, 6, 6, 3, 3))
    ones = torch.ones(2, 4, dtype=torch.long)
    student = taps_for(term, "student", 2, 4, 6, ones, generator)
    teacher = taps_for(term, "teacher", 2, 4, 6, ones, generator)
    bare = term(Taps(modules=student.modules), Taps(modules=teacher.modules))
    torch.testing.assert_close(bare, term(student, teacher))
