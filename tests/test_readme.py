"""The README's tour must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    tour = next(block for block in blocks if "DistillationObjective.from_config" in block)
    exec(compile(tour, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("'total'", "'kd'", "'l2'", "'codir'"))


def test_readme_documents_what_tap_requests_returns():
    from types import SimpleNamespace

    from distillkit import TapRequest

    text = README.read_text()
    assert "`tap_requests()` method returning the pair\n`(student request, teacher request)`" in text
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "def tap_requests" in b)
    namespace = {"TapRequest": TapRequest}
    exec(compile(block, "README.md", "exec"), namespace)
    term = SimpleNamespace(params=SimpleNamespace(attentions=True))
    student, teacher = namespace["tap_requests"](term)
    assert student == teacher == TapRequest(hidden_states=True, attentions=True)


def test_readme_shows_how_to_ship_several_losses_in_one_package():
    text = README.read_text()
    assert "**Several losses in one package.**" in text
    assert "declare one entry point for the module" in text
