"""The intermediate-layer losses on real models: attention taps of a tiny BERT, and short training runs."""

import json
import math

import pytest
import torch
from transformers import BertConfig, BertModel

from distillkit import DistillationObjective
from distillkit.config import config_from_dict
from distillkit.objective.taps import collect_taps
from distillkit.objective.terms import ModelDims
from distillkit.run.distill import distill
from tests.distill_fixtures import bert, text_config

TERMS = [
    {"loss": "attention", "weight": 1.0, "kind": "kl"},
    {"loss": "minilm_v2", "weight": 1.0},
    {"loss": "cosine", "weight": 1.0},
]


def no_attention_dropout(config):
    """Hugging Face eager attention returns probabilities after dropout in training mode; turn it off."""
    return {**config, "attention_probs_dropout_prob": 0.0}


def tiny_bert(layers, hidden, heads):
    config = BertConfig(
        vocab_size=30,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
    )
    return BertModel(config).eval()


def test_collect_taps_gives_attention_rows_summing_to_one_over_real_keys():
    torch.manual_seed(0)
    student, teacher = tiny_bert(2, 12, 3), tiny_bert(4, 16, 2)
    dims = ModelDims.from_models(student, teacher)
    objective = DistillationObjective.from_config(
        [{"loss": "attention", "heads": "mean"}, {"loss": "minilm_v2", "relation_heads": 4}], dims
    )
    objective.prepare_models(student, teacher, announce=False)  # switches both to eager attention
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
    batch = {"input_ids": torch.randint(0, 30, (3, 7)), "attention_mask": mask}
    request_s, request_t = objective.tap_requests()
    taps_s, taps_t = collect_taps(student, batch, request_s), collect_taps(teacher, batch, request_t)
    for taps, layers, heads, width in ((taps_s, 2, 3, 12), (taps_t, 4, 2, 16)):
        assert len(taps.attentions) == layers
        for probs in taps.attentions:
            assert probs.shape == (3, heads, 7, 7)
            real_keys = mask[:, None, None, :].bool()
            torch.testing.assert_close(
                (probs * real_keys).sum(-1), torch.ones(3, heads, 7), rtol=0, atol=1e-5
            )
            assert float(probs.detach().masked_select(~real_keys.expand_as(probs)).abs().max()) < 1e-6
        assert len(taps.modules) == 3 and all(v.shape == (3, 7, width) for v in taps.modules.values())
    out = objective(taps_s, taps_t)
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in out.terms.values())


def test_representation_run_trains_a_narrower_student(tmp_path):
    teacher = no_attention_dropout(bert(4, 32))
    raw = text_config(tmp_path, "representation", teacher, TERMS, steps=10, lr=5e-3)
    raw["student"] = {
        "config": no_attention_dropout(bert(2, 24))
    }  # randomly initialised, narrower: cosine learns a projection
    summary = distill(config_from_dict(raw))
    assert set(summary["final_terms"]) == {"total", "attention", "minilm_v2", "cosine"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row.get("split") == "train"]
    assert len(train) == 10 and all(math.isfinite(row["total"]) for row in train)
    first, last = train[0], train[-1]
    assert last["total"] < first["total"]
    assert last["attention"] < first["attention"] and last["cosine"] < first["cosine"]


@pytest.mark.parametrize("task", ["masked_lm"])
def test_masked_lm_run_taps_the_encoder_under_the_head(tmp_path, task):
    teacher = no_attention_dropout(bert(4, 32))  # the student copies its config
    raw = text_config(tmp_path, task, teacher, [*TERMS, {"loss": "kd", "weight": 1.0}], steps=3)
    summary = distill(config_from_dict(raw))
    assert all(math.isfinite(v) for v in summary["final_terms"].values())
    assert summary["final_terms"]["minilm_v2"] >= 0.0
