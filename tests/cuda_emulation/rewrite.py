"""Rewrites the CUDA-only syntax of a ``.cu`` file into C++ that compiles with ``cpusim.h``.

Two constructs have no C++ spelling: ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``::cpusim::launch(kernel, ::cpusim::LaunchCfg(grid, block, smem, stream), args)`` and
``extern __shared__ T name[];`` becomes a pointer to the block's dynamic shared memory. Everything else
(``__global__``, ``__syncthreads``, warp intrinsics, WMMA) is mapped by ``cpusim.h`` itself.

The rewrite keeps every line where it was, so ``__LINE__`` in the emulated file is the ``.cu`` line: the
mutation check names the barrier to delete by its line (``barrier_sites``, ``CPUSIM_SKIP_BARRIER_LINE``).

Usage: ``python rewrite.py kernels.cu > kernels.sim.cpp``.
"""

from __future__ import annotations

import re
import sys

_NAME = r"([A-Za-z_][A-Za-z0-9_:]*(?:<[A-Za-z0-9_:, ]+>)?)"
_CONFIG = r"<<<([^;]*?)>>>"  # a launch configuration never spans a statement
_LAUNCH_NO_ARGS = re.compile(_NAME + r"\s*" + _CONFIG + r"\s*\(\s*\)")
_LAUNCH = re.compile(_NAME + r"\s*" + _CONFIG + r"\s*\(")
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([A-Za-z_][A-Za-z0-9_ ]*?)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;"
)


def rewrite(source: str) -> str:
    """Returns ``source`` with kernel launches and ``extern __shared__`` arrays rewritten for cpusim."""
    source = _LAUNCH_NO_ARGS.sub(r"::cpusim::launch(\1, ::cpusim::LaunchCfg(\2))", source)
    source = _LAUNCH.sub(r"::cpusim::launch(\1, ::cpusim::LaunchCfg(\2), ", source)
    return _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::cpusim::dyn_smem());", source)


_BARRIER = re.compile(r"\b(__syncwarp|__syncthreads)\(\s*\)\s*;")


def barrier_sites(source: str, function: str) -> list[tuple[int, int, int, str]]:
    """Barrier statements in the body of the first definition of ``function``.

    Returns:
        ``(start, end, line, name)`` per ``__syncwarp();`` / ``__syncthreads();`` statement, in order.
    """
    match = re.search(r"\b" + re.escape(function) + r"\s*\([^;{]*\)\s*\{", source)
    if match is None:
        raise ValueError(f"no definition of {function} found")
    depth, end = 0, match.end() - 1
    for end in range(match.end() - 1, len(source)):
        depth += {"{": 1, "}": -1}.get(source[end], 0)
        if depth == 0:
            break
    return [
        (m.start(), m.end(), source.count("\n", 0, m.start()) + 1, m.group(1))
        for m in _BARRIER.finditer(source, match.end(), end)
    ]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python rewrite.py FILE.cu > FILE.sim.cpp", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        sys.stdout.write(rewrite(f.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
