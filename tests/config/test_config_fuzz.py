"""Hostile config input: whatever the YAML or the overrides say, the loader answers with a ConfigError.

Draws are derandomised by default (``tests/hypothesis_profiles.py``); ``HYPOTHESIS_PROFILE=explore`` draws
anew, and every failure it found is kept below as an ``@example``.
"""

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from distillkit.config import DistillConfig, config_from_dict, load_config, safe_load_yaml
from distillkit.errors import ConfigError
from tests.hypothesis_profiles import examples

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
        assert "\n" not in message, f"the error should be one line (the input quoted): {message!r}"
        assert "Traceback" not in message
        return None
    assert isinstance(result, DistillConfig)
    return result


@settings(max_examples=examples(150))
@given(key=keys, value=values)
@example(key="objective.5.weight", value="\n0")  # a newline in the value once split the message in two
@example(key="objective.5.weight", value="a\n\nb")
@example(key="bogus", value={"x\ny": 1})
def test_overrides_never_escape_as_raw_exceptions(key, value):
    _accept_or_config_error(lambda: config_from_dict(VALID, [f"{key}={yaml.safe_dump(value).strip()}"]))


@settings(max_examples=examples(150))
@given(data=values)
def test_arbitrary_documents_give_config_errors(data):
    _accept_or_config_error(lambda: config_from_dict(data))


@settings(max_examples=examples(100))
@given(text=st.text(max_size=60))
@example(text="a\nb")
@example(text="train.\n.lr=1")
def test_arbitrary_override_strings(text):
    _accept_or_config_error(lambda: config_from_dict(VALID, [text]))


@settings(max_examples=examples(100))
@given(text=st.text(alphabet=st.sampled_from(list("ab:{}[]-!&*|>'\"\n #%@`?,.=")), max_size=40))
def test_arbitrary_yaml_text(text):
    def load():
        return config_from_dict(safe_load_yaml(text))

    _accept_or_config_error(load)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['true']", "!!python/name:os.system"])
def test_python_tags_in_overrides_are_refused(tag):
    with pytest.raises(ConfigError, match="python tags are refused"):
        config_from_dict(VALID, [f"output_dir={tag}"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_missing_relative_file_says_what_it_was_resolved_against(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config("configs/nope.yaml")
    assert str(caught.value) == (
        f"config file 'configs/nope.yaml' does not exist (resolved against {tmp_path})"
    )


def test_a_newline_in_an_override_is_shown_escaped_on_one_line():
    with pytest.raises(ConfigError) as caught:
        config_from_dict(VALID, ["objective.5.weight=a\nb"])
    message = str(caught.value)
    assert "\n" not in message
    assert "override 'objective.5.weight=a\\nb': '5' is not an index of a list of 1 entries" in message


def test_invalid_yaml_in_an_override_is_one_line():
    with pytest.raises(ConfigError) as caught:
        config_from_dict(VALID, ["train.lr=[1, 2"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--set 'train.lr': invalid YAML: ")
    assert "line 1" in message
