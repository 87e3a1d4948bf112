"""A top-k teacher cache read as a sparse teacher: Taps.topk_logits, the output-layer decision, kd's loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distillkit.config import config_from_dict
from distillkit.errors import ConfigError
from distillkit.models import freeze, load_model, load_tokenizer
from distillkit.objective.taps import TapRequest, TopKLogits, collect_taps
from distillkit.ops import fused_linear_divergence_topk
from distillkit.run.cache_teacher import cache_teacher
from distillkit.run.distill import distill
from distillkit.run.fused_logits import choose_output_layer
from distillkit.run.run import Run
from distillkit.teacher_cache import TeacherCache
from tests.distill_fixtures import llama, text_config

K = 8


def _cached(tmp_path, objective, top_k=K, **train):
    raw = text_config(tmp_path, "causal_lm", llama(2, 16), objective, steps=3, log_every=1, **train)
    raw["teacher"]["cache"] = str(tmp_path / "cache")
    raw["teacher"]["cache_top_k"] = top_k
    raw["train"]["precision"] = "fp32"
    cfg = config_from_dict(raw)
    cache_teacher(cfg)
    return cfg


def _live_teacher_and_batch(cfg, rows=3):
    from distillkit.tasks import make_task

    tokenizer = load_tokenizer(cfg.teacher)
    task = make_task(cfg)
    data = task.load_data(tokenizer)
    torch.manual_seed(cfg.data.split_seed)
    teacher = freeze(load_model(cfg.teacher, 0, "teacher", "causal_lm"))
    batch = task.collator(tokenizer)([data.train[i] for i in range(rows)])
    return teacher, batch


def test_the_cache_gives_the_teachers_top_k_at_real_positions(tmp_path):
    cfg = _cached(tmp_path, [{"loss": "kd", "temperature": 1.0}])
    cache = TeacherCache(tmp_path / "cache")
    assert cache.serves_topk
    teacher, batch = _live_teacher_and_batch(cfg)
    topk = cache.taps(batch, TapRequest(output_layer=True)).topk_logits
    assert isinstance(topk, TopKLogits)
    live = torch.log_softmax(collect_taps(teacher, batch, TapRequest(logits=True)).logits.double(), -1)
    mask = batch["attention_mask"].bool()
    values, index = live.topk(K, dim=-1)
    assert topk.index.shape == (*mask.shape, K) and topk.log_tail.shape == mask.shape
    assert torch.equal(topk.index[mask], index[mask])
    torch.testing.assert_close(topk.logp[mask].double(), values[mask], atol=1e-5, rtol=1e-5)
    tail = torch.log1p(-values.exp().sum(-1))
    torch.testing.assert_close(topk.log_tail[mask].double(), tail[mask], atol=1e-4, rtol=1e-4)
    if (~mask).any():  # padding: distinct ids, a distribution on them, no tail
        assert torch.equal(topk.index[~mask][0], torch.arange(K))
        assert torch.all(topk.logp[~mask] == -math.log(K)) and torch.all(topk.log_tail[~mask] == -math.inf)


@pytest.mark.parametrize("tail", ["spread", "bucket"])
def test_kd_reads_the_sparse_teacher_through_the_top_k_op(tmp_path, tail):
    term = {"loss": "kd", "temperature": 2.0, "divergence": "jsd", "beta": 0.3, "topk_tail": tail}
    cfg = _cached(tmp_path, [term])
    cache = TeacherCache(tmp_path / "cache")
    teacher, batch = _live_teacher_and_batch(cfg)
    run = Run.from_config(cfg, finetune_teacher=False, announce=False)
    objective, student = run.objective, run.student
    assert choose_output_layer("always", objective, student, {"teacher": cache}, batch, announce=False)
    student_taps = collect_taps(student, batch, objective.tap_requests()[0])
    got = objective.terms["kd"](student_taps, cache.taps(batch, objective.teacher_requests()["teacher"]))
    rows = batch["input_ids"].numel()
    topk = cache.taps(batch, TapRequest(output_layer=True)).topk_logits
    expected = fused_linear_divergence_topk(
        student_taps.output_hidden.reshape(rows, -1),
        student_taps.output_weight,
        topk.index.reshape(rows, K),
        topk.logp.reshape(rows, K),
        topk.log_tail.reshape(rows),
        divergence="jsd",
        beta=0.3,
        temperature=2.0,
        mask=student_taps.position_mask().reshape(rows) > 0,
        tail=tail,
    )
    torch.testing.assert_close(got, expected)


def test_a_term_that_cannot_read_a_top_k_teacher_keeps_the_logits(tmp_path, monkeypatch):
    cfg = _cached(tmp_path, [{"loss": "kd", "temperature": 1.0, "divergence": "tvd"}])
    cache = TeacherCache(tmp_path / "cache")
    _, batch = _live_teacher_and_batch(cfg)
    run = Run.from_config(cfg, finetune_teacher=False, announce=False)
    kd = run.objective.terms["kd"]
    assert kd.reads_topk_teacher()  # the spread tail has every divergence
    monkeypatch.setattr(type(kd), "reads_topk_teacher", lambda self: False)
    assert not choose_output_layer("auto", run.objective, run.student, {"teacher": cache}, batch)
    with pytest.raises(
        ConfigError, match="objective term 'kd' \\(loss 'kd'\\) cannot read without its logits"
    ):
        choose_output_layer("always", run.objective, run.student, {"teacher": cache}, batch)


def test_the_bucket_tail_has_only_its_divergences():
    from distillkit_plugins.kd import KDLoss

    assert KDLoss.parse_params({"divergence": "jsd", "topk_tail": "bucket"}).topk_tail == "bucket"
    with pytest.raises(
        ValueError, match="topk_tail: bucket has forward_kl, reverse_kl, jsd, not divergence 'tvd'"
    ):
        KDLoss.parse_params({"divergence": "tvd", "topk_tail": "bucket"})


def test_a_dense_cache_cannot_stand_for_the_output_layer(tmp_path):
    cfg = _cached(tmp_path, [{"loss": "kd", "temperature": 1.0}], top_k=None)
    cache = TeacherCache(tmp_path / "cache")
    assert not cache.serves_topk
    _, batch = _live_teacher_and_batch(cfg)
    with pytest.raises(ConfigError, match="holds no top-k logits to stand for the teacher's output layer"):
        cache.taps(batch, TapRequest(output_layer=True))


def test_a_run_on_a_top_k_cache_of_all_but_one_token_equals_the_live_run(tmp_path, capsys):
    """The whole loop on the sparse teacher: with k = V - 1 the tail bucket is one token, so the buckets are
    the whole distribution and kd's logged losses equal those of the live teacher step by step."""
    objective = [{"loss": "kd", "temperature": 1.0, "divergence": "jsd", "ce_weight": 0.5}]
    logged = {}
    for name in ("live", "cached"):
        (tmp_path / name).mkdir()
        if name == "cached":
            cfg = _cached(tmp_path / name, objective, top_k=39, batch_size=4)
        else:
            raw = text_config(tmp_path / name, "causal_lm", llama(2, 16), objective, steps=3, log_every=1)
            raw["train"].update(precision="fp32", batch_size=4, fused_logits="always")
            cfg = config_from_dict(raw)
        distill(cfg)
        records = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        logged[name] = [r["kd"] for r in map(json.loads, records) if r.get("split") == "train"]
    assert capsys.readouterr().out.count("read(s) the models' output layers") == 2
    assert len(logged["cached"]) == 3
    assert logged["cached"] == pytest.approx(logged["live"], rel=1e-4, abs=1e-6)


def test_the_spread_tail_trains_as_the_caches_dense_logits_do(tmp_path):
    """A top-8 cache: reading it through the output layers (spread tail) or as dense logits gives the same
    losses step by step (the same teacher distribution, without building it)."""
    objective = [{"loss": "kd", "temperature": 2.0, "divergence": "skew_reverse_kl", "alpha": 0.2}]
    logged = {}
    for mode in ("auto", "never"):
        (tmp_path / mode).mkdir()
        cfg = _cached(tmp_path / mode, objective, top_k=8, batch_size=4)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fused_logits": mode})})
        distill(cfg)
        records = (tmp_path / mode / "run" / "metrics.jsonl").read_text().splitlines()
        logged[mode] = [r["kd"] for r in map(json.loads, records) if r.get("split") == "train"]
    assert len(logged["auto"]) == 3
    assert logged["auto"] == pytest.approx(logged["never"], rel=1e-4, abs=1e-7)
