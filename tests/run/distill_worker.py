"""Runs ``distill`` in each process of ``python -m torch.distributed.run`` (tests of multi-process runs).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/run/distill_worker.py CONFIG.yaml
[--stop-after-step N] [--resume]``; the command line offers no ``--stop-after-step`` (an interruption is
simulated here, with the checkpoint written).
"""

import argparse

from distillkit.config import load_config
from distillkit.run.distill import distill


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--stop-after-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    distill(load_config(args.config), resume=args.resume, stop_after_step=args.stop_after_step)


if __name__ == "__main__":
    main()
