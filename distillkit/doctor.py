"""``distillkit doctor``: the environment facts a bug report about the compiled ops needs.

Prints torch, CUDA and driver versions, each GPU, which compiled ops loaded for which devices, the CUDA
kernel's self-check per device (running it when it has not run yet), and the commands that verify the CUDA
kernel on this machine.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from typing import TextIO

import torch

VERIFY_COMMANDS = (
    "python -m pytest -q tests/ops/infonce/test_cuda_op.py tests/ops/infonce/test_selfcheck.py",
    "compute-sanitizer --tool memcheck python -m pytest -q -x tests/ops/infonce/test_cuda_op.py -k labels",
    "compute-sanitizer --tool racecheck python -m pytest -q -x tests/ops/infonce/test_cuda_op.py -k labels",
    "compute-sanitizer --tool synccheck python -m pytest -q -x tests/ops/infonce/test_cuda_op.py -k labels",
    "python -m pytest -q tests/cuda_emulation   # the same kernel emulated on the CPU (no GPU needed)",
)


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi not found)"
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else "unknown (nvidia-smi failed)"


def run_doctor(out: TextIO | None = None) -> int:
    """Prints the report to ``out`` (``sys.stdout`` at call time when None).

    Returns:
        0, or 1 when a CUDA device's self-check failed.
    """
    out = sys.stdout if out is None else out
    from distillkit import __version__
    from distillkit.ops import library
    from distillkit.ops.infonce import compiled, selfcheck

    def say(line: str = "") -> None:
        print(line, file=out)

    say(f"distillkit {__version__}")
    say(f"python {platform.python_version()} ({sys.executable})")
    say(f"platform {platform.platform()}")
    say(f"torch {torch.__version__}")
    cuda_build = torch.version.cuda
    say(f"torch CUDA build: {cuda_build or 'none (CPU-only torch)'}")
    has_cuda = torch.cuda.is_available()
    say(f"NVIDIA driver: {_driver_version() if has_cuda or cuda_build else 'n/a'}")
    if has_cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            say(
                f"GPU cuda:{i}: {props.name}, sm_{props.major}{props.minor}, "
                f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB"
            )
        say(f"torch arch list: {' '.join(torch.cuda.get_arch_list())}")
    else:
        say("GPU: no CUDA device")

    say()
    say("compiled extensions:")
    for name, status in library.extension_status().items():
        say(f"  {name}: {status}")
    say("compiled ops (device types with a kernel):")
    kernels = library.op_kernels()
    if not kernels:
        say("  none: every op uses its pure-PyTorch reference")
    for name, devices in kernels.items():
        say(f"  {name}: {', '.join(devices) or 'no device'}")

    say()
    policy = selfcheck.mode()
    say(f"CUDA kernel policy: {selfcheck.ENV}={policy}")
    status = 0
    if not has_cuda:
        say("self-check: not run (no CUDA device)")
    elif not library.has_kernel(compiled.OP_NAME, "cuda"):
        say("self-check: not run (distillkit._C_cuda is not built; the PyTorch reference is used on CUDA)")
    else:
        for i in range(torch.cuda.device_count()):
            device = f"cuda:{i}"
            key = selfcheck.result_key(device, selfcheck.kernel_uses_tf32(torch.device(device)))
            result = selfcheck.results().get(key) or selfcheck.run_check(torch.device(device))
            verdict = "PASS" if result.passed else "FAIL (the reference is used on this device)"
            say(
                f"self-check {key}: {verdict}; {result.cases} cases, worst "
                f"{result.max_error:.3g}x tolerance ({result.worst}), {result.seconds * 1e3:.0f} ms"
            )
            status |= 0 if result.passed else 1

    say()
    say("verify the CUDA kernel on this machine (from a source checkout):")
    for command in VERIFY_COMMANDS:
        say(f"  {command}")
    return status
