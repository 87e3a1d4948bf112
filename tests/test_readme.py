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
