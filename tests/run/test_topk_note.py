"""A term reading teacher logits from a top-k cache says when that makes it approximate."""

import copy

import pytest

from distillkit.config import config_from_dict
from distillkit.run import Run
from distillkit.run.cache_teacher import cache_teacher
from tests.distill_fixtures import llama, text_config


@pytest.fixture(scope="module")
def topk_config(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("topk")
    raw = text_config(tmp_path, "causal_lm", llama(2, 16), [{"loss": "kd", "temperature": 1.0}], steps=2)
    raw["teacher"]["cache"] = str(tmp_path / "cache")
    raw["teacher"]["cache_top_k"] = 8
    cache_teacher(config_from_dict(raw))
    return raw


def notes_for(raw, capsys, **kd):
    raw = copy.deepcopy(raw)
    raw["objective"] = [{"loss": "kd", **kd}]
    capsys.readouterr()
    Run.from_config(config_from_dict(raw))
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("distillkit: note:")]


def test_reverse_kl_from_a_top_k_cache_says_it_is_approximate(topk_config, capsys):
    assert notes_for(topk_config, capsys, divergence="reverse_kl", temperature=1.0) == [
        "distillkit: note: objective term 'kd' reads the teacher's logits from a top-8 cache: divergence "
        "'reverse_kl' weighs the teacher's tail probabilities, which the cache spreads evenly, so it is "
        "approximate; use dense logits (no cache_top_k) or a larger cache_top_k (docs/teachers.md)"
    ]


def test_a_temperature_other_than_one_is_approximate_too(topk_config, capsys):
    (note,) = notes_for(topk_config, capsys, divergence="forward_kl", temperature=2.0)
    assert "at temperature 2 the cached top-k distribution is rescaled" in note


def test_forward_kl_at_temperature_one_needs_no_note(topk_config, capsys):
    assert notes_for(topk_config, capsys, divergence="forward_kl", temperature=1.0) == []
