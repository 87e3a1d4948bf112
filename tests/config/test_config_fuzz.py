"""Hostile config input: whatever the YAML or the overrides say, the loader answers with a ConfigError."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillkit.config import DistillConfig, config_from_dict, load_config, safe_load_yaml
from distillkit.errors import ConfigError

VALID = {
    "student": {"layers": 2},
    "teacher": {"path": "x"},
    "objective": [{"loss": "kd", "weight": 1.0}],
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
keys = st.sampled_from(
    [
        "student",
        "teacher",
        "objective",
        "data",
        "train",
        "output_dir",
        "train.lr",
        "train.steps",
        "data.max_length",
        "objective.0",
        "objective.0.weight",
        "student.layers",
        "teacher.path",
        "bogus",
        "train.bogus",
        "objective.5.weight",
        "data.eval_fraction",
    ]
)


def _accept_or_config_error(call):
    try:
        result = call()
    except ConfigError as exc:
        message = str(exc)
        assert message.strip(), "an empty error message"
        assert "\n\n" not in message, "the error should be one paragraph"
        assert "Traceback" not in message
        return None
    assert isinstance(result, DistillConfig)
    return result


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=keys, value=values)
def test_overrides_never_escape_as_raw_exceptions(key, value):
    _accept_or_config_error(lambda: config_from_dict(VALID, [f"{key}={yaml.safe_dump(value).strip()}"]))


@settings(max_examples=150, deadline=None)
@given(data=values)
def test_arbitrary_documents_give_config_errors(data):
    _accept_or_config_error(lambda: config_from_dict(data))


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60))
def test_arbitrary_override_strings(text):
    _accept_or_config_error(lambda: config_from_dict(VALID, [text]))


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab:{}[]-!&*|>'\"\n #%@`?,.=")), max_size=40))
def test_arbitrary_yaml_text(text):
    def load():
        return config_from_dict(safe_load_yaml(text))

    _accept_or_config_error(load)


def test_python_tags_in_overrides_are_refused():
    for tag in ("!!python/object/apply:os.system ['true']", "!!python/name:os.system"):
        try:
            config_from_dict(VALID, [f"output_dir={tag}"])
        except ConfigError as exc:
            assert "python tags are refused" in str(exc)
        else:
            raise AssertionError("a python tag was accepted")


def test_missing_file(tmp_path):
    try:
        load_config(tmp_path / "nope.yaml")
    except ConfigError as exc:
        assert "does not exist" in str(exc)
