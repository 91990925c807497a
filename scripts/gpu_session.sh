#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as ONE command that ends within 9 minutes on an H200: the CUDA
# parity tests first, then the kernel, decode and offload benchmarks at the shapes of the targets of
# issues 4, 5 and 8 (docs/benchmarks.md, "GPU figures"), with grids trimmed to fit.
#
#   OUT=/some/folder scripts/gpu_session.sh            # run it (OUT: the device runner's $OUT)
#   scripts/gpu_session.sh --dry-run                   # print every command, its timeout and the budget
#   DRY_RUN=1 scripts/gpu_session.sh                   # the same
#
# Every section runs under its own `timeout` (then a kill after KILL_GRACE_S), so a slow section ends
# at its limit and the ones after it still run; the limits, the graces and a reserve for the script's
# own work sum to at most 9 minutes (BUDGET_S), so the whole does too. Triton and inductor compile at first use on a fresh machine: that
# time falls inside each section's limit, and the summary records each section's wall time.
#
# Results, at most 8 files, 2 folders deep (what the device runner brings back): $OUT/summary.md (one
# markdown summary that docs/benchmarks.md can take as it is), $OUT/log.txt (every section's full
# output) and one folder per benchmark with its JSON. Without $OUT: ./gpu-results.
#
# The machine has no network: the project is installed without dependencies and without build
# isolation, over the image's own torch 2.11, triton 3.6 and transformers 5.17 (Python 3.12), and
# nothing there needs `datasets` or `lm-eval`.
#
# GPU_SESSION_PLAN=file replaces the plan below with the file's `name|timeout_s|command` lines (the
# tests use it to check the timeouts; it also runs a subset).
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=540      # 9 minutes: the sections' limits and kill graces, plus RESERVE_S, stay within it
KILL_GRACE_S=5    # after a section's limit, SIGTERM; after this grace, SIGKILL
RESERVE_S=10      # the script's own work between sections (the xdist probe, the summary)
PY=${PYTHON:-python3}
DS="$PY -m doublesparse.cli"
DRY_RUN=${DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-./gpu-results}

# name|timeout_s|command. Sizing notes are ESTIMATES for a fresh H200 (nothing here was measured on
# one): they set the limits, never a figure in the docs.
PLAN="
install|45|$PY -m pip install -q --no-deps --no-build-isolation --no-index -e .
environment|15|nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv && $PY -c 'import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())'
tests-gpu|50|$PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu tests
tests-kernels|75|$PY -m pytest -q -p no:cacheprovider -m 'not gpu' \$XDIST tests/kernels/test_label_append.py tests/kernels/test_label_scores.py tests/kernels/test_selection.py tests/kernels/test_sparse_attention.py tests/kernels/test_dense_attention.py tests/kernels/test_attention_extensions.py tests/kernels/test_end_to_end.py
bench-kernels|60|$DS bench kernels --batch 8 --contexts 32K,64K,128K --budgets 1/16 --label-bits 16,4 --repeats 20 --warmup 3 --no-plot --no-progress --out-dir $OUT/bench-kernels
decode-32k-eager|40|$DS bench decode --config llama-3.1-8b --context 32K --batch 8 --steps 6 --warmup 2 --no-plot --no-progress --out-dir $OUT/decode-32k-eager
decode-32k|95|$DS bench decode --config llama-3.1-8b --context 32K --batch 8 --steps 8 --warmup 3 --compile --compile-mode reduce-overhead --no-plot --no-progress --out-dir $OUT/decode-32k
decode-128k|60|$DS bench decode --config llama-3.1-8b --context 128K --batch 4 --steps 8 --warmup 3 --compile --compile-mode reduce-overhead --no-plot --no-progress --out-dir $OUT/decode-128k
offload-256k|40|$DS bench offload --config llama-3.1-8b --context 256K --batch 1 --methods ds_offload,full_offload --steps 4 --warmup 2 --no-plot --no-progress --out-dir $OUT/offload-256k
"
# Estimates behind the limits (a fresh machine, caches cold):
# - install: an editable install without dependencies, seconds.
# - tests-gpu: the 7 model-shape parity tests, a few Triton compiles each (~10 s apiece at most); a test
#   module that cannot import there (a missing package) does not stop the others.
# - tests-kernels: ~320 parity cases on CUDA; compiling is most of it, spread over 8 pytest-xdist workers
#   where the image has xdist (it lists pytest-xdist), else one process (then the limit cuts it short and
#   the log says how far it got).
# - bench-kernels: 3 contexts x (SDPA, dense, 2 label widths x 6 timed functions) x 23 calls of 1-20 ms,
#   plus the compiles of each kernel specialisation.
# - decode: Llama-3.1-8B shapes (16 GB of bf16 weights). 32K x batch 8 holds 34 GB of K/V; 128K runs at
#   batch 4 (69 GB), since batch 8 (137 GB of K/V) does not fit in the H200's memory with the weights.
#   The eager run gives a figure even if compiling does not fit its limit; the compiled runs capture CUDA
#   graphs (inductor compiles the 32-layer step once per method and shape).
# - offload-256k: 32 GB of bf16 K/V in pinned host memory, drawn on the device; 4 timed steps a method.
if [ -n "${GPU_SESSION_PLAN:-}" ]; then PLAN=$(cat "$GPU_SESSION_PLAN"); fi

total=$RESERVE_S
while IFS='|' read -r name limit command; do
  [ -z "$name" ] && continue
  total=$((total + limit + KILL_GRACE_S))
done <<<"$PLAN"

if [ "$DRY_RUN" = 1 ]; then
  printf 'PLAN\t%s\t%s\t%s\n' name timeout_s command
  while IFS='|' read -r name limit command; do
    [ -z "$name" ] && continue
    printf 'PLAN\t%s\t%s\t%s\n' "$name" "$limit" "$command"
  done <<<"$PLAN"
  printf 'BUDGET\t%s\t%s\t(the limits, %s s of kill grace each and %s s for the script; 9 minutes = %s s)\n' \
    "$total" "$BUDGET_S" "$KILL_GRACE_S" "$RESERVE_S" "$BUDGET_S"
  [ "$total" -le "$BUDGET_S" ] || { echo "the plan's limits exceed the budget" >&2; exit 1; }
  exit 0
fi
[ "$total" -le "$BUDGET_S" ] || { echo "the plan's limits ($total s) exceed the budget ($BUDGET_S s)" >&2; exit 1; }

mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
XDIST=""
$PY -c 'import xdist' 2>/dev/null && XDIST="-n 8"
export XDIST
log="$OUT/log.txt"
summary="$OUT/summary.md"
section_out="$OUT/.section.txt"
: >"$log"
rows=""
details=""
started=$(date +%s)
while IFS='|' read -r name limit command; do
  [ -z "$name" ] && continue
  command=${command//\$XDIST/$XDIST}
  echo "== $name (limit $limit s): $command" | tee -a "$log"
  begin=$(date +%s)
  timeout -k "$KILL_GRACE_S" "$limit" bash -c "$command" >"$section_out" 2>&1
  status=$?
  wall=$(( $(date +%s) - begin ))
  cat "$section_out" >>"$log"
  case $status in
    0) verdict="ok" ;;
    124|137) verdict="**stopped at its limit** ($limit s)" ;;
    *) verdict="failed (exit $status)" ;;
  esac
  echo "   $verdict, $wall s" | tee -a "$log"
  rows+="| $name | $limit | $wall | $verdict |"$'\n'
  details+=$'\n'"### $name"$'\n\n'"\`$command\` ($verdict, $wall s)"$'\n\n```\n'"$(tail -n 30 "$section_out")"$'\n```\n'
done <<<"$PLAN"
rm -f "$section_out"

commit=$(git rev-parse --short HEAD 2>/dev/null || echo "${COMMIT:-unknown}")
{
  echo "## GPU session of $(date -u +%Y-%m-%d), commit $commit"
  echo
  echo "Measured by \`OUT=... scripts/gpu_session.sh\` on this machine (one command, $(( $(date +%s) - started )) s):"
  echo
  echo '```'
  grep -A3 '^== environment' "$log" | tail -n 3
  echo '```'
  echo
  echo "| section | limit s | wall s | result |"
  echo "|---|---:|---:|---|"
  printf '%s' "$rows"
  echo
  echo "Each section's last lines follow (full output in log.txt, JSON beside this file):"
  printf '%s\n' "$details"
} >"$summary"
cat "$summary"
