import pytest

from distillkit.config import apply_overrides, config_from_dict, load_config, parse_term_configs
from distillkit.errors import ConfigError

BASE = {
    "student": {"layers": 3},
    "teacher": {"path": "some/teacher"},
    "objective": [
        {"loss": "kd", "weight": 1.0, "temperature": 2.0},
        {"loss": "l2", "weight": 0.5, "layer_map": "uniform"},
        {"loss": "codir", "weight": 0.1, "bank": {"kind": "queue", "size": 16384}},
    ],
}


def test_valid_config_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "student: {layers: 3}\nteacher: {path: x}\n"
        "objective:\n  - {loss: kd, weight: 1.0, temperature: 2.0}\n"
    )
    config = load_config(path, ["train.lr=3e-5", "objective.0.weight=0.25"])
    assert config.train.lr == pytest.approx(3e-5)
    assert config.objective[0].weight == 0.25
    assert config.objective[0].params() == {"temperature": 2.0}


def test_python_tag_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("student: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="python tags are refused"):
        load_config(path)


def test_unknown_field_names_field_and_close_match():
    data = dict(BASE, train={"lerning_rate": 1.0})
    with pytest.raises(ConfigError, match=r"unknown field 'train.lerning_rate'.*accepted here: steps"):
        config_from_dict(data)
    with pytest.raises(ConfigError, match=r"did you mean 'steps'"):
        config_from_dict(dict(BASE, train={"step": 3}))


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError, match=r"field 'train.lr'.*'fast'"):
        config_from_dict(BASE, ["train.lr=fast"])


def test_missing_teacher_source():
    with pytest.raises(ConfigError, match="teacher needs `path`"):
        config_from_dict(dict(BASE, teacher={}))


def test_objective_must_be_list():
    with pytest.raises(ConfigError, match="objective must be a list"):
        config_from_dict(dict(BASE, objective={"loss": "kd"}))


def test_override_errors():
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_overrides(BASE, ["train.lr"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(BASE, ["objective.9.weight=1"])
    assert apply_overrides(BASE, ["objective.2.bank.size=128"])["objective"][2]["bank"]["size"] == 128
    assert BASE["objective"][2]["bank"]["size"] == 16384  # the input is not modified


def test_term_config_needs_loss():
    with pytest.raises(ConfigError, match="missing field 'objective.0.loss'"):
        parse_term_configs([{"weight": 1.0}])
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_term_configs(["kd"])
