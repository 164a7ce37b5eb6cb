#!/usr/bin/env bash
# Compile-only check of the torch-free CUDA kernel translation units (csrc/*.cu) for sm_80 and sm_90a,
# one at a time (the CI machine has 2 cores). Exits non-zero if any fails.
# Usage: .ci/compile_csrc.sh [-v]    -v: add the ptxas register / spill report
set -u
cd "$(dirname "$0")/.."
nvcc=${NVCC:-nvcc}
command -v "$nvcc" >/dev/null || { echo "compile_csrc: $nvcc not found" >&2; exit 2; }
out=$(mktemp -d /tmp/ek_csrc.XXXXXX)
trap 'rm -rf "$out"' EXIT
report=()
[[ "${1:-}" == "-v" ]] && report=(-Xptxas -v)
status=0
for arch in sm_80 sm_90a; do
  for tu in csrc/*.cu; do
    start=$SECONDS
    if "$nvcc" -std=c++17 -O3 -arch="$arch" "${report[@]}" -c "$tu" -o "$out/$(basename "$tu" .cu).$arch.o"; then
      echo "compile_csrc: ok   $tu $arch ($((SECONDS - start)) s)"
    else
      echo "compile_csrc: FAIL $tu $arch"
      status=1
    fi
  done
done
exit $status
