"""Small losses stay readable in the summary and the progress bar."""

import pytest

from distillkit.config import config_from_dict
from distillkit.run import distill
from distillkit.run.distill import _common_lines
from distillkit.run.numbers import format_loss
from tests.distill_fixtures import tiny_config


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.9306, "0.9306"),
        (4.5925, "4.5925"),
        (0.001, "0.0010"),
        (0.000999, "9.990e-04"),
        (2.3456e-6, "2.346e-06"),
        (-3.2e-7, "-3.200e-07"),
        (0.0, "0"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
    ],
)
def test_format_loss(value, shown):
    assert format_loss(value) == shown


def test_the_summary_keeps_the_demo_look_and_shows_small_losses():
    summary = {"final_terms": {"total": 0.9306, "kd": 0.2981, "l2": 2.5e-06}, "student": {"path": "x"}}
    assert _common_lines(summary)[0] == "final losses: total 0.9306, kd 0.2981, l2 2.500e-06"


def test_a_run_with_tiny_losses_prints_them_in_the_bar_and_the_summary(tmp_path, capsys):
    raw = tiny_config(tmp_path, steps=3, progress=True, report_to=[])
    raw["objective"] = [{"loss": "l2", "weight": 1e-6}, {"loss": "ce", "weight": 1e-6, "name": "tiny_ce"}]
    summary = distill(config_from_dict(raw))
    captured = capsys.readouterr()
    total = summary["final_terms"]["total"]
    assert 0 < total < 1e-3
    assert f"final losses: total {format_loss(total)}, " in captured.out
    assert "e-0" in format_loss(total) and "total 0.0000" not in captured.out
    assert f"total={format_loss(total)}" in captured.err  # the progress bar's last state
