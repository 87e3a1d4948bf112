"""The CPU table of benchmarks/RESULTS.md: membank InfoNCE variants on the target cases.

Times forward + backward of the naive, chunked-reference and compiled forms (gather+bmm instead of naive for
``negative_index``), the machine's sgemm rate and each variant's peak extra memory; the method is in
:mod:`distillkit.bench.infonce`. ``distillkit bench --op`` runs
the same measurement over a range of bank sizes.

Usage (the CPU extension built in place first)::

    python benchmarks/cpu_bench.py --repeats 5
    python benchmarks/cpu_bench.py --repeats 3 --threads 1 --no-memory --case D768 --case "D128 K64k"
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

try:
    import distillkit  # noqa: F401
except ImportError:  # run from a checkout that is not installed: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillkit.bench.infonce import Case, format_table, measure  # noqa: E402

# The cases the targets in benchmarks/RESULTS.md are stated for.
TARGET_CASES: tuple[Case, ...] = (
    Case("dense B256 D128 K64k", batch=256, dim=128, negatives=65536),
    Case("dense B128 D768 K64k", batch=128, dim=768, negatives=65536),
    Case("dense B256 D128 K256k", batch=256, dim=128, negatives=262144),
    Case("index B64 D128 K16k N50k", batch=64, dim=128, negatives=16384, rows=50000),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the benchmark table for the target cases."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/cpu_bench.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median is shown)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--case", action="append", help="only cases whose name contains this text")
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of a table")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in TARGET_CASES if not args.case or any(s in c.name for s in args.case)]
    rows = measure(cases, repeats=args.repeats, memory=not args.no_memory)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
