"""Build script for distillkit.

The pure-Python framework installs everywhere. The compiled ops are built when torch is importable at build
time: the CPU extension (``distillkit._C``: every op's schema and CPU kernel) always, the CUDA extension
(``distillkit._C_cuda``: the CUDA kernels) only when torch was built with CUDA and ``nvcc`` is on the PATH.
Without them, each op falls back to its pure-PyTorch path.

Sources follow one layout per op, ``csrc/<op>/``: ``cpu_*.cpp`` go into the CPU extension, ``cuda_*.cu`` and
``cuda_*.cpp`` into the CUDA one; ``csrc/registration.cpp`` and ``csrc/cuda_module.cpp`` are the two modules.

``python setup.py --print-cuda-arch-list`` prints the CUDA arch list a build without a visible GPU uses (see
:func:`cuda_arch_list`); ``.ci/compile_cuda.sh`` compiles the kernels for the same list.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _arch(text: str) -> tuple[int, int] | None:
    """``sm_86`` / ``compute_86`` / ``8.6`` -> (8, 6); None for a name without a plain number (``sm_90a``)."""
    digits = text.split("_")[-1].replace(".", "")
    if not digits.isdigit() or len(digits) < 2:
        return None
    return int(digits[:-1]), int(digits[-1])


def _nvcc_archs() -> list[tuple[int, int]]:
    """The archs the ``nvcc`` on the PATH compiles for (``nvcc --list-gpu-arch``); empty without nvcc."""
    if shutil.which("nvcc") is None:
        return []
    listed = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
    return sorted({a for a in map(_arch, listed) if a is not None})


def _torch_accepts(arch: tuple[int, int]) -> bool:
    """Whether torch's extension builder takes ``arch`` in TORCH_CUDA_ARCH_LIST (it rejects unknown ones)."""
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags
    except ImportError:  # no torch, or a torch without that (private) helper: nvcc decides alone
        return True
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{arch[0]}.{arch[1]}"
    try:
        _get_cuda_arch_flags()
    except ValueError:
        return False
    finally:
        if previous is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    return True


def cuda_arch_list() -> str:
    """The TORCH_CUDA_ARCH_LIST for a build of the CUDA kernels that no visible GPU narrows down.

    The archs the installed torch runs on (the ``sm_*`` it was built for, read from torch without a GPU)
    when torch has CUDA; otherwise every arch the ``nvcc`` on the PATH knows, one per major version (its
    lowest minor: that binary runs on the whole family). Either list keeps only what nvcc compiles and
    torch's extension builder accepts. The oldest and the newest arch also embed PTX, so that every GPU
    newer than the oldest can JIT-compile the kernels, and GPUs newer than the list get the newest code.

    Returns:
        E.g. ``"7.5+PTX;8.0;8.6;9.0;10.0;12.0+PTX"``; empty when nothing qualifies.
    """
    try:
        import torch
    except ImportError:
        torch = None
    nvcc = set(_nvcc_archs())
    flags = (
        getattr(torch._C, "_cuda_getArchFlags", None) if torch is not None and torch.version.cuda else None
    )
    archs = set()
    if flags is not None:  # a CUDA build of torch: the archs it was built for
        archs = {a for a in map(_arch, (flags() or "").split()) if a is not None}
        archs = {a for a in archs if not nvcc or a in nvcc}
    if not archs:
        archs = {min(a for a in nvcc if a[0] == major) for major in {a[0] for a in nvcc}}
    archs = sorted(a for a in archs if _torch_accepts(a))
    names = [f"{major}.{minor}" for major, minor in archs]
    if names:
        names[0] += "+PTX"
        if len(names) > 1:
            names[-1] += "+PTX"
    return ";".join(names)


def _extensions():
    """Returns (ext_modules, cmdclass) for the compiled ops, or empty ones when torch is absent."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("distillkit: torch not importable at build time; skipping the compiled ops", file=sys.stderr)
        return [], {}

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    # Portable by default: a wheel built here must run on any x86-64/arm64 machine. DISTILLKIT_NATIVE_ARCH=1
    # tunes the build for this machine's CPU (its vector units) instead.
    if os.environ.get("DISTILLKIT_NATIVE_ARCH", "0") == "1":
        cxx_flags.append("-march=native")
    cpu_sources = [os.path.join("csrc", "registration.cpp")]
    cpu_sources += sorted(glob.glob(os.path.join("csrc", "*", "cpu_*.cpp")))
    extensions = []
    if os.path.exists(cpu_sources[0]):
        extensions.append(
            CppExtension(
                "distillkit._C",
                cpu_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-fopenmp"],
            )
        )

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*", "cuda_*.cu")))
    cuda_sources += sorted(glob.glob(os.path.join("csrc", "*", "cuda_*.cpp")))
    want_cuda = os.environ.get("DISTILLKIT_BUILD_CUDA", "auto")
    has_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if cuda_sources and want_cuda != "0" and (has_cuda or want_cuda == "1"):
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # No GPU to build for (torch would then build for the visible ones): every arch torch runs on.
            archs = cuda_arch_list()
            if archs:
                os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        extensions.append(
            CUDAExtension(
                "distillkit._C_cuda",
                [*cuda_sources, os.path.join("csrc", "cuda_module.cpp")],
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__" and sys.argv[1:] == ["--print-cuda-arch-list"]:
    print(cuda_arch_list())
    sys.exit(0)

ext_modules, cmdclass = _extensions()

setup(
    name="distillkit",
    version="0.1.0",
    description="Knowledge distillation for language models: every loss a plugin, the hot one compiled.",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["distillkit", "distillkit.*", "distillkit_plugins"]),
    install_requires=[
        "torch>=2.4",
        "pluggy>=1.3",
        "pyyaml>=6",
        "pydantic>=2.5",
        "transformers>=4.40",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "datasets>=2.14",
        "accelerate>=0.26",
        "matplotlib>=3.5",
        "scipy>=1.9",
    ],
    extras_require={
        # the trackers' tests run on real TensorBoard event files and a real MLflow file store
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "pytest-benchmark>=4",
            "numpy",
            "tensorboard",
            "mlflow-skinny",
        ],
        "tensorboard": ["tensorboard"],
        "tracking": ["tensorboard", "mlflow-skinny", "trackio", "wandb"],
        "dev": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4", "numpy", "ruff>=0.4", "ninja"],
    },
    entry_points={
        "console_scripts": ["distillkit = distillkit.cli:main"],
        "distillkit": [
            "l2 = distillkit_plugins.l2",
            "kd = distillkit_plugins.kd",
            "codir = distillkit_plugins.codir",
            "ce = distillkit_plugins.ce",
            "attention = distillkit_plugins.attention",
            "minilm_v2 = distillkit_plugins.minilm_v2",
            "cosine = distillkit_plugins.cosine",
            "pkd = distillkit_plugins.pkd",
            "uld = distillkit_plugins.uld",
            "gold = distillkit_plugins.gold",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
