"""Every config in ``configs/`` validates, and its objective builds against its models' configs."""

from pathlib import Path

import pytest
import yaml

from distillkit.config import load_config
from distillkit.models import load_tokenizer
from distillkit.run.run import build_objective
from distillkit.study import load_study
from distillkit.tasks import make_task

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _is_study(path: Path) -> bool:
    return "variants" in yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if not _is_study(p)], ids=lambda p: p.name)
def test_a_shipped_distill_config_builds_its_objective(path):
    config = load_config(path)
    task = make_task(config)
    data = task.load_data(load_tokenizer(config.teacher))
    objective = build_objective(config, task, data)  # checks every term against the models' sizes, no weights
    assert len(objective.terms) == len(config.objective)


@pytest.mark.parametrize("path", [p for p in CONFIGS if _is_study(p)], ids=lambda p: p.name)
def test_a_shipped_study_validates_every_run(path):
    study, runs = load_study(path)
    assert len(runs) == len(study.variants) * len(study.seed_list)
