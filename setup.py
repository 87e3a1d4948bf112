"""Build script for distillkit.

The pure-Python framework installs everywhere. The compiled ops are built when torch is importable at build
time: the CPU extension (``distillkit._C``: every op's schema and CPU kernel) always, the CUDA extension
(``distillkit._C_cuda``: the CUDA kernels) only when torch was built with CUDA and ``nvcc`` is on the PATH.
Without them, each op falls back to its pure-PyTorch path.

Sources follow one layout per op, ``csrc/<op>/``: ``cpu_*.cpp`` go into the CPU extension, ``cuda_*.cu`` and
``cuda_*.cpp`` into the CUDA one; ``csrc/registration.cpp`` and ``csrc/cuda_module.cpp`` are the two modules.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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
            # No GPU to ask: sm_80, sm_90 and the newer archs this nvcc knows, plus PTX of the newest so
            # that GPUs newer still can JIT-compile the kernel.
            known = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
            archs = ["8.0", "9.0"] + [a for a in ("10.0", "12.0") if f"compute_{a.replace('.', '')}" in known]
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs) + "+PTX"
        extensions.append(
            CUDAExtension(
                "distillkit._C_cuda",
                [*cuda_sources, os.path.join("csrc", "cuda_module.cpp")],
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4", "numpy"],
        "tensorboard": ["tensorboard"],
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
