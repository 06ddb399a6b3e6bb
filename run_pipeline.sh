#!/usr/bin/env bash
# The whole method of Ke et al. (IEEE TIP 2022), chained: stage 1, pseudo-masks, the paper's stage 2
# (multi-task, ĝ: separate), pseudo-masks again, its stage 3 (multi-task, g̃: shared), the last
# pseudo-masks (to measure the last round), then the evaluation of the final model beside stage 1
# (and the controls). Every command is printed before it runs, so that it can be copied.
#
#   ./run_pipeline.sh                           the offline CPU demo on synthetic data (3-9 minutes on 2 cores)
#   ./run_pipeline.sh DATA_ROOT LABELED [OUT]   the default recipe on VOC, Cityscapes or your own data
#
# Environment:
#   SEED, SPLIT_SEED     training seed and split seed (default 0)
#   OUT                  output folder (default runs/demo, or runs/<data folder>_LABELED)
#   EXTRA                flags added to every training command, e.g. EXTRA="--amp --compile"
#   STAGE1_EXTRA         flags for stage 1 and the controls only, e.g. --strong-aug
#   MULTITASK_EXTRA      flags for the two multi-task stages only, e.g. "--batch-unlabeled 4 --w-sup 0.5"
#   CONTROL=1            also train the supervised controls, as long as the three stages together:
#                        stage 1's recipe without the strong augmentation S, and with it
#   LABEL_NEXT=DIR       the next labelling round, instead of drawing LABELED images: the labelled images of
#                        DIR (a round of pseudo-masks, e.g. runs/demo/pseudo3) and the first LABELED images
#                        of DIR/label_next.csv, which you have labelled since (OUT: DIR's run folder + _next)
#                          LABEL_NEXT=runs/demo/pseudo3 ./run_pipeline.sh           the demo, 64 more labels
#                          LABEL_NEXT=runs/mydata_50/pseudo3 ./run_pipeline.sh mydata 20
# A rerun skips what is finished and continues what was interrupted; each script refuses a step
# made with other flags, naming the flag, and never overwrites it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
[[ "$HERE" == "$(pwd)" ]] && S="" || S="$HERE/"  # the scripts' folder, as printed in the commands

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
    exit 0
fi
run() {  # print a command, shell-quoted, then run it
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    "$@"
}
SEED=${SEED:-0}
SPLIT_SEED=${SPLIT_SEED:-0}
NEXT_OUT=""  # the next labelling round's default output folder
[[ -n "${LABEL_NEXT:-}" ]] && NEXT_OUT="$(dirname "$LABEL_NEXT")_next"
if [[ $# -eq 0 ]]; then
    DATA=data/demo/VOC2012
    LABELED=64
    OUT=${OUT:-${NEXT_OUT:-runs/demo}}
    run python "${S}make_demo_data.py" --out "$DATA"
    # The CPU demo (docs/demo.md): the tiny U-Net from scratch with AdamW, on 48-pixel crops.
    COMMON=(--backbone tiny_unet --no-pretrained --optimizer adamw --lr 2e-3 --head-lr-mult 1 --crop-size 48
            --scale-range 0.75 1.25 --workers 0 --device cpu --print-every 100)
    # Stage 1 with the strong augmentation S and a long warm-up, which keeps a from-scratch start steady.
    STAGE1=(--warmup 200 --batch-size 8 --eval-every 500)
    STAGE1_LENGTH=(--iters 1500)
    STRONG=(--strong-aug)
    # A constant teacher decay: the authors' schedule reaches 0.999, a horizon longer than these short stages.
    MULTITASK=(--batch-labeled 4 --batch-unlabeled 4 --iters 600 --eval-every 300 --ema-decay 0.99)
    # No ImageNet weights to start from: each multi-task stage continues from the stage before.
    INIT2=(--init "$OUT/stage1")
    INIT3=(--init "$OUT/stage2")
    CPU=(--workers 0 --device cpu)
elif [[ $# -ge 2 ]]; then
    DATA=$1
    LABELED=$2
    OUT=${3:-${OUT:-${NEXT_OUT:-runs/$(basename "$DATA")_$LABELED}}}
    # The scripts' defaults are the VOC recipe; Cityscapes takes its flags in EXTRA (README).
    COMMON=() STAGE1=() STAGE1_LENGTH=() STRONG=() MULTITASK=() INIT2=() INIT3=() CPU=()
else
    echo "error: give no arguments (the demo) or DATA_ROOT LABELED [OUT]; see ./run_pipeline.sh --help" >&2
    exit 2
fi
read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"
read -r -a STAGE1_EXTRA_FLAGS <<< "${STAGE1_EXTRA:-}"
read -r -a MULTITASK_EXTRA_FLAGS <<< "${MULTITASK_EXTRA:-}"
TRAIN=("${COMMON[@]}" --seed "$SEED" "${EXTRA_FLAGS[@]}")
if [[ -n "${LABEL_NEXT:-}" ]]; then
    SPLIT=(--data-root "$DATA" --add-labeled "$LABEL_NEXT" "$LABELED")
else
    SPLIT=(--data-root "$DATA" --labeled "$LABELED" --split-seed "$SPLIT_SEED")
fi

run python "${S}stage1_train.py" "${SPLIT[@]}" "${TRAIN[@]}" "${STAGE1[@]}" "${STRONG[@]}" "${STAGE1_LENGTH[@]}" \
    "${STAGE1_EXTRA_FLAGS[@]}" --out "$OUT/stage1"
run python "${S}stage2_pseudolabel.py" --checkpoint "$OUT/stage1" --out "$OUT/pseudo1" "${CPU[@]}"
run python "${S}stage3_multitask.py" --pseudo "$OUT/pseudo1" --aux-head separate "${TRAIN[@]}" "${MULTITASK[@]}" \
    "${INIT2[@]}" "${MULTITASK_EXTRA_FLAGS[@]}" --out "$OUT/stage2"
run python "${S}stage2_pseudolabel.py" --checkpoint "$OUT/stage2" --out "$OUT/pseudo2" "${CPU[@]}"
run python "${S}stage3_multitask.py" --pseudo "$OUT/pseudo2" --aux-head shared "${TRAIN[@]}" "${MULTITASK[@]}" \
    "${INIT3[@]}" "${MULTITASK_EXTRA_FLAGS[@]}" --out "$OUT/stage3"
run python "${S}stage2_pseudolabel.py" --checkpoint "$OUT/stage3" --out "$OUT/pseudo3" \
    --previous "$OUT/pseudo1" "$OUT/pseudo2" "${CPU[@]}"

COMPARE=("$OUT/stage1")
if [[ "${CONTROL:-0}" == 1 ]]; then
    # Supervised only, as long as the three stages together: stage 1's recipe without S (the
    # paper's stage 1, even where the method's stage 1 had S), then the same with S.
    ITERS=$(python -c 'import json, sys; print(sum(json.load(open(p))["step"] for p in sys.argv[1:]))' \
        "$OUT"/stage{1,2,3}/metrics.json)
    PLAIN=()
    for flag in "${STAGE1_EXTRA_FLAGS[@]}"; do [[ "$flag" == --strong-aug ]] || PLAIN+=("$flag"); done
    CONTROL_FLAGS=("${SPLIT[@]}" "${TRAIN[@]}" "${STAGE1[@]}" "${PLAIN[@]}" --iters "$ITERS")
    run python "${S}stage1_train.py" "${CONTROL_FLAGS[@]}" --out "$OUT/control"
    run python "${S}stage1_train.py" "${CONTROL_FLAGS[@]}" --strong-aug --out "$OUT/control_strong"
    COMPARE+=("$OUT/control" "$OUT/control_strong")
fi
run python "${S}evaluate.py" --checkpoint "$OUT/stage3" --compare "${COMPARE[@]}" --json "$OUT/summary.json" "${CPU[@]}"
echo "the rounds side by side: $OUT/pseudo3/preview.png; the figures: $OUT/summary.json and $OUT/pseudo*/stats.json;"
echo "the images to label next: $OUT/pseudo3/label_next.csv and label_next.png"
