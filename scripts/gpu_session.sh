#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one call (a lent GPU machine gives about 30 minutes):
# the GPU parity tests, then the kernel, decode and offload benchmarks at the issues' target shapes.
# Usage (from the repository root, on the GPU machine): OUT=/some/folder scripts/gpu_session.sh [quick]
# Results: $OUT/pytest.txt, $OUT/bench-*/ (JSON and PNG of each benchmark), $OUT/summary.txt.
# The machine has no network: the project is installed without dependencies over its own torch,
# triton and transformers (see DESIGN.md, section 4).
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the results}
mode=${1:-full}
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --no-deps -e . >"$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv >"$OUT/gpu.txt" 2>&1

run() {  # run NAME COMMAND...: log to $OUT/NAME.txt, keep going on failure, note the exit code
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  "$@" >"$OUT/$name.txt" 2>&1
  echo "   exit $?" | tee -a "$OUT/summary.txt"
}

run pytest python -m pytest -q -x tests/test_kernels_label_append.py tests/test_kernels_label_scores.py \
  tests/test_kernels_selection.py tests/test_kernels_sparse_attention.py tests/test_kernels_dense_attention.py \
  tests/test_kernels_end_to_end.py tests/test_static_decoder.py tests/test_offload.py

if [ "$mode" = quick ]; then
  run bench-kernels doublesparse bench kernels --batch 8 --contexts 32K,64K --budgets 1/16 --label-bits 16,4 --no-progress --out-dir "$OUT/bench-kernels"
  run bench-decode doublesparse bench decode --config llama-3.1-8b --context 32K --batch 8 --compile --compile-mode reduce-overhead --no-progress --out-dir "$OUT/bench-decode"
  run bench-offload doublesparse bench offload --context 256K --batch 1 --no-progress --out-dir "$OUT/bench-offload"
else
  # Issue targets: dense kernel vs copy bandwidth at >= 32K; Double Sparsity at batch 8, 64K, 1/16, r=16
  # (int4 and fp16 labels); CUDA graph replay of the whole decode attention step.
  run bench-kernels doublesparse bench kernels --batch 8 --contexts 4K,16K,32K,64K,128K --no-progress --out-dir "$OUT/bench-kernels"
  # Llama-3.1-8B shapes, batch 8, 32K and 128K, budget 1/16: static decode, CUDA graphs, dense SDPA vs Double Sparsity.
  run bench-decode doublesparse bench decode --config llama-3.1-8b --context 32K,128K --batch 1,8 --compile --compile-mode reduce-overhead --no-progress --out-dir "$OUT/bench-decode"
  # 32K..256K, batch 1 and 8: Double Sparsity-Offload vs full-KV offload vs dense on the device.
  run bench-offload doublesparse bench offload --no-progress --out-dir "$OUT/bench-offload"
fi
tail -n 5 "$OUT/pytest.txt" >>"$OUT/summary.txt"
for name in bench-kernels bench-decode bench-offload; do
  echo "== $name (last lines)" >>"$OUT/summary.txt"
  tail -n 25 "$OUT/$name.txt" >>"$OUT/summary.txt"
done
cat "$OUT/summary.txt"
