"""Executes study runs: one run in this process, or many in a pool of spawned processes.

A run records the identity it was started with (``study-run.json``) so a later study knows whether it may
resume it; a pool's workers leave Ctrl-C to the main process, which ends them (they resume from their last
checkpoint next time).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from distillkit.config import DistillConfig
from distillkit.study.spec import fingerprint, run_identity

RUN_RECORD = "study-run.json"
"""Written into every run directory: the identity (config and threads) the run was started with."""


def _start_run(config: DistillConfig, threads: int) -> bool:
    """Records the run's identity; returns whether it resumes from checkpoints."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = run_identity(config, threads)
    record = {"fingerprint": fingerprint(identity), "identity": identity}
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return (out / "checkpoints").is_dir()


def execute(config: DistillConfig, threads: int, log: Path | None) -> dict[str, Any]:
    """Runs one study run with ``threads`` CPU threads; its output goes to ``log`` when given."""
    import torch

    from distillkit.run.distill import distill

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    resume = _start_run(config, threads)
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if log is not None:
                handle = stack.enter_context(open(log, "a", encoding="utf-8"))
                stack.enter_context(contextlib.redirect_stdout(handle))
                stack.enter_context(contextlib.redirect_stderr(handle))
            summary = distill(config, resume=resume, overwrite=not resume)  # the study's own directory
    finally:
        torch.set_num_threads(previous)
    summary["study_seconds"] = time.perf_counter() - started
    (Path(config.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def run_parallel(
    pending: dict[str, DistillConfig],
    threads: int,
    jobs: int,
    tunes_teacher: str | None,
    done: int = 0,
    total: int | None = None,
) -> None:
    """Runs in ``jobs`` spawned processes, each run's output in ``<run>/study.log``.

    Args:
        pending: The runs to do, by run id.
        threads: Threads per run.
        jobs: Runs at once.
        tunes_teacher: A run to do alone first, because it fine-tunes (and caches) the teacher the others
            then load; None when the fine-tuned teacher is cached already.
        done: Runs of the study done before these (for the progress lines).
        total: Runs of the study to do in all (default: these).

    """
    total = len(pending) if total is None else total
    queue = [(run_id, config) for run_id, config in pending.items() if run_id != tunes_teacher]
    if tunes_teacher is not None:
        why = "it fine-tunes the shared teacher"
        done += 1
        print(f"[study {done}/{total}] {tunes_teacher}: running alone first ({why})")
        execute(pending[tunes_teacher], threads, None)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_leave_ctrl_c_to_main) as pool:
        futures = {}
        for run_id, config in queue:
            quiet = config.model_copy(update={"train": config.train.model_copy(update={"progress": False})})
            log = Path(config.output_dir) / "study.log"  # the run makes its directory when it starts
            futures[pool.submit(execute, quiet, threads, log)] = run_id
        try:
            _collect(futures, pending, done, total)
        except KeyboardInterrupt:
            _stop_workers(pool)
            raise


def _leave_ctrl_c_to_main() -> None:
    """In a worker: Ctrl-C is the main process's to handle; its SIGTERM then ends the worker as an exit does.

    So no worker prints a traceback, and each releases what it holds (semaphores, files) on the way out.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancels the runs not started and ends the running ones (they resume from their last checkpoint)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)  # joins the pool's own thread: its queues are released


def _collect(futures: dict, pending: dict[str, DistillConfig], done: int, total: int) -> None:
    """Waits for the runs, printing each as it finishes; a failed run cancels the others and raises."""
    remaining = set(futures)
    while remaining:
        finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
        for future in finished:
            done += 1
            run_id = futures[future]
            try:
                summary = future.result()
            except BaseException:
                print(
                    f"[study {done}/{total}] {run_id}: failed; its output is in "
                    f"{Path(pending[run_id].output_dir) / 'study.log'}",
                    file=sys.stderr,
                )
                for other in remaining:
                    other.cancel()
                raise
            print(f"[study {done}/{total}] {run_id}: finished in {summary['study_seconds']:.0f} s")
