"""Tap requests and the one builder that runs a model for them."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from distillkit.errors import ConfigError
from distillkit.objective.model_access import find_module
from distillkit.objective.objective import DistillationObjective
from distillkit.objective.taps import NOTHING, Taps, collect_taps
from distillkit.objective.terms import ModelDims, TapRequest


class TwoLayerNet(nn.Module):
    """A plain module (not from transformers): embedding, two linear blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.blocks(self.embed(input_ids)).mean(1))


def batch(rows=3, length=5):
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, 3:] = 0  # padding in the first row
    return {
        "input_ids": torch.randint(1, 20, (rows, length)),
        "attention_mask": mask,
        "labels": torch.tensor([0, 1, 2][:rows]),
        "example_ids": torch.arange(rows),
        "weights": torch.rand(rows),
    }


def test_requests_union_and_forward_need():
    a = TapRequest(hidden_states=True, modules=("x",))
    b = TapRequest(logits=True, modules=("x", "y"), labels=True)
    union = a | b
    assert union == TapRequest(hidden_states=True, logits=True, modules=("x", "y"), labels=True)
    assert not NOTHING.needs_forward and not TapRequest(labels=True).needs_forward
    assert union.needs_forward


def test_module_taps_on_a_plain_module():
    model = TwoLayerNet()
    data = batch()
    taps = collect_taps(model, data, TapRequest(logits=True, modules=("blocks.0", "blocks.2")))
    expected = model.blocks[0](model.embed(data["input_ids"]))
    torch.testing.assert_close(taps.modules["blocks.0"], expected)
    assert taps.modules["blocks.2"].shape == (3, 5, 8)
    assert taps.logits.shape == (3, 3)
    assert torch.equal(taps.example_ids, data["example_ids"])
    assert torch.equal(taps.extras["weights"], data["weights"])  # nothing in the batch is dropped
    assert not model.blocks[0]._forward_hooks  # hooks are removed after the pass


def test_unknown_module_path_names_neighbours():
    with pytest.raises(ConfigError, match=r"blocks\.3.*blocks\.2|blocks\.2.*blocks\.3"):
        find_module(TwoLayerNet(), "blocks.3", who="objective term 'rel'")
    with pytest.raises(ConfigError, match="objective term 'rel'"):
        find_module(TwoLayerNet(), "nothing.here", who="objective term 'rel'")


def tiny_encoder():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32
    )
    return BertModel(config, add_pooling_layer=False).eval()


def test_only_what_is_requested_is_computed():
    model = tiny_encoder()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    taps = collect_taps(model, batch(), TapRequest(modules=("encoder.layer.1.attention.self.value",)))
    assert "output_hidden_states" not in seen[0] and "output_attentions" not in seen[0]
    assert "labels" not in seen[0] and "example_ids" not in seen[0]
    assert taps.hidden_states == () and taps.attentions == ()
    assert taps.modules["encoder.layer.1.attention.self.value"].shape == (3, 5, 16)
    assert collect_taps(model, batch(), NOTHING).hidden_states == ()
    assert len(seen) == 1  # NOTHING does not run the model


@torch.no_grad()
def test_attention_probabilities_sum_to_one_over_real_keys():
    model = tiny_encoder()
    model.set_attn_implementation("eager")
    data = batch()
    taps = collect_taps(model, data, TapRequest(attentions=True, hidden_states=True))
    assert len(taps.attentions) == 2 and len(taps.hidden_states) == 3
    mask = data["attention_mask"].bool()
    for layer in taps.attentions:
        assert layer.shape == (3, 4, 5, 5)
        real = layer.masked_fill(~mask[:, None, None, :], 0.0).sum(-1)
        torch.testing.assert_close(real, torch.ones_like(real))
        assert float(layer.masked_select(~mask[:, None, None, :]).abs().max()) < 1e-6


def test_objective_unions_its_terms_requests_and_prepares_models():
    dims = ModelDims(2, 2, 16, 16)
    objective = DistillationObjective.from_config([{"loss": "l2"}, {"loss": "ce"}], dims)
    student, teacher = objective.tap_requests()
    assert student == TapRequest(hidden_states=True, logits=True, labels=True)
    assert teacher == TapRequest(hidden_states=True)
    assert objective.terms_reading("teacher") == ["l2"]
    labels_only = DistillationObjective.from_config([{"loss": "ce"}], dims)
    assert not labels_only.uses_teacher


def test_taps_position_mask_prefers_the_task_loss_mask():
    labels = torch.tensor([[5, -100, 7], [-100, -100, 1]])
    taps = Taps.from_batch({"attention_mask": torch.ones(2, 3, dtype=torch.long), "labels": labels})
    assert torch.equal(taps.position_mask(), (labels != -100).float())
    assert torch.equal(taps.token_mask(), torch.ones(2, 3))
    detached = Taps(hidden_states=(torch.ones(1, 2, 3, requires_grad=True),)).detached()
    assert not detached.hidden_states[0].requires_grad


def test_models_whose_attentions_are_read_get_eager_attention_without_dropout(capsys):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        attention_probs_dropout_prob=0.5,
    )
    student = BertModel(config, add_pooling_layer=False).train()  # training mode: dropout would be active
    dims = ModelDims(2, 2, 16, 16, 4, 4)
    objective = DistillationObjective.from_config([{"loss": "attention", "kind": "kl"}], dims)
    objective.prepare_models(student, None)
    assert "runs eager attention and has no attention-probability dropout" in capsys.readouterr().out
    data = batch()
    with torch.no_grad():
        taps = collect_taps(student, data, objective.tap_requests()[0])
    mask = data["attention_mask"].bool()
    for layer in taps.attentions:
        sums = layer.masked_fill(~mask[:, None, None, :], 0.0).sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums))
