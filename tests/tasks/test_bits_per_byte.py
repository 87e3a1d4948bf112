"""Bits per byte: the next-token loss over the bytes of the text it predicts, in every causal-LM run."""

import math
from types import SimpleNamespace

import pytest
import torch

from distillkit.config import config_from_dict
from distillkit.models import load_tokenizer
from distillkit.run.distill import distill
from distillkit.tasks import EvalContext, make_task
from distillkit.text_data import load_text_splits
from tests.cross_tokenizer_fixtures import cross_config
from tests.distill_fixtures import llama, text_config


class _ToyLM(torch.nn.Module):
    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = torch.nn.Embedding(vocab, 6), torch.nn.Linear(6, vocab)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


def test_bits_per_byte_matches_a_float64_count(tmp_path):
    g = torch.Generator().manual_seed(0)
    model, batches = _ToyLM(13, 0), []
    for b, t in ((2, 6), (1, 9)):  # B=1 and lengths that differ between batches
        ids = torch.randint(13, (b, t), generator=g)
        labels = torch.randint(13, (b, t), generator=g).masked_fill(torch.rand(b, t, generator=g) < 0.3, -100)
        label_bytes = torch.randint(0, 5, (b, t), generator=g).masked_fill(labels == -100, -1)
        label_bytes[0, 0] = -1  # a labelled position outside the scored text
        batches.append({"input_ids": ids, "labels": labels, "label_bytes": label_bytes})
    nll, nbytes = 0.0, 0
    for batch in batches:
        with torch.no_grad():
            logp = torch.log_softmax(model(batch["input_ids"]).logits.double(), -1)
        for i, j in (batch["label_bytes"] >= 0).nonzero().tolist():
            nll -= float(logp[i, j, batch["labels"][i, j]])
            nbytes += int(batch["label_bytes"][i, j])
    cfg = config_from_dict(text_config(tmp_path, "causal_lm", llama(2, 8), [{"loss": "ce"}]))
    metrics = make_task(cfg).evaluate(model, batches, EvalContext())
    assert metrics["bytes"] == nbytes > 0
    assert metrics["bits_per_byte"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-6)


def test_every_text_byte_but_each_rows_first_token_is_scored(tmp_path):
    raw = cross_config(tmp_path, [{"loss": "ce"}])  # writes a byte-level BPE tokenizer (no BOS)
    bpe = raw["student"]["tokenizer"]
    raw = text_config(tmp_path, "causal_lm", llama(2, 16), [{"loss": "ce"}])
    raw["teacher"]["tokenizer"] = bpe
    raw["teacher"]["config"]["vocab_size"] = 300
    raw["data"].update(packing=False, max_length=64)
    cfg = config_from_dict(raw)
    task, tokenizer = make_task(cfg), load_tokenizer(cfg.teacher)
    data = task.load_data(tokenizer)
    batch = task.collator(tokenizer)([data.eval[i] for i in range(len(data.eval))])
    texts = load_text_splits(cfg.data)[1][cfg.data.text_column]
    first = sum(len(tokenizer.decode([row[0]]).encode("utf-8")) for row in data.eval["input_ids"])
    assert int(batch["label_bytes"].clamp_min(0).sum()) == sum(len(t.encode("utf-8")) for t in texts) - first


def test_a_run_reports_bits_per_byte_of_both_models_on_the_same_text(tmp_path, capsys):
    summary = distill(
        config_from_dict(text_config(tmp_path, "causal_lm", llama(4, 32), [{"loss": "ce"}], steps=2))
    )
    student, teacher = summary["student"]["eval"], summary["teacher"]["eval"]
    assert student["bytes"] == teacher["bytes"] > 0
    assert math.isfinite(student["bits_per_byte"]) and math.isfinite(teacher["bits_per_byte"])
    assert "bits/byte" in capsys.readouterr().out
    (tmp_path / "cross").mkdir()
    cross = distill(config_from_dict(cross_config(tmp_path / "cross", [{"loss": "ce"}], steps=2)))
    assert cross["student"]["eval"]["bytes"] == cross["teacher"]["eval"]["bytes"] > 0
    assert "agreement" not in cross["student"]["eval"]  # no position-by-position agreement across tokenizers
    assert cross["cross_tokenizer"] and not summary["cross_tokenizer"]
