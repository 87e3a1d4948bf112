"""Several teachers in one objective: routing, per-teacher sizes, logit mixing, end to end with a cache."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from distillkit import DistillationObjective, ModelDims, Taps
from distillkit.config import config_from_dict
from distillkit.errors import ConfigError
from distillkit.objective.taps import TapRequest, collect_taps
from distillkit.objective.teachers import TermTeachers, mix_teacher_logits
from distillkit.run.cache_teacher import cache_teacher
from distillkit.run.distill import distill
from tests.conftest import tiny_bert
from tests.distill_fixtures import bert, tiny_config

EVERYTHING = TapRequest(hidden_states=True, logits=True)


@pytest.fixture
def wide():
    """A second teacher: shallower and wider than the ``teacher`` fixture (4 layers, 32)."""
    model = tiny_bert(layers=2, hidden=48, seed=5).eval()
    return model.requires_grad_(False)


def _taps(model, batch, grad=False):
    with torch.set_grad_enabled(grad):
        return collect_taps(model, batch, EVERYTHING)


def test_each_term_reads_its_own_teacher_and_the_total_is_the_sum_of_single_teacher_objectives(
    student, teacher, wide, batch
):
    dims = {"teacher": ModelDims.from_models(student, teacher), "wide": ModelDims.from_models(student, wide)}
    objective = DistillationObjective.from_config(
        [
            {"loss": "kd", "weight": 1.0, "temperature": 2.0},
            {"loss": "l2", "weight": 0.5, "teacher": "wide", "layer_map": "uniform"},
            {"loss": "l2", "weight": 0.25, "name": "l2_main", "layer_map": "uniform"},
        ],
        dims,
    )
    assert objective.terms["l2"].dims.teacher_hidden == 48 and objective.terms["l2"].dims.teacher_layers == 2
    assert objective.terms["l2_main"].dims.teacher_hidden == 32
    assert objective.teacher_layers("wide") == (1, 2) and objective.teacher_layers("teacher") == (2, 4)
    requests = objective.teacher_requests()
    assert requests["wide"] == TapRequest(hidden_states=True) and requests["teacher"].logits
    s, t, w = _taps(student, batch, grad=True), _taps(teacher, batch), _taps(wide, batch)
    out = objective(s, {"teacher": t, "wide": w}, batch)
    # the same term modules, each in an objective of its own teacher
    single_main = DistillationObjective([(objective.terms["kd"], 1.0), (objective.terms["l2_main"], 0.25)])
    single_wide = DistillationObjective([(objective.terms["l2"], 0.5)], teachers=[TermTeachers(("wide",))])
    expected = single_main(s, t, batch).total + single_wide(s, {"wide": w}, batch).total
    torch.testing.assert_close(out.total, expected)
    assert any(p.shape == (48, 16) for p in objective.terms["l2"].parameters())  # projects into 48 wide
    out.total.backward()
    assert all(p.grad is None for p in [*teacher.parameters(), *wide.parameters()])


def test_the_single_teacher_call_form_still_works(student, teacher, batch):
    objective = DistillationObjective.from_config(
        [{"loss": "kd"}], {"teacher": ModelDims.from_models(student, teacher)}
    )
    s = _taps(student, batch)
    torch.testing.assert_close(
        objective(s, _taps(teacher, batch), batch).total,
        objective(s, {"teacher": _taps(teacher, batch)}, batch).total,
    )


@pytest.mark.parametrize("mix", ["probabilities", "logits"])
def test_kd_on_a_weighted_mix_of_two_teachers_against_float64(student, teacher, wide, batch, mix):
    dims = {"teacher": ModelDims.from_models(student, teacher), "wide": ModelDims.from_models(student, wide)}
    temperature = 3.0
    objective = DistillationObjective.from_config(
        [
            {
                "loss": "kd",
                "temperature": temperature,
                "teacher": ["teacher", "wide"],
                "teacher_weights": [3, 1],
                "teacher_mix": mix,
            }
        ],
        dims,
    )
    s, t, w = _taps(student, batch), _taps(teacher, batch), _taps(wide, batch)
    value = objective(s, {"teacher": t, "wide": w}, batch).total
    zs, za, zb = (x.logits.double() / temperature for x in (s, t, w))
    if mix == "probabilities":
        p = 0.75 * za.softmax(-1) + 0.25 * zb.softmax(-1)
    else:
        p = (0.75 * za + 0.25 * zb).softmax(-1)
    reference = temperature**2 * (p * (p.log() - zs.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(value.double(), reference, atol=1e-5, rtol=1e-5)
    mixed = mix_teacher_logits([t.logits, w.logits], [0.75, 0.25], mix, temperature)
    assert mixed.shape == t.logits.shape


def test_mixing_teachers_is_refused_for_terms_that_read_more_than_logits(student, teacher, wide):
    dims = {"teacher": ModelDims.from_models(student, teacher), "wide": ModelDims.from_models(student, wide)}
    with pytest.raises(ConfigError, match="only logits can be mixed"):
        DistillationObjective.from_config([{"loss": "l2", "teacher": ["teacher", "wide"]}], dims)
    with pytest.raises(ConfigError, match="reads teacher 'other', which is not defined"):
        DistillationObjective.from_config([{"loss": "l2", "teacher": "other"}], dims)


def _two_teacher_config(tmp_path, **train):
    raw = tiny_config(tmp_path, precision="fp32", **train)
    raw["teachers"] = {"wide": {"config": bert(2, 48)}}
    raw["objective"] = [
        {"loss": "kd", "weight": 1.0, "temperature": 2.0, "teacher": ["teacher", "wide"]},
        {"loss": "l2", "weight": 0.5, "teacher": "wide"},
        {"loss": "codir", "weight": 0.1, "dim": 8, "bank": {"kind": "queue", "size": 16}},
        {"loss": "ce", "weight": 1.0},
    ]
    return raw


def test_two_teachers_one_cached_one_live_equal_two_live_and_resume_exactly(tmp_path):
    raw = _two_teacher_config(tmp_path, steps=6, save_every=2, grad_accum=2, batch_size=4)
    live = copy.deepcopy(raw)
    live["output_dir"] = str(tmp_path / "live")
    cached = copy.deepcopy(raw)
    cached["teachers"]["wide"]["cache"] = str(tmp_path / "wide-cache")
    cache_teacher(config_from_dict(cached), name="wide")
    whole = copy.deepcopy(cached)
    whole["output_dir"] = str(tmp_path / "whole")
    parted = copy.deepcopy(cached)
    parted["output_dir"] = str(tmp_path / "parted")
    summaries = [distill(config_from_dict(live)), distill(config_from_dict(whole))]
    assert set(summaries[1]["final_terms"]) == {"total", "kd", "l2", "codir", "ce"}
    assert summaries[0]["final_terms"] == pytest.approx(summaries[1]["final_terms"], rel=1e-5, abs=1e-7)
    assert distill(config_from_dict(parted), stop_after_step=3)["stopped_early"]
    distill(config_from_dict(parted), resume=True)
    last = {n: tmp_path / n / "checkpoints" / "step-00000006" for n in ("whole", "parted", "live")}
    for part in ("student", "objective", "optimizer"):
        a = load_file(str(last["whole"] / f"{part}.safetensors"))
        b = load_file(str(last["parted"] / f"{part}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    a = load_file(str(last["live"] / "objective.safetensors"))
    assert any(
        v.shape == (48, 32) for v in a.values()
    )  # l2 projects the 32-wide student into the wide teacher


def test_a_teacher_no_term_reads_is_not_loaded(tmp_path, monkeypatch):
    raw = _two_teacher_config(tmp_path, steps=1)
    raw["objective"] = [{"loss": "kd"}, {"loss": "ce"}]
    raw["teachers"]["wide"]["path"] = str(tmp_path / "does-not-exist")  # would fail if it were loaded
    raw["teachers"]["wide"].pop("config")
    with pytest.raises(ConfigError, match="teachers.wide.path"):  # its config is read to size the terms
        distill(config_from_dict(raw))
    raw["teachers"]["wide"] = {"config": bert(2, 48)}
    import distillkit.run.run as run_module

    loaded = []
    original = run_module.load_teacher
    monkeypatch.setattr(
        run_module, "load_teacher", lambda run, spec, *a: loaded.append(spec) or original(run, spec, *a)
    )
    distill(config_from_dict(raw))
    assert len(loaded) == 1 and loaded[0].config["hidden_size"] == 32


def test_unknown_teacher_name_in_a_config_is_a_config_error(tmp_path):
    raw = _two_teacher_config(tmp_path)
    raw["objective"][1]["teacher"] = "wid"
    with pytest.raises(ConfigError, match="reads teacher 'wid' \\(did you mean 'wide'\\?\\)"):
        config_from_dict(raw)
    raw = _two_teacher_config(tmp_path)
    raw["teachers"]["wide"]["config"]["vocab_size"] = 50
    with pytest.raises(ConfigError, match="share the main teacher's tokenizer"):
        distill(config_from_dict(raw))


def test_taps_of_several_teachers_are_detached(student, teacher, wide, batch):
    dims = {"teacher": ModelDims.from_models(student, teacher), "wide": ModelDims.from_models(student, wide)}
    objective = DistillationObjective.from_config([{"loss": "l2", "teacher": "wide"}], dims)
    w = Taps.from_batch(
        batch, hidden_states=tuple(h.requires_grad_() for h in _taps(wide, batch).hidden_states)
    )
    objective(_taps(student, batch, grad=True), {"wide": w}, batch).total.backward()
    assert all(h.grad is None for h in w.hidden_states)
