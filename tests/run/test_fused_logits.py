"""The output layers in place of logits: same losses and gradients as with logits, and who may use them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig, LlamaForCausalLM

from distillkit.config import config_from_dict
from distillkit.errors import ConfigError
from distillkit.objective.objective import DistillationObjective
from distillkit.objective.output_layer import output_layer_parts
from distillkit.objective.taps import TapRequest, collect_taps
from distillkit.objective.teachers import TermTeachers
from distillkit.objective.terms import ModelDims
from distillkit.run.distill import distill
from distillkit.run.fused_logits import check_output_layer, choose_output_layer
from tests.distill_fixtures import llama, text_config

VOCAB = 53


def _llama(layers: int, hidden: int, seed: int, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits of a useful spread (freshly initialised ones are nearly uniform)
        model.lm_head.weight.mul_(40.0)
    return model


def _batch(rows: int = 3, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length - 3 :] = 0  # a padded row
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _objective(specs: list[dict], student: nn.Module, teacher: nn.Module) -> DistillationObjective:
    dims = ModelDims.from_models(student, teacher)
    return DistillationObjective.from_config(specs, dims)


def _loss_and_grads(objective, student, teacher, batch, fused: bool):
    objective.read_output_layer(fused)
    student_request, teacher_request = objective.tap_requests()
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher_taps = collect_taps(teacher, batch, teacher_request)
    out = objective(collect_taps(student, batch, student_request), teacher_taps, batch)
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in out.terms.items()}, grads


@pytest.mark.parametrize(
    "specs",
    [
        [{"loss": "kd", "temperature": 2.0}],
        [{"loss": "kd", "divergence": "jsd", "beta": 0.3, "temperature": 0.7, "ce_weight": 0.5}],
        [{"loss": "kd", "divergence": "skew_reverse_kl", "alpha": 0.2}, {"loss": "ce", "weight": 0.3}],
        [{"loss": "ce"}],
    ],
    ids=["kd", "kd-jsd-ce", "skew+ce", "ce"],
)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_output_layers_give_the_losses_and_gradients_of_the_logits(specs, tie):
    """Teacher and student of different widths and depths: equal term values and student gradients."""
    student, teacher = _llama(2, 16, seed=1, tie=tie), _llama(3, 24, seed=2)
    teacher.eval()
    objective = _objective(specs, student, teacher)
    batch = _batch()
    fused, fused_grads = _loss_and_grads(objective, student, teacher, batch, fused=True)
    plain, plain_grads = _loss_and_grads(objective, student, teacher, batch, fused=False)
    assert fused.keys() == plain.keys()
    for label in plain:
        assert fused[label] == pytest.approx(plain[label], rel=1e-5, abs=1e-6), label
        assert plain[label] > 0.01  # not a vacuous comparison
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_collect_taps_runs_to_the_output_layer_without_logits():
    model = _llama(2, 16, seed=3)
    batch = _batch()
    taps = collect_taps(model, batch, TapRequest(output_layer=True, hidden_states=True))
    assert taps.logits is None
    assert taps.output_hidden.shape == (3, 9, 16) and taps.output_weight is model.lm_head.weight
    assert len(taps.hidden_states) == 3
    torch.testing.assert_close(taps.output_hidden @ taps.output_weight.T, model(**_inputs(batch)).logits)
    with pytest.raises(ValueError, match="not both"):
        collect_taps(model, batch, TapRequest(output_layer=True, logits=True))


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


class _ScaledLogits(nn.Module):
    """A causal LM that multiplies its logits after the output layer (as logit-scaling models do)."""

    def __init__(self, inner: LlamaForCausalLM) -> None:
        super().__init__()
        self.inner = inner
        self.base_model = inner.model

    def get_output_embeddings(self) -> nn.Module:
        return self.inner.lm_head

    def forward(self, **inputs):
        output = self.inner(**inputs)
        output.logits = output.logits * 0.5
        return output


def test_models_whose_logits_are_not_the_product_are_refused():
    model = _llama(1, 16, seed=4)
    assert check_output_layer(model, _batch()) is None
    assert "differ by up to" in check_output_layer(_ScaledLogits(model), _batch())
    model.lm_head = nn.Linear(16, VOCAB, bias=True)
    assert output_layer_parts(model) == "its output layer has a bias"
    classifier = AutoModelForSequenceClassification.from_config(
        BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_labels=2)
    )
    assert "no output embedding" in output_layer_parts(classifier)


def test_choose_output_layer_decides_and_explains():
    student, teacher = _llama(1, 16, seed=5), _llama(2, 24, seed=6)
    batch = _batch()
    kd = _objective([{"loss": "kd"}], student, teacher)
    assert choose_output_layer("never", kd, student, {"teacher": teacher}, batch) is False
    assert not kd.output_layer
    assert choose_output_layer("auto", kd, student, {"teacher": teacher}, batch, announce=False) is True
    assert kd.tap_requests() == (TapRequest(output_layer=True), TapRequest(output_layer=True))
    assert kd.teacher_requests() == {"teacher": TapRequest(output_layer=True)}
    cached = _objective([{"loss": "kd"}], student, teacher)
    assert choose_output_layer("auto", cached, student, {"teacher": object()}, batch) is False
    with pytest.raises(ConfigError, match="teacher 'teacher' is read from a cache of logits"):
        choose_output_layer("always", cached, student, {"teacher": object()}, batch)
    hidden_only = _objective([{"loss": "l2"}], student, teacher)
    with pytest.raises(ConfigError, match="no objective term reads logits"):
        choose_output_layer("always", hidden_only, student, {"teacher": teacher}, batch)
    mixed = DistillationObjective([(kd.terms["kd"], 1.0)], teachers=[TermTeachers(("a", "b"), (0.5, 0.5))])
    assert mixed.output_layer_blocker() == "objective term 'kd' mixes several teachers' logits"
    with pytest.raises(ValueError, match="mixes several teachers"):
        mixed.read_output_layer(True)


def test_a_causal_lm_run_is_the_same_with_and_without_logits(tmp_path, capsys):
    """Two training runs, fused and not: the logged losses agree step by step."""
    logged = {}
    for mode in ("always", "never"):
        term = {"loss": "kd", "temperature": 1.0, "ce_weight": 0.5}
        (tmp_path / mode).mkdir()
        raw = text_config(
            tmp_path / mode, "causal_lm", llama(2, 32), [term], steps=6, log_every=1, batch_size=4
        )
        raw["train"]["fused_logits"] = mode
        raw["train"]["precision"] = "fp32"
        distill(config_from_dict(raw))
        records = (tmp_path / mode / "run" / "metrics.jsonl").read_text().splitlines()
        logged[mode] = [r["kd"] for r in map(json.loads, records) if r.get("split") == "train"]
    out = capsys.readouterr().out
    assert out.count("read(s) the models' output layers") == 1
    assert len(logged["always"]) == 6
    assert logged["always"] == pytest.approx(logged["never"], rel=1e-4)
