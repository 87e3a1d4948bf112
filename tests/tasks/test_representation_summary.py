"""An embedding run without a probe says so, instead of printing ``probe acc nan``."""

from distillkit.config import config_from_dict
from distillkit.tasks import make_task
from distillkit.tasks.representation import NO_PROBE
from tests.distill_fixtures import bert, text_config


def summary_of(tmp_path, probe=None):
    task = make_task(config_from_dict(text_config(tmp_path, "representation", bert(2, 16), [{"loss": "l2"}])))
    summary = {
        "teacher": {"parameters": 1000},
        "student": {"parameters": 500, "eval": {"cosine": 0.9}},
        "eval_examples": 5,
    }
    if probe:
        summary["probe"] = probe
    return task.summary_lines(summary)


def test_no_probe_is_said_in_words(tmp_path):
    lines = summary_of(tmp_path)
    assert "nan" not in "\n".join(lines)
    assert lines[1] == f"{'teacher':10} {'-':>9} {1000:12,}"
    assert lines[-1] == NO_PROBE
    assert "set evaluation.probe" in NO_PROBE


def test_a_probe_is_shown(tmp_path):
    accuracy = {"teacher": 0.75, "student": 0.7}
    probe = {"accuracy": accuracy, "train_examples": 8, "eval_examples": 4, "data": "p"}
    lines = summary_of(tmp_path, probe)
    assert lines[1] == f"{'teacher':10} {0.75:9.4f} {1000:12,}"
    assert lines[-1] == "linear probe: p, 8 train / 4 held-out examples"
