#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc for sm_90 and sm_80 (no GPU or CUDA build of torch needed).
#
# The kernel files are torch-free by design, so this checks that they compile on any machine with nvcc.
# The binding (csrc/cuda/*.cpp) includes torch/ATen CUDA headers and is only compiled by setup.py when
# torch itself has CUDA; it cannot be checked here.
#
# Usage: bash .ci/compile_cuda.sh          (VERBOSE=1 also prints ptxas register / smem usage)
# Exits non-zero on any compile error; prints a one-line notice and exits 0 when nvcc is absent.
set -euo pipefail

cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "${NVCC}" ]]; then
  echo "compile_cuda: nvcc not found; skipping the CUDA compile check"
  exit 0
fi

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "compile_cuda: no csrc/cuda/*.cu sources"
  exit 0
fi

out_dir="$(mktemp -d)"
trap 'rm -rf "${out_dir}"' EXIT

archs=(90 80)
flags=(-std=c++17 -O3 --use_fast_math -Icsrc -Xcompiler -Wall -Werror all-warnings)
if [[ "${VERBOSE:-0}" == "1" ]]; then
  flags+=(-Xptxas -v)
fi

echo "compile_cuda: $("${NVCC}" --version | tail -n 1)"
status=0
for src in "${sources[@]}"; do
  for arch in "${archs[@]}"; do
    obj="${out_dir}/$(basename "${src}" .cu).sm_${arch}.o"
    if "${NVCC}" "${flags[@]}" -gencode "arch=compute_${arch},code=sm_${arch}" -c "${src}" -o "${obj}"; then
      echo "compile_cuda: ok   ${src} (sm_${arch})"
    else
      echo "compile_cuda: FAIL ${src} (sm_${arch})" >&2
      status=1
    fi
  done
done
exit "${status}"
