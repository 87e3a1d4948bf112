"""Ctrl-C in ``distillkit study``: one line, exit 130, no traceback; running it again resumes."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml

from distillkit.run.checkpoint import list_checkpoints
from distillkit.study.execution import _leave_ctrl_c_to_main, _stop_workers
from tests.distill_fixtures import tiny_config


def _write_study(tmp_path: Path) -> Path:
    base = tiny_config(tmp_path, steps=40, save_every=2, report_to=[])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    study = {
        "base": "base.yaml",
        "variants": {"kd": [{"loss": "kd"}], "ce": [{"loss": "ce"}]},
        "seeds": [0],
        "output_dir": str(tmp_path / "study"),
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def _study(path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [sys.executable, "-m", "distillkit.cli", "study", str(path), "--jobs", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches every process
    )


def test_ctrl_c_stops_a_parallel_study_with_one_line_and_running_it_again_resumes(tmp_path):
    path = _write_study(tmp_path)
    study = _study(path)
    runs = [tmp_path / "study" / variant / "seed-0" / "checkpoints" for variant in ("kd", "ce")]
    deadline = time.monotonic() + 300
    while not any(list_checkpoints(r) for r in runs) and study.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(study.pid, signal.SIGINT)
    out, err = study.communicate(timeout=120)
    assert study.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == (
        "distillkit: study interrupted; finished runs are kept and each interrupted run resumes from its "
        f"last checkpoint: continue with: distillkit study {path}"
    )
    again = _study(path)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "| kd |" in out and "| ce |" in out


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_stopping_the_workers_ends_running_and_queued_runs():
    pool = ProcessPoolExecutor(
        max_workers=2, mp_context=get_context("spawn"), initializer=_leave_ctrl_c_to_main
    )
    futures = [pool.submit(_sleep, 60) for _ in range(4)]
    while not any(f.running() for f in futures):
        time.sleep(0.05)
    processes = list(pool._processes.values())
    started = time.monotonic()
    _stop_workers(pool)
    for process in processes:
        process.join(timeout=30)
    assert all(not p.is_alive() for p in processes)
    assert time.monotonic() - started < 30
    assert sum(f.cancelled() for f in futures) >= 2  # the queued ones never start
