#!/usr/bin/env bash
# The whole method of Ke et al. (IEEE TIP 2022), chained: stage 1, pseudo-masks, the multi-task
# stage with ĝ (separate), pseudo-masks again, the multi-task stage with g̃ (shared), evaluation.
#
#   ./run_pipeline.sh                           the offline CPU demo on synthetic data (~11 min)
#   ./run_pipeline.sh DATA_ROOT LABELED [OUT]   the VOC recipe, e.g. data/VOCdevkit/VOC2012 1464
#
# Environment: SEED (training seed, default 0), SPLIT_SEED (default 0), OUT (output folder,
# default runs/demo or runs/voc_LABELED), CONTROL=1 also trains the supervised-only control of the
# same total length (the demo's README figures), EXTRA (flags added to every training command).
# Each step is skipped when its output is complete and newer than its input, so an interrupted
# pipeline reruns from where it stopped. Ends with a table, also written to OUT/summary.json.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # the scripts' folder; paths given by the user stay relative to theirs

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
SEED=${SEED:-0}
SPLIT_SEED=${SPLIT_SEED:-0}
if [[ $# -eq 0 ]]; then
    DATA=data/demo/VOC2012
    OUT=${OUT:-runs/demo}
    LABELED=64
    python "$HERE/make_demo_data.py" --out "$DATA"
    # The CPU demo (README, "The offline demo"): the tiny U-Net from scratch, AdamW, 64-pixel images.
    COMMON=(--backbone tiny_unet --no-pretrained --optimizer adamw --head-lr-mult 1 --crop-size 64
            --scale-range 0.75 1.25 --workers 0 --device cpu --print-every 100)
    # Stage 1 runs to its plateau (the val mIoU printed every 500 steps flattens; CONTROL=1 checks it).
    STAGE1=(--lr 2e-3 --warmup 20 --batch-size 16 --iters 3000 --eval-every 500)
    MULTITASK=(--lr 1e-3 --batch-labeled 8 --batch-unlabeled 8 --iters 800 --eval-every 500)
    # No ImageNet weights to restart from: each multi-task stage continues from the stage before.
    INIT2=(--init "$OUT/stage1/checkpoint.pt")
    INIT3=(--init "$OUT/stage2/checkpoint.pt")
    CONTROL_ITERS=4600  # 3000 + 2 x 800
    PSEUDO=(--workers 0 --device cpu)
elif [[ $# -ge 2 ]]; then
    DATA=$1
    LABELED=$2
    OUT=${3:-${OUT:-runs/voc_$LABELED}}
    COMMON=()  # the scripts' defaults are the VOC recipe (README)
    STAGE1=()
    MULTITASK=()
    INIT2=()
    INIT3=()
    CONTROL_ITERS=""
    PSEUDO=()
else
    echo "error: give no arguments (the demo) or DATA_ROOT LABELED [OUT]; see ./run_pipeline.sh --help" >&2
    exit 2
fi
read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"
SPLIT=(--data-root "$DATA" --labeled "$LABELED" --split-seed "$SPLIT_SEED" --seed "$SEED")
mkdir -p "$OUT"

# Run a training step unless its metrics.json is newer than its input; resume a half-done one.
train() {  # train SCRIPT OUT_DIR INPUT_FILE ARGS...
    local script=$1 dir=$2 input=$3
    shift 3
    if [[ -f "$dir/metrics.json" && ( -z "$input" || "$dir/metrics.json" -nt "$input" ) ]]; then
        echo "== $dir: done, skipped"
        return
    fi
    local resume=()
    [[ -f "$dir/checkpoint.pt" ]] && resume=(--resume)
    echo "== $script -> $dir"
    python "$HERE/$script" "$@" --out "$dir" "${resume[@]}"
}

# Write pseudo-masks unless their stats.json is newer than the checkpoint that makes them.
pseudo() {  # pseudo CHECKPOINT OUT_DIR
    if [[ -f "$2/stats.json" && "$2/stats.json" -nt "$1" ]]; then
        echo "== $2: done, skipped"
        return
    fi
    echo "== stage2_pseudolabel.py -> $2"
    python "$HERE/stage2_pseudolabel.py" --checkpoint "$1" --out "$2" "${PSEUDO[@]}" --overwrite
}

train stage1_train.py "$OUT/stage1" "" "${SPLIT[@]}" "${COMMON[@]}" "${STAGE1[@]}" "${EXTRA_FLAGS[@]}"
pseudo "$OUT/stage1/checkpoint.pt" "$OUT/pseudo1"
train stage3_multitask.py "$OUT/stage2" "$OUT/pseudo1/stats.json" "${SPLIT[@]}" "${COMMON[@]}" "${MULTITASK[@]}" \
    --pseudo "$OUT/pseudo1" --aux-head separate "${INIT2[@]}" "${EXTRA_FLAGS[@]}"
pseudo "$OUT/stage2/checkpoint.pt" "$OUT/pseudo2"
train stage3_multitask.py "$OUT/stage3" "$OUT/pseudo2/stats.json" "${SPLIT[@]}" "${COMMON[@]}" "${MULTITASK[@]}" \
    --pseudo "$OUT/pseudo2" --aux-head shared "${INIT3[@]}" "${EXTRA_FLAGS[@]}"
pseudo "$OUT/stage3/checkpoint.pt" "$OUT/pseudo3"
if [[ "${CONTROL:-0}" == 1 && -n "$CONTROL_ITERS" ]]; then
    train stage1_train.py "$OUT/control" "" "${SPLIT[@]}" "${COMMON[@]}" "${STAGE1[@]}" --iters "$CONTROL_ITERS" "${EXTRA_FLAGS[@]}"
fi
python "$HERE/evaluate.py" --checkpoint "$OUT/stage3/checkpoint.pt" --json "$OUT/final_val.json" "${PSEUDO[@]}"

python - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def read(*parts):
    path = os.path.join(out, *parts)
    return json.load(open(path)) if os.path.exists(path) else None
val = {stage: read(stage, "metrics.json")["miou"] for stage in ["stage1", "stage2", "stage3"]}
rounds = {f"round{r}": read(f"pseudo{r}", "stats.json")["unlabeled"] for r in [1, 2, 3]}
summary = {"val_miou": val,
           "pseudo_miou": {r: s["miou"] for r, s in rounds.items()},
           "pseudo_uncertainty": {r: {k: s[k] for k in ["mean_max_prob", "mean_entropy", "confident_share"]}
                                  for r, s in rounds.items()}}
if read("control", "metrics.json"):
    summary["val_miou"]["supervised_control"] = read("control", "metrics.json")["miou"]
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(f"\n{'':34}{'val mIoU':>10}")
names = {"stage1": "stage 1 (supervised)", "stage2": "stage 2 (multi-task, separate head)",
         "stage3": "stage 3 (multi-task, shared head)", "supervised_control": "supervised only, same length"}
for key, value in summary["val_miou"].items():
    print(f"{names[key]:<36}{value:8.2f}")
print(f"\n{'pseudo-masks (unlabelled images)':<34}{'mIoU':>8}{'max-prob':>10}{'entropy':>9}{'>=0.9':>8}")
for r, s in rounds.items():
    print(f"{r + ' from ' + {'round1': 'stage 1', 'round2': 'stage 2', 'round3': 'stage 3'}[r]:<34}"
          f"{s['miou']:8.2f}{s['mean_max_prob']:10.3f}{s['mean_entropy']:9.3f}{100 * s['confident_share']:7.1f}%")
print(f"\nwritten to {out}/summary.json")
EOF
