"""One run per output directory: reruns are refused untouched, resumes are checked, overwrites are clean."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distillkit import cli
from distillkit.config import config_from_dict
from distillkit.run import Run, fit
from distillkit.run.checkpoint import checkpoint_run_id, list_checkpoints
from distillkit.run.output_dir import RUN_OUTPUTS, check_output_dir, read_run_record
from distillkit.run.runlog import read_jsonl
from tests.distill_fixtures import tiny_config


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> SHA-256 of its bytes), and every directory."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        found[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return found


def write_config(tmp_path: Path, name: str = "run.yaml", **train) -> tuple[Path, dict]:
    raw = tiny_config(tmp_path, report_to=[], **train)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path, raw


def distill_cli(config: Path, *extra: str) -> int:
    return cli.main(["distill", str(config), *extra])


@pytest.fixture
def finished_run(tmp_path):
    """The user's first run: 10 steps, a checkpoint every 2 (keep_last 2 keeps steps 8 and 10)."""
    config, raw = write_config(tmp_path, steps=10, save_every=2, keep_last=2)
    assert distill_cli(config) == 0
    out = Path(raw["output_dir"])
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000008", "step-00000010"]
    return config, raw, out


def refused(out: Path, capsys, *argv: str) -> str:
    """Runs ``distillkit distill ARGV``: it must exit 2 and leave every byte of ``out`` as it was."""
    before = tree_hashes(out)
    capsys.readouterr()
    assert cli.main(["distill", *argv]) == 2
    assert tree_hashes(out) == before
    return capsys.readouterr().err


def test_a_second_run_into_a_used_output_dir_is_refused_and_changes_nothing(finished_run, tmp_path, capsys):
    _, _, out = finished_run
    shorter, _ = write_config(tmp_path, "shorter.yaml", steps=4, save_every=2, keep_last=2)
    assert refused(out, capsys, str(shorter)) == (
        f"distillkit: error: output_dir '{out}' already holds a finished run (checkpoints/, metrics.jsonl, "
        "run.json, student/, summary.json); nothing was changed. Continue that run with --resume, replace it "
        "with --overwrite, or set output_dir to another directory\n"
    )


def test_resume_with_other_settings_names_what_differs_and_changes_nothing(finished_run, capsys):
    config, _, out = finished_run
    sets = ["--set", "objective.1.weight=0.25", "--set", "data.max_length=12"]
    err = refused(out, capsys, str(config), *sets, "--resume")
    assert err.startswith(f"distillkit: error: --resume: output_dir '{out}' holds a run of other settings: ")
    assert "data.max_length 16 -> 12; objective.1.weight 0.5 -> 0.25. Resume it with the config it ran" in err


def test_resuming_past_train_steps_is_refused_and_changes_nothing(finished_run, capsys):
    config, _, out = finished_run
    assert refused(out, capsys, str(config), "--set", "train.steps=5", "--resume") == (
        f"distillkit: error: --resume: the last checkpoint {out / 'checkpoints' / 'step-00000010'} is at "
        "step 10, past train.steps=5; set train.steps to at least 10 to continue that run, or start anew "
        "with --overwrite\n"
    )


def test_overwrite_replaces_the_previous_run_and_keeps_only_the_new_checkpoints(finished_run, tmp_path):
    config, raw, out = finished_run
    old_id = read_run_record(out)["run_id"]
    (out / "notes.txt").write_text("mine", encoding="utf-8")  # not a run output: left alone
    shorter, _ = write_config(tmp_path, "shorter.yaml", steps=4, save_every=1, keep_last=2)
    assert distill_cli(shorter, "--overwrite") == 0
    new_id = read_run_record(out)["run_id"]
    assert new_id != old_id
    checkpoints = list_checkpoints(out / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000003", "step-00000004"]
    assert {checkpoint_run_id(p) for p in checkpoints} == {new_id}
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_resume_continues_the_same_run(tmp_path):
    config, raw = write_config(tmp_path, steps=6, save_every=2)
    from distillkit.run import distill

    distill(config_from_dict(raw), stop_after_step=3)
    out = Path(raw["output_dir"])
    first = read_run_record(out)["run_id"]
    assert distill_cli(config, "--resume") == 0
    assert read_run_record(out)["run_id"] == first
    assert {checkpoint_run_id(p) for p in list_checkpoints(out / "checkpoints")} == {first}


def test_pruning_never_touches_another_runs_checkpoints(tmp_path):
    # the API does not guard the directory: fit() into a directory holding another run's checkpoints
    raw = tiny_config(tmp_path, steps=10, save_every=2, keep_last=2, report_to=[])
    fit(Run.from_config(config_from_dict(raw)))
    out = Path(raw["output_dir"])
    old = {p.name: checkpoint_run_id(p) for p in list_checkpoints(out / "checkpoints")}
    assert list(old) == ["step-00000008", "step-00000010"]
    raw["train"].update(steps=5, save_every=1)
    loop_result = fit(Run.from_config(config_from_dict(raw)))
    assert loop_result.step == 5
    after = {p.name: checkpoint_run_id(p) for p in list_checkpoints(out / "checkpoints")}
    assert {k: after[k] for k in old} == old  # the other run's checkpoints are all still there
    new = [k for k in after if k not in old]
    assert new == ["step-00000004", "step-00000005"] and len({after[k] for k in new} - set(old.values())) == 1


def test_everything_a_run_writes_is_a_run_output(finished_run):
    _, _, out = finished_run
    assert {p.name for p in out.iterdir()} <= set(RUN_OUTPUTS)


def test_inputs_inside_the_output_dir_do_not_make_it_used(tmp_path):
    raw = tiny_config(tmp_path)
    out = Path(raw["output_dir"])
    raw["teacher"]["finetune"] = {"steps": 2, "cache_dir": str(out / "teachers")}
    (out / "teachers").mkdir(parents=True)
    check_output_dir(config_from_dict(raw))  # no error: only the config's own input is there
    (out / "metrics.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(Exception, match="already holds a run without checkpoints"):
        check_output_dir(config_from_dict(raw))


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    config, _ = write_config(tmp_path)
    with pytest.raises(SystemExit):
        distill_cli(config, "--resume", "--overwrite")
    assert "not allowed with argument" in capsys.readouterr().err


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(tmp_path):
    config, raw = write_config(tmp_path, steps=400, save_every=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "distillkit.cli", "distill", str(config), "--set", "train.lr=0.003"]
    victim = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = Path(raw["output_dir"]) / "checkpoints"
    deadline = time.monotonic() + 300
    while not list_checkpoints(checkpoints) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = err.strip().splitlines()
    last = list_checkpoints(checkpoints)[-1]
    assert lines[-1] == (
        f"distillkit: interrupted; the last checkpoint is {last}; continue with: distillkit distill {config} "
        "--set train.lr=0.003 --resume"
    )
    assert not any("distillkit: interrupted" in line for line in lines[:-1])
