#!/usr/bin/env bash
# Compiles every op's CUDA kernels (csrc/<op>/cuda_*.cu) with nvcc for the arch list a build without a
# visible GPU uses (`python setup.py --print-cuda-arch-list`: the archs the installed torch runs on, or with a
# CPU-only torch one arch per major version this nvcc knows, each accepted by torch's extension builder),
# with PTX embedded for the archs marked +PTX (the oldest and the newest), and fails on any register spill
# (ptxas -v) or on PTX missing from the object. No GPU or CUDA build of torch needed.
#
# The kernel files are torch-free by design, so this checks that they compile on any machine with nvcc.
# The bindings (csrc/<op>/cuda_*.cpp) include torch's CUDA headers and are only built by setup.py when torch
# has CUDA, so they cannot be compiled or linked here. As a best effort, when a torch with c10/cuda headers is
# importable (CPU wheels ship them), the binding gets a syntax-only check with g++ against a stub of the
# one header CUDA builds generate (c10/cuda/impl/cuda_cmake_macros.h), and so does the module file
# (csrc/cuda_module.cpp); set CHECK_BINDING=0 to skip it.
#
# Usage: bash .ci/compile_cuda.sh          (VERBOSE=1 also prints ptxas register / smem usage)
#        ARCHS="8.0+PTX;9.0" bash .ci/compile_cuda.sh   (another list, TORCH_CUDA_ARCH_LIST syntax)
# Exits non-zero on any compile error; prints a one-line notice and exits 0 when nvcc is absent.
set -euo pipefail

cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "${NVCC}" ]]; then
  echo "compile_cuda: nvcc not found; skipping the CUDA compile check"
  exit 0
fi

shopt -s nullglob
sources=(csrc/*/cuda_*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "compile_cuda: no csrc/*/cuda_*.cu sources"
  exit 0
fi

out_dir="$(mktemp -d)"
trap 'rm -rf "${out_dir}"' EXIT

PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi

arch_list="${ARCHS:-}"
if [[ -z "${arch_list}" ]]; then
  if [[ -z "${PYTHON}" ]] || ! arch_list="$(PATH="$(dirname "${NVCC}"):${PATH}" "${PYTHON}" setup.py \
    --print-cuda-arch-list)" || [[ -z "${arch_list}" ]]; then
    echo "compile_cuda: FAIL could not get the arch list from setup.py --print-cuda-arch-list" >&2
    exit 1
  fi
fi
read -r -a archs <<<"${arch_list//;/ }"
flags=(-std=c++17 -O3 --use_fast_math -Icsrc -Xcompiler -Wall -Werror all-warnings -Wno-deprecated-gpu-targets
  -Xptxas -v --no-compress)

echo "compile_cuda: $("${NVCC}" --version | tail -n 1)"
echo "compile_cuda: arch list ${arch_list}"
status=0
for src in "${sources[@]}"; do
  for entry in "${archs[@]}"; do
    arch="${entry%+PTX}"
    arch="${arch/./}"
    gencode=(-gencode "arch=compute_${arch},code=sm_${arch}")
    if [[ "${entry}" == *+PTX ]]; then gencode+=(-gencode "arch=compute_${arch},code=compute_${arch}"); fi
    obj="${out_dir}/$(tr / _ <<<"${src%.cu}").sm_${arch}.o"  # one name per op: their files share names
    log="${obj}.log"
    if "${NVCC}" "${flags[@]}" "${gencode[@]}" -c "${src}" -o "${obj}" >"${log}" 2>&1; then
      if [[ "${VERBOSE:-0}" == "1" ]]; then cat "${log}"; fi
      # What the object embeds: SASS per ptxas, PTX as text (the fatbinary is not compressed here).
      embedded="sm_${arch} SASS"
      ptx="$(grep -a -c "^\.target sm_${arch}\$" "${obj}" || true)"
      if [[ "${ptx}" -gt 0 ]]; then embedded+=" + compute_${arch} PTX"; fi
      # ptxas prints "N bytes spill stores, M bytes spill loads" per kernel; any N or M > 0 fails.
      spills="$(grep -E '[1-9][0-9]* bytes spill (stores|loads)' "${log}" || true)"
      if [[ -n "${spills}" ]]; then
        echo "compile_cuda: FAIL ${src} (sm_${arch}): register spills" >&2
        grep -E -B2 '[1-9][0-9]* bytes spill (stores|loads)' "${log}" >&2 || true
        status=1
      elif [[ "${entry}" == *+PTX && "${ptx}" -eq 0 ]]; then
        echo "compile_cuda: FAIL ${src} (sm_${arch}): no compute_${arch} PTX in the object" >&2
        status=1
      else
        echo "compile_cuda: ok   ${src} (${embedded}, $(grep -c 'spill stores' "${log}") kernels, no spills)"
      fi
    else
      cat "${log}" >&2
      echo "compile_cuda: FAIL ${src} (sm_${arch})" >&2
      status=1
    fi
  done
done

# Best-effort syntax check of the torch binding (see the header comment).
bindings=(csrc/*/cuda_*.cpp csrc/cuda_module.cpp)
if [[ "${CHECK_BINDING:-1}" == "1" && ${#bindings[@]} -gt 0 && -n "${PYTHON}" ]] &&
  torch_inc="$("${PYTHON}" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)" &&
  [[ -f "${torch_inc}/c10/cuda/CUDAGuard.h" ]]; then
  py_inc="$("${PYTHON}" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  cuda_inc=/usr/local/cuda/include
  for root in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "${NVCC}")")")"; do
    if [[ -n "${root}" && -f "${root}/include/cuda_runtime.h" ]]; then cuda_inc="${root}/include"; break; fi
  done
  mkdir -p "${out_dir}/stub/c10/cuda/impl"
  echo '#pragma once' >"${out_dir}/stub/c10/cuda/impl/cuda_cmake_macros.h"
  for src in "${bindings[@]}"; do
    if "${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra -Icsrc -isystem "${torch_inc}" \
      -isystem "${torch_inc}/torch/csrc/api/include" -isystem "${out_dir}/stub" -isystem "${py_inc}" \
      -isystem "${cuda_inc}" "${src}"; then
      echo "compile_cuda: ok   ${src} (syntax only, host compiler)"
    else
      echo "compile_cuda: FAIL ${src} (syntax only, host compiler)" >&2
      status=1
    fi
  done
else
  echo "compile_cuda: skipped the binding syntax check (no torch with c10/cuda headers)"
fi
exit "${status}"
