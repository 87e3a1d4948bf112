"""Per-process memory of ``train.strategy: ddp`` against ``fsdp`` (with and without teacher offload).

Each variant is one ``python -m torch.distributed.run --nproc_per_node=N`` launch of this file's worker: it
builds the run of ``configs/lm.yaml`` (SmolLM2-135M-Instruct teacher, de-quantised to float32) with a
``--student-layers``-layer student, places and shards the models as the strategy does, trains ``--steps``
steps and reports, per process:

- the bytes it holds of the student's (and the objective's) parameters, their gradients (one per trainable
  parameter, the size of its shard) and AdamW's state after the steps, and of the teacher's parameters
  (device / host-offloaded): shards count as their own size, replicated tensors whole;
- its resident memory once the models are placed, and the peak of resident memory during the steps above
  it (``VmHWM`` after resetting the mark). The processes run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at
  64 KiB, so every tensor of more than 64 KiB is its own mapping, given back to the system when freed, and
  resident memory follows what is live (with the default, adaptive threshold the full weights every process
  reads before sharding stay resident as free heap after they are freed).

The driver prints one markdown table. On a CPU-only machine the "device" is the CPU, so teacher offload
moves nothing (the shards already are in host memory): it shows in the table only where they are counted.

Usage (12 minutes on a 2-core CPU shared with other jobs, 4 minutes of CPU time; the reduced run in
``tests/run/test_fsdp.py`` takes under one)::

    python benchmarks/fsdp_memory.py                                  # 2 processes, 15-layer student
    python benchmarks/fsdp_memory.py --processes 2 --student-layers 15 --steps 2 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"ddp": ["train.strategy=ddp"], "fsdp": ["train.strategy=fsdp"]}
VARIANTS["fsdp + teacher offload"] = [*VARIANTS["fsdp"], "train.fsdp.teacher_offload=true"]
MIB = 2**20


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(config_path: str, overrides: Sequence[str], steps: int, out: Path) -> None:
    """One process of a variant: build, place, train ``steps`` steps, write this rank's measurements."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from distillkit.bench.harness import peak_rss_growth
    from distillkit.config import load_config
    from distillkit.run.loop import TrainingLoop
    from distillkit.run.run import Run
    from distillkit.run.sharding import per_process_bytes

    config = load_config(config_path, overrides)
    run = Run.from_config(config, announce=False)
    loop = TrainingLoop(run)
    loop.start()
    resident = _status_mib("VmRSS")
    peak = peak_rss_growth(lambda: [loop.step() for _ in range(steps)])
    trainable = [p for p in loop.model.parameters() if p.requires_grad]
    state = [v for s in loop.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]

    def local_device(t: torch.Tensor) -> str:
        return (t.to_local() if isinstance(t, DTensor) else t).device.type

    teacher = list(loop.teacher.parameters())
    host = {id(t) for t in teacher if local_device(t) == "cpu" and loop.device.type != "cpu"}
    record = {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "student_params": per_process_bytes(trainable) / MIB,
        "student_grads": per_process_bytes(trainable) / MIB,
        "optimizer_state": per_process_bytes(state) / MIB,
        "teacher_device": per_process_bytes([t for t in teacher if id(t) not in host]) / MIB,
        "teacher_host": per_process_bytes([t for t in teacher if id(t) in host]) / MIB,
        "resident": resident,
        "step_peak": peak / MIB,
        "final_loss": loop.last_values.losses["total"],
    }
    loop.finish()
    out.with_name(f"{out.stem}-rank{record['rank']}.json").write_text(json.dumps(record))


def launch(processes: int, overrides: Sequence[str], steps: int, out: Path, config: str) -> list[dict]:
    """Runs one variant in ``processes`` processes; returns each rank's record."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += [__file__, "--worker", "--out", str(out), "--steps", str(steps), "--config", config]
    command += [arg for o in overrides for arg in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return [json.loads(p.read_text()) for p in sorted(out.parent.glob(f"{out.stem}-rank*.json"))]


def table(results: dict[str, list[dict]]) -> str:
    """The markdown table of every variant's ranks."""
    head = (
        "| strategy | rank | student params | grads | AdamW state | params+grads+state | teacher (device) "
        "| teacher (host) | resident after placing | step peak above it | final loss |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, records in results.items():
        for r in records:
            total = r["student_params"] + r["student_grads"] + r["optimizer_state"]
            lines.append(
                f"| {name} | {r['rank']} | {r['student_params']:.1f} | {r['student_grads']:.1f} "
                f"| {r['optimizer_state']:.1f} | {total:.1f} | {r['teacher_device']:.1f} "
                f"| {r['teacher_host']:.1f} | {r['resident']:.0f} | {r['step_peak']:.0f} "
                f"| {r['final_loss']:.4f} |"
            )
    return "\n".join(lines) + "\n\n(MiB per process)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "lm.yaml"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--student-layers", type=int, default=15)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--json", type=Path, help="also write every record to this file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.config, args.overrides, args.steps, args.out)
        return 0
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as scratch:
        common = [
            f"student.layers={args.student_layers}",
            f"train.batch_size={args.batch_size}",
            f"data.max_length={args.max_length}",
            "data.max_train_examples=400",
            "data.max_eval_examples=20",
            f"train.steps={args.steps + 1}",
            "train.eval_every=null",
            "train.save_every=null",
            "train.progress=false",
            "train.tensorboard=false",
            "train.precision=fp32",
            f"output_dir={scratch}/run",
            *args.overrides,
        ]
        results = {}
        for name in args.variants.split(","):
            out = Path(scratch) / name.replace(" ", "_").replace("+", "plus")
            results[name] = launch(args.processes, [*common, *VARIANTS[name]], args.steps, out, args.config)
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
