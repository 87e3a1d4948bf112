"""The teacher cache: per-example storage, re-padding, refusal of mismatches, top-k logits, study reuse."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from distillkit.config import config_from_dict
from distillkit.data import Collator, load_task_data
from distillkit.errors import ConfigError
from distillkit.models import freeze, load_model, load_tokenizer
from distillkit.objective.taps import TapRequest, collect_taps
from distillkit.run.cache_teacher import cache_teacher
from distillkit.run.distill import distill
from distillkit.teacher_cache import (
    LOG_TAIL_FLOOR,
    TeacherCache,
    densify_topk,
    expected_meta,
    write_cache,
)
from tests.distill_fixtures import bert, llama, text_config, tiny_config

EVERYTHING = TapRequest(
    hidden_states=True, attentions=True, logits=True, modules=("bert.encoder.layer.1.output",)
)


def _varied_csv(tmp_path):
    """Sentences of 1 to 9 words, so batches have padding."""
    words = ["good", "bad", "movie", "the", "plot", "very", "dull", "fun", "story"]
    lines = ["sentence,sentiment"]
    for i in range(40):
        lines.append(
            " ".join(words[(i + j) % len(words)] for j in range(1 + i % 9)) + ("," + ("pos", "neg")[i % 2])
        )
    path = tmp_path / "varied.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _teacher_and_data(tmp_path, **data):
    raw = tiny_config(tmp_path, precision="fp32")
    raw["data"].update(path=_varied_csv(tmp_path), **data)
    cfg = config_from_dict(raw)
    tokenizer = load_tokenizer(cfg.teacher)
    dataset = load_task_data(cfg.data, tokenizer)
    torch.manual_seed(0)
    teacher = freeze(load_model(cfg.teacher, dataset.num_labels, "teacher"))
    return cfg, tokenizer, dataset, teacher


def _write(tmp_path, cfg, tokenizer, dataset, teacher, request=EVERYTHING, layers=None, batch_size=5):
    collator = Collator(tokenizer)
    meta = expected_meta(cfg, teacher, tokenizer, torch.device("cpu"))
    loader = DataLoader(dataset.train, batch_size=batch_size, collate_fn=collator)
    stats = write_cache(
        tmp_path / "cache", teacher, {"train": loader}, request, layers=layers, top_k=None, meta=meta
    )
    return stats, meta, collator


def test_cached_taps_equal_live_taps_at_real_positions_and_zero_at_padding(tmp_path):
    cfg, tokenizer, dataset, teacher = _teacher_and_data(tmp_path)
    stats, _, collator = _write(tmp_path, cfg, tokenizer, dataset, teacher, layers=(0, 2, 4))
    assert stats["examples"] == len(dataset.train) and stats["bytes_per_example"] > 0
    cache = TeacherCache(tmp_path / "cache")
    rows = [dataset.train[i] for i in (7, 0, 31, 12, 3, 30, 22)]  # another batching than when written
    batch = collator(rows)
    mask = batch["attention_mask"].bool()
    assert not mask.all(), "the batch must have padding for this test"
    assert teacher.config._attn_implementation == "eager"  # switched by write_cache to return attentions
    live = collect_taps(teacher, batch, EVERYTHING)
    read = cache.taps(batch, EVERYTHING)
    for layer in (0, 2, 4):
        torch.testing.assert_close(
            read.hidden_states[layer][mask], live.hidden_states[layer][mask], atol=1e-5, rtol=1e-5
        )
        assert torch.all(read.hidden_states[layer][~mask] == 0)
    with pytest.raises(LookupError, match="teacher layer 3 is not in the teacher cache"):
        read.hidden_states[3]
    with pytest.raises(LookupError, match="stores layers 0, 2, 4"):
        list(read.hidden_states)
    torch.testing.assert_close(read.logits, live.logits, atol=1e-5, rtol=1e-5)
    pair = mask[:, None, :, None] & mask[:, None, None, :]  # [B, 1, T, T]: real query and real key
    for cached, fresh in zip(read.attentions, live.attentions, strict=True):
        torch.testing.assert_close(cached * pair, fresh * pair, atol=1e-5, rtol=1e-5)
        assert torch.all(cached[~pair.expand_as(cached)] == 0)
    path = "bert.encoder.layer.1.output"
    torch.testing.assert_close(read.modules[path][mask], live.modules[path][mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(read.example_ids, batch["example_ids"]) and torch.equal(read.labels, batch["labels"])


def test_missing_example_id_and_other_tokens_are_errors(tmp_path):
    cfg, tokenizer, dataset, teacher = _teacher_and_data(tmp_path)
    _, _, collator = _write(tmp_path, cfg, tokenizer, dataset, teacher, request=TapRequest(logits=True))
    cache = TeacherCache(tmp_path / "cache")
    batch = collator([dataset.train[i] for i in range(4)])
    batch["example_ids"] = torch.tensor([0, 1, 999, 2])
    with pytest.raises(ConfigError, match="example id 999 of the train data is not in the teacher cache"):
        cache.taps(batch, TapRequest(logits=True))
    batch = collator([dataset.train[i] for i in range(4)])
    batch["example_ids"] = torch.tensor([1, 0, 2, 3])  # rows swapped: the tokens no longer match the ids
    with pytest.raises(ConfigError, match="tokens differ"):
        cache.taps(batch, TapRequest(logits=True))


def test_a_cached_run_equals_a_live_run(tmp_path):
    """Teacher in eval mode, fp32: the two runs agree within float tolerance (measured: identical here)."""
    raw = tiny_config(tmp_path, precision="fp32", steps=6, save_every=3)
    raw["objective"].append({"loss": "codir", "weight": 0.1, "dim": 8, "bank": {"kind": "queue", "size": 16}})
    live = copy.deepcopy(raw)
    live["output_dir"] = str(tmp_path / "live")
    cached = copy.deepcopy(raw)
    cached["output_dir"] = str(tmp_path / "cached")
    cached["teacher"]["cache"] = str(tmp_path / "cache")
    stats = cache_teacher(config_from_dict(cached))
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["stored"]["layers"] == [2, 4]  # the uniform map 2 -> 4 of l2 and codir: only those
    assert index["stored"]["logits"] == "dense" and stats["examples"] == 43
    summaries = [distill(config_from_dict(c)) for c in (live, cached)]
    assert summaries[0]["final_terms"] == pytest.approx(summaries[1]["final_terms"], rel=1e-5, abs=1e-7)
    a = load_file(str(tmp_path / "live" / "checkpoints" / "step-00000006" / "student.safetensors"))
    b = load_file(str(tmp_path / "cached" / "checkpoints" / "step-00000006" / "student.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["teacher"]["config"].update(hidden_size=48), "teacher: cache"),
        (lambda r: r["data"].update(max_length=12), "data.max_length: cache 16, this run 12"),
        (lambda r: r["objective"][1].update(layer_map=[[1, 1], [2, 3]]), "the terms map teacher layers"),
        (lambda r: r["objective"].append({"loss": "attention", "weight": 0.1}), "attention maps"),
    ],
)
def test_a_cache_of_another_run_is_refused_saying_what_differs(tmp_path, change, message):
    raw = tiny_config(tmp_path, precision="fp32", steps=1)
    raw["teacher"]["cache"] = str(tmp_path / "cache")
    cache_teacher(config_from_dict(raw))
    other = copy.deepcopy(raw)
    change(other)
    with pytest.raises(ConfigError, match=message):
        distill(config_from_dict(other))


def test_no_cache_and_masked_lm_are_config_errors(tmp_path):
    raw = tiny_config(tmp_path, steps=1)
    raw["teacher"]["cache"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="holds no teacher cache"):
        distill(config_from_dict(raw))
    masked = text_config(tmp_path, "masked_lm", bert(2, 16), [{"loss": "kd"}])
    masked["teacher"]["cache"] = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="masks the inputs anew"):
        config_from_dict(masked)


# -- top-k token logits ------------------------------------------------------------------------------------
def _peaked_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3.0


def _sparse(logits: torch.Tensor, k: int):
    logp = torch.log_softmax(logits, dim=-1)
    values, index = logp.topk(k, dim=-1)
    log_tail = torch.log(-torch.expm1(values.logsumexp(-1))).clamp_min(LOG_TAIL_FLOOR)
    return values.float(), index, log_tail.float(), logp


@pytest.mark.parametrize(("vocab", "k"), [(257, 16), (1000, 64), (33, 33)])
def test_topk_densified_distribution_keeps_the_top_k_and_the_tail_mass(vocab, k):
    values, index, log_tail, logp = _sparse(_peaked_logits(7, vocab), k)
    dense = densify_topk(values, index, log_tail, vocab).double()
    p, p_tilde = logp.exp(), dense.exp()
    torch.testing.assert_close(p_tilde.sum(-1), torch.ones(7, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(dense.gather(1, index), logp.gather(1, index), atol=1e-6, rtol=0)
    tail = 1 - p.gather(1, index).sum(-1)
    outside = torch.ones_like(p, dtype=torch.bool).scatter_(1, index, False)
    torch.testing.assert_close((p_tilde * outside).sum(-1), tail, atol=1e-5, rtol=0)
    if k == vocab:
        torch.testing.assert_close(dense, logp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [4, 16, 64])
def test_topk_error_bounds_at_temperature_one(k):
    """float64 formulas: forward-KL gradient (q − p̃ vs q − p) differs by at most 2·tail in L1, TVD by tail."""
    vocab = 300
    teacher = _peaked_logits(32, vocab, seed=1)
    student = _peaked_logits(32, vocab, seed=2)
    values, index, log_tail, logp = _sparse(teacher, k)
    p = logp.exp()
    p_tilde = densify_topk(values, index, log_tail, vocab).double().softmax(-1)
    q = student.softmax(-1)
    tail = 1 - p.gather(1, index).sum(-1)
    grad_error = ((q - p_tilde) - (q - p)).abs().sum(-1)
    assert torch.all(grad_error <= 2 * tail + 1e-6)
    tvd_error = (0.5 * (p_tilde - q).abs().sum(-1) - 0.5 * (p - q).abs().sum(-1)).abs()
    assert torch.all(tvd_error <= tail + 1e-6)
    # the forward KL value differs by the teacher-entropy part and Σ_tail (p - p̃)·log q: measured, and small
    # when the tail is small
    kl = (p * (logp - q.log())).sum(-1)
    kl_tilde = (p_tilde * (p_tilde.log() - q.log())).sum(-1)
    assert float(tail.max()) < 1.0
    if k == 64:
        assert float((kl - kl_tilde).abs().max()) < 2.0 * float(tail.max()) * math.log(vocab) + 1e-3


def test_topk_logits_through_a_causal_lm_cache(tmp_path):
    raw = text_config(tmp_path, "causal_lm", llama(2, 16), [{"loss": "kd", "temperature": 1.0}], steps=2)
    raw["teacher"]["cache"] = str(tmp_path / "cache")
    raw["teacher"]["cache_top_k"] = 8
    cfg = config_from_dict(raw)
    cache_teacher(cfg)
    cache = TeacherCache(tmp_path / "cache")
    assert cache.contents.logits == "topk" and cache.contents.top_k == 8
    tokenizer = load_tokenizer(cfg.teacher)
    from distillkit.tasks import make_task

    task = make_task(cfg)
    data = task.load_data(tokenizer)
    torch.manual_seed(cfg.data.split_seed)
    teacher = freeze(load_model(cfg.teacher, 0, "teacher", "causal_lm"))
    batch = task.collator(tokenizer)([data.train[i] for i in range(3)])
    live = torch.log_softmax(collect_taps(teacher, batch, TapRequest(logits=True)).logits, -1)
    read = cache.taps(batch, TapRequest(logits=True)).logits
    mask = batch["attention_mask"].bool()
    top = live.topk(8, dim=-1).indices
    torch.testing.assert_close(read.gather(-1, top)[mask], live.gather(-1, top)[mask], atol=1e-5, rtol=1e-5)
    assert distill(cfg)["steps"] == 2  # kd trains on the sparse top-k teacher (the output layers are read)


# -- the study ---------------------------------------------------------------------------------------------
def test_study_fills_the_cache_once_and_gives_the_same_table(tmp_path):
    from distillkit.study import run_study

    base = tiny_config(tmp_path, precision="fp32", steps=4)
    (tmp_path / "base.yaml").write_text(json.dumps(base), encoding="utf-8")
    study = {
        "base": "base.yaml",
        "variants": {
            "kd": [{"loss": "kd", "temperature": 2.0, "ce_weight": 0.5}],
            "kd+l2": [{"loss": "kd", "temperature": 2.0}, {"loss": "l2", "weight": 1.0}],
        },
        "seeds": [0],
    }
    rows = {}
    for use_cache in (True, False):
        study["output_dir"] = str(tmp_path / f"study-{use_cache}")
        (tmp_path / "study.yaml").write_text(json.dumps(study), encoding="utf-8")
        rows[use_cache] = run_study(tmp_path / "study.yaml", teacher_cache=use_cache, jobs=1)
    assert (tmp_path / "study-True" / "teacher-cache" / "index.json").is_file()
    assert not (tmp_path / "study-False" / "teacher-cache").exists()
    summary = json.loads((tmp_path / "study-True" / "kd+l2" / "seed-0" / "summary.json").read_text())
    assert summary["teacher"]["cache"].endswith("teacher-cache")
    for cached, live in zip(rows[True], rows[False], strict=True):
        assert cached["accuracy_mean"] == live["accuracy_mean"]
        terms = [k for k in cached if k.startswith("term.")]
        assert [cached[t] for t in terms] == pytest.approx([live[t] for t in terms], rel=1e-5, abs=1e-7)
