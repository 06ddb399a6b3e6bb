#!/usr/bin/env bash
# The whole method of Ke et al. (IEEE TIP 2022), chained: stage 1, pseudo-masks, the multi-task
# stage with ĝ (separate), pseudo-masks again, the multi-task stage with g̃ (shared), the last
# pseudo-masks, evaluation, a table (OUT/summary.json) and a picture of every round (OUT/rounds.png).
#
#   ./run_pipeline.sh                           the offline CPU demo on synthetic data (~10 min on 2 cores)
#   ./run_pipeline.sh DATA_ROOT LABELED [OUT]   the default recipe on VOC or Cityscapes, e.g. data/VOCdevkit/VOC2012 1464
#
# Environment:
#   SEED, SPLIT_SEED     training seed and split seed (default 0)
#   OUT                  output folder (default runs/demo, or runs/<dataset>_LABELED)
#   EXTRA                flags added to every training command, e.g. EXTRA="--amp --compile"
#   STAGE1_EXTRA         flags for stage 1 and its controls only, e.g. --strong-aug
#   MULTITASK_EXTRA      flags for the two multi-task stages only, e.g. "--batch-unlabeled 4 --w-sup 0.5"
#   CONTROL=1            also train the supervised controls of the method's total length: stage 1's
#                        recipe, and the same with the strong augmentation S
#   RESTART_FROM=STEP    clear STEP and every step after it first (stage1 pseudo1 stage2 pseudo2
#                        stage3 pseudo3 control control_strong)
# Each step records the recipe that made it (OUT/recipes/STEP.json: its flags, its input, the
# code). A rerun skips a finished step of the same recipe, resumes an interrupted one, and stops
# before a step whose recipe differs, saying which setting differs; nothing is overwritten.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # the scripts' folder; paths given by the user stay relative to theirs

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
SEED=${SEED:-0}
SPLIT_SEED=${SPLIT_SEED:-0}
if [[ $# -eq 0 ]]; then
    DATA=data/demo/VOC2012
    OUT=${OUT:-runs/demo}
    LABELED=64
    python "$HERE/make_demo_data.py" --out "$DATA"
    # The CPU demo (README, "The offline demo"): the tiny U-Net from scratch, AdamW, 48-pixel images.
    COMMON=(--backbone tiny_unet --no-pretrained --optimizer adamw --head-lr-mult 1 --crop-size 48
            --scale-range 0.75 1.25 --workers 0 --device cpu --print-every 100)
    # Stage 1 with the strong augmentation S, and a long warm-up that keeps a from-scratch start steady (README).
    STAGE1=(--lr 2e-3 --warmup 200 --batch-size 8 --iters 1500 --eval-every 500 --strong-aug)
    # A constant teacher decay: the authors' schedule reaches 0.999, a horizon longer than these short stages.
    MULTITASK=(--lr 2e-3 --batch-labeled 4 --batch-unlabeled 4 --iters 600 --eval-every 300 --ema-decay 0.99)
    # No ImageNet weights to restart from: each multi-task stage continues from the stage before.
    INIT2=(--init "$OUT/stage1/checkpoint.pt")
    INIT3=(--init "$OUT/stage2/checkpoint.pt")
    PSEUDO=(--workers 0 --device cpu)
elif [[ $# -ge 2 ]]; then
    DATA=$1
    LABELED=$2
    DATASET=$([[ -d "$DATA/leftImg8bit" ]] && echo cityscapes || echo voc)
    OUT=${3:-${OUT:-runs/${DATASET}_$LABELED}}
    COMMON=()  # the scripts' defaults are the VOC recipe (README); Cityscapes needs its own flags, in EXTRA
    STAGE1=()
    MULTITASK=()
    INIT2=()
    INIT3=()
    PSEUDO=()
else
    echo "error: give no arguments (the demo) or DATA_ROOT LABELED [OUT]; see ./run_pipeline.sh --help" >&2
    exit 2
fi
read -r -a EXTRA_FLAGS <<< "${EXTRA:-}"
read -r -a STAGE1_EXTRA_FLAGS <<< "${STAGE1_EXTRA:-}"
read -r -a MULTITASK_EXTRA_FLAGS <<< "${MULTITASK_EXTRA:-}"
SPLIT=(--data-root "$DATA" --labeled "$LABELED" --split-seed "$SPLIT_SEED" --seed "$SEED")
STEPS=(stage1 pseudo1 stage2 pseudo2 stage3 pseudo3 control control_strong)
if [[ -n "${RESTART_FROM:-}" ]]; then
    found=0
    for step in "${STEPS[@]}"; do
        [[ "$step" == "$RESTART_FROM" ]] && found=1
        if (( found )); then
            rm -rf "${OUT:?}/$step" "$OUT/recipes/$step.json"
        fi
    done
    (( found )) || { echo "error: RESTART_FROM=$RESTART_FROM is not a step; the steps: ${STEPS[*]}" >&2; exit 2; }
    echo "== cleared $RESTART_FROM and the steps after it in $OUT"
fi
mkdir -p "$OUT/recipes"  # after the checks above, so a mistyped RESTART_FROM leaves no folder behind

# Compare a step's recipe with the one recorded when it first made something (PRODUCT: its
# checkpoint or its source.json). Prints "new" (recording it) or "same"; for a different recipe,
# one line naming the setting that differs (and exits 1).
recipe() {  # recipe STEP PRODUCT INPUT_FILE SCRIPT ARGS...
    python - "$OUT" "$HERE" "$@" <<'EOF'
import hashlib, json, os, sys
out, here, step, product, input_file, script, *args = sys.argv[1:]
# Flags that change how a step runs, not what it makes.
RUNNING = {"--workers", "--print-every", "--eval-every", "--save-every", "--device", "--compile", "--channels-last",
           "--no-channels-last", "--batch-size" if script == "stage2_pseudolabel.py" else "", "--out", "--resume"}
def relocatable(path):  # paths inside OUT are recorded relative to it, so a run folder can move
    return os.path.join("$OUT", os.path.relpath(path, out)) if path.startswith(out.rstrip("/") + "/") else path
flags, name = {}, None
for token in args:
    if token.startswith("--"):
        name = token
        flags[name] = []
    elif name:
        flags[name].append(relocatable(token))
def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if path and os.path.exists(path) else None
recipe = {"script": script, "flags": {k: v for k, v in flags.items() if k not in RUNNING},
          "input": {relocatable(input_file): sha(input_file)} if input_file else {},
          "code": {f: sha(os.path.join(here, f)) for f in ["common.py", script]}}
path = os.path.join(out, "recipes", f"{step}.json")
how = f"use another OUT, or RESTART_FROM={step} to clear it and the steps after it"
if not os.path.exists(product):  # nothing made yet (or a first try that stopped at once): this recipe now
    json.dump(recipe, open(path, "w"), indent=2)
    print("new")
    sys.exit()
if not os.path.exists(path):
    sys.exit(f"error: {os.path.join(out, step)} exists but no recipe says how it was made; {how}")
old = json.load(open(path))
for flag in sorted(set(old["flags"]) | set(recipe["flags"])):
    if old["flags"].get(flag) != recipe["flags"].get(flag):
        def shown(v):
            return "absent" if v is None else " ".join([flag] + v)
        sys.exit(f"error: step {step} was made with {shown(old['flags'].get(flag))}, this run asks for "
                 f"{shown(recipe['flags'].get(flag))}; {how}")
if old["input"] != recipe["input"]:
    sys.exit(f"error: step {step} was made from another {next(iter(recipe['input']))}; {how}")
changed = [f for f in recipe["code"] if old["code"].get(f) != recipe["code"][f]]
if changed:
    sys.exit(f"error: step {step} was made by another version of {', '.join(changed)}; {how}")
print("same")
EOF
}

# Run a training step unless finished with the same recipe; resume an interrupted one.
train() {  # train STEP INPUT_FILE SCRIPT ARGS...
    local step=$1 input=$2 script=$3 dir="$OUT/$1" state
    shift 3
    state=$(recipe "$step" "$dir/checkpoint.pt" "$input" "$script" "$@") || exit 2
    if [[ "$state" == same && -f "$dir/metrics.json" ]]; then
        echo "== $dir: done, skipped"
        return
    fi
    local resume=()
    [[ -f "$dir/checkpoint.pt" ]] && resume=(--resume)
    echo "== $script -> $dir"
    python "$HERE/$script" "$@" --out "$dir" "${resume[@]}"
}

# Write pseudo-masks unless written with the same recipe; a rerun completes an interrupted step.
pseudo() {  # pseudo STEP CHECKPOINT
    local step=$1 checkpoint=$2 dir="$OUT/$1" state
    state=$(recipe "$step" "$dir/source.json" "$checkpoint" stage2_pseudolabel.py --checkpoint "$checkpoint" "${PSEUDO[@]}") || exit 2
    if [[ "$state" == same && -f "$dir/stats.json" ]]; then
        echo "== $dir: done, skipped"
        return
    fi
    echo "== stage2_pseudolabel.py -> $dir"
    python "$HERE/stage2_pseudolabel.py" --checkpoint "$checkpoint" --out "$dir" "${PSEUDO[@]}"
}

train stage1 "" stage1_train.py "${SPLIT[@]}" "${COMMON[@]}" "${STAGE1[@]}" "${EXTRA_FLAGS[@]}" "${STAGE1_EXTRA_FLAGS[@]}"
pseudo pseudo1 "$OUT/stage1/checkpoint.pt"
train stage2 "$OUT/pseudo1/source.json" stage3_multitask.py "${SPLIT[@]}" "${COMMON[@]}" "${MULTITASK[@]}" \
    --pseudo "$OUT/pseudo1" --aux-head separate "${INIT2[@]}" "${EXTRA_FLAGS[@]}" "${MULTITASK_EXTRA_FLAGS[@]}"
pseudo pseudo2 "$OUT/stage2/checkpoint.pt"
train stage3 "$OUT/pseudo2/source.json" stage3_multitask.py "${SPLIT[@]}" "${COMMON[@]}" "${MULTITASK[@]}" \
    --pseudo "$OUT/pseudo2" --aux-head shared "${INIT3[@]}" "${EXTRA_FLAGS[@]}" "${MULTITASK_EXTRA_FLAGS[@]}"
pseudo pseudo3 "$OUT/stage3/checkpoint.pt"
if [[ "${CONTROL:-0}" == 1 ]]; then
    # Supervised only, for as many steps as the whole method took: the paper's stage-1 recipe
    # (without S, even where the method's stage 1 had it), then the same with S.
    CONTROL_ITERS=$(python -c 'import json, sys; print(sum(json.load(open(f"{sys.argv[1]}/{s}/metrics.json"))["step"] for s in ["stage1", "stage2", "stage3"]))' "$OUT")
    PLAIN=()  # stage 1's flags without --strong-aug, and without its length (--iters or --epochs N)
    skip=0
    for flag in "${STAGE1[@]}" "${STAGE1_EXTRA_FLAGS[@]}"; do
        if (( skip )); then skip=0
        elif [[ "$flag" == --iters || "$flag" == --epochs ]]; then skip=1
        elif [[ "$flag" != --strong-aug ]]; then PLAIN+=("$flag")
        fi
    done
    CONTROL_ARGS=("${SPLIT[@]}" "${COMMON[@]}" "${PLAIN[@]}" "${EXTRA_FLAGS[@]}" --iters "$CONTROL_ITERS")
    train control "" stage1_train.py "${CONTROL_ARGS[@]}"
    train control_strong "" stage1_train.py "${CONTROL_ARGS[@]}" --strong-aug
fi
python "$HERE/evaluate.py" --checkpoint "$OUT/stage3/checkpoint.pt" --json "$OUT/final_val.json" "${PSEUDO[@]}"

python - "$OUT" "$DATA" "$HERE" <<'EOF'
import json, os, sys
out, data, here = sys.argv[1:]
sys.path.insert(0, here)
import common
def read(*parts):
    path = os.path.join(out, *parts)
    return json.load(open(path)) if os.path.exists(path) else None
val = {stage: read(stage, "metrics.json")["miou"] for stage in ["stage1", "stage2", "stage3"]}
for control in ["control", "control_strong"]:
    if read(control, "metrics.json"):
        val[control] = read(control, "metrics.json")["miou"]
rounds = {f"round{r}": read(f"pseudo{r}", "stats.json")["unlabeled"] for r in [1, 2, 3]}
summary = {"val_miou": val,
           "gain_over": {k: val["stage3"] - val[k] for k in ["stage1", "control", "control_strong"] if k in val},
           "pseudo_miou": {r: s["miou"] for r, s in rounds.items()},
           "pseudo_uncertainty": {r: {k: s[k] for k in ["mean_max_prob", "mean_entropy", "confident_share", "calibration_error"]}
                                  for r, s in rounds.items()}}
common.write_json(os.path.join(out, "summary.json"), summary)
names = {"stage1": "stage 1 (supervised)", "stage2": "stage 2 (multi-task, separate head)",
         "stage3": "stage 3 (multi-task, shared head)", "control": "supervised, same length",
         "control_strong": "supervised + S, same length"}
print(f"\n{'':38}{'val mIoU':>10}{'final gain':>12}")
for key, value in val.items():
    gain = f"{summary['gain_over'][key]:+12.2f}" if key in summary["gain_over"] else ""
    print(f"{names[key]:<38}{value:10.2f}{gain}")
print(f"\n{'pseudo-masks (unlabelled images)':<34}{'mIoU':>8}{'max-prob':>10}{'entropy':>9}{'>=0.9':>8}{'ECE':>7}")
for r, s in rounds.items():
    ece = f"{100 * s['calibration_error']:7.1f}" if s["calibration_error"] is not None else f"{'-':>7}"
    print(f"{r + ' from ' + {'round1': 'stage 1', 'round2': 'stage 2', 'round3': 'stage 3'}[r]:<34}"
          f"{s['miou']:8.2f}{s['mean_max_prob']:10.3f}{s['mean_entropy']:9.3f}{100 * s['confident_share']:7.1f}%{ece}")
# One picture of the run: the same unlabelled images, their truth and the pseudo-masks of every round.
description = common.describe_dataset(data)
unlabeled = open(os.path.join(out, "stage1", "unlabeled.txt")).read().split()
common.save_mask_sheet(os.path.join(out, "rounds.png"), description, common.preview_ids(unlabeled),
                       [("image", "image"), ("true mask", "truth")] +
                       [(f"round {r}", os.path.join(out, f"pseudo{r}")) for r in [1, 2, 3]])
print(f"\nwritten to {out}/summary.json; the rounds side by side in {out}/rounds.png")
EOF
