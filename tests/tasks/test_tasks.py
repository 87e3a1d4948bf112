"""The tasks end to end on tiny models built from configs: causal LM, masked LM, representation."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distillkit.config import config_from_dict
from distillkit.errors import ConfigError
from distillkit.models import load_tokenizer, student_from_teacher
from distillkit.run.distill import distill
from distillkit.tasks.causal_lm import NextTokenCollator
from distillkit.tasks.masked_lm import MaskingCollator
from distillkit.tasks.representation import linear_probe
from tests.distill_fixtures import bert, gpt2, llama, text_config, write_vocab

LM_TERMS = [{"loss": "kd", "temperature": 2.0}, {"loss": "ce", "weight": 0.5}, {"loss": "l2", "weight": 0.1}]


@pytest.mark.parametrize("family", [llama, gpt2])
def test_causal_lm_run_reports_perplexity_agreement_and_samples(tmp_path, family, capsys):
    raw = text_config(tmp_path, "causal_lm", family(4, 32), LM_TERMS, steps=6, eval_every=3)
    summary = distill(config_from_dict(raw))
    student, teacher = summary["student"]["eval"], summary["teacher"]["eval"]
    assert math.isfinite(student["perplexity"]) and math.isfinite(teacher["perplexity"])
    assert 0.0 <= student["agreement"] <= 1.0
    assert set(summary["samples"]) == {"teacher", "student"}
    assert summary["tokens_per_second"]["student"] > 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "prompt:" in out and "LOAD REPORT" not in out
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert reloaded.config.num_hidden_layers == 2


def test_causal_lm_resume_equals_an_uninterrupted_run(tmp_path):
    raw = text_config(
        tmp_path, "causal_lm", llama(4, 32), LM_TERMS, steps=6, save_every=2, grad_accum=2, batch_size=4
    )
    whole, parted = copy.deepcopy(raw), copy.deepcopy(raw)
    whole["output_dir"], parted["output_dir"] = str(tmp_path / "whole"), str(tmp_path / "parted")
    distill(config_from_dict(whole))
    assert distill(config_from_dict(parted), stop_after_step=3)["stopped_early"]
    distill(config_from_dict(parted), resume=True)
    for part in ("student", "objective", "optimizer"):
        a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-00000006" / f"{part}.safetensors"))
        b = load_file(str(tmp_path / "parted" / "checkpoints" / "step-00000006" / f"{part}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_masked_lm_run(tmp_path):
    raw = text_config(tmp_path, "masked_lm", bert(4, 32), LM_TERMS, steps=4)
    raw["data"]["mlm_probability"] = 0.3
    summary = distill(config_from_dict(raw))
    assert summary["student"]["eval"]["positions"] > 0
    assert 0.0 <= summary["student"]["eval"]["accuracy"] <= 1.0


def test_representation_run_with_linear_probe(tmp_path):
    raw = text_config(tmp_path, "representation", bert(4, 32), [{"loss": "l2"}], steps=4)
    raw["evaluation"] = {
        "probe": {"path": raw["data"]["path"], "text_column": "sentence", "label_column": "sentiment"}
    }
    summary = distill(config_from_dict(raw))
    assert -1.0 <= summary["student"]["eval"]["cosine"] <= 1.0
    assert set(summary["probe"]["accuracy"]) == {"teacher", "student"}
    assert (tmp_path / "run" / "student" / "config.json").exists()


@pytest.mark.parametrize(
    ("task", "term", "message"),
    [
        (
            "representation",
            {"loss": "kd"},
            "reads logits, but the models of task 'representation' have no head",
        ),
        (
            "representation",
            {"loss": "codir", "negatives": "other_labels", "bank": {"kind": "in_batch"}},
            "reads labels, but task 'representation' trains on unlabelled",
        ),
        ("causal_lm", {"loss": "codir", "negatives": "other_labels"}, "needs a class label per example"),
        ("causal_lm", {"loss": "l2", "layer_map": [[1, 9]]}, "objective term 'l2'"),
    ],
)
def test_task_and_loss_mismatches_are_refused_before_models_load(tmp_path, monkeypatch, task, term, message):
    teacher = llama(4, 32) if task == "causal_lm" else bert(4, 32)
    raw = text_config(tmp_path, task, teacher, [term])

    def no_weights(*args, **kwargs):
        raise AssertionError("a model was loaded before the objective was checked")

    monkeypatch.setattr("distillkit.run.run.load_teacher", no_weights)
    with pytest.raises(ConfigError, match=message):
        distill(config_from_dict(raw))


def test_next_token_labels_are_shifted_and_masked(tmp_path):
    tokenizer = load_tokenizer(
        config_from_dict(text_config(tmp_path, "causal_lm", llama(2, 16), [{"loss": "ce"}])).teacher
    )
    rows = [
        {"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "example_ids": 0},
        {"input_ids": [9, 10], "attention_mask": [1] * 2, "example_ids": 1},
    ]
    batch = NextTokenCollator(tokenizer)(rows)
    assert batch["labels"].tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]


def test_masking_depends_only_on_the_batch_and_spares_special_tokens(tmp_path):
    tokenizer = load_tokenizer(
        config_from_dict(text_config(tmp_path, "masked_lm", bert(2, 16), [{"loss": "ce"}])).teacher
    )
    rows = [
        {"input_ids": [2, *range(5, 25), 3], "attention_mask": [1] * 22, "example_ids": i} for i in range(4)
    ]
    collate = MaskingCollator(tokenizer, probability=0.5, seed=3)
    first, again = collate(rows), collate(rows)
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(
        first["labels"], again["labels"]
    )
    chosen = first["labels"] != -100
    assert 0 < int(chosen.sum()) < chosen.numel()
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS] and [SEP] are never chosen
    other = collate(rows[::-1])
    assert not torch.equal(other["labels"].flip(0), first["labels"])  # another batch, another mask


@pytest.mark.parametrize("family", [llama, gpt2])
def test_student_copies_the_picked_decoder_layers(family):
    from transformers import AutoConfig

    kwargs = dict(family(6, 32))
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config)
    student = student_from_teacher(
        teacher,
        config_from_dict(
            {"teacher": {"config": family(6, 32)}, "student": {"layers": 3}, "objective": [{"loss": "kd"}]}
        ).student,
    )
    stack = "model.layers" if family is llama else "transformer.h"
    for new, old in enumerate([0, 2, 4]):
        a = teacher.get_submodule(f"{stack}.{old}").state_dict()
        b = student.get_submodule(f"{stack}.{new}").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 40, (1, 5))
    assert student(input_ids=ids).logits.shape == (1, 5, 40)


def test_linear_probe_separates_separable_features():
    torch.manual_seed(0)
    labels = torch.arange(200) % 2
    features = torch.randn(200, 5) + 3.0 * labels[:, None].float()
    assert linear_probe(features[:150], labels[:150], features[150:], labels[150:], 2) > 0.95
    assert linear_probe(torch.randn(150, 5), labels[:150], torch.randn(50, 5), labels[150:], 2) < 0.8


def test_packed_text_blocks(tmp_path):
    from distillkit.text_data import load_text_data

    raw = text_config(tmp_path, "causal_lm", llama(2, 16), [{"loss": "ce"}])
    config = config_from_dict(raw)
    data = load_text_data(config.data, load_tokenizer(config.teacher), packing=True)
    assert {len(row) for row in data.train["input_ids"]} == {16}
    assert data.train["example_ids"] == list(range(len(data.train)))
    write_vocab(tmp_path)  # unchanged fixture still usable


class _ToyLM(torch.nn.Module):
    """``[B, T] -> [B, T, V]`` logits (embedding + linear), counting its forwards."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = torch.nn.Embedding(vocab, 6), torch.nn.Linear(6, vocab)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


def _token_batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    batches = []
    for b, t in ((3, 5), (1, 7)):  # B=1 and lengths that differ between batches
        ids = torch.randint(vocab, (b, t), generator=g)
        labels = torch.randint(vocab, (b, t), generator=g)
        labels[torch.rand(b, t, generator=g) < 0.4] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def _expected_token_metrics(model, teacher, batches):
    """Float64 loss, accuracy and agreement over the labelled positions, written out per position."""
    nll, count, hits, agree = 0.0, 0, 0, 0
    for batch in batches:
        with torch.no_grad():
            logp = torch.log_softmax(model(batch["input_ids"]).logits.double(), -1)
            guess = teacher(batch["input_ids"]).logits.double().argmax(-1)
        for i, j in (batch["labels"] != -100).nonzero().tolist():
            label = int(batch["labels"][i, j])
            nll -= float(logp[i, j, label])
            count += 1
            hits += int(logp[i, j].argmax()) == label
            agree += int(logp[i, j].argmax()) == int(guess[i, j])
    return {"loss": nll / count, "accuracy": hits / count, "agreement": agree / count, "positions": count}


@pytest.mark.parametrize("task", ["causal_lm", "masked_lm"])
def test_token_evaluation_matches_a_float64_count(tmp_path, task):
    from distillkit.tasks import EvalContext, make_task

    vocab = 11
    cfg = config_from_dict(text_config(tmp_path, task, bert(2, 8), [{"loss": "ce"}]))
    model, teacher, batches = _ToyLM(vocab, 0), _ToyLM(vocab, 1), _token_batches(vocab)
    expected = _expected_token_metrics(model, teacher, batches)
    metrics = make_task(cfg).evaluate(model, batches, EvalContext(teacher=teacher))
    assert metrics["positions"] == expected["positions"] > 0
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected["loss"]), rel=1e-5)
    assert metrics["agreement"] == pytest.approx(expected["agreement"])
    assert ("accuracy" in metrics) == (task == "masked_lm")
    if task == "masked_lm":
        assert metrics["accuracy"] == pytest.approx(expected["accuracy"])
    alone = make_task(cfg).evaluate(model, batches, EvalContext())
    assert "agreement" not in alone and alone["loss"] == metrics["loss"]


def test_causal_lm_runs_the_frozen_teacher_at_the_first_evaluation_only(tmp_path):
    from distillkit.tasks import EvalContext, make_task

    cfg = config_from_dict(text_config(tmp_path, "causal_lm", llama(2, 8), [{"loss": "ce"}]))
    task, model, teacher, batches = make_task(cfg), _ToyLM(11, 0), _ToyLM(11, 1), _token_batches(11)
    first = task.evaluate(model, batches, EvalContext(teacher=teacher))
    assert task.evaluate(model, batches, EvalContext(teacher=teacher)) == first
    assert teacher.calls == len(batches) and model.calls == 2 * len(batches)


DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_causal_lm_distils_with_every_divergence(tmp_path, divergence):
    """A causal-LM config with `kd` in each divergence runs, and the divergence falls while training."""
    term = {"loss": "kd", "divergence": divergence, "temperature": 1.0}
    raw = text_config(tmp_path, "causal_lm", llama(4, 32), [term], steps=16, log_every=1, batch_size=8)
    raw["train"]["lr"] = 3e-3
    summary = distill(config_from_dict(raw))
    assert math.isfinite(summary["student"]["eval"]["perplexity"])
    logged = [
        record["kd"]
        for record in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if record.get("split") == "train"
    ]
    assert len(logged) == 16 and all(math.isfinite(v) for v in logged)
    assert sum(logged[-4:]) < sum(logged[:4])
